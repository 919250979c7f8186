"""Micro batches of packed token sequences from a weighted mixture of sources, for data parallelism.

The global sample order is data/mixture.py's: position g -> (source, sample), a function of the
seed, the weights, the sources' sizes and the shuffle window only. Optimizer step s trains on
positions [s * B, (s + 1) * B) for the global batch B, cut into equal contiguous slices, one per
data-parallel rank: rank r's micro batch a of step s holds positions
s * B + r * B / D + a * b + [0, b) (micro batch b, D ranks). Hence:

- every rank yields the same number of batches, forever: nothing depends on shard counts, and a
  source whose epoch ends goes on into its next (reshuffled) epoch while the others continue;
- no sample of an epoch is left out: consecutive steps read consecutive positions, across epochs;
- the state is one number (global samples consumed, at a step boundary), so a run resumed on
  another number of ranks, workers or micro batch size, with the same global batch, reads the
  same global sequence;
- a rank reads only its own samples: each is one positioned read into its shard (data/shards.py).
  webdataset's reader streams whole shards, so with a rank-independent order each rank would read
  every shard (D times the I/O) or the order would depend on the rank count.

DataLoader workers split a rank's micro batches round-robin (worker w makes batches w, w + W, ...),
the order in which torch hands them out, so the stream does not depend on the number of workers.

Image sources (data/shards.py) hold one document per sample, padded: labels of <|pad|> targets are
IGNORE. A sample_fn turns each sample (its ids, and its image's bytes or None) into arrays, in the
workers (decoding an image there, say); it is given the sample's global position, the same for any
number of ranks, workers or micro batch size, from which it can seed any randomness of its own.

A sample that cannot be read (a truncated or missing shard, a corrupt member, an id outside the
vocabulary) raises ShardError naming the shard and member, and so does a SampleError or ValueError
of sample_fn; with on_error="skip" its row is left out of the loss (labels IGNORE, input ids 0,
extras {}), counted in skipped_samples and logged, and training goes on with the batch shapes
unchanged.
"""

import ctypes
import logging
import signal
import sys
import weakref
import zlib
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cromwell.data.mixture import Interleave, SourceOrder, integer_weights
from cromwell.data.remote import RemoteError
from cromwell.data.shards import (
    Location, SampleError, ShardError, ShardReader, SourceManifest, member_name, read_corpus, shard_name,
)
from cromwell.data.tokenizer import IGNORE, PAD_ID

log = logging.getLogger(__name__)
OnError = Literal["raise", "skip"]
# (global position, ids, image bytes or None, "shard FILE sample KEY") -> a row's extras.
SampleFn = Callable[[int, np.ndarray, bytes | None, str], dict[str, np.ndarray]]
# Micro batches a reader plans at once: the position arithmetic is vectorised over all of them.
_PLAN_AHEAD = 64


_PR_SET_PDEATHSIG = 1


def _leave_signals_to_trainer(worker_id: int) -> None:
    """Slurm signals every process of a job, DataLoader workers too. A worker that died of it would
    take its rank down before the rank's graceful stop could checkpoint; the rank stops the workers
    itself. If the rank dies (a node failure, SIGKILL) the kernel kills its workers at once: an orphaned
    worker holds the job step's output open, and Slurm then waits a minute before ending the step."""
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _as_is(batch):
    return batch


def _stop_workers(batches) -> None:
    """End a DataLoader iterator's worker processes. They ignore stop signals
    (_leave_signals_to_trainer), so the interpreter's exit, which terminates them with SIGTERM,
    would wait for them forever; nor can the iterator's garbage collection be left to do it, which
    an exception's traceback may put off until exit."""
    workers = getattr(batches, "_workers", [])
    if workers:
        batches._shutdown_workers()  # the orderly way: an end-of-work message, then a join
        for w in workers:
            if w.is_alive():  # busy past the join's timeout: SIGTERM is ignored, so SIGKILL
                w.kill()
                w.join()


