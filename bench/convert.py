"""Checkpoint conversion against a plain copy of the same bytes, and its peak memory against the largest
tensor, on a model of more than 1 GB in fp32.

A GPT (randomly initialised: conversion does not care what the numbers are) is built by the trainer's
own engine on one CPU process with ZeRO-1 and saved as the trainer saves, so the converter reads the
fp32 master weights from the ZeRO partition file, the path a real run's checkpoint takes. Then, in
rounds with the order rotated every round (bench/timing.py):
- the converter, `tools/convert_ckpt.py --format safetensors`, in its own process: its time is the
  one it reports (from opening the checkpoint to the rename), not the interpreter's start. Here every
  tensor's bytes are stretches of the ZeRO partition file, which it has the kernel copy;
- the same with `--through-memory`, every tensor read into memory and written from there: the path
  GGUF and row-parallel joins take, reported beside (not the headline);
- a plain copy (shutil.copyfile, then fsync) of the checkpoint's module-weights file, which holds the
  same model bytes in fp32, timed inside its own new process too.
Throughput ratio: the median over rounds of (copy seconds / convert seconds) x (converted bytes /
copied bytes), i.e. converter MB/s over copy MB/s.

Both write through to the storage (the converter syncs its files before its rename; the copy is
synced too): without that, whichever of them crossed the kernel's dirty-page limit first would be
throttled for the other's writes.

Memory: the converter process's peak RSS (ru_maxrss at its exit) minus its peak RSS converting a
model of a few MB (the constant: interpreter, libraries, the plan), over the largest tensor's bytes;
the headline is the larger of the two paths' (the through-memory one: the kernel copy holds no
tensor). Target: at most 2.

  python bench/convert.py [--hidden 1536 --layers 8 --vocab 32000 --rounds 5]
"""

from __future__ import annotations

import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cromwell.bench.corpus import stdlib_tokenizer
from cromwell.bench.machine import machine
from cromwell.bench.timing import rotated
from cromwell.model.config import ModelConfig
from cromwell.model.tensors import plan

ROOT = Path(__file__).resolve().parents[1]
PEAK = "import resource, runpy, sys; sys.argv = {argv!r}; {body}; print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def _python(code: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc.stdout


