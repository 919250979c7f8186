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

import torch
import torch.distributed as dist

from cromwell.data.chats import hf_chat_encoder, project_chat_encoder
from cromwell.data.images import patchify, preprocess
from cromwell.data.shards import ShardError
from cromwell.model.generate import Sampling
from cromwell.pretrain.checkpoint import CheckpointError
from cromwell.pretrain.config import ConfigError
from cromwell.pretrain.evaluation.held_out import held_out
from cromwell.pretrain.objectives import build_objective
from cromwell.pretrain.distributed import device_type
from cromwell.pretrain.losses import to_device
from cromwell.pretrain.evaluation import humaneval as he
from cromwell.pretrain.evaluation.generation import answers, prompt_ids, setup
from cromwell.pretrain.checkpoint.load import Loaded, load, locate
from cromwell.pretrain.evaluation.reasoning import gsm8k_correct, read_tasks, regex_match

TASKS = ("perplexity", "jepa_mse", "humaneval", "image_to_code", "gsm8k", "nlrx")
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
            loaded.model.to(_device())
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


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device_type() == "cuda" else torch.device("cpu")


# -- held-out losses --------------------------------------------------------------------------------------------


def perplexity(loaded: Loaded, args) -> dict:
    return _held_out(loaded, args, jepa=False)


def jepa_mse(loaded: Loaded, args) -> dict:
    if loaded.cfg is None or loaded.cfg.model.type != "vljepa":
        return {"skipped": "the model predicts no embeddings (not a VL-JEPA)"}
    return _held_out(loaded, args, jepa=True)


def _held_out(loaded: Loaded, args, jepa: bool) -> dict:
    if loaded.kind == "hf":
        return {"skipped": "held-out shards are in the project's tokenizer, not this model's"}
    cfg = loaded.cfg.model_copy(deep=True)
    # The evaluation's layout, not the training run's: this process's tensor-parallel size, no pipeline.
    cfg.parallel = cfg.parallel.model_copy(update={"tensor": args.tp, "pipeline": 1})
    cfg.data.valid_shards = args.valid_shards or cfg.data.valid_shards
    if not cfg.data.valid_shards:
        raise ConfigError("perplexity and jepa_mse need held-out shards: --valid-shards, or data.valid_shards in the run")
    cfg.data.num_workers = 0
    if cfg.model.type == "vljepa":
        # JEPA scores need masks and a target pass even for a stage that trained no JEPA (its head is there);
        # perplexity needs neither. The loss weights do not enter the components reported.
        # Every token counts, also after instruction tuning (which trained on answers only).
        weights = {"alpha": 1.0} if jepa else {"alpha": 0.0, "beta": 1.0}
        cfg.training.hybrid = cfg.training.hybrid.model_copy(update={**weights, "instruction": False})
    objective = build_objective(cfg, loaded.tokenizer)
    if jepa:
        objective.setup(loaded.model, lambda params: torch.no_grad(), _device())  # the target starts as the online model
        if loaded.target is not None:
            objective.load_state_dict({"ema_target": loaded.target.state_dict()})
    valid = objective.batches("valid", 0, 1)
    try:
        samples = sum(m.num_samples for m in valid.loader.plan.manifests)
        count = samples // cfg.training.micro_batch_size
        if args.max_batches:
            count = min(count, args.max_batches)
        if count == 0:
            raise ConfigError(f"{cfg.data.valid_shards}: {samples} held-out samples, fewer than one micro batch "
                              f"({cfg.training.micro_batch_size})")
        batches = [next(valid) for _ in range(count)]
    finally:
        valid.close()
    model = loaded.model
    metrics = held_out(objective, batches, _device(),
                       lambda counts: [objective.forward(model, to_device(b, _device())) for b in batches])
    samples = {"samples": count * cfg.training.micro_batch_size}
    if jepa:
        keys = ("val_jepa_mse", "val_jepa_cosine", "val_jepa_rank", "val_jepa_text", "val_jepa_vision")
        return {**samples, **{k.removeprefix("val_"): metrics[k] for k in keys if k in metrics}}
    tokens = int(sum(objective.counts(b)[0] for b in batches))  # the LM term's labelled tokens
    if tokens == 0:
        raise ConfigError(f"{cfg.data.valid_shards}: no token to score in {count} held-out micro batches")
    return {**samples, "tokens": tokens, "ppl": metrics["val_ppl"], "lm": metrics["val_lm"]}


