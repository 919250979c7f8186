"""Plan a run at scale: parameters, memory per GPU, communication and time, before asking for a cluster.

    python tools/plan.py --config pretrain/configs/stage1_jepa.yaml --gpus 64 --gpu h100 [--tokens 80B]
    python tools/plan.py --curriculum pretrain/configs/curriculum.yaml --gpus 128 --gpu h200 [--tokens 250B]

For each config (a curriculum: each stage, with its share of the token budget) on --gpus GPUs in the
config's own layout (parallel.tensor, parallel.pipeline, ZeRO stage, activation checkpointing; the rest
of the GPUs data-parallel):
- parameters per module (vision encoder, fusion, language encoder, heads) and on each GPU;
- memory per GPU: weights, gradients, fp32 master copy, optimizer states, EMA target, DeepSpeed's
  buffers, activations, the transients at the peak, and which moment of a step peaks (pretrain/planner.py;
  checked against measured peaks of real runs, tests/test_plan.py);
- bytes each GPU sends per step over data-, tensor- and pipeline-parallel links;
- time per step and to the token budget at a stated MFU (default Megatron-LM's published 41-47% on H100);
- whether it fits (the peak within 90% of the card: the rest is CUDA's context, NCCL's buffers and the
  caching allocator's fragmentation), and if not, the smallest layout that does: the least model
  parallelism, then no activation checkpointing, then the lowest ZeRO stage; if nothing fits on --gpus,
  the smallest GPU count (in whole nodes) on which something does.
"""

from __future__ import annotations

import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from cromwell.pretrain.config import ConfigError, load_config, load_curriculum, parse_count, stage_configs
from cromwell.pretrain.planner import GPUS, INTER_NODE_BYTES_PER_S, MFU, Plan, plan


GIB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="a run config (YAML)")
    src.add_argument("--curriculum", type=Path, help="a curriculum file: every stage is planned")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job (the world size)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--gpus-per-node", type=int, default=8, help="tensor parallelism stays within a node")
    p.add_argument("--tokens", help="token budget (5B, 250B): the config's training.train_tokens, or the "
                                    "curriculum's total_tokens, replaced")
    p.add_argument("--mfu", default=f"{MFU[0]},{MFU[1]}",
                   help="model FLOPs utilisation to time with: one value or a range lo,hi (default %(default)s)")
    p.add_argument("--json", type=Path, help="also write the plan as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def run(args) -> list[Plan]:
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise ConfigError(f"--gpus ({args.gpus}) and --gpus-per-node ({args.gpus_per_node}) must be at least 1")
    mfu = _mfu(args.mfu)
    if args.curriculum:
        curriculum = load_curriculum(args.curriculum)
        if args.tokens:
            curriculum.total_tokens = _count(args.tokens, "--tokens")
        configs = [(stage.name, cfg) for stage, cfg in zip(curriculum.stages, stage_configs(curriculum, args.set))]
    else:
        sets = args.set + ([f"training.train_tokens={_count(args.tokens, '--tokens')}"] if args.tokens else [])
        configs = [(args.config.stem, load_config(args.config, sets))]
    plans = [plan(name, cfg, args.gpus, args.gpu, args.gpus_per_node, mfu) for name, cfg in configs]
    for p in plans:
        report(p)
    if len(plans) > 1:
        total = [sum(p.days[i] for p in plans) for i in range(len(mfu))]
        print(f"\nall stages: {_count_text(sum(p.tokens for p in plans))} tokens in {_range(total, 86400)} on {args.gpus} x "
              f"{args.gpu.upper()}; " + ("every stage fits" if all(p.fits for p in plans) else
                                        "stages that do not fit: " + ", ".join(p.name for p in plans if not p.fits)))
    if args.json:
        args.json.write_text(json.dumps([asdict(p) for p in plans], indent=2))
    return plans


def report(p: Plan) -> None:
    print(f"\n== {p.name}: {p.model_type}, {_count_text(sum(p.parameters.values()))} parameters "
          f"({_count_text(p.trained_parameters)} trained), {p.gpus} x {p.gpu.upper()} ({p.capacity_gib:.0f} GiB)")
    print("parameters: " + ", ".join(f"{m} {n / 1e6:,.1f}M" for m, n in p.parameters.items()))
    print(f"layout: {p.layout}; micro batch {p.micro_batch}, global batch {p.global_batch} x {p.context_length} "
          f"tokens; {p.fullest_gpu_parameters / 1e6:,.1f}M parameters on the fullest GPU"
          + (f" (pipeline stage {p.pipeline_stage})" if p.pipeline_stage is not None else ""))
    print("memory per GPU: " + ", ".join(f"{k} {_bytes(v * GIB)}" for k, v in p.memory_gib.items() if v))
    print(f"peak {_bytes(p.peak_gib * GIB)} at the {p.peak_phase} of {_bytes(p.usable_gib * GIB)} usable: "
          + ("fits" if p.fits else "DOES NOT FIT"))
    sent = {k: v * 1e9 for k, v in p.communication_gb.items() if v}
    print("sent per GPU per step: " + (", ".join(f"{k.replace('_', '-')} {_bytes(v)}" for k, v in sent.items())
                                       + f" (data-parallel at {INTER_NODE_BYTES_PER_S * 8 / 1e9:.0f} Gb/s: "
                                       f"{_duration(p.communication_gb['data_parallel'] * 1e9 / INTER_NODE_BYTES_PER_S)})"
                                       if sent else "nothing (one GPU)"))
    print(f"compute: {p.flops_per_token / 1e9:.3g} GFLOP per token, {p.steps:,} steps of {_count_text(p.step_tokens)} "
          f"tokens: {_range(p.step_seconds)} per step, {_count_text(p.tokens)} tokens in {_range(p.days, 86400)} at "
          + "-".join(f"{100 * u:.0f}" for u in p.mfu) + "% MFU")
    if p.suggestion:
        print(f"smallest that fits: {p.suggestion}")


def _mfu(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--mfu: expected a fraction or a range lo,hi (e.g. 0.41,0.47), got {text!r}") from None
    if not values or len(values) > 2 or not all(0 < v <= 1 for v in values) or values != tuple(sorted(values)):
        raise ConfigError(f"--mfu: expected one or two increasing fractions in (0, 1], got {text!r}")
    return values


def _count(text: str, what: str) -> int:
    try:
        return parse_count(text)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None


def _bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _count_text(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    for unit, scale in (("days", 86400), ("h", 3600), ("min", 60), ("s", 1), ("ms", 1e-3)):
        if seconds >= scale or unit == "ms":
            return f"{seconds / scale:.3g} {unit}"
    raise AssertionError


def _range(values: list, scale: float = 1.0) -> str:
    """Durations (values x scale seconds) as "lo-hi unit", the unit the low end's."""
    lo, hi = sorted(v * scale for v in (min(values), max(values)))
    if math.isclose(lo, hi):
        return _duration(lo)
    text = _duration(lo)
    number, unit = text.split(" ")
    hi_number = _duration(hi).split(" ")[0] if _duration(hi).endswith(unit) else None
    return f"{number}-{hi_number} {unit}" if hi_number else f"{text} to {_duration(hi)}"


if __name__ == "__main__":
    main()
