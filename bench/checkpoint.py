"""Checkpoint save and resume on the largest GPT whose fp32 weights, gradients and AdamW states fit this
machine on 2 CPU ranks at ZeRO-3 (randomly initialised: saving and loading do not care what the numbers
are; one optimizer step on random tokens gives the moments values).

- async_save_stall_vs_sync: how long a background save (checkpoint.async) blocks the training loop (the
  save call, which returns once the state is copied to host memory) over the time of a synchronous save
  (the call, which returns once the checkpoint is complete). Paired per round, the two saves' order
  rotated every round (bench/timing.py); each the slowest rank's. Target at most 0.25. Beside it: the
  background write's own time after the call returned (the next save waits for it).
- reshard_resume_vs_same_layout: the time `--resume` takes to load a checkpoint written at ZeRO-3 on 2
  ranks into an engine at ZeRO-1 on 2 ranks (pretrain/checkpoint/relayout.py: every parameter's fp32
  value and both moments read whole, each rank keeping its part) over loading it into an engine at the
  writer's layout (DeepSpeed's own loader, each rank reading its partition files). Each load in a fresh
  pair of processes (the engine's build is not timed: it is the same for any checkpoint), alternating.
  Target at most 2.0.

  python bench/checkpoint.py [--hidden 1536 --layers 12 --ffn 4096 --vocab 32000 --rounds 3]
"""

from __future__ import annotations

import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cromwell.bench.corpus import stdlib_tokenizer
from cromwell.bench.machine import machine
from cromwell.bench.timing import paired_ratio, rotated

ROOT = Path(__file__).resolve().parents[1]
RANKS = 2


