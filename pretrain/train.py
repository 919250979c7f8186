"""Training under DeepSpeed: `deepspeed --num_gpus N pretrain/train.py --config C.yaml [--set k=v ...]`.

The objective (training.objective), the model (model.type), ZeRO stage, tensor and pipeline
parallel sizes and precision come from the config; pretrain/trainer.py is the loop.
"""

from __future__ import annotations

import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import logging
import os
import sys

from cromwell.pretrain.config import ConfigError, load_config
from cromwell.pretrain.objectives import build_objective
from cromwell.pretrain.trainer import MakeObjective, run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=[True, "auto"],
                   help="continue from the newest complete checkpoint; `--resume auto`: when there is one, else "
                        "start afresh (what a requeued Slurm job does)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run directory that holds a run (deletes its checkpoints and logs)")
    p.add_argument(
        "--stop-after", type=int, metavar="STEPS",
        help="checkpoint and exit once the run has done STEPS optimizer steps (a job that fits a "
        "time-limited allocation; continue it with --resume)",
    )
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def main(argv=None, objective: MakeObjective = build_objective) -> None:
    """The command line; `objective` makes the run's objective (a script of the user's may pass its own)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(message)s")
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    run(cfg, args.resume, args.stop_after, args.overwrite, objective)


if __name__ == "__main__":
    main()
