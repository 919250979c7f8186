"""Fused losses against their plain torch references, forward + backward.

CPU (always): fused linear cross-entropy (chunked torch) vs materialised logits +
F.cross_entropy at N tokens x H x V, peak memory and time; masked MSE (chunked torch) vs
F.mse_loss on the gathered masked rows, time. Times are compared as in bench/timing.py: the
two impls alternate (order flipped every rep), the ratio fused/reference is taken per pair, and
the median ratio is reported with its quartiles, range and count; the load average is recorded
at start and end.

CE runs each impl in a fresh subprocess per rep (--reps pairs): its peak memory is the RSS
high-water mark (getrusage) minus its RSS just before the inputs were built: it counts inputs,
gradients and every temporary, and sees torch's allocations (tracemalloc would not). Memory is
not noisy the way time is: the ratio is of the highest peak per impl, the median peak is reported
beside it. Time is the second of two forward + backward steps in that process (the first also
pays one-time costs). MSE times --mse-reps pairs of steps in this process, after one
untimed step of each.

GPU (when CUDA is available): the same CE comparison in fp32 and bf16 plus torch.compile of
the reference (median of CUDA-event times, peak from torch.cuda.max_memory_allocated, same
accounting), and the achieved DRAM bandwidth of the masked-MSE Triton kernels as a fraction of
the GPU's peak.

Writes bench/results/kernels_<device>.json; prints `RESULT name value` lines last (the worst
case over the shapes).
"""
import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from cromwell.bench.machine import machine, slug
from cromwell.bench.timing import interleaved, paired_ratio, rotated

from cromwell.model.kernels import fused_linear_cross_entropy, masked_mse
from cromwell.model.kernels import reference
from cromwell.pretrain.throughput import gpu_memory_bandwidth

RESULTS = Path(__file__).resolve().parent / "results"
MSE_DENSITY = 0.5
# Below this many bytes a kernel's time is mostly launch latency, not DRAM traffic.
MIN_BANDWIDTH_BYTES = 64 << 20


def ce_inputs(tokens, hidden, vocab, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=gen, device=device) / hidden**0.5).to(dtype)
    w.requires_grad_(True)
    t = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    t[::17] = -100
    return h, w, t


def ce_step(fn, h, w, t):
    # Gradients are dropped after each step so that they count in the step's peak only.
    fn(h, w, t).backward()
    h.grad = w.grad = None


def reference_ce(h, w, t):
    return reference.linear_cross_entropy(h, w, t, -100, 0.0, 0.0, None)


def fused_ce(impl):
    return lambda h, w, t: fused_linear_cross_entropy(h, w, t, impl=impl)


def rss_bytes():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ce_cpu_worker(impl, tokens, hidden, vocab):
    """One case in this fresh process; prints its measurements as JSON."""
    fn = reference_ce if impl == "reference" else fused_ce(impl)
    ce_step(fn, *ce_inputs(64, 32, 1000, torch.float32, "cpu"))  # thread pool, lazy inits
    before = rss_bytes()
    h, w, t = ce_inputs(tokens, hidden, vocab, torch.float32, "cpu")
    with_inputs = rss_bytes()
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        ce_step(fn, h, w, t)
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak - before, "peak_above_inputs_bytes": peak - with_inputs,
                      "seconds": seconds[-1]}))


def spread(pairs):
    return (f"{pairs['median']:.3f}x (p25 {pairs['p25']:.3f}, p75 {pairs['p75']:.3f}, "
            f"min {pairs['min']:.3f}, max {pairs['max']:.3f}, n {pairs['n']})")


def ce_cpu(args):
    cases = []
    for hidden in args.hidden:
        runs = {"reference": [], "torch": []}
        for rep in range(args.reps):
            for impl in rotated(list(runs), rep):
                out = subprocess.run([sys.executable, __file__, "--ce-cpu-worker", impl,
                                      str(args.tokens), str(hidden), str(args.vocab)],
                                     check=True, capture_output=True, text=True).stdout
                runs[impl].append(json.loads(out.strip().splitlines()[-1]))
        summary = {impl: {"peak_bytes": max(r["peak_bytes"] for r in rs),
                          "peak_bytes_median": statistics.median(r["peak_bytes"] for r in rs),
                          "peak_above_inputs_bytes": max(r["peak_above_inputs_bytes"] for r in rs),
                          "seconds_median": statistics.median(r["seconds"] for r in rs), "runs": rs}
                   for impl, rs in runs.items()}
        ref, fused = summary["reference"], summary["torch"]
        time_pairs = paired_ratio([r["seconds"] for r in runs["torch"]],
                                  [r["seconds"] for r in runs["reference"]])
        case = {"tokens": args.tokens, "hidden": hidden, "vocab": args.vocab, "dtype": "float32",
                "reference": ref, "fused": fused,
                "peak_memory_ratio": fused["peak_bytes"] / ref["peak_bytes"],
                "peak_memory_ratio_of_medians": fused["peak_bytes_median"] / ref["peak_bytes_median"],
                "time_ratio": time_pairs["median"], "time_ratio_pairs": time_pairs}
        print(f"ce cpu H={hidden}: peak {case['peak_memory_ratio']:.3f}x, time {spread(time_pairs)}",
              file=sys.stderr)
        cases.append(case)
    return cases


