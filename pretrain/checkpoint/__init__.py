"""Checkpoints: DeepSpeed's own format (model, optimizer, scheduler, ZeRO partitions) plus the design's
training-state fields (docs/design.md, Checkpoints and conversion) and each rank's RNG state, so --resume is exact.

A checkpoint is complete or invisible. Every rank writes its files into the step's folder, hashes them
and leaves a note of them (`.rank<N>.json`); only when every rank's note is there does rank 0 write
`complete.json` (every file's size and sha256, the config and the layout) and then `latest`. Resume
takes the newest folder whose marker matches its files and says which newer ones it skipped.
DeepSpeed's own `latest` cannot be trusted for this: rank 0 writes it before the other ranks'
optimizer partitions are on disk.

A save first copies every state it will write into host memory (DeepSpeed copies most of them anyway);
a background save (checkpoint.async) then returns to training and a thread writes, hashes and, on rank 0,
publishes: the marker comes last as before, so a crash mid-write leaves the previous checkpoint the
newest complete one. The next save, and the end of the run, wait for it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.checkpoint.utils import clone_tensors_for_torch_save
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from megatron.core import parallel_state

from cromwell.pretrain.config import migrate

MARKER = "complete.json"
_TAG = re.compile(r"global_step(\d+)")


class CheckpointError(RuntimeError):
    pass


def _rng_state() -> dict:
    # Tensors and plain numbers only, so the file loads with weights_only=True.
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def safe_load(path: Path, map_location=None, mmap: bool = False):
    """torch.load that never runs pickled code: a file holding anything but tensors, containers and
    plain values is refused, naming the file. mmap: tensors read from the file only when touched."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # DeepSpeed pickles these few of its own classes into its optimizer files; they only hold numbers.
    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: refused to load, it holds pickled objects that would run code ({first})") from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True. Saving, it copies each state to
    host memory (each tensor compact, as DeepSpeed's own copy makes it) and writes it; between `collect`
    and `collected` it notes the paths, and for a background save keeps the copies to write later (the
    memory of one copy of the rank's state; a synchronous save holds one file's at a time). A background
    save's copies are kept once written and reused by the next one (torchtitan's async checkpoint stages
    through reused buffers the same way): fresh host memory is faulted in page by page on its first
    write, which made the copy cost a quarter of a synchronous save (bench/checkpoint.py)."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self._paths: list[Path] | None = None
        self._pending: list[tuple[dict, Path]] | None = None
        self._staging: dict[tuple, list[torch.Tensor]] = {}  # written copies, by (shape, dtype), to reuse
        self._writer: threading.Thread | None = None
        self._failure: BaseException | None = None

    def preserves_storage_sharing(self) -> bool:
        return False  # DeepSpeed need not copy the tensors first: save() does, once

    def save(self, state_dict, path: str) -> None:
        state = clone_tensors_for_torch_save(state_dict) if self._pending is None else self._stage(state_dict)
        if self._paths is not None:
            self._paths.append(Path(path))
        if self._pending is None:
            self.write(state, Path(path))
        else:
            self._pending.append((state, Path(path)))

    def _stage(self, item):
        """DeepSpeed's copy (each tensor compact, on the host), into a staging buffer where one is free."""
        if torch.is_tensor(item):
            free = self._staging.get((tuple(item.shape), item.dtype))
            return free.pop().copy_(item.detach()) if free else clone_tensors_for_torch_save(item)
        if isinstance(item, list):
            return [self._stage(v) for v in item]
        if isinstance(item, tuple):
            return tuple(self._stage(v) for v in item)
        if isinstance(item, dict):
            return type(item)({k: self._stage(v) for k, v in item.items()})
        return item

    def unstage(self, states: list[tuple[dict, Path]]) -> None:
        """The written copies become staging buffers for the next background save."""
        for state, _ in states:
            for t in all_tensors(state):
                self._staging.setdefault((tuple(t.shape), t.dtype), []).append(t)

    def write(self, state, path: Path) -> None:
        torch.save(state, path, _use_new_zipfile_serialization=self.zipfile_serialization)

    def load(self, path: str, map_location=None):
        return safe_load(Path(path), map_location)

    def collect(self, background: bool) -> None:
        self.wait()
        self._paths, self._pending = [], [] if background else None

    def collected(self) -> tuple[list[Path], list[tuple[dict, Path]]]:
        """(every file saved since `collect`, those of them still to write with their states)."""
        paths, pending = self._paths, self._pending or []
        self._paths = self._pending = None
        return paths, pending

    def start(self, job: Callable[[], None]) -> None:
        """Run `job` (the writing) on a thread. Not a daemon: the interpreter waits for it at exit."""
        def guarded():
            _name_thread(WRITER_THREAD)
            try:
                job()
            except BaseException as e:  # re-raised in the training thread by wait()
                self._failure = e

        self._writer = threading.Thread(target=guarded, name="checkpoint-writer")
        self._writer.start()

    def wait(self) -> None:
        """Until the background save (if any) is written and published; its failure raised here."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise CheckpointError(f"the background checkpoint write failed: {failure}") from failure

    def busy(self) -> bool:
        return self._writer is not None and self._writer.is_alive()


WRITER_THREAD = "ckpt-writer"  # the background writer's name in the kernel (top -H, /proc/<pid>/task/*/comm)


def _name_thread(name: str) -> None:
    if sys.platform == "linux":  # Python names its threads for itself only (before 3.14)
        ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME


def all_tensors(value):
    """Every tensor in a nest of dicts, lists and tuples."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from all_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from all_tensors(v)


