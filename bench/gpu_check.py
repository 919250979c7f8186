"""`make gpu-check`: every path only a GPU runs, once, on one GPU, in at most 8 minutes on an H100.

  python bench/gpu_check.py [--out FILE] [--data DIR] [--budget-s 480] [--only CHECK,...]

Checks, in this order, each in a process of its own (a CUDA error or a hang takes only that check; memory
figures start from zero) and within its share of the time budget:

  kernels       the Triton fused cross-entropy and masked MSE compiled for the GPU, against torch in fp32 and
                bf16 (CE: loss and both gradients; MSE: loss and gradient), their time and memory against
                torch's, the MSE kernels' DRAM bandwidth and a device-to-device copy's against the datasheet
  train_gpt     the 1.1B GPT of bench/configs/gpu_check_gpt.yaml (context 4096, bf16, ZeRO-1): 25 steps of
  train_vljepa  pretrain/train.py; and the 1.3B VL-JEPA (images, EMA target) of gpu_check_vljepa.yaml: loss
                falls, no non-finite step, no DeepSpeed op compiled; tokens/s, TFLOP/s and MFU as the
                trainer logs them (median after 3 warm-up steps); pretrain/planner.py's predicted peak against
                torch.cuda.max_memory_allocated
  decode        KV-cached greedy decoding of the 1.1B GPT at batch 1 and 32; batch 1 against the bound of
                reading every weight once per token at the datasheet's memory bandwidth
  bf16_vs_fp32  one training step of a 0.2B GPT from the same init and batch in bf16 and in fp32, through the
                trainer: loss and gradient norm agree within bf16's tolerance

The training data is made once by the project's own tools under --data (the standard library's code and
prose, generated image -> code pairs, a 32K tokenizer, shards at context 4096); a rerun reuses it.
Without CUDA every check is reported as skipped with the reason, nothing heavy runs, the planner's
predictions for both runs are still given, and the command exits 0. Writes bench/results/gpu_check_<gpu>.json
(the checks, their measurements, targets and whether each was met) and prints the headline figures last
as `RESULT name value`; exits 1 when a check failed.
"""

from __future__ import annotations

import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"train_gpt": ROOT / "bench/configs/gpu_check_gpt.yaml",
           "train_vljepa": ROOT / "bench/configs/gpu_check_vljepa.yaml"}
# Seconds each check may take at most, in the order they run (the run also starts no check after
# --budget-s): a hang costs one check, not the run. Set from the planner's step times at 41% MFU plus
# start-up (imports, weights drawn on the CPU, DeepSpeed's engine), with a margin; no GPU run has
# timed them yet. The headline figures come first, in case the budget runs out.
BUDGETS = {"kernels": 60, "train_gpt": 150, "train_vljepa": 170, "decode": 60, "bf16_vs_fp32": 75}
CHECKS = tuple(BUDGETS)
WARMUP_STEPS = 3  # first steps pay for kernel compilation, cuDNN/cuBLAS selection and allocator growth
# bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3). The loss is reduced in fp32 from bf16
# activations that went through every layer, so it moves by a few roundoffs; the gradient norm sums
# squares of gradients that are themselves bf16 products of bf16 activations and moves more.
BF16_LOSS_RTOL = 1e-2
BF16_GRAD_NORM_RTOL = 5e-2
TARGETS = {"mfu_gpt_1b": (">=", 0.45), "plan_memory_error_gpt": ("abs<=", 0.10),
           "plan_memory_error_vljepa": ("abs<=", 0.10), "ce_triton_vs_torch_time": ("<=", 1.2),
           "ce_triton_vs_torch_memory": ("<=", 0.25)}


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


# -- the planner's prediction (no GPU needed) -----------------------------------------------------------------


def planned_peak(config: Path, sets: list[str] = ()) -> float:
    """pretrain/planner.py's peak bytes per GPU for `config` trained on one GPU in bf16, with the DeepSpeed
    JSON the trainer would use there."""
    from cromwell.pretrain.config import load_config
    from cromwell.pretrain.parallelize import deepspeed_config
    from cromwell.pretrain.planner import DeepSpeedBuffers, Layout, memory

    cfg = load_config(config, list(sets))
    p = cfg.parallel
    layout = Layout(p.tensor, p.pipeline, 1, p.zero_stage, p.activation_checkpointing)
    return memory(cfg, layout, DeepSpeedBuffers.of(deepspeed_config(cfg, 1, "cuda")), "cuda").peak


