"""Trains a few steps with the project's engine and writes per-step loss and grad norm as JSON.

Every layout reads the same global batches (one dp_size=1 stream of real shard data) and each
data-parallel rank takes its slice, so 1 process and N processes see identical samples per step:
any difference in the losses is the parallelism's.
"""

import argparse
import json

import torch.distributed as dist
from megatron.core import parallel_state

from data.loader import TokenBatches
from pretrain.config import load_config
from pretrain.parallel import build_engine, init_distributed, train_step


def dp_slices(cfg, world):
    global_batch, micro, _, dp = cfg.batch_sizes(world)
    rank = parallel_state.get_data_parallel_rank()
    stream = TokenBatches(cfg.data.shards, micro_batch_size=global_batch, dp_rank=0, dp_size=1, seed=cfg.data.seed)
    for input_ids, labels in stream:
        # rank r owns rows [r*B/dp, (r+1)*B/dp) of each global batch, cut into micro batches.
        per_rank = global_batch // dp
        ids, lab = input_ids[rank * per_rank:(rank + 1) * per_rank], labels[rank * per_rank:(rank + 1) * per_rank]
        for start in range(0, per_rank, micro):
            yield ids[start:start + micro], lab[start:start + micro]


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
    engine = build_engine(cfg)
    batches = dp_slices(cfg, world)
    losses, norms = [], []
    for _ in range(args.steps):
        loss, grad_norm = train_step(engine, batches)
        losses.append(loss)
        norms.append(grad_norm)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"loss": losses, "grad_norm": norms}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
