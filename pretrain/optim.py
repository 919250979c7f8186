"""AdamW with decoupled weight decay on matrices only, and the LR schedule."""

import math

import torch
import torch.distributed as dist
from torch import nn

from cromwell.pretrain.config import Config


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that leaves the weights alone when any rank holds a non-finite gradient.

    DeepSpeed's ZeRO and bf16 optimizers make this check (all ranks agreeing) and skip the step;
    its plain fp32 path (ZeRO-0) does not. `overflow` is what DeepSpeed's engine reads to count a
    skipped step and hold the LR schedule back.
    """

    overflow = False

    def step(self, closure=None):
        bad = torch.zeros((), dtype=torch.int32)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    bad.fill_(1)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.overflow = bool(bad)
        return None if self.overflow else super().step(closure)


def build_optimizer(model: nn.Module, cfg: Config, fused: bool, skip_nonfinite: bool = False) -> torch.optim.Optimizer:
    o = cfg.training.optimizer
    # Norm gains (1-D) are not decayed: shrinking them towards 0 only fights the normalisation.
    # A parameter partitioned by ZeRO-3 is an empty 1-D tensor; ds_shape is its real shape.
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in model.parameters()]
    decay = [p for p, m in zip(model.parameters(), matrix) if p.requires_grad and m]
    no_decay = [p for p, m in zip(model.parameters(), matrix) if p.requires_grad and not m]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cls = SkippingAdamW if skip_nonfinite else torch.optim.AdamW
    return cls(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate after `step` optimizer steps: linear warmup, then cosine (or linear) from
    optimizer.lr to scheduler.min_lr at the last step, or constant."""
    peak, floor = cfg.training.optimizer.lr, cfg.training.scheduler.min_lr
    total, warmup = cfg.train_steps(), cfg.warmup_steps()
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    kind = cfg.training.scheduler.type
    if kind == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1e-9, total - warmup))
    if kind == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    peak = cfg.training.optimizer.lr  # LambdaLR scales each group's initial lr, which is the peak
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / peak if peak else 0.0)
