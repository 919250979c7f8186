"""Trains a few steps through the trainer's own pieces and writes per-step losses, gradient norms,
the held-out losses of the trained model (on the first global batch again) and the largest
per-rank parameter memory as JSON.

Every layout reads the same global batches (one dp_size=1 stream of the objective's real data)
and each data-parallel rank takes its slice, so 1 process and N processes see identical samples
per step: any difference in the losses is the parallelism's.
"""

import argparse
import json

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.config import load_config
from pretrain.objectives import build_objective, load_run_tokenizer
from pretrain.parallel import build_engine, eval_losses, init_distributed, setup_objective, shutdown, train_step
from pretrain.trainer import seed_everything


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
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
    for _ in range(args.steps):
        result = train_step(engine, objective, [next(batches) for _ in range(accum)])
        losses.append(result.losses)
        norms.append(result.grad_norm)
    again = dp_slices(cfg, tokenizer, world)
    evaluation = eval_losses(engine, objective, [next(again) for _ in range(accum)])
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "grad_norm": norms, "eval": evaluation,
                       "max_rank_parameter_bytes": int(param_bytes)}, f)
    shutdown()


if __name__ == "__main__":
    main()
