"""Cost of the trainer's step against a plain PyTorch loop doing the same work, and the MFU of the
tiny training run.

Engine: pretrain.parallelize.build_engine + pretrain.trainer.train_step, exactly what the training loop runs per step
(the step's token count all-reduced, loss sums normalised over it, DeepSpeed's backward and step).
Plain: the same module and init, the same objective and normalisation, AdamW groups, LR schedule,
clipping and batches, in the same precision (bf16 autocast over fp32 weights on a GPU, where the
engine trains in bf16 with fp32 master weights; fp32 on CPU), one rank, no DeepSpeed.
Timed as interleaved pairs of blocks (the order alternating every pair): the ratio per pair, its
median and spread are reported with the machine's load. Target: engine / plain <= 1.05 (ZeRO-1).

MFU: `pretrain/train.py` on the tiny config (what `make train` runs: 2 CPU ranks), the median of
its logged MFU, which is measured against each rank's matmul peak measured at start-up.

    python bench/trainer_overhead.py [--pairs 12] [--block 3] [--set parallel.zero_stage=0 ...]
"""

from __future__ import annotations

import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cromwell.bench.machine import machine
from cromwell.bench.timing import interleaved, paired_ratio
from cromwell.pretrain.config import load_config
from cromwell.pretrain.objectives.lm import LanguageModeling, TokenBatch
from cromwell.pretrain.optim import build_optimizer, build_scheduler
from cromwell.pretrain.distributed import device_type, init_distributed
from cromwell.pretrain.parallelize import build_engine, build_model, deepspeed_config
from cromwell.pretrain.trainer import train_step

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# Larger than the tiny config so that a step is real work, small enough for a 2-core machine.
DEFAULT_SETS = [
    "model.hidden_size=256", "model.num_layers=4", "model.num_heads=8", "model.ffn_hidden_size=704",
    "model.vocab_size=8192", "training.lm.context_length=256", "training.batch_size=16",
    "training.micro_batch_size=4", "training.gradient_accumulation_steps=4",
]


