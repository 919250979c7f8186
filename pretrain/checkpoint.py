"""Checkpoints: DeepSpeed's own format (model, optimizer, scheduler, ZeRO partitions) plus the seed's
training-state fields (seed 000, section 5.1) and each rank's RNG state, so --resume is exact."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist


class CheckpointError(RuntimeError):
    pass


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def latest(directory: Path) -> Path | None:
    """The checkpoint `latest` names in `directory`, or None."""
    marker = Path(directory) / "latest"
    return Path(directory) / marker.read_text().strip() if marker.is_file() else None


def save(engine, directory: Path, step: int, training_state: dict, write_tokenizer: Callable[[Path], None]) -> Path:
    """Collective: every rank calls it. training_state holds the seed's fields (epoch, tokens_seen,
    train_loss, eval_metrics, config, tokenizer) and the loader position; it is stored with the
    model states. write_tokenizer(tag_dir) puts the tokenizer's files beside them (rank 0)."""
    tag = f"global_step{step}"
    tag_dir = directory / tag
    rank = dist.get_rank()
    if rank == 0:
        tag_dir.mkdir(parents=True, exist_ok=True)
        write_tokenizer(tag_dir)
    dist.barrier()
    # RNG first: `latest` is written last, by DeepSpeed, so a checkpoint it names is complete.
    torch.save(_rng_state(), tag_dir / f"rng_state_rank{rank:05d}.pt")
    engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step, **training_state}, save_latest=True)
    return tag_dir


def load(engine, directory: Path) -> dict:
    """Restore the latest checkpoint in `directory` into the engine and this rank's RNG; return the
    training state saved with it."""
    tag_dir = latest(directory)
    if tag_dir is None:
        raise CheckpointError(
            f"--resume: no checkpoint in {directory} (no 'latest' file; a run writes one every "
            "checkpoint.every_steps steps and at its end)"
        )
    rng_file = tag_dir / f"rng_state_rank{dist.get_rank():05d}.pt"
    try:
        load_path, client_state = engine.load_checkpoint(str(directory), tag=tag_dir.name)
        rng = torch.load(rng_file, weights_only=False)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {tag_dir} is unreadable (truncated or incomplete?): {e}") from e
    if load_path is None or client_state is None:
        raise CheckpointError(f"checkpoint {tag_dir} named by {directory / 'latest'} could not be loaded")
    _set_rng_state(rng)
    return client_state