# -- data ---------------------------------------------------------------------------------------------------


def prepare_data(data: Path, log) -> dict:
    """The training data of both runs, made by the project's tools; each step skips work done before."""
    workers = str(max(1, min(16, os.cpu_count() or 1)))
    steps = [
        ["tools/stdlib_corpus.py", "--output", data / "corpus"],
        ["tools/make_vision_pairs.py", "--output", data / "pairs", "--count", "96", "--samples-per-shard", "48"],
        ["tools/train_tokenizer.py", "--input", data / "corpus", "--vocab-size", "32000", "--output",
         data / "tokenizer.json"],
        ["tools/build_shards.py", "--input", data / "corpus", "--source", f"vision_text={data / 'pairs'}",
         "--tokenizer", data / "tokenizer.json", "--context-length", "4096", "--samples-per-shard", "64",
         "--workers", workers, "--output", data / "shards"],
    ]
    for step in steps:
        if step[0] == "tools/train_tokenizer.py" and (data / "tokenizer.json").is_file():
            continue
        start = time.perf_counter()
        _run([sys.executable, *map(str, step)], timeout=600)
        log(f"  data: {step[0]} {time.perf_counter() - start:.0f} s")
    return {"tokenizer": str(data / "tokenizer.json"), "shards": str(data / "shards")}


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    # Each child is a process group of its own (a group of one: pretrain/distributed.py join_process_group).
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    proc = subprocess.run(cmd, cwd=ROOT, env={**inherited, "PYTHONUNBUFFERED": "1", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[1:3])} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
    return proc


# -- training runs through the trainer ------------------------------------------------------------------------


def summarize_run(rows: list[dict], warmup: int = WARMUP_STEPS) -> dict:
    """What a training check reports of its metrics.jsonl rows: throughput as the median over the steps after
    the warm-up, the loss at the start and at the end (mean of the last five steps), the peak memory."""
    if len(rows) <= warmup:
        raise ValueError(f"{len(rows)} steps logged, need more than the {warmup} warm-up steps")
    steady = rows[warmup:]
    out = {key: statistics.median(r[key] for r in steady)
           for key in ("mfu", "tflops_per_device", "tokens_per_s", "step_time_s")}
    out.update(steps=len(rows), first_loss=rows[0]["loss"], last_loss=statistics.fmean(r["loss"] for r in rows[-5:]),
               nonfinite_steps=rows[-1]["nonfinite_steps"], peak_memory_bytes=max(r["peak_mem_gb"] for r in rows) * 2**30,
               losses=[r["loss"] for r in rows])
    out["loss_falls"] = out["last_loss"] <= 0.9 * out["first_loss"]
    return out


