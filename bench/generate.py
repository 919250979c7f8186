"""Tokens/s of KV-cached generation (model/generate.py) against the no-cache path (the whole sequence again
at every step) on the same model and prompts, at batch 1 and 16, in one run.

Both paths decode greedily to exactly --new-tokens tokens per row (no end token), from the same prompts;
they run once per round in an order rotated every round (bench/timing.py) and the speedup is the median of
the per-round ratios. On CPU torch runs one thread and time is the thread's CPU time (the machines are
shared). On a GPU, batch 1's cached rate is also given as a fraction of the HBM-bandwidth bound (every
step reads every weight once: bandwidth / model bytes tokens/s).

  python bench/generate.py                      # CPU defaults, about 10 minutes
  python bench/generate.py --hidden 1024 --layers 16 --vocab 32000   # on a GPU
"""

from __future__ import annotations

import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from cromwell.bench.machine import machine
from cromwell.bench.timing import interleaved, paired_ratio
from cromwell.model.generate import ModelDecoder, Sampling, generate
from cromwell.model.build import build
from cromwell.model.gpt import GPT, init_weights, megatron_config
from cromwell.pretrain.config import load_config
from cromwell.pretrain.distributed import init_distributed
from cromwell.pretrain.throughput import gpu_memory_bandwidth

ROOT = Path(__file__).resolve().parents[1]


def language_model(hidden: int, layers: int, heads: int, vocab: int, device: str, dtype: torch.dtype) -> GPT:
    """A randomly initialised GPT of this size (decoding speed does not depend on the weights' values)."""
    cfg = load_config(ROOT / "pretrain/configs/tiny.yaml", [f"model.hidden_size={hidden}", f"model.num_layers={layers}",
                                                          f"model.num_heads={heads}", "model.ffn_hidden_size=null",
                                                          f"model.vocab_size={vocab}"])
    init_distributed(cfg)
    model = build(cfg.model, megatron_config(1))
    for name, layer in model.named_children():
        init_weights(layer, int(name), cfg.model, 0)
    return model.to(device=device, dtype=dtype).eval()


def decode_rates(model: GPT, vocab: int, batches: list[int], prompt: int, new_tokens: int, rounds: int, device: str,
                 no_cache: bool = True, log=print) -> dict:
    """{batch: tokens/s of cached (and, with no_cache, uncached) greedy decoding of exactly new_tokens per row}."""
    clock = time.thread_time if device == "cpu" else time.perf_counter
    decoder = ModelDecoder(model, vocab)
    sampling = Sampling(max_new_tokens=new_tokens)
    g = torch.Generator().manual_seed(0)

    def run(prompts, use_cache):
        def call():
            generate(decoder, prompts, sampling, eos_id=-1, pad_id=0, use_cache=use_cache)
            if device == "cuda":
                torch.cuda.synchronize()
        return call

    results = {}
    for batch in batches:
        prompts = torch.randint(20, vocab, (batch, prompt), generator=g).tolist()
        calls = [run(prompts, True)] + ([run(prompts, False)] if no_cache else [])
        calls[0]()  # warm-up: first-call allocations and kernel selection
        seconds = interleaved(calls, rounds, clock)
        tokens = batch * new_tokens
        results[batch] = {"tokens": tokens, "cached_tokens_per_s": tokens / statistics.median(seconds[0]),
                          "seconds": {"cached": seconds[0]}}
        line = f"batch {batch}: cached {results[batch]['cached_tokens_per_s']:.1f} tokens/s"
        if no_cache:
            ratio = paired_ratio(seconds[1], seconds[0])  # no-cache time over cached time: the speedup
            results[batch].update(no_cache_tokens_per_s=tokens / statistics.median(seconds[1]), speedup=ratio)
            results[batch]["seconds"]["no_cache"] = seconds[1]
            line += (f", no cache {results[batch]['no_cache_tokens_per_s']:.1f} tokens/s, speedup {ratio['median']:.2f}x "
                     f"(p25 {ratio['p25']:.2f}, p75 {ratio['p75']:.2f}, n {ratio['n']})")
        log(line)
    return results


def hbm_bound(model: GPT, cached_tokens_per_s: float) -> dict | None:
    """Batch-1 decoding against the bound of reading every weight once per token at the datasheet's
    memory bandwidth (None off CUDA or on a GPU the table does not know)."""
    if not torch.cuda.is_available():
        return None
    bandwidth, source = gpu_memory_bandwidth(torch.cuda.get_device_name())
    if math.isnan(bandwidth):
        return None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"bandwidth": bandwidth, "bandwidth_source": source, "weight_bytes": weight_bytes,
            "bound_tokens_per_s": bandwidth / weight_bytes, "fraction": cached_tokens_per_s / (bandwidth / weight_bytes)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # A small LM (13M parameters): in a tinier one both paths' steps are mostly Python overhead.
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    load_start = os.getloadavg()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = language_model(args.hidden, args.layers, args.heads, args.vocab, args.device, dtype)
    results = decode_rates(model, args.vocab, [int(b) for b in args.batches.split(",")], args.prompt, args.new_tokens,
                           args.rounds, args.device)
    bound = hbm_bound(model, results[1]["cached_tokens_per_s"]) if args.device == "cuda" and 1 in results else None
    out = Path(args.out or ROOT / "bench" / "results" / f"generate_{args.device}.json")
    out.write_text(json.dumps({
        "benchmark": "generate", "machine": machine(), "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg(), "device": args.device, "dtype": str(dtype), "args": vars(args),
        "parameters": sum(p.numel() for p in model.parameters()), "results": results, "hbm_bound_batch1": bound,
        "target": "KV-cached generation at least 5x the no-cache path at 256 new tokens",
    }, indent=1))
    print(f"wrote {out}")
    if bound:
        print(f"RESULT batch1_fraction_of_hbm_bound {bound['fraction']:.3f}")
    speedups = {b: r["speedup"]["median"] for b, r in results.items()}
    for b, s in speedups.items():
        print(f"RESULT kv_cache_speedup_batch{b} {s:.2f}")
    print(f"RESULT kv_cache_speedup {min(speedups.values()):.2f}")


if __name__ == "__main__":
    main()
