"""LLM-JEPA from scratch on NL-RX-SYNTH: the project's GPT trained with lambda = 0 (plain LM)
and with the JEPA term (two views: the user's description <-> the assistant's regex), the
same seeds, data order and number of steps for both; test exact match of greedy answers.
Each run goes through the project's one training loop (pretrain/trainer.py, objective step_jepa).

The paper (Huang, LeCun, Balestriero 2025) reports 54.4 -> 60.6 from scratch with
Llama-3.2-1B; the CPU default here is a ~1M-parameter model sized to finish the 6 runs in
well under an hour on 2 cores, so it measures the method at a very different scale.

  python bench/jepa_from_scratch.py                               # CPU
  python bench/jepa_from_scratch.py --hidden 512 --layers 8 --steps 3000 --batch_size 64   # GPU
"""
import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import torch
from tokenizers import Tokenizer

from cromwell.bench.machine import machine
from cromwell.data.chats import project_chat_encoder
from cromwell.data.tokenizer import EOS_ID, PAD_ID
from cromwell.model.config import ModelConfig
from cromwell.model.build import build
from cromwell.model.gpt import megatron_config
from cromwell.pretrain.config import load_config
from cromwell.pretrain.trainer import train
from cromwell.pretrain.evaluation.reasoning import regex_match
from cromwell.tools.train_tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NLRX = os.path.join(ROOT, "..", "shared", "data", "nlrx-synth")


def read(path: str) -> list[list[dict]]:
    if not os.path.exists(path):
        sys.exit(f"NL-RX-SYNTH not found at {path} (shared/data is developer/CI data); pass --data")
    return [json.loads(line)["messages"] for line in open(path)]


@torch.no_grad()
def greedy(gpt, prompts: list[list[int]], max_new: int, batch_size: int, device) -> list[list[int]]:
    """Greedy continuations without a KV cache (answers are short): left padding, the pads
    masked out and position ids counted from each prompt's first real token."""
    outs = []
    for i in range(0, len(prompts), batch_size):
        rows = [list(p) for p in prompts[i:i + batch_size]]
        done = [False] * len(rows)
        gen = [[] for _ in rows]
        for _ in range(max_new):
            width = max(len(r) for r in rows)
            ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows], device=device)
            real = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=device)
            pos = (real.long().cumsum(1) - 1).clamp(min=0)
            mask = torch.ones(width, width, dtype=torch.bool, device=device).tril() & real[:, None, :]
            mask |= torch.eye(width, dtype=torch.bool, device=device)  # pad rows see themselves
            h = gpt(ids, pos, mask[:, None])[:, -1]
            nxt = (h @ gpt.output_weight.T).argmax(-1).tolist()
            for r, t in enumerate(nxt):
                if not done[r]:
                    done[r] = t == EOS_ID
                    if not done[r]:
                        gen[r].append(t)
                rows[r].append(t)
            if all(done):
                break
        outs += gen
    return outs


