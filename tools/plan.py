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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cromwell.model.config import swiglu_size
from cromwell.pretrain.config import Config, ConfigError, ParallelConfig, load_config, load_curriculum, parse_count, stage_configs
from cromwell.pretrain.parallelize import deepspeed_config, precision
from cromwell.pretrain.throughput import gpu_peak_flops
from cromwell.pretrain.planner import BLOCKS, DeepSpeedBuffers, Layout, communication, flops_per_step, layers_of, memory

# Memory the driver reports per card (nvidia-smi's MiB), and the name the FLOP/s table knows it by.
GPUS = {"h100": (81559 * 2**20, "H100 SXM"), "h200": (143771 * 2**20, "H200 SXM"),
        "a100": (81920 * 2**20, "A100 SXM 80GB"), "a100-40": (40960 * 2**20, "A100 SXM 40GB")}
USABLE = 0.9
MFU = (0.41, 0.47)  # Megatron-LM's published range for GPT models on H100 (its README's scaling table)
INTER_NODE_BYTES_PER_S = 50e9  # 400 Gb/s InfiniBand per GPU
GIB = 2**30


@dataclass
class Plan:
    name: str
    layout: str
    fits: bool
    peak_gib: float
    usable_gib: float
    memory_gib: dict
    communication_gb: dict
    parameters: dict
    tokens: int
    steps: int
    step_seconds: list
    days: list
    suggestion: str | None = None


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
    if len(plans) > 1:
        total = [sum(p.days[i] for p in plans) for i in range(len(mfu))]
        print(f"\nall stages: {_count_text(sum(p.tokens for p in plans))} tokens in {_range(total, 86400)} on {args.gpus} x "
              f"{args.gpu.upper()}; " + ("every stage fits" if all(p.fits for p in plans) else
                                        "stages that do not fit: " + ", ".join(p.name for p in plans if not p.fits)))
    if args.json:
        args.json.write_text(json.dumps([asdict(p) for p in plans], indent=2))
    return plans


def plan(name: str, cfg: Config, gpus: int, gpu: str, per_node: int, mfu: tuple) -> Plan:
    capacity, gpu_name = GPUS[gpu]
    usable = USABLE * capacity
    layers = layers_of(cfg)
    layout = _configured(cfg, gpus)
    mem = layout_memory(cfg, layout, layers)
    comm = communication(cfg, layout, layers)
    peak_flops, _ = gpu_peak_flops(gpu_name, torch.bfloat16 if precision(cfg, "cuda") == "bf16" else torch.float32)
    flops = flops_per_step(cfg, layers)
    step_tokens, steps = cfg.tokens_per_step(), cfg.train_steps()
    # training.train_steps, when set, replaces the token budget
    tokens = cfg.training.train_tokens if cfg.training.train_steps is None else steps * step_tokens
    step_s = [flops / (gpus * peak_flops * u) for u in mfu]
    days = [s * steps / 86400 for s in step_s]

    modules: dict[str, int] = {}
    for layer in layers:
        modules[layer.module] = modules.get(layer.module, 0) + layer.split + layer.whole
    trained = sum(layer.split + layer.whole for layer in layers if layer.trains)
    fits = mem.peak <= usable
    print(f"\n== {name}: {cfg.model.type}, {_count_text(sum(modules.values()))} parameters "
          f"({_count_text(trained)} trained), {gpus} x {gpu.upper()} ({capacity / GIB:.0f} GiB)")
    print("parameters: " + ", ".join(f"{m} {n / 1e6:,.1f}M" for m, n in modules.items()))
    print(f"layout: {layout}; micro batch {cfg.training.micro_batch_size}, global batch {cfg.training.batch_size} "
          f"x {cfg.training.lm.context_length} tokens; {mem.parameters / 1e6:,.1f}M parameters on the fullest GPU"
          + (f" (pipeline stage {mem.stage})" if layout.pp > 1 else ""))
    breakdown = {"weights": mem.weights, "gradients": mem.gradients, "fp32 master": mem.master,
                 "optimizer": mem.optimizer, "EMA target": mem.ema_target, "buffers": mem.buffers,
                 "activations": mem.activations, f"{mem.peak_phase} transients": mem.transient}
    print("memory per GPU: " + ", ".join(f"{k} {_bytes(v)}" for k, v in breakdown.items() if v))
    verdict = "fits" if fits else "DOES NOT FIT"
    print(f"peak {_bytes(mem.peak)} at the {mem.peak_phase} of {_bytes(usable)} usable: {verdict}")
    sent = [f"{k.replace('_', '-')} {_bytes(v)}" for k, v in comm.items() if v]
    print("sent per GPU per step: " + (", ".join(sent) + f" (data-parallel at {INTER_NODE_BYTES_PER_S * 8 / 1e9:.0f} "
                                       f"Gb/s: {_duration(comm['data_parallel'] / INTER_NODE_BYTES_PER_S)})"
                                       if sent else "nothing (one GPU)"))
    print(f"compute: {flops / step_tokens / 1e9:.3g} GFLOP per token, {steps:,} steps of {_count_text(step_tokens)} "
          f"tokens: {_range(step_s)} per step, {_count_text(tokens)} tokens in {_range(days, 86400)} at "
          + "-".join(f"{100 * u:.0f}" for u in mfu) + "% MFU")
    suggestion = None
    if not fits:
        suggestion = _suggest(cfg, gpus, per_node, usable, layers)
        print(f"smallest that fits: {suggestion}")
    return Plan(name, str(layout), fits, mem.peak / GIB, usable / GIB, {k: v / GIB for k, v in breakdown.items()},
                {k: v / 1e9 for k, v in comm.items()}, modules, tokens, steps, step_s, days, suggestion)


