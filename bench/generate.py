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

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.machine import machine
from bench.timing import interleaved, paired_ratio
from model.generate import ModelDecoder, Sampling, generate
from model.gpt import GPT, init_weights, megatron_config
from pretrain.config import load_config
from pretrain.parallel import init_distributed

ROOT = Path(__file__).resolve().parents[1]
# HBM bandwidth per GPU from NVIDIA's datasheets (bytes/s); a name matches the first key it contains.
HBM = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIE": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
       "A100 80GB PCIE": 1.935e12, "A100": 1.555e12}


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
    clock = time.thread_time if args.device == "cpu" else time.perf_counter
    load_start = os.getloadavg()
    cfg = load_config(ROOT / "pretrain/configs/tiny.yaml", [f"model.hidden_size={args.hidden}",
                                                          f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
                                                          "model.ffn_hidden_size=null", f"training.lm.vocab_size={args.vocab}"])
    init_distributed(cfg)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = GPT(cfg.model, cfg.model.padded_vocab_size(args.vocab), megatron_config(1))
    for name, layer in model.named_children():
        init_weights(layer, int(name), cfg.model, 0)
    model.to(device=args.device, dtype=dtype).eval()
    decoder = ModelDecoder(model, args.vocab)
    sampling = Sampling(max_new_tokens=args.new_tokens)
    g = torch.Generator().manual_seed(0)

    def run(prompts, use_cache):
        def call():
            generate(decoder, prompts, sampling, eos_id=-1, pad_id=0, use_cache=use_cache)
            if args.device == "cuda":
                torch.cuda.synchronize()
        return call

    results = {}
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = torch.randint(20, args.vocab, (batch, args.prompt), generator=g).tolist()
        cached, uncached = run(prompts, True), run(prompts, False)
        cached()  # warm-up: first-call allocations and kernel selection
        seconds = interleaved([cached, uncached], args.rounds, clock)
        tokens = batch * args.new_tokens
        ratio = paired_ratio(seconds[1], seconds[0])  # no-cache time over cached time: the speedup
        results[batch] = {"tokens": tokens, "cached_tokens_per_s": tokens / statistics.median(seconds[0]),
                          "no_cache_tokens_per_s": tokens / statistics.median(seconds[1]), "speedup": ratio,
                          "seconds": {"cached": seconds[0], "no_cache": seconds[1]}}
        print(f"batch {batch}: cached {results[batch]['cached_tokens_per_s']:.1f} tokens/s, no cache "
              f"{results[batch]['no_cache_tokens_per_s']:.1f} tokens/s, speedup {ratio['median']:.2f}x "
              f"(p25 {ratio['p25']:.2f}, p75 {ratio['p75']:.2f}, n {ratio['n']})", flush=True)
    bound = None
    if args.device == "cuda" and 1 in results:
        name = torch.cuda.get_device_name().upper()
        bandwidth = next((b for key, b in HBM.items() if key.upper() in name), None)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if bandwidth:
            bound = {"bandwidth": bandwidth, "weight_bytes": weight_bytes, "bound_tokens_per_s": bandwidth / weight_bytes,
                     "fraction": results[1]["cached_tokens_per_s"] / (bandwidth / weight_bytes)}
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
