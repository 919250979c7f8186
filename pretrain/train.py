"""Language-model training under DeepSpeed: `deepspeed --num_gpus N pretrain/train.py --config C.yaml`.

ZeRO stage, tensor and pipeline parallel sizes and precision come from the config; see
pretrain/parallel.py for how they are applied.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from data.loader import TokenBatches
from data.shards import ShardError
from pretrain import checkpoint
from pretrain.checkpoint import CheckpointError
from pretrain.config import ConfigError, load_config
from pretrain.metrics import MetricsLog
from pretrain.parallel import build_engine, init_distributed, train_step


class Fingerprinted:
    """Wraps the batch iterator and sums a position-weighted checksum of the tokens it hands out in
    a step, so tests and logs can tell whether two runs consumed exactly the same samples."""

    def __init__(self, batches):
        self.batches = batches
        self.value = 0

    def __iter__(self):
        return self

    def __next__(self):
        input_ids, labels = next(self.batches)
        weights = torch.arange(1, labels.numel() + 1, dtype=torch.int64).view_as(labels)
        self.value = (self.value + int((labels.long() * weights).sum())) % (1 << 61)
        return input_ids, labels


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument(
        "--stop-after", type=int, metavar="STEPS",
        help="checkpoint and exit once the run has done STEPS optimizer steps (a job that fits a "
        "time-limited allocation; continue it with --resume)",
    )
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    init_distributed(cfg)
    rank0 = dist.get_rank() == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, format="%(message)s")
    engine = build_engine(cfg)
    loader = TokenBatches(
        cfg.data.shards, micro_batch_size=cfg.training.micro_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
        seed=cfg.data.seed, num_workers=cfg.data.num_workers, shuffle_window=cfg.data.shuffle_window,
    )
    if loader.context_length != cfg.training.lm.context_length:
        raise ConfigError(
            f"{cfg.data.shards}: shards hold sequences of context length {loader.context_length} but "
            f"training.lm.context_length is {cfg.training.lm.context_length}"
        )
    if loader.manifest.vocab_size > cfg.training.lm.vocab_size:
        raise ConfigError(
            f"{cfg.data.shards}: tokenizer vocab {loader.manifest.vocab_size} exceeds training.lm.vocab_size "
            f"{cfg.training.lm.vocab_size}"
        )

    step, total_steps = 0, cfg.train_steps()
    if args.resume:
        state = checkpoint.load(engine, cfg.checkpoint_dir)
        step = state["step"]
        loader.load_state_dict(state["data"])
    batches = Fingerprinted(loader)
    out_dir = Path(cfg.run.output_dir)
    log = MetricsLog(out_dir, total_steps, step, cfg.logging.tensorboard) if rank0 else None

    def save():
        training_state = {
            "epoch": loader.state_dict()["epoch"], "tokens_seen": step * cfg.tokens_per_step(),
            "metrics": {"train_loss": loss, "eval_metrics": {}}, "config": cfg.model_dump(),
            "data": loader.state_dict(),
        }
        return checkpoint.save(engine, cfg.checkpoint_dir, step, training_state, cfg.data.tokenizer)

    loss = float("nan")
    stop_at = min(total_steps, args.stop_after or total_steps)
    while step < stop_at:
        batches.value = 0
        loss, grad_norm = train_step(engine, batches)
        step += 1
        fingerprint = torch.tensor(batches.value, dtype=torch.int64)
        dist.all_reduce(fingerprint)  # ranks that hold no data (pipeline middle stages) add 0
        record = {
            "loss": loss, "lr": engine.get_lr()[0], "grad_norm": grad_norm,
            "tokens_seen": step * cfg.tokens_per_step(), "data_fingerprint": int(fingerprint) % (1 << 61),
        }
        if log:
            log.step(step, record)
            if step % cfg.logging.log_every == 0 or step == total_steps:
                log.console(step, record, cfg.tokens_per_step())
        if step % cfg.checkpoint.every_steps == 0 or step == stop_at:
            save()
    if log:
        png = log.close()
        print(
            f"\n{'finished' if step == total_steps else 'stopped after'} {step}/{total_steps} steps\n  logs:       {log.jsonl} (TensorBoard: {out_dir / 'tensorboard'})\n"
            f"  checkpoint: {cfg.checkpoint_dir / f'global_step{step}'}\n  loss curve: {png}",
            flush=True,
        )
    dist.barrier()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError, ShardError) as e:
        sys.exit(f"error: {e}")