def build_checkpoint(root: Path, args) -> Path:
    """The trainer's checkpoint of a randomly initialised GPT of the given size (1 process, ZeRO-1)."""
    root.mkdir(parents=True)
    stdlib_tokenizer(root)
    sets = [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.num_heads={args.hidden // 128}",
            f"model.ffn_hidden_size={args.ffn}", f"model.vocab_size={args.vocab}", "training.lm.context_length=128",
            "parallel.zero_stage=1",
            "training.batch_size=1", "training.micro_batch_size=1", f"data.tokenizer={root / 'tokenizer.json'}",
            f"run.output_dir={root / 'run'}"]
    body = f"""
from pathlib import Path
import shutil
from cromwell.pretrain import checkpoint
from cromwell.pretrain.config import load_config
from cromwell.pretrain.objectives import build_objective, load_run_tokenizer
from cromwell.pretrain.distributed import init_distributed, shutdown
from cromwell.pretrain.parallelize import build_engine
cfg = load_config("pretrain/configs/tiny.yaml", {sets!r})
init_distributed(cfg)
tokenizer = load_run_tokenizer(cfg)
engine = build_engine(cfg, build_objective(cfg, tokenizer), tokenizer)
layout = {{"world_size": 1, "tp": 1, "pp": 1, "dp": 1}}
checkpoint.save(engine, cfg.checkpoint_dir, 0, {{"tokens_seen": 0, "epoch": {{}}, "config": cfg.model_dump(), "data": {{}}}},
                lambda d: shutil.copy(cfg.data.tokenizer, d / "tokenizer.json"), layout)
shutdown()
"""
    _python(body)
    return root / "run" / "checkpoints" / "global_step0"


def convert(tag_dir: Path, out: Path, *flags: str) -> tuple[float, float, int]:
    """(seconds the converter reports, MB converted, its peak RSS in bytes)."""
    argv = ["tools/convert_ckpt.py", "--checkpoint", str(tag_dir), "--out", str(out), "--format", "safetensors", *flags]
    stdout = _python(PEAK.format(argv=argv, body="runpy.run_path('tools/convert_ckpt.py', run_name='__main__')"))
    _delete(out)
    line = next(x for x in stdout.splitlines() if x.startswith("converted "))
    mb, seconds = float(line.split()[1]), float(line.split(" in ")[1].split()[0])
    return seconds, mb, int(stdout.split("PEAK_RSS_KB")[1].split()[0]) * 1024


def copy(src: Path, dst: Path) -> float:
    """Seconds to copy src to dst and have it on the storage (the converter syncs its output too), timed
    inside a new process like the converter's: on these machines a new process's first gigabyte of
    writes can take several times longer than a warm one's."""
    stdout = _python(f"""
import os, shutil, time
start = time.perf_counter()
shutil.copyfile({str(src)!r}, {str(dst)!r})
fd = os.open({str(dst)!r}, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
print("SECONDS", time.perf_counter() - start)
""")
    _delete(dst)
    return float(stdout.split("SECONDS")[1])


def _delete(path: Path) -> None:
    """Delete an output after its timing, and wait for the storage: the file system discards freed
    blocks in the background, which would slow whichever write came next."""
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.sync()
    time.sleep(2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workdir", type=Path, help="where to build the checkpoint (default: a temporary folder)")
    args = p.parse_args()
    info = machine()
    root = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        tag_dir = build_checkpoint(root / "big", args)
        # The constant: the converter's peak on a model of a few MB, the same code path.
        tiny = build_checkpoint(root / "tiny", argparse.Namespace(hidden=128, layers=2, vocab=512, ffn=352))
        constant = max(convert(tiny, root / "tiny_export", *flags)[2] for flags in ([], ["--through-memory"]))
        weights = tag_dir / "mp_rank_00_model_states.pt"

        results = {"convert": [], "through_memory": [], "copy": []}
        peaks, converted_mb = {"convert": [], "through_memory": []}, None
        for r in range(args.rounds):
            for kind in rotated(list(results), r):
                if kind == "copy":
                    seconds = copy(weights, root / "copy.pt")
                else:
                    flags = ["--through-memory"] if kind == "through_memory" else []
                    seconds, converted_mb, peak = convert(tag_dir, root / "export", *flags)
                    peaks[kind].append(peak)
                results[kind].append(seconds)
        copied_mb = weights.stat().st_size / 1e6

        def ratios(kind):
            return [(c / copied_mb) / (v / converted_mb) for v, c in zip(results[kind], results["copy"])]

        largest = max(4 * math.prod(piece.shape) for p in plan(ModelConfig(
            hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 128, ffn_hidden_size=args.ffn,
            vocab_size=args.vocab)) for piece in p.pieces)
        memory = {kind: (max(p) - constant) / largest for kind, p in peaks.items()}
        memory_ratio = max(memory.values())
        throughput = statistics.median(ratios("convert"))
        report = {
            "machine": info, "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                                       "fp32_bytes": int(converted_mb * 1e6), "largest_tensor_bytes": largest},
            "seconds": results, "convert_mb_per_s": [converted_mb / s for s in results["convert"]],
            "through_memory_mb_per_s": [converted_mb / s for s in results["through_memory"]],
            "copy_mb_per_s": [copied_mb / s for s in results["copy"]], "throughput_ratios": ratios("convert"),
            "through_memory_throughput_ratios": ratios("through_memory"),
            "through_memory_vs_copy_throughput": statistics.median(ratios("through_memory")),
            "converter_peak_rss_bytes": peaks, "constant_rss_bytes": constant,
            "peak_rss_over_largest_tensor": memory,
            "convert_vs_copy_throughput": throughput, "convert_peak_rss_over_largest_tensor": memory_ratio,
            "load_average_at_end": os.getloadavg(),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = ROOT / "bench" / "results" / "convert.json"
    out.write_text(json.dumps(report, indent=1))
    median = {k: statistics.median(report[f"{k}_mb_per_s"]) for k in ("convert", "through_memory", "copy")}
    print(f"model {converted_mb / 1e3:.2f} GB fp32, largest tensor {largest / 1e6:.0f} MB; converter "
          f"{median['convert']:.0f} MB/s ({median['through_memory']:.0f} MB/s through memory), copy {median['copy']:.0f} MB/s; "
          f"peak RSS over the largest tensor {memory['convert']:.2f} ({memory['through_memory']:.2f} through memory) "
          f"beside {constant / 1e6:.0f} MB for the interpreter and libraries")
    print(f"wrote {out}")
    print(f"RESULT convert_vs_copy_throughput {throughput:.3f}")
    print(f"RESULT convert_peak_rss_over_largest_tensor {memory_ratio:.3f}")


if __name__ == "__main__":
    main()