def wait(engine) -> None:
    """Until the engine's background checkpoint write, if any, is complete (every rank calls it)."""
    engine.checkpoint_engine.wait()


def make_safe(engine) -> None:
    """Load DeepSpeed's files with weights_only=True, and leave out the zero_to_fp32.py it copies
    into every checkpoint (it loads with weights_only=False); the installed deepspeed package still
    has it, for whoever chooses to run it."""
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    engine._copy_recovery_script = lambda save_path: None


def step_of(tag_dir: Path) -> int:
    return int(_TAG.fullmatch(tag_dir.name).group(1))


def _tag_dirs(directory: Path) -> list[Path]:
    """Every global_step<N> folder, newest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _TAG.fullmatch(p.name)]
    return sorted(found, key=step_of, reverse=True)


def read_marker(tag_dir: Path) -> dict:
    return json.loads((tag_dir / MARKER).read_text())


def problem(tag_dir: Path) -> str | None:
    """Why `tag_dir` is not a complete checkpoint, or None. Sizes only: cheap enough to scan many."""
    try:
        marker = read_marker(tag_dir)
    except FileNotFoundError:
        return f"no {MARKER} (its save did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable {MARKER}: {e}"
    for name, entry in marker["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, {entry['size']} were written"
    return None


def newest_complete(directory: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint or None, [(newer incomplete one, why)])."""
    skipped = []
    for tag_dir in _tag_dirs(directory):
        why = problem(tag_dir)
        if why is None:
            return tag_dir, skipped
        skipped.append((tag_dir, why))
    return None, skipped


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint in `directory`, or None."""
    return newest_complete(Path(directory))[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
        # The writer closed the file; this makes sure it is on the storage, not only in the page cache.
        os.fsync(f.fileno())
    return h.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish(work: Path, out: Path) -> None:
    """Rename the finished folder into place, its files on the storage first: a crash right after the
    rename must not leave an export whose files are still in the page cache only."""
    for path in sorted(work.rglob("*"), reverse=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _objective_file(tag_dir: Path) -> Path:
    # One file per model-parallel rank: every data-parallel rank holds the same objective state.
    tp, pp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    return tag_dir / f"objective_state_tp{tp:02d}_pp{pp:02d}.pt"


def save(engine, directory: Path, step: int, training_state: dict, write_tokenizer: Callable[[Path], None],
         layout: dict, keep: int | None = None, objective_state: dict | None = None, background: bool = False) -> Path:
    """Collective: every rank calls it. training_state holds the design's fields (epoch, tokens_seen,
    train_loss, eval_metrics, config, tokenizer) and the loader position; it is stored with the
    model states. write_tokenizer(tag_dir) puts the tokenizer's files beside them (rank 0). layout
    (world and parallel sizes) goes into the marker, for resume to compare. keep: how many complete
    checkpoints to leave, the newest ones. objective_state: tensors the objective keeps beside the model
    (the EMA target), written by data-parallel rank 0. background: return once the states are copied to
    host memory and write them on a thread (wait() or the next save waits for it); otherwise return when
    the checkpoint is complete."""
    writer = engine.checkpoint_engine
    writer.collect(background)  # waits for the previous background save first
    tag_dir = directory / f"global_step{step}"
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        if tag_dir.exists():  # a save of this step that was cut short, by a killed earlier attempt
            shutil.rmtree(tag_dir)
        tag_dir.mkdir(parents=True)
        write_tokenizer(tag_dir)
    written = sorted(p for p in tag_dir.rglob("*") if p.is_file()) if rank == 0 else []
    dist.barrier()
    writer.save(_rng_state(), str(tag_dir / f"rng_state_rank{rank:05d}.pt"))
    if objective_state and parallel_state.get_data_parallel_rank() == 0:
        writer.save(objective_state, str(_objective_file(tag_dir)))
    engine.save_checkpoint(str(directory), tag=tag_dir.name, client_state={"step": step, **training_state,
                           "optimizer_params": _optimizer_params(engine)}, save_latest=False)
    saved, states = writer.collected()
    marker = {"step": step, "layout": layout, "config": training_state["config"]}

    def finish():
        try:
            for state, path in states:
                writer.write(state, path)
            writer.unstage(states)
            mine = written + saved
            _write_atomically(tag_dir / f".rank{rank:05d}.json", json.dumps(
                {str(p.relative_to(tag_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in mine}))
        except Exception as e:  # rank 0 stops waiting for this rank's note
            _write_atomically(tag_dir / f".rank{rank:05d}.failed", f"{type(e).__name__}: {e}")
            raise
        if rank == 0:
            _publish(directory, tag_dir, {**marker, "files": _notes(tag_dir, world)}, keep)

    if background:
        writer.start(finish)
    else:
        finish()
        dist.barrier()
    return tag_dir


def _notes(tag_dir: Path, world: int) -> dict:
    """{file: {size, sha256}} of every rank's note, once all are there; the notes are then removed."""
    notes = [tag_dir / f".rank{r:05d}.json" for r in range(world)]
    while not all(n.is_file() for n in notes):
        failed = sorted(tag_dir.glob(".rank*.failed"))
        if failed:
            raise CheckpointError(f"{tag_dir}: {failed[0].name.removeprefix('.').removesuffix('.failed')} could not "
                                  f"write its files ({failed[0].read_text()}); the checkpoint stays incomplete")
        time.sleep(0.02)
    files = {}
    for n in notes:
        files.update(json.loads(n.read_text()))
    for n in notes:
        n.unlink()
    return dict(sorted(files.items()))


