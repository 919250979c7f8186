"""Cost of the DeepSpeed engine per optimizer step, against a plain PyTorch loop doing the same work.

Same model and init (pretrain.parallel.build_model), same AdamW groups and LR schedule, same
gradient clipping, same batches, one rank. The two loops are timed in alternating blocks so that
drift in the machine's speed hits both alike. Target: engine time / plain time <= 1.10.

    python bench/trainer_overhead.py [--steps 30] [--set model.hidden_size=512 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import deepspeed
import torch

from bench.machine import machine

from pretrain.config import deepspeed_config, load_config
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.parallel import MegatronMPU, build_model, device_type, init_distributed, train_step

RESULTS = Path(__file__).resolve().parent / "results"

# Larger than the tiny config so that a step is real work, small enough for a 2-core machine.
DEFAULT_SETS = [
    "model.hidden_size=256", "model.num_layers=4", "model.num_heads=8", "model.ffn_hidden_size=704",
    "training.lm.vocab_size=8192", "training.lm.context_length=256", "training.batch_size=16",
    "training.micro_batch_size=4", "training.gradient_accumulation_steps=4",
]


def plain_step(module, optimizer, scheduler, batches, accum: int, clip: float) -> float:
    total = 0.0
    for _ in range(accum):
        input_ids, labels = next(batches)
        loss = module(input_ids, labels)
        (loss / accum).backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total / accum


def cycle(batches):
    while True:
        yield from batches


def timed(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="pretrain/configs/tiny.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=30, help="timed steps per loop, in blocks of --block")
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    cfg = load_config(args.config, DEFAULT_SETS + args.set)
    init_distributed(cfg)
    _, micro, accum, _ = cfg.batch_sizes(1)
    device = device_type()

    gen = torch.Generator().manual_seed(0)
    seq = cfg.training.lm.context_length
    data = [torch.randint(0, cfg.training.lm.vocab_size, (micro, seq + 1), generator=gen) for _ in range(4 * accum)]
    data = [(d[:, :-1].to(device), d[:, 1:].to(device)) for d in data]

    model = build_model(cfg).to(device)
    plain_model = build_model(cfg).to(device)  # init is deterministic: the same weights
    plain_opt = build_optimizer(plain_model, cfg, fused=device == "cuda")
    plain_sched = build_scheduler(plain_opt, cfg)
    optimizer = build_optimizer(model, cfg, fused=device == "cuda")
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, cfg),
        config=deepspeed_config(cfg, 1, device), mpu=MegatronMPU(),
    )
    plain_batches, engine_batches = cycle(data), cycle(data)

    def run_plain():
        plain_step(plain_model, plain_opt, plain_sched, plain_batches, accum, cfg.training.optimizers.grad_clip)

    def run_engine():
        train_step(engine, engine_batches)

    timed(run_plain, args.warmup)
    timed(run_engine, args.warmup)
    plain_times, engine_times = [], []
    for _ in range(max(1, args.steps // args.block)):
        plain_times.append(timed(run_plain, args.block))
        engine_times.append(timed(run_engine, args.block))
    plain_s, engine_s = statistics.median(plain_times), statistics.median(engine_times)
    ratio = engine_s / plain_s

    result = {
        "benchmark": "trainer_overhead",
        "machine": machine(),
        "device": device,
        "zero_stage": cfg.parallel.zero_stage,
        "model": cfg.model.model_dump(),
        "micro_batch_size": micro,
        "gradient_accumulation_steps": accum,
        "context_length": seq,
        "plain_step_s": plain_s,
        "engine_step_s": engine_s,
        "plain_steps_per_s": 1 / plain_s,
        "engine_steps_per_s": 1 / engine_s,
        "block_times_s": {"plain": plain_times, "engine": engine_times},
        "engine_overhead_ratio": ratio,
        "target": "engine_overhead_ratio <= 1.10",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"trainer_overhead_{device}_zero{cfg.parallel.zero_stage}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"plain loop  {1 / plain_s:.3f} steps/s\nDeepSpeed   {1 / engine_s:.3f} steps/s\nwrote {out}")
    print(f"RESULT engine_overhead_ratio {ratio:.4f}")


if __name__ == "__main__":
    main()
