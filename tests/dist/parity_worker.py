"""Trains a few steps through the trainer's own pieces and writes per-step losses, gradient norms,
the held-out losses of the trained model (on the first global batch again) and the largest
per-rank parameter memory as JSON.

Every layout reads the same global batches (one dp_size=1 stream of the objective's real data)
and each data-parallel rank takes its slice, so 1 process and N processes see identical samples
per step: any difference in the losses is the parallelism's.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from cromwell.pretrain import checkpoint
from cromwell.pretrain.config import load_config
from cromwell.pretrain.objectives import build_objective, load_run_tokenizer
from cromwell.model.jepa import momentum
from cromwell.pretrain.distributed import init_distributed, shutdown
from cromwell.pretrain.evaluation.held_out import engine_losses
from cromwell.pretrain.losses import step_counts, step_means
from cromwell.pretrain.parallelize import build_engine, model_of, setup_objective, whole_parameters
from cromwell.pretrain.trainer import train_step
from cromwell.pretrain.trainer import seed_everything


def dp_slices(cfg, tokenizer, world):
    """This rank's micro batches of the global batches of a one-rank stream, collated."""
    global_batch, micro, _, dp = cfg.batch_sizes(world)
    rank = parallel_state.get_data_parallel_rank()
    whole = cfg.model_copy(deep=True)
    whole.training.micro_batch_size = global_batch
    stream = build_objective(whole, tokenizer).batches("train", 0, 1)
    per_rank = global_batch // dp
    for batch in stream.loader:
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        rows = batch[mine] if isinstance(batch, list) else tuple(t[mine] for t in batch)
        for start in range(0, per_rank, micro):
            part = rows[start:start + micro] if isinstance(rows, list) else tuple(t[start:start + micro] for t in rows)
            yield stream.collate(part)


def parameter_bytes(engine) -> int:
    """Bytes of parameter values this rank holds (under ZeRO-3, its partitions)."""
    return sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in engine.module.parameters())


def ema_snapshot(objective):
    target = objective.ema_target()
    return None if target is None else {n: p.clone() for n, p in target.named_parameters()}


def ema_check(engine, objective, before: dict, cfg) -> dict:
    """Whether, after the last step, every target tensor is exactly m * before + (1 - m) * online (the
    online weights gathered whole under ZeRO-3), and whether all ranks hold the same targets."""
    start, end = cfg.training.jepa.momentum
    m = momentum(engine.global_steps, cfg.train_steps(), start, end)
    online = dict(model_of(engine).named_parameters())
    exact = True
    for name, p in objective.ema_target().named_parameters():
        with whole_parameters(engine)([online[name]]):
            exact &= torch.equal(p, before[name] * m + online[name].detach() * (1 - m))
    flags = torch.tensor([int(exact)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    # Targets are per tensor-parallel shard: ranks of one data-parallel group must agree exactly.
    checksum = torch.stack([p.double().sum() for p in objective.ema_target().parameters()]).sum().reshape(1)
    sums = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, checksum)
    group = dist.get_process_group_ranks(parallel_state.get_data_parallel_group())
    same = all(torch.equal(sums[r], sums[group[0]]) for r in group)
    agree = torch.tensor([int(same)])
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    return {"ema_exact": bool(flags), "ema_same_on_data_parallel_ranks": bool(agree),
            "ema_moved": bool(any(not torch.equal(p, before[n]) for n, p in objective.ema_target().named_parameters()))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--save", help="a checkpoints folder to save the trained model into")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    cfg = load_config(args.config, args.set)
    world = init_distributed(cfg)
    seed_everything(cfg.run.seed)
    tokenizer = load_run_tokenizer(cfg)
    objective = build_objective(cfg, tokenizer)
    engine = build_engine(cfg, objective, tokenizer)
    setup_objective(engine, objective)
    param_bytes = torch.tensor(parameter_bytes(engine))
    dist.all_reduce(param_bytes, op=dist.ReduceOp.MAX)
    batches = dp_slices(cfg, tokenizer, world)
    accum = cfg.batch_sizes(world)[2]
    losses, norms = [], []
    for step in range(args.steps):
        target_before = ema_snapshot(objective) if step == args.steps - 1 else None
        result = train_step(engine, objective, [next(batches) for _ in range(accum)])
        losses.append(result.losses)
        norms.append(result.grad_norm)
    ema = ema_check(engine, objective, target_before, cfg) if objective.state_dict() else {}
    again = dp_slices(cfg, tokenizer, world)
    held_out = [next(again) for _ in range(accum)]
    counts = step_counts(objective, held_out, engine.device)
    evaluation = step_means(objective, engine_losses(engine, objective, held_out, counts), counts)
    if args.save:
        layout = {"world_size": world, "tp": cfg.parallel.tensor, "pp": cfg.parallel.pipeline,
                  "dp": parallel_state.get_data_parallel_world_size()}
        state = {"tokens_seen": 0, "epoch": {}, "config": cfg.model_dump(), "data": {}}
        checkpoint.save(engine, Path(args.save), engine.global_steps, state,
                        lambda tag_dir: shutil.copy(cfg.data.tokenizer, tag_dir / "tokenizer.json"), layout,
                        objective_state=objective.state_dict())
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "grad_norm": norms, "eval": evaluation,
                       "max_rank_parameter_bytes": int(param_bytes), **ema}, f)
    shutdown()


if __name__ == "__main__":
    main()