def train(config: Path, data: dict, out_dir: Path, sets: list[str], timeout: float) -> tuple[list[dict], list[str]]:
    """pretrain/train.py on this GPU; (its metrics.jsonl rows, the DeepSpeed ops it compiled)."""
    extensions = out_dir / "torch_extensions"
    extensions.mkdir(parents=True, exist_ok=True)
    args = [f"data.tokenizer={data['tokenizer']}", f"data.shards={data['shards']}", f"run.output_dir={out_dir}", *sets]
    proc = _run([sys.executable, "pretrain/train.py", "--config", str(config), "--overwrite",
                 *[a for s in args for a in ("--set", s)]], timeout, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    (out_dir / "console.log").write_text(proc.stdout + proc.stderr)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, sorted(p.name for p in extensions.iterdir())


def check_training(name: str, data: dict, work: Path, timeout: float) -> dict:
    rows, compiled = train(CONFIGS[name], data, work / name, [], timeout)
    run = summarize_run(rows)
    planned = planned_peak(CONFIGS[name])
    run.update(planned_peak_bytes=planned, plan_memory_error=(planned - run["peak_memory_bytes"]) / run["peak_memory_bytes"],
               compiled_ops=compiled)
    problems = ([] if run["loss_falls"] else [f"the loss did not fall by 10% ({run['first_loss']:.3f} -> "
                                                 f"{run['last_loss']:.3f})"])
    problems += [f"{run['nonfinite_steps']} non-finite steps"] if run["nonfinite_steps"] else []
    problems += [f"DeepSpeed compiled ops at run time: {compiled}"] if compiled else []
    return {**run, "problems": problems}


def check_bf16_vs_fp32(data: dict, work: Path, timeout: float) -> dict:
    """Step 1's loss and gradient norm (before any update: the same init and batch) in both precisions."""
    small = ["model.hidden_size=1024", "model.num_layers=12", "model.num_heads=8", "training.train_steps=1",
             "training.batch_size=4", "training.micro_batch_size=2"]
    first = {}
    for precision in ("bf16", "fp32"):
        rows, _ = train(CONFIGS["train_gpt"], data, work / f"step_{precision}", small + [f"training.precision={precision}"],
                        timeout / 2)
        first[precision] = {"loss": rows[0]["loss"], "grad_norm": rows[0]["grad_norm"]}
    loss_rel = abs(first["bf16"]["loss"] - first["fp32"]["loss"]) / abs(first["fp32"]["loss"])
    norm_rel = abs(first["bf16"]["grad_norm"] - first["fp32"]["grad_norm"]) / abs(first["fp32"]["grad_norm"])
    problems = [f"loss differs by {loss_rel:.2e} relative (tolerance {BF16_LOSS_RTOL})"] if not loss_rel <= BF16_LOSS_RTOL else []
    if not norm_rel <= BF16_GRAD_NORM_RTOL:
        problems.append(f"gradient norm differs by {norm_rel:.2e} relative (tolerance {BF16_GRAD_NORM_RTOL})")
    return {"first_step": first, "loss_rel_diff": loss_rel, "grad_norm_rel_diff": norm_rel,
            "tolerance": {"loss": BF16_LOSS_RTOL, "grad_norm": BF16_GRAD_NORM_RTOL}, "problems": problems}


# -- kernels and decoding, in this process (run as a child with --run) -----------------------------------------


def kernel_agreement(device: str, ce_shape=(4096, 2048, 32000), mse_shape=(8192, 2048)) -> tuple[dict, list[str]]:
    """The Triton kernels against torch on `device` in fp32 and bf16: CE's loss and both gradients, masked MSE's
    loss and gradient; ({case: largest absolute differences}, what disagreed)."""
    import torch

    from cromwell.bench import kernels as k

    agreement, problems = {}, []
    for dtype in (torch.float32, torch.bfloat16):
        h, w, t = k.ce_inputs(*ce_shape, dtype, device)
        pred, target, mask, weights = k.mse_inputs(*mse_shape, dtype, device)
        cases = {"cross_entropy": [(fn(h, w, t), (h, w)) for fn in (k.fused_ce("triton"), k.reference_ce)],
                 "masked_mse": [(fn(pred, target, mask, weights), (pred,)) for fn in (k.fused_mse("triton"), k.reference_mse)]}
        for name, ((got, inputs), (want, _)) in cases.items():
            got_grads = torch.autograd.grad(got, inputs)
            want_grads = torch.autograd.grad(want, inputs)
            key = f"{name}_{str(dtype).removeprefix('torch.')}"
            agreement[key] = {}
            # The loss is fp32 in both (fp32 logits or row losses from the same inputs, summed in another order):
            # rtol 1e-5. Gradients come out in the input dtype: torch.testing's defaults for it (fp32 rtol
            # 1.3e-6, atol 1e-5; bf16 rtol 1.6e-2, atol 1e-5: one bf16 rounding of nearly the same fp32 value).
            pairs = [("loss", got.detach(), want.detach(), {"rtol": 1e-5, "atol": 0.0})]
            pairs += [(f"grad_{i}", g, r, {}) for i, (g, r) in enumerate(zip(got_grads, want_grads))]
            for part, g, r, tolerance in pairs:
                agreement[key][part] = float((g.float() - r.float()).abs().max())
                try:
                    torch.testing.assert_close(g, r, **tolerance)
                except AssertionError as e:
                    problems.append(f"{key} {part}: {str(e).strip().splitlines()[0]}")
    return agreement, problems


def check_kernels() -> dict:
    import torch

    from cromwell.bench.kernels import ce_inputs, ce_step, cuda_measure, fused_ce, mse_kernel_bandwidth, reference_ce
    from cromwell.model.kernels.dispatch import resolve_impl
    from cromwell.pretrain.throughput import gpu_memory_bandwidth

    agreement, problems = kernel_agreement("cuda")
    out = {"agreement": agreement, "auto_impl_on_cuda": resolve_impl("auto", torch.empty(1, device="cuda"))}
    if out["auto_impl_on_cuda"] != "triton":
        problems.append(f"impl='auto' resolves to {out['auto_impl_on_cuda']} on CUDA, not triton")

    # Time and memory of one forward + backward at the trainer's shape: 4 x 4096 tokens, hidden 2048, 32K vocab.
    timing = {}
    for dtype in (torch.float32, torch.bfloat16):
        case = {}
        for name, fn in (("triton", fused_ce("triton")), ("torch", reference_ce)):
            torch.cuda.empty_cache()
            h, w, t = ce_inputs(16384, 2048, 32000, dtype, "cuda")
            seconds, peak = cuda_measure(lambda: ce_step(fn, h, w, t))
            case[name] = {"seconds": seconds, "peak_above_inputs_bytes": peak}
            del h, w, t
        case["time_ratio"] = case["triton"]["seconds"] / case["torch"]["seconds"]
        case["memory_ratio"] = case["triton"]["peak_above_inputs_bytes"] / case["torch"]["peak_above_inputs_bytes"]
        timing[str(dtype).removeprefix("torch.")] = case
    out["cross_entropy_vs_torch"] = timing

    peak, source = gpu_memory_bandwidth(torch.cuda.get_device_name())  # nan: a GPU the table does not know
    mse = []
    for dtype in (torch.float32, torch.bfloat16):
        for density in (1.0, 0.5):
            mse += mse_kernel_bandwidth(65536, 2048, dtype, density, peak)
    out["masked_mse_bandwidth"] = mse
    copy = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    seconds, _ = cuda_measure(lambda: copy.clone())
    out["device_copy"] = {"bytes_moved": 2 * copy.numel() * 4, "bandwidth": 2 * copy.numel() * 4 / seconds}
    out["datasheet_bandwidth"] = {"bytes_per_s": peak if math.isfinite(peak) else None, "source": source}
    if math.isfinite(peak):
        out["device_copy"]["datasheet_fraction"] = out["device_copy"]["bandwidth"] / peak
    out["problems"] = problems
    return out


def check_decode(device: str = "cuda", size=(2048, 20, 16, 32000), batches=(1, 32), tokens=128) -> dict:
    """Cached greedy decoding of a GPT of `size` (hidden, layers, heads, vocab): `tokens` prompt and new tokens."""
    import torch

    from cromwell.bench.generate import decode_rates, hbm_bound, language_model

    model = language_model(*size, device, torch.bfloat16 if device == "cuda" else torch.float32)
    rates = decode_rates(model, size[3], list(batches), prompt=tokens, new_tokens=tokens, rounds=3, device=device,
                         no_cache=False, log=lambda line: print(line, file=sys.stderr))
    # Keyed by the batch as a string, as the report's JSON will have it.
    return {"parameters": sum(p.numel() for p in model.parameters()), "prompt_tokens": tokens, "new_tokens": tokens,
            "rates": {str(b): r for b, r in rates.items()},
            "hbm_bound_batch1": hbm_bound(model, rates[batches[0]]["cached_tokens_per_s"]), "problems": []}


# -- the orchestration ------------------------------------------------------------------------------------------


def headline(checks: dict) -> dict:
    """RESULT name -> value, from the checks that ran."""
    out = {}
    k = checks.get("kernels", {})
    if k.get("status") in ("passed", "failed") and "cross_entropy_vs_torch" in k:
        out["ce_triton_vs_torch_time"] = k["cross_entropy_vs_torch"]["bfloat16"]["time_ratio"]
        out["ce_triton_vs_torch_memory"] = k["cross_entropy_vs_torch"]["bfloat16"]["memory_ratio"]
        big = [c["peak_fraction"] for c in k["masked_mse_bandwidth"] if c["peak_fraction"] is not None]
        if big:
            out["mse_hbm_fraction"] = min(big)
    for name, key in (("train_gpt", "gpt"), ("train_vljepa", "vljepa")):
        run = checks.get(name, {})
        if "mfu" in run:
            out[f"mfu_{key}_1b"] = run["mfu"]
            out[f"plan_memory_error_{key}"] = run["plan_memory_error"]
    b = checks.get("bf16_vs_fp32", {})
    if "loss_rel_diff" in b:
        out["bf16_fp32_loss_rel_diff"] = b["loss_rel_diff"]
        out["bf16_fp32_grad_norm_rel_diff"] = b["grad_norm_rel_diff"]
    d = checks.get("decode", {})
    if d.get("hbm_bound_batch1"):
        out["decode_hbm_fraction_b1"] = d["hbm_bound_batch1"]["fraction"]
    for batch, rate in d.get("rates", {}).items():
        out[f"decode_tokens_per_s_b{batch}"] = rate["cached_tokens_per_s"]
    return out


def targets_met(results: dict) -> dict:
    met = {}
    for name, (op, bound) in TARGETS.items():
        if name in results:
            value = results[name]
            ok = value >= bound if op == ">=" else value <= bound if op == "<=" else abs(value) <= bound
            met[name] = {"target": f"{op.replace('abs', '|x| ')} {bound}", "value": value, "met": ok}
    return met


def run_child(check: str, timeout: float) -> dict:
    """`check` (kernels, decode) in a process of its own; its dict, or why there is none."""
    with tempfile.NamedTemporaryFile(suffix=".json") as part:
        _run([sys.executable, "bench/gpu_check.py", "--run", check, "--part", part.name], timeout)
        return json.loads(Path(part.name).read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="report JSON (default bench/results/gpu_check_<gpu>.json)")
    ap.add_argument("--data", type=Path, default=ROOT / "runs/gpu_check/data", help="training data, made once")
    ap.add_argument("--work", type=Path, default=ROOT / "runs/gpu_check", help="the training runs' folders")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting checks after this many seconds")
    ap.add_argument("--only", default=",".join(CHECKS), help="comma-separated checks: " + ", ".join(CHECKS))
    ap.add_argument("--run", choices=("kernels", "decode"), help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run:  # a child: one in-process check
        result = (check_kernels if args.run == "kernels" else check_decode)()
        Path(args.part).write_text(json.dumps(result))
        return 0

    start = time.perf_counter()
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(CHECKS))
    if unknown:
        ap.error(f"--only: unknown checks {unknown}; choose from {', '.join(CHECKS)}")

    def log(line):
        print(line, flush=True)

    from cromwell.bench.machine import machine, slug

    gpu = gpu_name()
    report = {"benchmark": "gpu_check", "gpu": gpu, "machine": machine(), "budget_s": args.budget_s, "checks": {},
              "planned_peak_bytes": {name: planned_peak(path) for name, path in CONFIGS.items()}}
    out = args.out or ROOT / "bench" / "results" / f"gpu_check_{slug(gpu or 'no_gpu')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every check: what was measured survives a later crash or a killed run
        report["results"] = headline(report["checks"])
        report["targets"] = targets_met(report["results"])
        report["elapsed_s"] = time.perf_counter() - start
        report["machine"]["load_average_at_end"] = os.getloadavg()
        out.write_text(json.dumps(report, indent=1) + "\n")

    data = None
    for name in CHECKS:
        if name not in wanted:
            report["checks"][name] = {"status": "skipped", "reason": "not in --only"}
            continue
        left = args.budget_s - (time.perf_counter() - start)
        if gpu is None:
            entry = {"status": "skipped", "reason": "no CUDA device (torch.cuda.is_available() is False)"}
        elif left < 20:
            entry = {"status": "skipped", "reason": f"the time budget of {args.budget_s:.0f} s is spent"}
        else:
            began = time.perf_counter()
            log(f"check {name} ...")
            try:
                if name in ("train_gpt", "train_vljepa", "bf16_vs_fp32") and data is None:
                    data = prepare_data(args.data, log)
                    left = args.budget_s - (time.perf_counter() - start)
                timeout = min(BUDGETS[name], left)
                if name in ("kernels", "decode"):
                    entry = run_child(name, timeout)
                elif name == "bf16_vs_fp32":
                    entry = check_bf16_vs_fp32(data, args.work, timeout)
                else:
                    entry = check_training(name, data, args.work, timeout)
                entry["status"] = "failed" if entry["problems"] else "passed"
            except subprocess.TimeoutExpired as e:
                entry = {"status": "failed", "reason": f"timed out after {e.timeout:.0f} s"}
            except Exception as e:  # noqa: BLE001 - a check's failure, whatever it is, is reported, not fatal
                entry = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
            entry["seconds"] = time.perf_counter() - began
        report["checks"][name] = entry
        save()
        why = entry.get("reason") or "; ".join(entry.get("problems", [])) or "ok"
        log(f"check {name}: {entry['status']} ({why})" + (f" in {entry['seconds']:.0f} s" if "seconds" in entry else ""))
    log(f"wrote {out} ({report['elapsed_s']:.0f} s)")
    for name, value in report["results"].items():
        print(f"RESULT {name} {value:.4g}")
    return 1 if any(c["status"] == "failed" for c in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
