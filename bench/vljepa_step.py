"""Cost of one VL-JEPA hybrid training step (0.3 x JEPA + 0.7 x LM) against the LM-only step of the
same model on the same batches, in one run.

Both steps are zero_grad + the objective's forward + backward + AdamW step; the hybrid step adds what
JEPA costs: the target encoder's forward (no grad) on the unmasked input, the projections and
predictors, and the EMA update of the target after the optimizer step. Its online ViT reads only the
context patches; the LM-only step's reads every patch. The two steps run once per round, in an order
rotated every round (bench/timing.py), and the reported ratio is the median of the per-round ratios.
On CPU torch runs one thread and time is the thread's CPU time (the machines are shared).

The breakdown splits the hybrid step by forward hooks: online forward (the model's encoders), the LM
loss (fused output projection + cross-entropy), target forward, JEPA head forward (projections,
predictors, JEPA loss), backward (all of it), optimizer, EMA update.

Memory: bytes of the tensors a step keeps, counted exactly: weights, gradients, AdamW states of the
trained weights, the fp32 EMA target (hybrid only), and the activations saved for backward
(deduplicated by storage). On CUDA the peak allocated bytes of each step are recorded too.

  python bench/vljepa_step.py                 # CPU defaults, a few minutes
  python bench/vljepa_step.py --hidden 1024 --layers 12 --vision_hidden 768 --vision_layers 12 --context 2048
"""

from __future__ import annotations

import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import io
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cromwell.bench.machine import machine
from cromwell.bench.step_jepa_cost import saved_activation_bytes
from cromwell.bench.timing import interleaved, paired_ratio
from cromwell.data.multimodal import JEPASamples
from cromwell.data.tokenizer import PAD_ID
from cromwell.model.build import build
from cromwell.model.gpt import init_weights, megatron_config
from cromwell.model.vljepa import OutputHead
from cromwell.pretrain.config import load_config
from cromwell.pretrain.objectives.hybrid import Hybrid
from cromwell.pretrain.distributed import init_distributed
from cromwell.pretrain.parallelize import whole_parameters

ROOT = Path(__file__).resolve().parents[1]


class _Plain:
    """whole_parameters' view of a one-process model without ZeRO."""

    def zero_optimization_stage(self):
        return 0


def config(args, alpha: float, beta: float):
    sets = [
        "model.type=vljepa", "training.objective=hybrid", f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}", f"model.num_heads={args.heads}", "model.ffn_hidden_size=null",
        f"model.vision.image_size={args.image_size}", f"model.vision.hidden_size={args.vision_hidden}",
        f"model.vision.num_layers={args.vision_layers}", f"model.vision.num_heads={args.heads}",
        f"model.fusion.every={args.fusion_every}", f"model.predictor.num_layers={args.predictor_layers}",
        f"model.predictor.num_heads={args.heads}", f"model.predictor.embedding_dim={args.embedding_dim}",
        f"training.lm.context_length={args.context}", f"model.vocab_size={args.vocab}",
        f"training.hybrid.alpha={alpha}", f"training.hybrid.beta={beta}", "training.train_steps=1000",
        f"training.precision={'bf16' if args.device == 'cuda' else 'fp32'}",
    ]
    return load_config(ROOT / "pretrain/configs/tiny.yaml", sets)


def batches(cfg, objective, args, n: int) -> list:
    """n micro batches of random ids in which args.images rows (the first ones) have a random image."""
    rng = np.random.default_rng(0)
    v = cfg.model.vision
    samples = JEPASamples(seed=0, pad_id=PAD_ID, image_size=v.image_size, patch_size=v.patch_size,
                          masks=objective.predicts_embeddings, span_length=cfg.training.jepa.span_length)
    out = []
    for b in range(n):
        rows = rng.integers(20, args.vocab, (args.batch_size, args.context + 1))
        extras = []
        for i, row in enumerate(rows):
            image = None
            if i < args.images:
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (v.image_size, v.image_size, 3), dtype=np.uint8)).save(buf, "PNG")
                image = buf.getvalue()
            extras.append(samples(b * args.batch_size + i, row, image, f"row {i}"))
        ids = torch.from_numpy(rows)
        out.append(objective.collate((ids[:, :-1], ids[:, 1:].clone(), extras)))
    return out


