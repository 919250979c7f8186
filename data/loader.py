"""Streaming micro batches of packed token sequences from a shard manifest, for data parallelism.

The stream is a pure function of (manifest, seed, micro_batch_size, dp_size, num_workers,
shuffle_window):

- Readers: each data-parallel rank has max(1, num_workers) readers (its DataLoader workers, or
  the main process); reader g = dp_rank * workers + w of R = dp_size * workers in all.
- Epoch e: shard order = np.random.default_rng([seed, e]).permutation(num_shards); reader g
  reads shards order[g::R] in that order, in groups of shuffle_window shards. Group i's samples
  (its shards' samples concatenated in that order) are permuted together by
  np.random.default_rng([seed, e, g, i]), so that a micro batch mixes shards, and the reader
  cuts its groups' samples, one group after the other, into micro batches.
- Memory: a reader holds one group, up to shuffle_window shards; a larger window mixes better.
- Every reader yields the same number of batches per epoch, batches_per_reader: what its
  floor(num_shards / R) smallest shards can fill, a bound that holds for any shard order, so it
  is known from the manifest counts alone and all ranks step together. The rest of an epoch's
  samples are left out of that epoch (logged once), different ones each epoch.
- A rank's stream takes its readers' batches in turn (reader w gives batches w, w + W, ...),
  which is the order in which torch's DataLoader hands out its workers' batches.

The position in this stream (epoch, batch_in_epoch) is the same on every rank, so one rank's
state_dict() resumes them all.
"""

import logging
import math
import signal
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.shards import Manifest, read_manifest, read_shard

log = logging.getLogger(__name__)


def shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def group_order(seed: int, epoch: int, reader: int, group: int, num_samples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, reader, group]).permutation(num_samples)


def batches_per_reader(shard_samples: list[int], num_readers: int, micro_batch_size: int) -> int:
    """Batches every reader can fill in every epoch, whatever shards the shuffle gives it: each
    reader gets at least floor(shards / readers) shards, each no smaller than the smallest ones."""
    fewest = len(shard_samples) // num_readers
    return sum(sorted(shard_samples)[:fewest]) // micro_batch_size