def mse_inputs(tokens, dim, dtype, device, density=MSE_DENSITY):
    gen = torch.Generator(device=device).manual_seed(0)
    pred = torch.randn(tokens, dim, generator=gen, device=device).to(dtype).requires_grad_(True)
    target = torch.randn(tokens, dim, generator=gen, device=device).to(dtype)
    mask = torch.rand(tokens, generator=gen, device=device) < density
    weights = torch.rand(tokens, generator=gen, device=device)
    return pred, target, mask, weights


def mse_step(fn, pred, target, mask, weights):
    fn(pred, target, mask, weights).backward()
    pred.grad = None


def reference_mse(pred, target, mask, weights):
    return reference.masked_loss(pred, target, mask, weights, "mse")


def fused_mse(impl):
    return lambda p, t, m, w: masked_mse(p, t, m, weights=w, impl=impl)


def mse_cpu(args):
    cases = []
    fused_fn = fused_mse("torch")
    for dim in args.hidden:
        inputs = mse_inputs(args.tokens, dim, torch.float32, "cpu")
        fns = [lambda: mse_step(fused_fn, *inputs), lambda: mse_step(reference_mse, *inputs)]
        for fn in fns:  # first calls pay for lazy initialisation
            fn()
        fused, ref = interleaved(fns, args.mse_reps)
        time_pairs = paired_ratio(fused, ref)
        cases.append({"tokens": args.tokens, "dim": dim, "dtype": "float32",
                      "mask_density": MSE_DENSITY, "reference_seconds_median": statistics.median(ref),
                      "fused_seconds_median": statistics.median(fused),
                      "time_ratio": time_pairs["median"], "time_ratio_pairs": time_pairs})
        print(f"mse cpu D={dim}: time {spread(time_pairs)}", file=sys.stderr)
    return cases


