"""Training-step cost of plain LM vs Step-JEPA (seed's two passes) vs single-pass Step-JEPA,
on the same model and the same GSM8K batches, in one run.

Model: a random-init Llama (transformers) of the given size; weights do not change the cost.
Each measured step is zero_grad + objective + backward + AdamW step. The three modes are
interleaved round by round so drift in machine load hits them equally; the median is reported.
On CPU torch runs one thread and the ratio is taken from the thread's CPU time (the machines
are shared: wall time there measures other people's jobs too); wall time is reported beside it.
Memory: on CUDA the peak allocated bytes of a step; on every device the bytes of tensors saved
for backward (activation memory, the part the objective changes), deduplicated by storage.

  python bench/step_jepa_cost.py            # CPU defaults, a few minutes
  python bench/step_jepa_cost.py --hidden 1024 --layers 8 --batch_size 16   # on a GPU
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from bench.machine import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from model import hf
from model.step_jepa import StepJEPA, predictor_names
from tools.prepare_step_data import convert

GSM8K = os.path.join(ROOT, "..", "shared", "data", "gsm8k", "train.jsonl")


def gsm8k_chats(path: str, n: int) -> list[list[dict]]:
    if not os.path.exists(path):
        sys.exit(f"GSM8K not found at {path} (shared/data is developer/CI data); pass --data")
    chats = []
    with open(path) as f:
        for line in f:
            rec, _ = convert(json.loads(line), "gsm8k")
            if rec["total_steps"] >= 2:
                chats.append(rec["messages"])
            if len(chats) == n:
                break
    return chats


def saved_activation_bytes(fn) -> tuple[object, int]:
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=GSM8K)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--predictors", type=int, default=1)
    ap.add_argument("--mode", default="step")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attn_implementation", default="sdpa")
    ap.add_argument("--tokenizer_records", type=int, default=3000, help="GSM8K records the BPE is trained on")
    ap.add_argument("--output", default=os.path.join(ROOT, "bench", "results", "step_jepa_cost.json"))
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    if device == "cpu":
        torch.set_num_threads(1)
    corpus = gsm8k_chats(args.data, max(args.tokenizer_records, args.batch_size * (args.rounds + args.warmup)))
    chats = corpus[:args.batch_size * (args.rounds + args.warmup)]
    with tempfile.TemporaryDirectory() as tmp:
        texts = [m["content"] for c in corpus for m in c]
        hf.build_tiny_llama(tmp, texts, hidden=args.hidden, layers=args.layers, heads=args.heads, vocab=args.vocab)
        model, tok = hf.load_causal_lm(tmp, attn_implementation=args.attn_implementation)
    model.to(device).train()
    encoder = hf.chat_encoder(tok)
    examples = [encoder(c) for c in chats]
    batches = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    preds = tok.convert_tokens_to_ids(predictor_names(args.predictors))
    objectives = {
        "lm": StepJEPA(preds, tok.pad_token_id, mode=args.mode, lbd=0.0),
        "two_pass": StepJEPA(preds, tok.pad_token_id, mode=args.mode, lbd=1.0, single_pass=False),
        "single_pass": StepJEPA(preds, tok.pad_token_id, mode=args.mode, lbd=1.0, single_pass=True),
    }
    backbone = hf.HFBackbone(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(name, batch):
        opt.zero_grad(set_to_none=True)
        out, act = saved_activation_bytes(lambda: objectives[name](backbone, batch, device))
        out["loss"].backward()
        opt.step()
        return act

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    clock = time.perf_counter if device == "cuda" else time.thread_time
    times, walls = {k: [] for k in objectives}, {k: [] for k in objectives}
    act, peak = {}, {}
    for r, batch in enumerate(batches):
        for name in objectives:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t, w = clock(), time.perf_counter()
            act[name] = max(act.get(name, 0), step(name, batch))
            sync()
            if r >= args.warmup:
                times[name].append(clock() - t)
                walls[name].append(time.perf_counter() - w)
            if device == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())
        print(f"round {r + 1}/{len(batches)}: " + ", ".join(f"{k} {times[k][-1] * 1e3:.0f} ms" for k in times if times[k]),
              flush=True)

    tokens = sum(len(e.input_ids) for e in examples) / len(examples)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "bench": "step_jepa_cost", "machine": machine(), "device": device,
        "model": {"kind": "random-init Llama (transformers)", "hidden": args.hidden, "layers": args.layers,
                  "heads": args.heads, "vocab": len(tok), "params": sum(p.numel() for p in model.parameters()),
                  "attn_implementation": args.attn_implementation},
        "batch": {"batch_size": args.batch_size, "mean_tokens_per_example": tokens, "data": "GSM8K train",
                  "mode": args.mode, "predictors": args.predictors},
        "rounds_measured": args.rounds,
        "time_basis": "wall clock" if device == "cuda" else "thread CPU time, 1 torch thread",
        "step_time_s_median": med,
        "step_time_s_all": times,
        "wall_time_s_median": {k: statistics.median(v) for k, v in walls.items()},
        "saved_activation_mb": {k: v / 2**20 for k, v in act.items()},
        "cuda_peak_mb": {k: v / 2**20 for k, v in peak.items()} or None,
        "single_pass_vs_lm_time_ratio": med["single_pass"] / med["lm"],
        "two_pass_vs_lm_time_ratio": med["two_pass"] / med["lm"],
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    for k in objectives:
        print(f"{k}: {med[k] * 1e3:.1f} ms/step, saved activations {act[k] / 2**20:.1f} MiB"
              + (f", CUDA peak {peak[k] / 2**20:.0f} MiB" if peak else ""))
    print(f"RESULT single_pass_vs_lm_time_ratio {result['single_pass_vs_lm_time_ratio']:.3f}")
    print(f"RESULT two_pass_vs_lm_time_ratio {result['two_pass_vs_lm_time_ratio']:.3f}")


if __name__ == "__main__":
    main()
