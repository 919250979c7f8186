"""Training logs: a console line with rate and ETA, TensorBoard scalars, a jsonl record per step,
and the loss curve as a PNG. Only rank 0 writes."""

from __future__ import annotations

import json
import time
from pathlib import Path


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
    def __init__(self, out_dir: Path, total_steps: int, start_step: int, tensorboard: bool):
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.jsonl = out_dir / "metrics.jsonl"
        if self.jsonl.exists():  # a resumed run redoes the steps after its checkpoint: drop their records
            kept = [line for line in self.jsonl.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.jsonl.write_text("".join(line + "\n" for line in kept))
        self._mark = (time.perf_counter(), start_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def step(self, step: int, record: dict) -> None:
        """Record one optimizer step (every step goes to jsonl and TensorBoard)."""
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.writer:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)

    def console(self, step: int, record: dict, tokens_per_step: int) -> None:
        now = time.perf_counter()
        then, then_step = self._mark
        self._mark = (now, step)
        steps_per_s = (step - then_step) / max(now - then, 1e-9)
        eta = (self.total_steps - step) / max(steps_per_s, 1e-9)
        if self.writer:
            self.writer.add_scalar("train/tokens_per_s", steps_per_s * tokens_per_step, step)
        print(
            f"step {step}/{self.total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
            f"grad_norm {record['grad_norm']:.3f} | {_human(steps_per_s * tokens_per_step)} tok/s | "
            f"tokens {_human(record['tokens_seen'])} | ETA {_duration(eta)}",
            flush=True,
        )

    def close(self) -> Path:
        """Flush TensorBoard and draw the loss curve of every step in metrics.jsonl (resumed runs too)."""
        if self.writer:
            self.writer.close()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.jsonl.read_text().splitlines()]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["tokens_seen"] for r in rows], [r["loss"] for r in rows], linewidth=1)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("training loss")
        ax.set_title(f"{self.out_dir.name}: training loss")
        ax.grid(alpha=0.3)
        png = self.out_dir / "loss_curve.png"
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
        return png