def plain_step(module, objective, optimizer, scheduler, micro_batches, clip, autocast) -> None:
    counts = sum(objective.counts(b) for b in micro_batches)
    for batch in micro_batches:
        with autocast():
            sums, _, _ = module(batch)
        objective.total(sums, counts).backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def overhead(args) -> dict:
    cfg = load_config(args.config, DEFAULT_SETS + args.set)
    init_distributed(cfg)
    accum = cfg.batch_sizes(1)[2]
    device = device_type()
    objective = LanguageModeling(cfg)
    gen = torch.Generator().manual_seed(0)
    seq, micro = cfg.training.lm.context_length, cfg.training.micro_batch_size
    data = [torch.randint(0, cfg.model.vocab_size, (micro, seq + 1), generator=gen) for _ in range(4 * accum)]
    data = [TokenBatch(d[:, :-1].to(device), d[:, 1:].to(device)) for d in data]
    steps = [data[i:i + accum] for i in range(0, len(data), accum)]

    engine = build_engine(cfg, objective, None)
    bf16 = engine.bfloat16_enabled()
    plain = build_model(cfg, objective, None, deepspeed_config(cfg, 1, device)).to(device)  # the same init
    optimizer = build_optimizer(plain, cfg, fused=device == "cuda")
    scheduler = build_scheduler(optimizer, cfg)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    counter = {"engine": 0, "plain": 0}

    def block(name, step_fn):
        def run():
            for _ in range(args.block):
                step_fn(steps[counter[name] % len(steps)])
                counter[name] += 1
            sync()
        return run

    run_engine = block("engine", lambda micro_batches: train_step(engine, objective, micro_batches))
    run_plain = block("plain", lambda micro_batches: plain_step(plain, objective, optimizer, scheduler, micro_batches,
                                                                cfg.training.optimizer.grad_clip, autocast))
    interleaved([run_engine, run_plain], 2)  # warm-up: allocator, thread pools, DeepSpeed's first-step work
    engine_s, plain_s = interleaved([run_engine, run_plain], args.pairs)
    ratio = paired_ratio(engine_s, plain_s)
    print(f"engine / plain per pair: median {ratio['median']:.4f} (p25 {ratio['p25']:.4f}, p75 {ratio['p75']:.4f}, "
          f"min {ratio['min']:.4f}, max {ratio['max']:.4f}, n {ratio['n']})", flush=True)
    return {"device": device, "precision": "bf16" if bf16 else "fp32", "zero_stage": cfg.parallel.zero_stage,
            "model": cfg.model.model_dump(), "micro_batch_size": micro, "gradient_accumulation_steps": accum,
            "context_length": seq, "steps_per_block": args.block,
            "engine_block_s": engine_s, "plain_block_s": plain_s,
            "engine_step_s_median": statistics.median(engine_s) / args.block,
            "plain_step_s_median": statistics.median(plain_s) / args.block,
            "engine_overhead_ratio": ratio, "target": "median engine_overhead_ratio <= 1.05 (ZeRO-1, 1 rank)"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run_mfu(args) -> dict:
    """pretrain/train.py on pretrain/configs/tiny.yaml for --mfu-steps steps on 2 CPU ranks, on the
    data `make train` builds (built here in a temporary directory when runs/tiny has none)."""
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        data = ROOT / "runs" / "tiny"
        if not (data / "shards" / "corpus.json").exists():
            data = Path(tmp)
            for cmd in (["tools/stdlib_corpus.py", "--output", f"{tmp}/corpus"],
                        ["tools/train_tokenizer.py", "--config", "pretrain/configs/tiny.yaml", "--input", f"{tmp}/corpus",
                         "--output", f"{tmp}/tokenizer.json"],
                        ["tools/build_shards.py", "--config", "pretrain/configs/tiny.yaml", "--input", f"{tmp}/corpus",
                         "--tokenizer", f"{tmp}/tokenizer.json", "--output", f"{tmp}/shards"]):
                subprocess.run([py, *cmd], cwd=ROOT, check=True, capture_output=True)
        out = Path(tmp) / "run"
        sets = [f"data.tokenizer={data / 'tokenizer.json'}", f"data.shards={data / 'shards'}", f"run.output_dir={out}",
                f"training.train_steps={args.mfu_steps}", f"checkpoint.every_steps={10 ** 9}", "logging.tensorboard=false"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([str(Path(py).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
                        "pretrain/train.py", "--config", "pretrain/configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in records if r["step"] > 3]  # the first steps pay one-time costs
    return {"config": "pretrain/configs/tiny.yaml", "ranks": 2, "steps": len(records),
            "mfu_median": statistics.median(r["mfu"] for r in measured),
            "tflops_per_device_median": statistics.median(r["tflops_per_device"] for r in measured),
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in measured),
            "mfu_per_step": [r["mfu"] for r in records]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="pretrain/configs/tiny.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--pairs", type=int, default=12, help="interleaved (engine, plain) pairs of blocks")
    p.add_argument("--block", type=int, default=3, help="optimizer steps per block")
    p.add_argument("--mfu-steps", type=int, default=40, help="steps of the tiny run whose MFU is reported")
    args = p.parse_args()
    result = {"benchmark": "trainer_overhead", "machine": machine()}
    start = time.time()
    result.update(overhead(args))
    if result["device"] == "cpu":
        result["tiny_run"] = tiny_run_mfu(args)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["wall_seconds"] = time.time() - start
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"trainer_overhead_{result['device']}_zero{result['zero_stage']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    print(f"RESULT engine_overhead_ratio {result['engine_overhead_ratio']['median']:.4f}")
    if "tiny_run" in result:
        print(f"RESULT cpu_mfu_vs_measured_peak {result['tiny_run']['mfu_median']:.4f}")


if __name__ == "__main__":
    main()
