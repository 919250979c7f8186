"""Score trained models side by side: held-out perplexity and JEPA prediction error, HumanEval pass@k in a
sandbox, image-to-code accuracy, GSM8K and NL-RX.

    python tools/evaluate.py --checkpoint runs/stage3/checkpoints --tasks perplexity,jepa_mse --out report.json
    python tools/evaluate.py --checkpoint sft=runs/stage4/checkpoints --checkpoint base=/models/llama \\
        --tasks humaneval,image_to_code,gsm8k --pairs held_out_pairs/ --limit 100 --out report.json
    deepspeed --num_gpus 2 tools/evaluate.py --tp 2 --checkpoint runs/stage3/checkpoints --tasks perplexity

A checkpoint is anything pretrain/checkpoint/load.py reads: a trainer checkpoint of any layout, a safetensors
export, or a Hugging Face model directory (so a baseline is scored by the same code). Tasks:
- perplexity: exp of the token-weighted mean next-token loss over the held-out shards (--valid-shards, or
  the run's data.valid_shards): every sample once, the last partial micro batch left out. The trainer's
  own validation computes it with the same functions (pretrain/evaluation/held_out.py).
- jepa_mse (a VL-JEPA): on the same held-out samples with the run's masks, the mean squared error, cosine
  similarity and effective rank of the predicted embeddings against the EMA target's (the online encoders'
  when the checkpoint keeps no target), beside the objective's own JEPA losses.
- humaneval: pass@1 of greedy completions, and with --samples n > 1 pass@k (k <= n, the unbiased estimator of
  Chen et al. 2021) of sampled ones; every completion runs in its own sandboxed process (pretrain/evaluation/sandbox.py).
- image_to_code: held-out pairs of tools/make_vision_pairs.py (--pairs): the model answers each image's
  instruction (stage 4's chat format) and pretrain/evaluation/image_to_code.py scores the answer per kind (charts by
  rendering the generated program, text by normalised exact match and character error rate).
- gsm8k, nlrx: accuracy / exact match of greedy answers to ../shared/data's test sets.
Writes --out (JSON) and a Markdown table beside it (.md), one column per checkpoint.
"""

from __future__ import annotations

import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch.distributed as dist

from cromwell.data.shards import ShardError
from cromwell.pretrain.checkpoint import CheckpointError
from cromwell.pretrain.checkpoint.load import load, locate
from cromwell.pretrain.config import ConfigError
from cromwell.pretrain.evaluation import humaneval as he
from cromwell.pretrain.evaluation.generation import setup
from cromwell.pretrain.evaluation.tasks import TASK, device

TASKS = tuple(TASK)
SHARED = he.REPO.parent / "shared" / "data"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]DIR")
    p.add_argument("--tag", help="global_stepN of each checkpoints folder (default: the newest complete one)")
    p.add_argument("--tasks", default="perplexity,jepa_mse", help=f"comma-separated, some of {','.join(TASKS)}")
    p.add_argument("--out", type=Path, required=True, help="the JSON report (a Markdown table goes beside it)")
    p.add_argument("--valid-shards", help="held-out token shards (default: the run's data.valid_shards)")
    p.add_argument("--max-batches", type=int, default=0, help="perplexity/jepa_mse: at most this many micro batches")
    p.add_argument("--pairs", type=Path, help="image_to_code: held-out pairs of tools/make_vision_pairs.py")
    p.add_argument("--humaneval", type=Path, default=he.DEFAULT_PATH)
    p.add_argument("--gsm8k", type=Path, default=SHARED / "gsm8k" / "test.jsonl")
    p.add_argument("--nlrx", type=Path, default=SHARED / "nlrx-synth" / "test.jsonl")
    p.add_argument("--limit", type=int, default=0, help="first N problems / pairs / questions of each task (0: all)")
    p.add_argument("--samples", type=int, default=1, help="humaneval: sampled completions per problem for pass@k")
    p.add_argument("--temperature", type=float, default=0.8, help="humaneval: when sampling (--samples > 1)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--workers", type=int, default=2, help="sandboxed programs run at once")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (the launcher's world size)")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        sys.exit(f"error: --tasks {args.tasks!r}: unknown {unknown} (choose from {', '.join(TASKS)})")
    runs = {}
    for item in args.checkpoint:
        name, _, path = item.rpartition("=")
        runs[name or Path(path).name] = Path(path)
    report = {}
    try:
        sources = {name: locate(path, args.tag) for name, path in runs.items()}
        setup(args.tp)
        for name, source in sources.items():
            loaded = load(source)
            loaded.model.to(device())
            say(f"== {name}: {loaded.kind} {loaded.source}" + (f" (step {loaded.step})" if loaded.step is not None else ""))
            report[name] = {"checkpoint": str(loaded.source), "step": loaded.step}
            for task in tasks:
                start = time.perf_counter()
                report[name][task] = TASK[task](loaded, args)
                say(f"   {task}: {_summary(report[name][task])} ({time.perf_counter() - start:.1f} s)")
            del loaded
    except (CheckpointError, ConfigError, ShardError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if dist.get_rank() == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text(markdown(report, tasks))
        say(f"\n{markdown(report, tasks)}\nreport: {args.out} (and {args.out.with_suffix('.md')})")
    dist.destroy_process_group()


def say(text: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)


# -- the report ---------------------------------------------------------------------------------------------------


def _flat(result, prefix="") -> dict:
    if not isinstance(result, dict):
        return {prefix: result}
    out = {}
    for k, v in result.items():
        if k != "examples":
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _summary(result: dict) -> str:
    return ", ".join(f"{k} {_cell(v)}" for k, v in _flat(result).items() if not isinstance(v, list))


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown(report: dict, tasks: list[str]) -> str:
    """One row per metric, one column per checkpoint."""
    names = list(report)
    rows = []
    for task in tasks:
        keys = dict.fromkeys(k for n in names for k in _flat(report[n].get(task, {})))
        rows += [(f"{task}.{k}", [_cell(_flat(report[n].get(task, {})).get(k, "")) for n in names]) for k in keys]
    lines = ["| metric | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    lines += [f"| {metric} | " + " | ".join(cells) + " |" for metric, cells in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
