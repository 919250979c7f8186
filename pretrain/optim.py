"""AdamW with decoupled weight decay on matrices only, and the token-based LR schedule."""

import math

import torch
from torch import nn

from pretrain.config import Config


def build_optimizer(model: nn.Module, cfg: Config, fused: bool) -> torch.optim.Optimizer:
    o = cfg.training.optimizers
    # Norm gains (1-D) are not decayed: shrinking them towards 0 only fights the normalisation.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate after `step` optimizer steps: linear warmup over warmup_tokens, then cosine
    from optimizers.lr to scheduler.min_lr at the end of train_tokens."""
    peak, floor = cfg.training.optimizers.lr, cfg.training.scheduler.min_lr
    tokens = step * cfg.tokens_per_step()
    warmup = cfg.training.scheduler.warmup_tokens
    if tokens < warmup:
        return peak * (tokens + cfg.tokens_per_step()) / (warmup + cfg.tokens_per_step())
    if cfg.training.scheduler.type == "constant":
        return peak
    progress = min(1.0, (tokens - warmup) / max(1, cfg.training.train_tokens - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    peak = cfg.training.optimizers.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / peak)