def _publish(directory: Path, tag_dir: Path, marker: dict, keep: int | None) -> None:
    _write_atomically(tag_dir / MARKER, json.dumps(marker, indent=1))
    _write_atomically(directory / "latest", tag_dir.name)  # for people and DeepSpeed's tools
    if keep:
        prune(directory, keep)


def _optimizer_params(engine) -> list[list[str]] | None:
    """The names of the parameters of each optimizer group, in order, where the optimizer's state knows
    them only by position (torch's own AdamW, which ZeRO-0 in fp32 steps directly): what a resume on
    another layout needs to find each parameter's moments. ZeRO-1-3 record the names themselves."""
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled():
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in engine.optimizer.param_groups]


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete the checkpoints older than the newest `keep` complete ones (incomplete ones among
    them too); never a complete one that is among the newest `keep`."""
    complete = [d for d in _tag_dirs(directory) if problem(d) is None]
    if len(complete) <= keep:
        return []
    oldest_kept = step_of(complete[keep - 1])
    doomed = [d for d in _tag_dirs(directory) if step_of(d) < oldest_kept]
    for d in doomed:
        shutil.rmtree(d)
    return doomed


def verify_checksums(tag_dir: Path) -> None:
    """Every file's sha256 against the marker, each rank reading a share (collective)."""
    files = sorted(read_marker(tag_dir)["files"].items())
    bad = [f"{name} (sha256 differs)" for name, entry in files[dist.get_rank()::dist.get_world_size()]
           if _sha256(tag_dir / name) != entry["sha256"]]
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, bad)
    bad = [b for share in shares for b in share]
    if bad:
        raise CheckpointError(f"checkpoint {tag_dir} is corrupt: {', '.join(bad)}")


def init_source(source: Path, cfg) -> Path:
    """The complete checkpoint run.init_from names, checked to hold this run's model."""
    tag_dir = source if _TAG.fullmatch(source.name) else newest_complete(source)[0]
    why = "no complete checkpoint in it" if tag_dir is None else problem(tag_dir)
    if why:
        raise CheckpointError(f"run.init_from {source}: {why}")
    saved = _flat(migrate(read_marker(tag_dir)["config"], f"{tag_dir}'s run config"))
    current = _flat(json.loads(json.dumps(cfg.model_dump())))
    differ = [k for k in sorted(saved.keys() | current.keys()) if k.startswith("model.") and saved.get(k) != current.get(k)]
    if differ:
        raise CheckpointError(f"run.init_from {tag_dir} holds another model: {', '.join(differ)} differ")
    return tag_dir