def _sets(args, root: Path, zero: int) -> list[str]:
    return [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.num_heads={args.hidden // 128}",
            f"model.ffn_hidden_size={args.ffn}", f"model.vocab_size={args.vocab}", "training.lm.context_length=128",
            f"parallel.zero_stage={zero}", "training.batch_size=2", "training.micro_batch_size=1",
            f"data.tokenizer={root / 'tokenizer.json'}", f"run.output_dir={root / 'run'}", "data.num_workers=0"]


def _launch(args, root: Path, zero: int, mode: str) -> list[dict]:
    """This file's worker on RANKS processes; each rank's result (a JSON file each: their stdout interleaves)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(RANKS), "--master_port", str(port),
           __file__, "--worker", mode, "--rounds", str(args.rounds),
           *[a for s in _sets(args, root, zero) for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-4000:] + proc.stderr[-4000:])
    return [json.loads((root / f"{mode}-rank{r}.json").read_text()) for r in range(RANKS)]


def worker(mode: str, rounds: int, sets: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from cromwell.pretrain import checkpoint
    from cromwell.pretrain.checkpoint import relayout
    from cromwell.pretrain.config import load_config
    from cromwell.pretrain.distributed import init_distributed, shutdown
    from cromwell.pretrain.objectives import build_objective, load_run_tokenizer
    from cromwell.pretrain.objectives.lm import TokenBatch
    from cromwell.pretrain.parallelize import build_engine, model_of, setup_objective
    from cromwell.pretrain.trainer import train_step

    cfg = load_config(ROOT / "pretrain/configs/tiny.yaml", sets)
    init_distributed(cfg)
    tokenizer = load_run_tokenizer(cfg)
    objective = build_objective(cfg, tokenizer)
    engine = build_engine(cfg, objective, tokenizer)
    setup_objective(engine, objective)
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = relayout.layout(cfg, world, world)
    out = {"rank": rank, "params": sum(getattr(p, "ds_numel", p.numel()) for p in model_of(engine).parameters())}
    if mode == "save":
        ids = torch.randint(0, cfg.model.vocab_size, (1, cfg.training.lm.context_length), generator=torch.Generator().manual_seed(rank))
        train_step(engine, objective, [TokenBatch(ids, ids)])
        state = {"tokens_seen": 0, "epoch": {}, "config": cfg.model_dump(), "data": {}}

        def write_tokenizer(tag_dir):
            shutil.copy(cfg.data.tokenizer, tag_dir / "tokenizer.json")

        directory = Path(cfg.run.output_dir) / "checkpoints"
        out.update(sync=[], stall=[], write=[])
        for r in range(rounds):
            for kind in rotated(["sync", "async"], r):
                dist.barrier()
                start = time.perf_counter()
                checkpoint.save(engine, directory, 1, state, write_tokenizer, layout, background=kind == "async")
                returned = time.perf_counter()
                checkpoint.wait(engine)
                dist.barrier()
                if kind == "sync":
                    out["sync"].append(returned - start)
                else:
                    out["stall"].append(returned - start)
                    out["write"].append(time.perf_counter() - returned)
    else:
        tag_dir = Path(cfg.run.output_dir) / "checkpoints" / "global_step1"
        dist.barrier()
        start = time.perf_counter()
        _, resharded = relayout.resume(engine, model_of(engine), objective, tag_dir, layout)
        dist.barrier()
        out.update(load=time.perf_counter() - start, resharded=resharded)
    (Path(cfg.run.output_dir).parent / f"{mode}-rank{rank}.json").write_text(json.dumps(out))
    shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", choices=["save", "load"])
    p.add_argument("--local_rank", type=int, default=0)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.rounds, args.set)
        return
    before = machine()
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "results") as tmp:
        root = Path(tmp)
        stdlib_tokenizer(root)
        print("saving: sync and background, alternating ...", flush=True)
        saves = _launch(args, root, 3, "save")
        params = saves[0]["params"]
        checkpoint_bytes = sum(f.stat().st_size for f in (root / "run" / "checkpoints" / "global_step1").iterdir())
        sync = [max(r["sync"][i] for r in saves) for i in range(args.rounds)]
        stall = [max(r["stall"][i] for r in saves) for i in range(args.rounds)]
        write = [max(r["write"][i] for r in saves) for i in range(args.rounds)]
        loads = {"same": [], "other": []}
        for r in range(args.rounds):
            for kind in rotated(["same", "other"], r):
                print(f"round {r + 1}/{args.rounds}: resume onto the {kind} layout ...", flush=True)
                ranks = _launch(args, root, 3 if kind == "same" else 1, "load")
                assert (ranks[0]["resharded"] is None) == (kind == "same"), ranks[0]
                loads[kind].append(max(x["load"] for x in ranks))
    stall_ratio = paired_ratio(stall, sync)
    resume_ratio = paired_ratio(loads["other"], loads["same"])
    result = {
        "benchmark": "checkpoint", "machine": before, "load_average_at_end": os.getloadavg(),
        "model": {"hidden": args.hidden, "layers": args.layers, "ffn": args.ffn, "vocab": args.vocab,
                  "parameters": params, "ranks": RANKS, "written_at": "ZeRO-3, 2 data-parallel ranks, fp32",
                  "checkpoint_gb": checkpoint_bytes / 1e9},
        "save_seconds": {"sync": sync, "async_stall": stall, "async_write_after_return": write},
        "async_save_stall_vs_sync": stall_ratio,
        "resume_seconds": {"same_layout_zero3": loads["same"], "other_layout_zero1": loads["other"]},
        "reshard_resume_vs_same_layout": resume_ratio,
        "targets": {"async_save_stall_vs_sync": 0.25, "reshard_resume_vs_same_layout": 2.0},
    }
    out = ROOT / "bench" / "results" / "checkpoint.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{params / 1e9:.2f}B parameters, checkpoint {checkpoint_bytes / 1e9:.1f} GB; sync save "
          f"{statistics.median(sync):.1f} s, background stall {statistics.median(stall):.2f} s (then "
          f"{statistics.median(write):.1f} s writing); resume same layout {statistics.median(loads['same']):.1f} s, "
          f"other {statistics.median(loads['other']):.1f} s; {out}")
    print(f"RESULT async_save_stall_vs_sync {stall_ratio['median']:.3f}")
    print(f"RESULT reshard_resume_vs_same_layout {resume_ratio['median']:.3f}")


if __name__ == "__main__":
    main()