# -- generation tasks ------------------------------------------------------------------------------------------


def humaneval(loaded: Loaded, args) -> dict:
    problems = he.load_problems(args.humaneval)[: args.limit or None]
    prompts = [loaded.encode(p["prompt"]) for p in problems]
    greedy = Sampling(args.max_new_tokens, stop=tuple(he.STOP_SEQUENCES))
    completions = {p["task_id"]: [he.truncate(g.text)] for p, g in zip(problems, answers(loaded, prompts, greedy, False, args.batch_size, _device()))}
    result = {"greedy": _humaneval_scores(problems, completions, (1,), args)}
    if args.samples > 1:
        sampled = {p["task_id"]: [] for p in problems}
        for s in range(args.samples):
            sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, tuple(he.STOP_SEQUENCES), seed=s)
            for p, g in zip(problems, answers(loaded, prompts, sampling, False, args.batch_size, _device())):
                sampled[p["task_id"]].append(he.truncate(g.text))
        ks = tuple(k for k in (1, 10, 100) if k <= args.samples)
        result["sampled"] = _humaneval_scores(problems, sampled, ks, args)
    return result


def _humaneval_scores(problems, completions, ks, args) -> dict:
    if dist.get_rank() != 0:  # every rank generated the same completions; one runs them
        return {}
    scores = he.evaluate(problems, completions, ks=ks, workers=args.workers)
    return {k: v for k, v in scores.items() if k.startswith("pass@") or k in ("n", "problems")}


def image_to_code(loaded: Loaded, args) -> dict:
    from cromwell.pretrain.evaluation import image_to_code as i2c
    from cromwell.data.corpus.instructions import QUESTIONS

    if loaded.cfg is None or loaded.cfg.model.type != "vljepa":
        return {"skipped": "the model reads no images (not a VL-JEPA)"}
    if args.pairs is None:
        raise ConfigError("image_to_code needs --pairs (held-out pairs of tools/make_vision_pairs.py)")
    samples = i2c.read_pairs(args.pairs)[: args.limit or None]
    v = loaded.cfg.model.vision
    images = [patchify(torch.from_numpy(preprocess(s["png"], f"{args.pairs} pair {i}", v.image_size))[None],
                       v.patch_size)[0] for i, s in enumerate(samples)]
    prompts = [prompt_ids(loaded, QUESTIONS[s["kind"]], chat=True) for s in samples]
    generated = answers(loaded, prompts, Sampling(args.max_new_tokens), True, args.batch_size, _device(), images)
    if dist.get_rank() != 0:
        return {}
    results = i2c.score_many(samples, [g.text for g in generated], workers=args.workers)
    return {**i2c.summarize(results), "examples": [{**r, "generated": g.text[:500]} for r, g in
                                                   list(zip(results, generated))[:10]]}


def reasoning(task: str):
    def run(loaded: Loaded, args) -> dict:
        path = args.gsm8k if task == "gsm8k" else args.nlrx
        if not path.is_file():
            return {"skipped": f"{path} not found"}
        items = read_tasks(task, str(path), args.limit)
        encoder = (hf_chat_encoder if loaded.kind == "hf" else project_chat_encoder)(loaded.tokenizer)
        prompts = [encoder.encode(encoder.render_prompt(it["messages"][:-1])) for it in items]
        generated = answers(loaded, prompts, Sampling(args.max_new_tokens), True, args.batch_size, _device())
        score = gsm8k_correct if task == "gsm8k" else regex_match
        correct = [score(g.text, it["gold"]) for g, it in zip(generated, items)]
        return {"accuracy" if task == "gsm8k" else "exact_match": sum(correct) / len(items), "n": len(items)}
    return run


TASK = {"perplexity": perplexity, "jepa_mse": jepa_mse, "humaneval": humaneval, "image_to_code": image_to_code,
        "gsm8k": reasoning("gsm8k"), "nlrx": reasoning("nlrx")}


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