def _to_tensors(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    sequences = torch.from_numpy(rows.astype(np.int64))
    return sequences[:, :-1].contiguous(), sequences[:, 1:].contiguous()


def _leave_signals_to_trainer(worker_id: int) -> None:
    """Slurm signals every process of a job, DataLoader workers too. A worker that died of it would
    take its rank down before the rank's graceful stop could checkpoint; the rank stops the workers
    itself, and they exit on their own if the rank dies."""
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


class _RankStream(IterableDataset):
    """The batches of one data-parallel rank from absolute position `start` (batches since epoch
    0 began); in a DataLoader worker, only the batches that worker hands out."""

    def __init__(self, manifest: Manifest, *, vocab_size: int, seed: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, workers: int, shuffle_window: int, per_reader: int, start: int):
        self.manifest = manifest
        self.vocab_size = vocab_size
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.workers = workers
        self.shuffle_window = shuffle_window
        self.per_reader = per_reader
        self.start = start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        # Worker w hands out rank batches start + w, start + w + W, ...: all from the same reader,
        # since an epoch has a multiple of W batches.
        first = self.start + (info.id if info is not None else 0)
        per_epoch = self.workers * self.per_reader
        reader = self.dp_rank * self.workers + first % self.workers
        epoch, in_epoch = divmod(first, per_epoch)
        return self._reader_batches(reader, epoch, in_epoch // self.workers)

    def _reader_batches(self, reader: int, epoch: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        counts = [s.samples for s in self.manifest.shards]
        size, window = self.micro_batch_size, self.shuffle_window
        while True:
            shards = shard_order(self.seed, epoch, len(counts))[reader :: self.dp_size * self.workers]
            skip, wanted = batch * size, (self.per_reader - batch) * size
            pending = np.empty((0, self.manifest.sequence_length), dtype=self.manifest.dtype)
            for group in range(math.ceil(len(shards) / window)):
                if wanted == 0:
                    break
                members = shards[group * window : (group + 1) * window]
                samples = sum(counts[shard] for shard in members)
                if skip >= samples:
                    skip -= samples  # skipped whole, without opening its files
                    continue
                tokens = np.concatenate([read_shard(self.manifest, shard, self.vocab_size)[0] for shard in members])
                order = group_order(self.seed, epoch, reader, group, samples)[skip : skip + wanted]
                skip, wanted = 0, wanted - len(order)
                pending = np.concatenate([pending, tokens[order]])
                while len(pending) >= size:
                    yield _to_tensors(pending[:size])
                    pending = pending[size:]
            epoch, batch = epoch + 1, 0


class StreamPosition:
    """The resumable position of an endless stream of micro batches, (epoch, batch_in_epoch), saved
    with the layout the stream depends on: a state is refused by a stream of another layout."""

    batches_per_epoch: int
    _position: int

    def _layout(self) -> dict:
        raise NotImplementedError

    def _restart(self) -> None:
        """Called after the position moved: the next batch is read from there."""

    def close(self) -> None:
        """Stop any reader processes now. They ignore stop signals (_leave_signals_to_trainer), so
        the interpreter's exit, which terminates them with a signal, must not be left to do it."""
        self._restart()

    def state_dict(self) -> dict:
        epoch, batch_in_epoch = divmod(self._position, self.batches_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        for name, value in self._layout().items():
            if state.get(name) != value:
                raise ValueError(
                    f"loader state has {name}={state.get(name)!r} but this loader has {value!r}: "
                    "it would not continue the same stream"
                )
        for name, limit in (("epoch", None), ("batch_in_epoch", self.batches_per_epoch)):
            value = state.get(name)
            if not isinstance(value, int) or value < 0 or (limit is not None and value >= limit):
                raise ValueError(f"loader state field {name} must be an int in 0..{limit or 'inf'}, got {value!r}")
        self._position = state["epoch"] * self.batches_per_epoch + state["batch_in_epoch"]
        self._restart()


class TokenBatches(StreamPosition):
    """Endless (input_ids, labels) int64 micro batches, each [micro_batch_size, context_length],
    of one data-parallel rank; see the module docstring for the order. Every id is checked to be
    below vocab_size (the model's embedding rows) as its shard is read."""

    def __init__(self, manifest_dir: str | Path, *, vocab_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, num_workers: int = 0, shuffle_window: int = 8):
        for name, value, low in (("vocab_size", vocab_size, 1), ("micro_batch_size", micro_batch_size, 1),
                                 ("dp_size", dp_size, 1), ("seed", seed, 0), ("num_workers", num_workers, 0),
                                 ("shuffle_window", shuffle_window, 1)):
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1} (dp_size {dp_size})")
        self.manifest = read_manifest(manifest_dir)
        self.vocab_size = vocab_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.num_workers = num_workers
        self.shuffle_window = shuffle_window
        workers = max(1, num_workers)
        readers = dp_size * workers
        counts = [s.samples for s in self.manifest.shards]
        if len(counts) < readers:
            raise ValueError(
                f"{self.manifest.directory} has {len(counts)} shards, fewer than the {readers} readers "
                f"(dp_size {dp_size} x {workers} per rank) that each need one: rebuild the shards with a "
                "smaller --samples-per-shard or use fewer loader workers"
            )
        self._per_reader = batches_per_reader(counts, readers, micro_batch_size)
        if self._per_reader == 0:
            raise ValueError(
                f"{self.manifest.directory}: micro_batch_size {micro_batch_size} is larger than the samples "
                f"a reader is sure to get per epoch ({sum(sorted(counts)[: len(counts) // readers])})"
            )
        self.batches_per_epoch = workers * self._per_reader
        self.tokens_per_batch = micro_batch_size * self.manifest.context_length
        self._position = 0
        self._batches = None
        if dp_rank == 0:
            used = readers * self._per_reader * micro_batch_size
            total = sum(counts)
            log.info(
                "%s: %d batches of %d per rank per epoch; %d of %d samples (%.1f%%) left out of each "
                "epoch so that all %d readers yield the same number of batches",
                self.manifest.directory, self.batches_per_epoch, micro_batch_size, total - used, total,
                100 * (total - used) / total, readers,
            )

    @property
    def context_length(self) -> int:
        return self.manifest.context_length

    def __iter__(self) -> "TokenBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self._stream())
        batch = next(self._batches)
        self._position += 1
        return batch

    def _stream(self):
        stream = _RankStream(
            self.manifest, vocab_size=self.vocab_size, seed=self.seed, micro_batch_size=self.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.dp_size, workers=max(1, self.num_workers),
            shuffle_window=self.shuffle_window, per_reader=self._per_reader, start=self._position,
        )
        if self.num_workers == 0:
            return stream
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, worker_init_fn=_leave_signals_to_trainer)

    def _layout(self) -> dict:
        # What the stream depends on besides the position: resuming under other values would not
        # continue the same stream.
        return {
            "micro_batch_size": self.micro_batch_size, "dp_size": self.dp_size, "num_workers": self.num_workers,
            "seed": self.seed, "shuffle_window": self.shuffle_window, "num_samples": self.manifest.num_samples,
        }

    def _restart(self) -> None:
        # Dropping the iterator also stops its DataLoader workers.
        self._batches = None
