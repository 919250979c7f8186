"""Training-step cost of plain LM vs Step-JEPA (the reference two passes) vs single-pass Step-JEPA,
on the same model and the same GSM8K batches, in one run.

Model: a random-init Llama (transformers) of the given size; weights do not change the cost.
Each measured step is zero_grad + collate + objective + backward + AdamW step. The three modes
run once per round, in an order rotated every round, so drift in machine load and order effects
hit them alike; a ratio to the plain LM step is taken per round and its median reported with
quartiles, range and count (bench/timing.py), beside the load average at start and end. On CPU
torch runs one thread and time is the thread's CPU time (the machines are shared: wall time
there measures other people's jobs too). Memory: on CUDA the peak allocated bytes of a step; on
every device the bytes of tensors saved for backward (activation memory, the part the objective
changes), deduplicated by storage.

  python bench/step_jepa_cost.py            # CPU defaults, a few minutes
  python bench/step_jepa_cost.py --hidden 1024 --layers 8 --batch_size 16   # on a GPU
"""
import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from cromwell.bench.machine import machine
from cromwell.bench.timing import interleaved, paired_ratio
from cromwell.data.chats import hf_chat_encoder
from cromwell.data.tokenizer import load_hf_tokenizer, predictor_token
from cromwell.model.config import HFConfig
from cromwell.model.hf import load_model
from cromwell.pretrain.config import load_config
from cromwell.pretrain.objectives.step_jepa import StepJEPA
from cromwell.data.corpus.step_data import convert
from cromwell.tools.tiny_hf_model import build_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    info = machine()
    corpus = gsm8k_chats(args.data, max(args.tokenizer_records, args.batch_size * (args.rounds + args.warmup)))
    chats = corpus[:args.batch_size * (args.rounds + args.warmup)]
    with tempfile.TemporaryDirectory() as tmp:
        texts = [m["content"] for c in corpus for m in c]
        build_tiny_llama(tmp, texts, hidden=args.hidden, layers=args.layers, heads=args.heads, vocab=args.vocab)
        tok = load_hf_tokenizer(tmp)
        model = load_model(tmp, len(tok), HFConfig(path=tmp, attn_implementation=args.attn_implementation))
    model.to(device).train()
    encoder = hf_chat_encoder(tok)
    examples = [encoder(c) for c in chats]
    batches = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    preds = tok.convert_tokens_to_ids([predictor_token(i) for i in range(1, args.predictors + 1)])

    def objective(lbd, single_pass=True):
        cfg = load_config(os.path.join(ROOT, "pretrain", "configs", "tiny.yaml"), [
            "training.objective=step_jepa", "data.chats=unused.jsonl", f"training.step_jepa.mode={args.mode}",
            f"training.step_jepa.jepa_weight={lbd}", f"training.step_jepa.single_pass={single_pass}"])
        return StepJEPA(cfg, encoder, preds, tok.pad_token_id)

    objectives = {"lm": objective(0.0), "two_pass": objective(1.0, single_pass=False),
                  "single_pass": objective(1.0)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    act, peak = {}, {}

    def step(name, examples):
        obj = objectives[name]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        opt.zero_grad(set_to_none=True)

        def loss():
            batch = obj.collate(examples)
            batch = batch.to(device)
            return obj.total(obj.forward(model, batch).sums, obj.counts(batch))

        out, saved = saved_activation_bytes(loss)
        out.backward()
        opt.step()
        sync()  # the clock stops after the fn returns: the GPU must be done
        act[name] = max(act.get(name, 0), saved)
        if device == "cuda":
            peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())

    def runner(name):
        rounds = iter(batches)  # every mode runs once per round: they consume the batches in step
        return lambda: step(name, next(rounds))

    names = list(objectives)
    fns = [runner(k) for k in names]
    clock = time.perf_counter if device == "cuda" else time.thread_time
    interleaved(fns, args.warmup, clock)
    times = dict(zip(names, interleaved(fns, args.rounds, clock)))

    tokens = sum(len(e.input_ids) for e in examples) / len(examples)
    med = {k: statistics.median(v) for k, v in times.items()}
    pairs = {k: paired_ratio(times[k], times["lm"]) for k in ("single_pass", "two_pass")}
    info["load_average_at_end"] = os.getloadavg()
    result = {
        "bench": "step_jepa_cost", "machine": info, "device": device,
        "model": {"kind": "random-init Llama (transformers)", "hidden": args.hidden, "layers": args.layers,
                  "heads": args.heads, "vocab": len(tok), "params": sum(p.numel() for p in model.parameters()),
                  "attn_implementation": args.attn_implementation},
        "batch": {"batch_size": args.batch_size, "mean_tokens_per_example": tokens, "data": "GSM8K train",
                  "mode": args.mode, "predictors": args.predictors},
        "rounds_measured": args.rounds,
        "time_basis": "wall clock" if device == "cuda" else "thread CPU time, 1 torch thread",
        "step_time_s_median": med,
        "step_time_s_all": times,
        "saved_activation_mb": {k: v / 2**20 for k, v in act.items()},
        "cuda_peak_mb": {k: v / 2**20 for k, v in peak.items()} or None,
        "single_pass_vs_lm_time_ratio": pairs["single_pass"]["median"],
        "two_pass_vs_lm_time_ratio": pairs["two_pass"]["median"],
        "time_ratio_pairs": {f"{k}_vs_lm": v for k, v in pairs.items()},
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    for k in objectives:
        print(f"{k}: {med[k] * 1e3:.1f} ms/step, saved activations {act[k] / 2**20:.1f} MiB"
              + (f", CUDA peak {peak[k] / 2**20:.0f} MiB" if peak else ""))
    for k, p in pairs.items():
        print(f"{k}/lm per round: median {p['median']:.3f} (p25 {p['p25']:.3f}, p75 {p['p75']:.3f}, "
              f"min {p['min']:.3f}, max {p['max']:.3f}, n {p['n']})")
    print(f"RESULT single_pass_vs_lm_time_ratio {result['single_pass_vs_lm_time_ratio']:.3f}")
    print(f"RESULT two_pass_vs_lm_time_ratio {result['two_pass_vs_lm_time_ratio']:.3f}")


if __name__ == "__main__":
    main()