class Step:
    """One training step of an objective on the shared model, with its own optimizer state."""

    def __init__(self, model, objective, device):
        self.model, self.objective, self.device = model, objective, device
        trained = [p for name, p in model.named_parameters() if objective.trains(model.modules_of[name.split(".")[0]])]
        self.trained = trained
        self.optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=device == "cuda")

    def __call__(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        sums = self.objective.forward(self.model, batch).sums
        total = self.objective.total(sums, self.objective.counts(batch).to(sums.device))
        total.backward()
        self.optimizer.step()
        self.objective.after_step(self.model, whole_parameters(_Plain()), step=1)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return total

    def state_bytes(self) -> dict:
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        trained = sum(p.numel() * p.element_size() for p in self.trained)
        target = 0 if self.objective.ema_target() is None else sum(
            p.numel() * p.element_size() for p in self.objective.ema_target().parameters())
        # AdamW keeps two fp32 moments per trained weight (and its gradient).
        return {"weights": weights, "gradients": trained, "adam_states": 2 * sum(p.numel() * 4 for p in self.trained),
                "ema_target": target}


def breakdown(step: Step, batch, rounds: int, clock) -> dict:
    """Mean seconds of each part of the hybrid step, by hooks around the modules that do it."""
    model, objective = step.model, step.objective
    parts = {k: [] for k in ("online_forward", "lm_loss_forward", "target_forward", "jepa_head_forward", "backward",
                             "optimizer", "ema")}
    marks = {}

    def pre(name):
        return lambda *_: marks.__setitem__(name, clock())

    def post(name):
        return lambda *_: parts[name].append(clock() - marks.pop(name))

    lm_head = model._of(OutputHead).proj
    hooks = [model.register_forward_pre_hook(pre("online_forward")), model.register_forward_hook(post("online_forward")),
             lm_head.register_forward_pre_hook(pre("lm_loss_forward")),
             lm_head.register_forward_hook(post("lm_loss_forward")),
             objective.ema_target().register_forward_pre_hook(pre("target_forward")),
             objective.ema_target().register_forward_hook(post("target_forward"))]
    try:
        for _ in range(rounds):
            step.optimizer.zero_grad(set_to_none=True)
            start = clock()
            sums = objective.forward(model, batch).sums
            total = objective.total(sums, objective.counts(batch).to(sums.device))
            forward_end = clock()
            total.backward()
            t1 = clock()
            step.optimizer.step()
            t2 = clock()
            objective.after_step(model, whole_parameters(_Plain()), step=1)
            t3 = clock()
            # The rest of the forward: projections, predictors, span means and the JEPA losses.
            parts["jepa_head_forward"].append(forward_end - start - parts["online_forward"][-1]
                                              - parts["lm_loss_forward"][-1] - parts["target_forward"][-1])
            parts["backward"].append(t1 - forward_end)
            parts["optimizer"].append(t2 - t1)
            parts["ema"].append(t3 - t2)
    finally:
        for h in hooks:
            h.remove()
    return {k: statistics.median(v) for k, v in parts.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vision_hidden", type=int, default=256)
    ap.add_argument("--vision_layers", type=int, default=4)
    ap.add_argument("--image_size", type=int, default=256)
    ap.add_argument("--fusion_every", type=int, default=2)
    ap.add_argument("--predictor_layers", type=int, default=2)
    ap.add_argument("--embedding_dim", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--images", type=int, default=1, help="rows of each batch with an image (stage 1: 25%%)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    clock = time.thread_time if args.device == "cpu" else time.perf_counter
    load_start = os.getloadavg()

    hybrid_cfg, lm_cfg = config(args, 0.3, 0.7), config(args, 0.0, 1.0)
    init_distributed(hybrid_cfg)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build(hybrid_cfg.model, megatron_config(1))
    for name, layer in model.named_children():
        init_weights(layer, int(name), hybrid_cfg.model, 0)
    model.to(device=args.device, dtype=dtype)
    hybrid, lm = Hybrid(hybrid_cfg), Hybrid(lm_cfg)
    hybrid.setup(model, whole_parameters(_Plain()), args.device)
    steps = {"hybrid": Step(model, hybrid, args.device), "lm": Step(model, lm, args.device)}
    data = {name: [b.to(args.device) for b in batches(cfg, obj, args, 2)]
            for name, cfg, obj in (("hybrid", hybrid_cfg, hybrid), ("lm", lm_cfg, lm))}

    memory = {}
    for name, step in steps.items():
        batch = data[name][0]
        _, activations = saved_activation_bytes(lambda: step.objective.forward(model, batch))
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        step(batch)
        memory[name] = {**step.state_bytes(), "activations": activations}
        memory[name]["total"] = sum(memory[name].values())
        if args.device == "cuda":
            memory[name]["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()

    for _ in range(args.warmup):
        for name in steps:
            steps[name](data[name][0])
    seconds = interleaved([lambda: steps["hybrid"](data["hybrid"][1]), lambda: steps["lm"](data["lm"][1])],
                          args.rounds, clock)
    ratio = paired_ratio(seconds[0], seconds[1])
    parts = breakdown(steps["hybrid"], data["hybrid"][1], max(3, args.rounds // 3), clock)
    hybrid_median, lm_median = statistics.median(seconds[0]), statistics.median(seconds[1])
    memory_ratio = memory["hybrid"]["total"] / memory["lm"]["total"]
    result = {
        "benchmark": "vljepa_step", "machine": machine(), "load_average_at_end": os.getloadavg(),
        "load_average_at_start": load_start, "device": args.device, "dtype": str(dtype), "args": vars(args),
        "parameters": sum(p.numel() for p in model.parameters()),
        "target_parameters": sum(p.numel() for p in hybrid.ema_target().parameters()),
        "step_seconds": {"hybrid_median": hybrid_median, "lm_median": lm_median},
        "hybrid_vs_lm_step_time_ratio": ratio,
        "hybrid_breakdown_seconds": parts,
        "hybrid_breakdown_share": {k: v / sum(parts.values()) for k, v in parts.items()},
        "memory_bytes": memory, "hybrid_vs_lm_memory_ratio": memory_ratio,
        "target": "hybrid step at most 1.45 x the LM-only step",
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"vljepa_step_{args.device}.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"hybrid step {hybrid_median * 1e3:.1f} ms, LM-only {lm_median * 1e3:.1f} ms "
          f"(per-round ratio p25 {ratio['p25']:.3f}, p75 {ratio['p75']:.3f}, n {ratio['n']})")
    print("hybrid breakdown: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in parts.items()))
    print(f"memory: hybrid {memory['hybrid']['total'] / 1e6:.1f} MB, LM-only {memory['lm']['total'] / 1e6:.1f} MB")
    print(f"wrote {out}")
    print(f"RESULT vljepa_vs_lm_step_time_ratio {ratio['median']:.3f}")
    print(f"RESULT vljepa_vs_lm_peak_memory_ratio {memory_ratio:.3f}")


if __name__ == "__main__":
    main()