def cuda_measure(fn, reps=10):
    """(median seconds, peak bytes above the allocation before the call) of fn() on CUDA."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), peak


def ce_gpu(args):
    cases = []
    compiled = torch.compile(reference_ce, dynamic=False)
    for dtype in (torch.float32, torch.bfloat16):
        for hidden in args.hidden:
            case = {"tokens": args.tokens, "hidden": hidden, "vocab": args.vocab,
                    "dtype": str(dtype).removeprefix("torch.")}
            for name, fn in (("reference", reference_ce), ("compiled", compiled),
                             ("fused", fused_ce("triton"))):
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                h, w, t = ce_inputs(args.tokens, hidden, args.vocab, dtype, "cuda")
                inputs = torch.cuda.memory_allocated() - base
                seconds, peak = cuda_measure(lambda: ce_step(fn, h, w, t))
                case[name] = {"seconds": seconds, "peak_bytes": inputs + peak,
                              "peak_above_inputs_bytes": peak}
                del h, w, t
            case["peak_memory_ratio"] = case["fused"]["peak_bytes"] / case["reference"]["peak_bytes"]
            case["time_ratio_vs_reference"] = case["fused"]["seconds"] / case["reference"]["seconds"]
            case["time_ratio_vs_compile"] = case["fused"]["seconds"] / case["compiled"]["seconds"]
            print(f"ce gpu {case['dtype']} H={hidden}: peak {case['peak_memory_ratio']:.3f}x, "
                  f"time {case['time_ratio_vs_compile']:.3f}x of compiled", file=sys.stderr)
            cases.append(case)
    return cases


def mse_kernel_bandwidth(tokens, dim, dtype, density, peak):
    """Achieved DRAM bandwidth of the masked-MSE Triton kernels, forward and backward, on CUDA."""
    import triton.testing

    from cromwell.model.kernels import mse_triton

    pred, target, mask, weights = mse_inputs(tokens, dim, dtype, "cuda", density)
    selected = int(mask.sum())
    row_bytes = dim * pred.element_size()
    coef = torch.where(mask, weights, 0.0) / max(selected, 1)
    _, stats = mse_triton.forward(pred, target, mask, "mse")
    kernels = {
        # reads the selected rows of pred and target, the mask; writes row losses
        "forward": (lambda: mse_triton.forward(pred, target, mask, "mse"), 2 * selected * row_bytes + tokens * 5),
        # reads coefs and the selected rows; writes every row of grad_pred
        "backward": (lambda: mse_triton.backward(pred, target, coef, stats, "mse", True, False),
                     2 * selected * row_bytes + tokens * (4 + row_bytes)),
    }
    cases = []
    for kernel, (fn, moved) in kernels.items():
        seconds = triton.testing.do_bench(fn, return_mode="median") / 1e3
        cases.append({"kernel": kernel, "tokens": tokens, "dim": dim, "dtype": str(dtype).removeprefix("torch."),
                      "mask_density": density, "bytes": moved, "seconds": seconds, "bandwidth": moved / seconds,
                      "peak_fraction": moved / seconds / peak if math.isfinite(peak) else None})
    return cases


def mse_gpu(args):
    peak, _ = gpu_memory_bandwidth(torch.cuda.get_device_name())  # nan: a GPU the table does not know
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in (args.tokens, 8 * args.tokens):
            for dim in args.hidden:
                for density in (1.0, MSE_DENSITY):
                    cases += mse_kernel_bandwidth(tokens, dim, dtype, density, peak)
                    pred, target, mask, weights = mse_inputs(tokens, dim, dtype, "cuda", density)
                    ref_s, _ = cuda_measure(lambda: mse_step(reference_mse, pred, target, mask, weights))
                    fused_s, _ = cuda_measure(lambda: mse_step(fused_mse("triton"), pred, target,
                                                               mask, weights))
                    cases.append({"kernel": "forward+backward vs reference", "tokens": tokens,
                                  "dim": dim, "dtype": str(dtype).removeprefix("torch."),
                                  "mask_density": density, "reference_seconds": ref_s,
                                  "fused_seconds": fused_s, "time_ratio": fused_s / ref_s})
    return {"peak_bandwidth": peak if math.isfinite(peak) else None, "cases": cases}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--vocab", type=int, default=50000)
    # 3 by default: a rep is four processes (two impls x two shapes), about 3.5 min at the default
    # shapes on a 2-core machine, where one step at H=2048 takes 35-45 s; 11 min in all.
    parser.add_argument("--reps", type=int, default=3, help="CE process pairs per shape")
    parser.add_argument("--mse-reps", type=int, default=20, help="MSE step pairs per shape")
    parser.add_argument("--skip-cpu", action="store_true", help="GPU part only")
    parser.add_argument("--out", type=Path, help="results JSON (default: by device name)")
    parser.add_argument("--ce-cpu-worker", nargs=4, metavar=("IMPL", "N", "H", "V"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ce_cpu_worker:
        impl, *shape = args.ce_cpu_worker
        return ce_cpu_worker(impl, *map(int, shape))

    results, lines = {"machine": machine()}, []
    if not args.skip_cpu:
        results["ce_cpu"] = ce_cpu(args)
        results["mse_cpu"] = mse_cpu(args)
        lines += [("ce_cpu_peak_memory_ratio", max(c["peak_memory_ratio"] for c in results["ce_cpu"])),
                  ("ce_cpu_time_ratio", max(c["time_ratio"] for c in results["ce_cpu"])),
                  ("mse_cpu_time_ratio", max(c["time_ratio"] for c in results["mse_cpu"]))]
    if torch.cuda.is_available():
        results["ce_gpu"] = ce_gpu(args)
        results["mse_gpu"] = mse_gpu(args)
        big = [c["peak_fraction"] for c in results["mse_gpu"]["cases"]
               if c.get("peak_fraction") is not None and c["bytes"] >= MIN_BANDWIDTH_BYTES]
        lines += [("ce_gpu_peak_memory_ratio", max(c["peak_memory_ratio"] for c in results["ce_gpu"])),
                  ("ce_gpu_time_ratio_vs_compile",
                   max(c["time_ratio_vs_compile"] for c in results["ce_gpu"]))]
        if big:
            lines.append(("mse_gpu_bandwidth_fraction", min(big)))
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["results"] = dict(lines)
    device = slug(results["machine"].get("gpu", "cpu"))
    out = args.out or RESULTS / f"kernels_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    for name, value in lines:
        print(f"RESULT {name} {value:.4f}")


if __name__ == "__main__":
    main()