def run_seed(args, seed: int, tokenizer_json: str) -> list[dict]:
    """The lambda = 0 and the JEPA run of one seed, in a process of its own: the trainer makes a
    one-rank group there (no launcher) on a fresh port."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.workers > 1:
        torch.set_num_threads(1)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    encoder = project_chat_encoder(tokenizer, max_len=256)
    test_chats = read(os.path.join(args.data, "test.jsonl"))[:args.test_limit or None]
    test_prompts = [encoder.encode(encoder.render_prompt(c[:-1])) for c in test_chats]
    test_gold = [c[-1]["content"] for c in test_chats]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        return [run_one(args, lbd, seed, tmp, test_prompts, test_gold, tokenizer, device) for lbd in (0.0, args.lbd)]


def run_config(args, lbd: float, seed: int, tmp: str, vocab: int):
    """The whole run as a run config: what `pretrain/train.py --config` would train."""
    sets = [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
            "model.ffn_hidden_size=null", f"model.vocab_size={vocab}", "parallel.zero_stage=0",
            "training.objective=step_jepa", f"data.chats={os.path.join(args.data, 'train.jsonl')}",
            f"data.tokenizer={os.path.join(tmp, 'tokenizer.json')}", "data.max_len=256", f"data.seed={seed}",
            "training.step_jepa.mode=two_view", f"training.step_jepa.loss_type={args.jepa_loss_type}",
            f"training.step_jepa.jepa_weight={lbd}", f"training.step_jepa.predictors={args.predictors}",
            f"training.batch_size={args.batch_size}", f"training.micro_batch_size={args.batch_size}",
            "training.gradient_accumulation_steps=1", f"training.train_steps={args.steps}",
            f"training.optimizer.lr={args.lr}", "training.scheduler.type=linear", "training.scheduler.min_lr=0",
            f"training.scheduler.warmup_steps={args.steps // 20}", f"training.kernels={args.kernels}",
            f"run.seed={seed}", f"run.output_dir={os.path.join(tmp, f'lambda{lbd}_seed{seed}')}",
            f"checkpoint.every_steps={args.steps}", f"logging.log_every={args.log_every}", "logging.tensorboard=false"]
    return load_config(os.path.join(ROOT, "pretrain", "configs", "tiny.yaml"), sets)


def run_one(args, lbd: float, seed: int, tmp: str, test_prompts, test_gold, tokenizer, device) -> dict:
    cfg = run_config(args, lbd, seed, tmp, tokenizer.get_vocab_size())
    t0 = time.time()
    engine = train(cfg)
    train_s = time.time() - t0
    log = [json.loads(line) for line in open(os.path.join(cfg.run.output_dir, "metrics.jsonl"))]
    gpt = engine.module.model.eval()
    answers = greedy(gpt, test_prompts, args.max_new_tokens, args.eval_batch_size, device)
    hits = [regex_match(tokenizer.decode(a), g) for a, g in zip(answers, test_gold)]
    em = sum(hits) / len(hits)
    print(f"lambda {lbd} seed {seed}: exact match {em:.4f} ({sum(hits)}/{len(hits)}), "
          f"train {train_s:.0f}s, eval {time.time() - t0 - train_s:.0f}s", flush=True)
    return {"lambda": lbd, "seed": seed, "exact_match": em, "train_seconds": train_s,
            "log": [{k: r[k] for k in ("step", "lm", "jepa")} for r in log if r["step"] % args.log_every == 0],
            "samples": [tokenizer.decode(a) for a in answers[:5]]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=NLRX)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lbd", type=float, default=1.0, help="JEPA weight of the JEPA runs")
    ap.add_argument("--jepa_loss_type", default="cosine")
    ap.add_argument("--predictors", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--test_limit", type=int, default=0, help="first N test records (0: all 2,000)")
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--eval_batch_size", type=int, default=256)
    ap.add_argument("--log_every", type=int, default=100)
    ap.add_argument("--kernels", choices=["fused", "reference"], default=None,
                    help="LM loss path; default fused on GPU, reference on CPU (at a 512 vocab the "
                         "chunked fused CE measured 4x slower per step than plain torch on CPU)")
    ap.add_argument("--workers", type=int, default=3,
                    help="seeds trained in parallel processes (one torch thread each on CPU)")
    ap.add_argument("--output", default=os.path.join(ROOT, "bench", "results", "jepa_from_scratch.json"))
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.kernels = args.kernels or ("fused" if device == "cuda" else "reference")
    train_chats = read(os.path.join(args.data, "train.jsonl"))
    tokenizer = train_tokenizer((m["content"] for c in train_chats for m in c), args.vocab, show_progress=False)
    lengths = [len(project_chat_encoder(tokenizer)(c).input_ids) for c in train_chats]
    test_records = len(read(os.path.join(args.data, "test.jsonl"))[:args.test_limit or None])
    print(f"{len(train_chats)} train / {test_records} test, vocab {tokenizer.get_vocab_size()}, "
          f"mean train length {sum(lengths) / len(lengths):.1f} tokens, {args.workers} worker(s)", flush=True)
    t0 = time.time()
    if args.workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.workers) as pool:
            per_seed = pool.starmap(run_seed, [(args, seed, tokenizer.to_str()) for seed in args.seeds])
    else:
        per_seed = [run_seed(args, seed, tokenizer.to_str()) for seed in args.seeds]
    runs = [r for rs in per_seed for r in rs]
    summary = {}
    for name, lbd in (("lm", 0.0), ("jepa", args.lbd)):
        ems = [r["exact_match"] for r in runs if r["lambda"] == lbd]
        summary[name] = {"mean": statistics.mean(ems), "std": statistics.stdev(ems) if len(ems) > 1 else 0.0,
                         "min": min(ems), "max": max(ems), "per_seed": ems}
    model = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                        vocab_size=tokenizer.get_vocab_size())
    params = sum(p.numel() for p in build(model, megatron_config(1)).parameters())
    result = {"bench": "jepa_from_scratch", "machine": machine(), "device": device,
              "model": {"kind": "project GPT (model/gpt.py), random init", "hidden": args.hidden, "layers": args.layers,
                        "heads": args.heads, "vocab": tokenizer.get_vocab_size(), "params": params},
              "config": {k: v for k, v in vars(args).items() if k not in ("data", "output")},
              "test_records": test_records, "wall_seconds": time.time() - t0, "summary": summary, "runs": runs}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    for name, s in summary.items():
        print(f"{name}: exact match mean {s['mean']:.4f} std {s['std']:.4f} per seed {[round(x, 4) for x in s['per_seed']]}")
    print(f"RESULT nlrx_exact_match_lm {summary['lm']['mean']:.4f}")
    print(f"RESULT nlrx_exact_match_jepa {summary['jepa']['mean']:.4f}")


if __name__ == "__main__":
    main()