def _configured(cfg: Config, gpus: int) -> Layout:
    par = cfg.parallel
    if gpus % (par.tensor * par.pipeline):
        raise ConfigError(f"--gpus {gpus} is not divisible by parallel.tensor ({par.tensor}) x parallel.pipeline "
                          f"({par.pipeline})")
    layout = Layout(par.tensor, par.pipeline, gpus // (par.tensor * par.pipeline), par.zero_stage,
                    par.activation_checkpointing)
    problem = _unsupported(cfg, layout)
    if problem:
        raise ConfigError(f"the config's layout on {gpus} GPUs: {problem}")
    return layout


def layout_memory(cfg: Config, layout: Layout, layers):
    """memory() with the DeepSpeed JSON the trainer would use for this layout."""
    parallel = ParallelConfig(tensor=layout.tp, pipeline=layout.pp, zero_stage=layout.zero,
                              activation_checkpointing=layout.checkpointing,
                              ds_config=cfg.parallel.ds_config, partition_method=cfg.parallel.partition_method)
    laid_out = cfg.model_copy(update={"parallel": parallel})
    ds = deepspeed_config(laid_out, layout.world, "cuda")
    return memory(laid_out, layout, DeepSpeedBuffers.of(ds), "cuda", layers)


def _unsupported(cfg: Config, layout: Layout) -> str | None:
    """Why the trainer cannot run `cfg` in `layout` (None: it can)."""
    m, t = cfg.model, cfg.training
    if t.batch_size % (t.micro_batch_size * layout.dp):
        return (f"training.batch_size {t.batch_size} is not divisible by micro batch {t.micro_batch_size} x "
                f"data-parallel size {layout.dp}")
    if layout.pp > 1 and layout.zero != 1:
        return "a pipeline trains with ZeRO stage 1 only"
    widths = [("model.num_heads", m.num_heads), ("model.ffn_hidden_size", m.ffn_size)]
    if m.type == "vljepa":
        widths += [("model.vision.num_heads", m.vision.num_heads), ("model.vision.ffn_hidden_size", m.vision.ffn_size),
                   ("model.predictor.num_heads", m.predictor.num_heads),
                   ("the predictor's ffn", swiglu_size(m.predictor.embedding_dim))]
    for field, value in widths:
        if value % layout.tp:
            return f"{field} ({value}) is not divisible by tensor parallelism {layout.tp}"
    if m.padded_vocab_size() % layout.tp:
        return f"the padded vocabulary is not divisible by tensor parallelism {layout.tp}"
    return None


def candidates(cfg: Config, gpus: int, per_node: int, layers) -> list[Layout]:
    """Every layout the trainer can run `cfg` in on `gpus` GPUs, in order of preference: the least model
    parallelism (tensor parallelism within a node), then no activation checkpointing, then the lowest
    ZeRO stage (less communication), then the shorter pipeline."""
    blocks = sum(1 for layer in layers if issubclass(layer.kind, BLOCKS))
    out = []
    for tp in (t for t in (1, 2, 4, 8) if t <= min(per_node, gpus)):
        for pp in (q for q in (1, 2, 4, 8, 16, 32, 64) if q <= blocks and gpus % (tp * q) == 0):
            for zero in (0, 1, 2, 3):
                for checkpointing in (False, True):
                    layout = Layout(tp, pp, gpus // (tp * pp), zero, checkpointing)
                    if not _unsupported(cfg, layout):
                        out.append(layout)
    return sorted(out, key=lambda lay: (lay.tp * lay.pp, lay.checkpointing, lay.zero, lay.pp))


def _suggest(cfg: Config, gpus: int, per_node: int, usable: float, layers) -> str:
    for n in [gpus] + [per_node * 2**k for k in range(12) if per_node * 2**k > gpus]:
        for layout in candidates(cfg, n, per_node, layers):
            mem = layout_memory(cfg, layout, layers)
            if mem.peak <= usable:
                where = "" if n == gpus else f" on {n} GPUs (nothing fits on {gpus})"
                return f"{layout}{where}: peak {_bytes(mem.peak)}"
    return "none up to 4096 nodes (a smaller micro batch, or a smaller model)"


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