class Plan:
    """Where every global position's sample is: the mixture and each source's epoch order."""

    def __init__(self, manifests: dict[str, SourceManifest], weights: dict[str, int], seed: int, window: int):
        self.names = list(weights)
        self.manifests = [manifests[n] for n in self.names]
        self.interleave = Interleave(weights)
        # A source's order is keyed by its name, not its place in the mixture: reweighting or adding
        # sources leaves each source's own order as it was.
        self.orders = [SourceOrder(zlib.crc32(n.encode()), m.num_samples, m.samples_per_shard, window, seed)
                       for n, m in zip(self.names, self.manifests)]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source index, shard, member) of every position."""
        source, cursor = self.interleave.locate(positions)
        shard, member = np.empty_like(cursor), np.empty_like(cursor)
        for j in np.unique(source):
            at = source == j
            _, shard[at], member[at] = self.orders[j].locate(cursor[at])
        return source, shard, member


def rank_positions(batch: int, *, global_batch: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> np.ndarray:
    """The global positions of rank dp_rank's micro batch `batch` (counted from the run's start)."""
    step, micro = divmod(batch, global_batch // (micro_batch_size * dp_size))
    first = step * global_batch + dp_rank * (global_batch // dp_size) + micro * micro_batch_size
    return first + np.arange(micro_batch_size)


class _RankStream(IterableDataset):
    """Micro batches `start`, `start` + 1, ... of one rank; in a DataLoader worker, only its share."""

    def __init__(self, loader: "TokenBatches", start: int):
        self.location, self.plan, self.start = loader.location, loader.plan, start
        self.vocab_size, self.on_error, self.sample_fn = loader.vocab_size, loader.on_error, loader.sample_fn
        self.workers = max(1, loader.num_workers)
        self.slicing = {"global_batch": loader.global_batch, "micro_batch_size": loader.micro_batch_size,
                        "dp_rank": loader.dp_rank, "dp_size": loader.dp_size}

    def __iter__(self):
        info = get_worker_info()
        first = self.start + (info.id if info is not None else 0)
        readers = [ShardReader(self.location, m) for m in self.plan.manifests]
        bad_shards: dict[tuple[int, int], str] = {}
        try:
            batch = first
            while True:
                batches = [batch + k * self.workers for k in range(_PLAN_AHEAD)]
                positions = np.stack([rank_positions(i, **self.slicing) for i in batches])
                source, shard, member = (a.reshape(positions.shape) for a in self.plan.locate(positions.ravel()))
                for row in range(len(batches)):
                    yield self._batch(readers, bad_shards, positions[row], source[row], shard[row], member[row])
                batch += _PLAN_AHEAD * self.workers
        finally:
            for r in readers:
                r.close()

    def _batch(self, readers, bad_shards, positions, source, shard, member):
        first = self.plan.manifests[0]
        rows = np.zeros((len(source), first.sequence_length), dtype=first.dtype)
        keep = np.ones(len(source), dtype=bool)
        padded = np.array([self.plan.manifests[j].images for j in source.tolist()])
        extras = None if self.sample_fn is None else [{} for _ in range(len(source))]
        skipped = []
        for i, (p, j, s, m) in enumerate(zip(positions.tolist(), source.tolist(), shard.tolist(), member.tolist())):
            manifest = self.plan.manifests[j]
            n = s * manifest.samples_per_shard + m
            try:
                if (j, s) in bad_shards:
                    raise ShardError(bad_shards[(j, s)])
                tokens, image = readers[j].read_sample(s, m)
                if tokens.max() >= self.vocab_size:
                    raise SampleError(
                        f"shard {self.location.name(manifest.source, shard_name(s))} member {member_name(n)} holds "
                        f"token id {tokens.max()}, outside the model's vocabulary of {self.vocab_size} ids (the "
                        "shards were built with a larger tokenizer, or are corrupt)")
                if extras is not None:
                    where = f"shard {self.location.name(manifest.source, shard_name(s))} sample {n:010d}"
                    extras[i] = self._extras(p, tokens, image, where)
                rows[i] = tokens
            except (ShardError, RemoteError, OSError) as e:
                if self.on_error == "raise":
                    raise
                if not isinstance(e, SampleError):
                    bad_shards[(j, s)] = str(e)  # the whole shard is unusable: do not try each sample
                keep[i] = False
                skipped.append(str(e))
        return rows, keep, padded, skipped, extras

    def _extras(self, position: int, tokens: np.ndarray, image: bytes | None, where: str) -> dict[str, np.ndarray]:
        try:
            return self.sample_fn(position, tokens, image, where)
        except SampleError:
            raise
        except ValueError as e:  # one sample's: it need not name it
            raise SampleError(f"{where}: {e}") from e


class TokenBatches:
    """Endless (input_ids, labels) int64 micro batches, each [micro_batch_size, context_length], of
    one data-parallel rank; see the module docstring for the order. With sample_fn (picklable, run
    in the workers; its ids are read-only), (input_ids, labels, extras): extras holds what it
    returned for each row."""

    def __init__(self, location: str | Path | Location, *, weights: dict[str, float] | None, vocab_size: int,
                 global_batch: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 num_workers: int = 0, shuffle_window: int = 8, on_error: OnError = "raise",
                 sample_fn: SampleFn | None = None):
        for name, value, low in (("vocab_size", vocab_size, 1), ("micro_batch_size", micro_batch_size, 1),
                                 ("dp_size", dp_size, 1), ("seed", seed, 0), ("num_workers", num_workers, 0),
                                 ("shuffle_window", shuffle_window, 1), ("global_batch", global_batch, 1)):
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1} (dp_size {dp_size})")
        if global_batch % (micro_batch_size * dp_size):
            raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch_size} x "
                             f"data-parallel size {dp_size}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.location = location if isinstance(location, Location) else Location(location)
        manifests = read_corpus(self.location)
        weights = self._weights(manifests, weights)
        self.plan = Plan(manifests, integer_weights(weights), seed, shuffle_window)
        self.vocab_size, self.global_batch, self.micro_batch_size = vocab_size, global_batch, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_workers, self.shuffle_window, self.on_error = num_workers, shuffle_window, on_error
        self.sample_fn = sample_fn
        self.accumulation = global_batch // (micro_batch_size * dp_size)
        self.manifest = self.plan.manifests[0]  # what every source shares: context length, vocabulary
        self.skipped_samples = 0  # this rank's, since this loader was made
        self._position = 0
        self._batches = self._stopper = None
        if dp_rank == 0:
            shares = self.plan.interleave.counts / self.plan.interleave.period
            log.info("%s: mixture %s; no sample is left out of an epoch (a source's next epoch follows on)",
                     self.location.base, ", ".join(f"{n} {s:.1%}" for n, s in zip(self.plan.names, shares)))

    @staticmethod
    def _weights(manifests: dict[str, SourceManifest], weights: dict[str, float] | None) -> dict[str, float]:
        if not weights:
            return {name: m.num_samples for name, m in manifests.items()}
        unknown = sorted(set(weights) - set(manifests))
        if unknown:
            raise ShardError(f"mixture weights name sources {unknown} that the corpus does not have "
                             f"(it has {sorted(manifests)})")
        left_out = sorted(set(manifests) - set(weights))
        if left_out:
            log.info("sources %s have no mixture weight and are not read", left_out)
        return {name: w for name, w in weights.items() if w > 0}

    @property
    def context_length(self) -> int:
        return self.manifest.context_length

    def __iter__(self) -> "TokenBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, list[dict]]:
        if self._batches is None:
            stream = _RankStream(self, self._position)
            # Workers send the shards' own small ids, as numpy (pickled through a pipe): a tensor per
            # batch would cost a shared-memory segment each, and int64 four times the bytes.
            self._batches = iter(stream if self.num_workers == 0 else DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, worker_init_fn=_leave_signals_to_trainer,
                collate_fn=_as_is))
            # Runs at close(), when this loader is collected, or at exit, whichever comes first:
            # weakref's exit hook runs before multiprocessing's, which would wait on them forever.
            self._stopper = weakref.finalize(self, _stop_workers, self._batches)
        rows, keep, padded, skipped, extras = next(self._batches)
        sequences = torch.from_numpy(rows.astype(np.int64))
        inputs, labels = sequences[:, :-1].contiguous(), sequences[:, 1:].contiguous()
        labels[torch.from_numpy(~keep)] = IGNORE
        if padded.any():  # rows of image sources
            labels[torch.from_numpy(padded)[:, None] & (labels == PAD_ID)] = IGNORE
        self._position += 1
        for why in skipped:
            log.warning("skipped a sample (data.on_error=skip): %s", why)
        self.skipped_samples += len(skipped)
        return (inputs, labels) if extras is None else (inputs, labels, extras)

    def close(self) -> None:
        """Stop the reader processes now (see _stop_workers); also done at exit if never called."""
        if self._stopper is not None:
            self._stopper()
        self._batches = self._stopper = None

    def _consumed(self) -> int:
        step, micro = divmod(self._position, self.accumulation)
        if micro:
            raise ValueError(f"the loader is {micro} micro batches into a step of {self.accumulation}: a state "
                             "is taken at a step boundary")
        return step * self.global_batch

    def state_dict(self) -> dict:
        consumed = self._consumed()
        cursors = self.plan.interleave.cursors(consumed)
        return {
            "format": 2, "samples": consumed, "global_batch": self.global_batch, "seed": self.seed,
            "shuffle_window": self.shuffle_window,
            "epoch": {n: int(c) // m.num_samples for n, m, c in zip(self.plan.names, self.plan.manifests, cursors)},
            "sources": {n: {"weight": int(w), "num_samples": m.num_samples, "samples_per_shard": m.samples_per_shard,
                            "cursor": int(c)}
                        for n, w, m, c in zip(self.plan.names, self.plan.interleave.counts, self.plan.manifests,
                                              cursors)},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(), possibly of another number of ranks, workers or micro batch
        size: the global batch, seed, shuffle window, weights and sources must be the same."""
        if not isinstance(state, dict) or state.get("format") != 2:
            raise ValueError("loader state is not one of this loader's (written by an older version?): "
                             "it cannot continue the same stream")
        mine = self.state_dict()
        for name in ("global_batch", "seed", "shuffle_window"):
            if state.get(name) != mine[name]:
                raise ValueError(f"loader state has {name}={state.get(name)!r} but this loader has {mine[name]!r}: "
                                 "it would not continue the same global sample sequence")
        layout = {n: {k: v for k, v in s.items() if k != "cursor"} for n, s in mine["sources"].items()}
        saved = {n: {k: v for k, v in s.items() if k != "cursor"} for n, s in state.get("sources", {}).items()}
        if saved != layout:
            raise ValueError(f"loader state was saved for sources {saved}, this loader reads {layout}: "
                             "it would not continue the same global sample sequence")
        samples = state.get("samples")
        if not isinstance(samples, int) or samples < 0 or samples % self.global_batch:
            raise ValueError(f"loader state field samples must be a multiple of the global batch "
                             f"{self.global_batch}, got {samples!r}")
        cursors = self.plan.interleave.cursors(samples)
        if [s["cursor"] for s in state["sources"].values()] != cursors.tolist():
            raise ValueError(f"loader state's source cursors {state['sources']} do not match its position {samples}")
        self._position = samples // self.global_batch * self.accumulation
        self.close()
