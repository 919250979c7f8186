"""Training logs: a console line with rate and ETA, TensorBoard scalars, optional Weights & Biases, a
jsonl record per step, and the loss curve as a PNG. Only rank 0 writes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from cromwell.pretrain.config import Config


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLog:
    def __init__(self, cfg: Config, total_steps: int, start_step: int):
        self.out_dir = Path(cfg.run.output_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps, self.log_every = total_steps, cfg.logging.log_every
        self.jsonl = self.out_dir / "metrics.jsonl"
        if self.jsonl.exists():  # a resumed run redoes the steps after its checkpoint: drop their records
            kept = [line for line in self.jsonl.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.jsonl.write_text("".join(line + "\n" for line in kept))
        self._mark = (time.perf_counter(), start_step)
        self.writer = self.wandb = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        w = cfg.logging.wandb
        if w.enabled:
            import wandb

            self.wandb = wandb.init(project=w.project, entity=w.entity, mode=w.mode, name=cfg.run.name,
                                    dir=w.dir or str(self.out_dir), config=cfg.model_dump())

    def note(self, text: str) -> None:
        print(text, flush=True)

    def step(self, step: int, record: dict) -> None:
        """Record one optimizer step: every step to jsonl, TensorBoard and W&B; the console every log_every."""
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        if self.writer:
            for key, value in scalars.items():
                self.writer.add_scalar(f"{'val' if key.startswith('val_') else 'train'}/{key}", value, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)
        if step % self.log_every == 0 or step == self.total_steps or "val_loss" in record:
            self._console(step, record)

    def _console(self, step: int, r: dict) -> None:
        now = time.perf_counter()
        then, then_step = self._mark
        self._mark = (now, step)
        eta = (self.total_steps - step) * (now - then) / max(step - then_step, 1)
        parts = [f"loss {r['loss']:.4f}"]
        components = [k for k in ("lm", "jepa", "jepa_text", "jepa_vision") if k in r]
        if len(components) > 1:  # a single-component loss is its only component
            parts += [f"{k} {r[k]:.4f}" for k in components]
        if "jepa_target_rank" in r:
            parts.append(f"target rank {r['jepa_target_rank']:.1f}")
        if "val_loss" in r:
            parts.append(f"val_loss {r['val_loss']:.4f}" + (f" (ppl {r['val_ppl']:.2f})" if "val_ppl" in r else ""))
        mfu = "n/a" if math.isnan(r["mfu"]) else f"{100 * r['mfu']:.1f}%"
        print(
            f"step {step}/{self.total_steps} | {' | '.join(parts)} | lr {r['lr']:.3e} | grad_norm {r['grad_norm']:.3f} | "
            f"{r['step_time_s']:.2f} s/step | {_human(r['tokens_per_s'])} tok/s | {r['tflops_per_device']:.3g} TFLOP/s/dev "
            f"| MFU {mfu} | mem {r['peak_mem_gb']:.2f} GB | tokens {_human(r['tokens_seen'])}"
            + (f" | non-finite steps skipped {r['nonfinite_steps']}" if r.get("nonfinite_steps") else "") + f" | ETA {_duration(eta)}",
            flush=True,
        )

    def close(self, checkpoint: Path | None) -> None:
        """Flush the writers, draw the loss curve of every step in metrics.jsonl (resumed runs too)
        and say where everything is."""
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.jsonl.read_text().splitlines()]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["tokens_seen"] for r in rows], [r["loss"] for r in rows], linewidth=1, label="train")
        val = [r for r in rows if "val_loss" in r]
        if val:
            ax.plot([r["tokens_seen"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
            ax.legend()
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss")
        ax.set_title(f"{self.out_dir.name}: loss")
        ax.grid(alpha=0.3)
        png = self.out_dir / "loss_curve.png"
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
        step = rows[-1]["step"] if rows else 0
        print(
            f"\n{'finished' if step == self.total_steps else 'stopped after'} {step}/{self.total_steps} steps\n"
            f"  logs:       {self.jsonl} (TensorBoard: {self.out_dir / 'tensorboard'})\n"
            f"  checkpoint: {checkpoint or 'none (checkpoint.at_end is false)'}\n  loss curve: {png}",
            flush=True,
        )