def load_objective_state(tag_dir: Path) -> dict:
    path = _objective_file(tag_dir)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} has no {path.name}: it was written by a run whose objective "
                              "keeps no state of its own (another training.objective?)")
    return safe_load(path)


def load(engine, tag_dir: Path) -> dict:
    """Restore checkpoint `tag_dir`, written on this run's layout, into the engine and this rank's RNG;
    return the training state saved with it. The LR scheduler's state is restored too (its step count);
    the trainer re-derives the learning rates from the current config. (Another layout:
    pretrain/checkpoint/relayout.py.)"""
    verify_checksums(tag_dir)
    rng = read_rng(tag_dir)
    try:
        load_path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except CheckpointError:
        raise
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {tag_dir} could not be loaded: {e}") from e
    if load_path is None or client_state is None:
        raise CheckpointError(f"checkpoint {tag_dir} could not be loaded")
    set_rng_state(rng)
    return client_state


def read_rng(tag_dir: Path) -> dict:
    """This rank's RNG state from checkpoint `tag_dir` (collective: a rank's error stops every rank). On
    another world size, rank r takes saved rank r mod the saved world size: the streams continue where
    ranks map one to one, and a rank that is new starts a copy of an existing one's."""
    saved_world = read_marker(tag_dir)["layout"]["world_size"]
    rng_file = tag_dir / f"rng_state_rank{dist.get_rank() % saved_world:05d}.pt"
    rng, error = None, None
    try:
        rng = safe_load(rng_file)
    except FileNotFoundError:
        error = f"checkpoint {tag_dir} has no {rng_file.name}, though its {MARKER} lists {saved_world} ranks"
    except CheckpointError as e:
        error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)  # every rank stops, not only the one that found it
    if any(errors):
        raise CheckpointError(next(e for e in errors if e))
    return rng


# What a resumed run may change. Anything else (the model, vocabulary, tokenizer, precision, objective)
# would not match the saved tensors or would silently train another model. The layout may change:
# pretrain/checkpoint/relayout.py moves the state onto any other.
_MAY_CHANGE = ("run.init_from", "training.optimizer.lr", "training.scheduler.", "training.train_tokens",
               "training.train_steps", "training.max_nonfinite_steps", "training.kernels", "parallel.activation_checkpointing", "logging.",
               "checkpoint.", "validation.", "run.name", "run.output_dir", "data.valid_shards", "data.valid_chats",
               "data.num_workers", "data.on_error", "data.cache_dir", "data.remote_", "training.micro_batch_size",
               "training.gradient_accumulation_steps", "data-parallel size", "parallel.tensor", "parallel.pipeline",
               "parallel.zero_stage", "parallel.ds_config")
# These decide which sample comes next; the loader state can only continue the layout it was saved in.
# (The token loader's order depends on the global batch, not on how it is split: ranks, micro
# batches and workers may change. The chat loader's state names what it cannot follow itself.)
_DATA_LAYOUT = ("data.shards", "data.mixture", "data.chats", "data.seed", "data.shuffle_window", "data.max_len",
                "data.document_mask", "training.batch_size", "run.seed")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict, saved_dp: int, dp: int) -> list[str]:
    """The fields that differ from the checkpoint's, as 'field: old -> new'. Raises CheckpointError
    listing those a resumed run cannot change."""
    old, new = _flat(migrate(saved, "the checkpoint's run config")), _flat(current)
    old["data-parallel size"], new["data-parallel size"] = saved_dp, dp
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]

    def line(k):
        return f"{k}: {old.get(k)!r} -> {new.get(k)!r}"

    fixed = [line(k) for k in changed if not k.startswith(_MAY_CHANGE) and not k.startswith(_DATA_LAYOUT)]
    layout = [line(k) for k in changed if k.startswith(_DATA_LAYOUT)]
    if fixed or layout:
        parts = []
        if fixed:
            parts.append("these cannot change on resume:\n  " + "\n  ".join(fixed))
        if layout:
            parts.append("these change the data layout, which a resumed loader cannot follow yet:\n  "
                         + "\n  ".join(layout))
        raise CheckpointError("--resume: the config differs from the checkpoint's; " + "\n".join(parts)
                              + "\n(start a new run with --overwrite or another run.output_dir to train it as configured)")
    return [line(k) for k in changed]
