"""The four-stage curriculum (docs/design.md, The curriculum), one stage after another in one job:

    deepspeed --num_gpus N pretrain/curriculum.py --curriculum pretrain/configs/curriculum.yaml [--set k=v ...]

A curriculum file names each stage's run config (which runs alone too: `deepspeed pretrain/train.py
--config pretrain/configs/stage1_jepa.yaml`), its share of a total token budget, and overrides for
every stage (`set:`, then the command line's). Stage n+1 starts from stage n's final weights
(run.init_from) with its own optimizer, LR schedule, data mixture and EMA target. Rerun, the command
skips finished stages and resumes an interrupted one from its newest complete checkpoint. At the end
it draws one loss curve over all stages, boundaries marked, each loss component drawn.
"""

from __future__ import annotations

import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import gc
import json
import logging
import os
import sys
from pathlib import Path

from cromwell.pretrain import checkpoint
from cromwell.pretrain.config import Config, ConfigError, load_curriculum, stage_args, stage_configs
from cromwell.pretrain.distributed import shutdown
from cromwell.pretrain.trainer import train

COMPONENTS = ("loss", "lm", "jepa_text", "jepa_vision")


def progress(cfg: Config) -> int:
    """Steps of the stage's newest complete checkpoint (0: not started)."""
    newest, _ = checkpoint.newest_complete(cfg.checkpoint_dir)
    return 0 if newest is None else checkpoint.step_of(newest)


def plot(configs: list[Config], png: Path) -> None:
    """One loss curve over every stage: x is the optimizer step counted across stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = dict(zip(COMPONENTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    offset, labelled = 0, set()
    for cfg in configs:
        rows = [json.loads(line) for line in (Path(cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines()]
        for name in COMPONENTS:
            points = [(offset + r["step"], r[name]) for r in rows if r.get(name, 0) > 0]  # 0: not in this stage
            if points:
                x, y = zip(*points)
                ax.plot(x, y, linewidth=1.2 if name == "loss" else 0.8, color=colours[name],
                        label=None if name in labelled else name)
                labelled.add(name)
        if offset:
            ax.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
        ax.text(offset, 1.0, f" {cfg.run.name}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        offset += rows[-1]["step"] if rows else 0
    ax.set_title("curriculum: each stage's loss and its components (stage boundaries dashed)")
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curriculum", required=True, type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field of every stage")
    p.add_argument("--stages", action="store_true",
                   help="print each stage as a line `STAGE<tab>name<tab>run config<tab>override...` (for "
                        "slurm/submit_curriculum.sh), and exit")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stages:
        try:
            for name, config, sets, _ in stage_args(load_curriculum(args.curriculum), args.set):
                print("\t".join(["STAGE", name, config, *sets]))
        except ConfigError as e:
            sys.exit(f"error: {e}")
        return
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(message)s")
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        curriculum = load_curriculum(args.curriculum)
        configs = stage_configs(curriculum, args.set)
        for cfg in configs:
            done = progress(cfg)
            if done >= cfg.train_steps():
                if rank0:
                    print(f"== stage {cfg.run.name}: finished ({done} steps in {cfg.checkpoint_dir}), skipped", flush=True)
                continue
            if rank0:
                print(f"== stage {cfg.run.name}: {'resuming at step ' + str(done) if done else 'starting'} "
                      f"({cfg.train_steps()} steps)", flush=True)
            # A stage with no complete checkpoint holds at most the logs of an attempt that died early.
            train(cfg, resume=done > 0, overwrite=done == 0)
            gc.collect()  # the finished stage's engine, before the next one is built
            if progress(cfg) < cfg.train_steps():  # stopped by a signal: the next stage needs this one's end
                if rank0:
                    print(f"== stage {cfg.run.name} stopped at step {progress(cfg)}; rerun the same command to "
                          "resume it", flush=True)
                shutdown()
                return
    except (ConfigError, checkpoint.CheckpointError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    shutdown()
    if rank0:
        png = Path(curriculum.output_dir) / "loss_curve.png"
        plot(configs, png)
        lines = [f"  {c.run.name}: logs {Path(c.run.output_dir) / 'metrics.jsonl'} (TensorBoard beside it), "
                 f"checkpoint {checkpoint.newest_complete(c.checkpoint_dir)[0]}" for c in configs]
        print(f"\ncurriculum finished: {len(configs)} stages\n" + "\n".join(lines)
              + f"\n  loss curve over all stages: {png}", flush=True)


if __name__ == "__main__":
    main()
