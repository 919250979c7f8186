"""The global sample order: which source, and which of its samples, fills each global position.

Position g of the global stream (the samples of optimizer step s are g = s * global_batch ...
(s + 1) * global_batch - 1) maps to a (source, sample) pair by a pure function of g, the seed, the
weights, the sources' sample counts and the shuffle window. Nothing else enters it: not the number
of data-parallel ranks, not the loader workers, not what was read before. So any position is found
in O(sources) time and memory, a resumed run continues from g alone, and a run resumed on another
number of ranks reads the same global sequence.

Sources interleave by weight, deterministically, as Megatron's blended datasets do: the weights
become integers W_j (integer_weights) with period P = sum W_j; in each period source
j fills exactly W_j positions, spread evenly (its k-th at time (k + 1/2) / W_j of the period). Any
run of positions therefore holds each source within two samples of its share, and the count
of source j's samples before g (its cursor) is closed-form.

Each source is read in epochs of its N samples (shards of samples_per_shard samples, the last
possibly shorter). Epoch e of a source visits its shards in a pseudo-random order (the short last
shard last), in windows of `window` shards whose samples are permuted together, so that
consecutive samples come from different shards while the reads of a window stay in a few files.
The permutations are keyed Feistel networks (cycle-walking to any domain size): a bijection
evaluated per index, with no O(shards) or O(samples) table.
"""

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

RESOLUTION = 10_000
MAX_PERIOD = 100_000
_MASK64 = (1 << 64) - 1
_ROUNDS = 6


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic, meant to overflow)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def key_of(*parts) -> np.ndarray:
    """A uint64 key per element from integer parts (scalars or arrays, broadcast together)."""
    arrays = np.broadcast_arrays(*[np.asarray(p, dtype=np.int64).astype(np.uint64) for p in parts])
    key = np.full(arrays[0].shape, 0x9E3779B97F4A7C15, dtype=np.uint64)
    for a in arrays:
        key = _mix(key ^ a)
    return key


def permute(index: np.ndarray, size: np.ndarray, key: np.ndarray) -> np.ndarray:
    """A pseudo-random bijection of [0, size) evaluated at `index`, element-wise (each element with its
    own size and key). A balanced Feistel network on the smallest even bit width that holds size,
    applied again while the result is out of range (cycle walking keeps it a bijection)."""
    index, size, key = (np.asarray(a).astype(np.uint64) for a in np.broadcast_arrays(index, size, key))
    if np.any(index >= size):
        raise ValueError("permute: an index is outside its domain")
    bits = np.maximum(np.ceil(np.log2(np.maximum(size, 2).astype(np.float64))), 2).astype(np.uint64)
    half = (bits + bits % np.uint64(2)) // np.uint64(2)
    mask = (np.uint64(1) << half) - np.uint64(1)
    round_keys = [_mix(key ^ np.uint64(r * 0x632BE59BD9B4E019 & _MASK64)) for r in range(1, _ROUNDS + 1)]
    out = index.copy()
    todo = np.ones(out.shape, dtype=bool)
    while todo.any():
        x, h, m = out[todo], half[todo], mask[todo]
        left, right = x >> h, x & m
        for rk in round_keys:
            left, right = right, left ^ (_mix(right ^ rk[todo]) & m)
        out[todo] = (left << h) | right
        todo = out >= size
    return out


def integer_weights(weights: dict[str, float]) -> dict[str, int]:
    """Weights as small integers in the same proportions: 30/10/10/10/5/5/25/5 -> 6/2/2/2/1/1/5/1,
    0.8/0.2 -> 4/1. Each weight is taken as a fraction with a denominator up to 1000 (0.333 -> 333/1000,
    1/3 as a float -> 1/3); if the resulting period would exceed MAX_PERIOD positions, the weights
    are rounded to 1/RESOLUTION of their total instead."""
    for name, w in weights.items():
        if not (isinstance(w, (int, float)) and w >= 0 and np.isfinite(w)):
            raise ValueError(f"mixture weight of source {name!r} must be a finite number >= 0, got {w!r}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"mixture weights {weights} do not give any source a positive weight")
    exact = {name: Fraction(w).limit_denominator(1000) for name, w in weights.items()}
    scale = math.lcm(*(f.denominator for f in exact.values()))
    scaled = {name: int(f * scale) for name, f in exact.items()}
    lost = any(w > 0 and scaled[name] == 0 for name, w in weights.items())
    if lost or sum(scaled.values()) // math.gcd(*scaled.values()) > MAX_PERIOD:
        scaled = {name: round(Fraction(w) / Fraction(total) * RESOLUTION) for name, w in weights.items()}
        for name, w in weights.items():
            if w > 0 and scaled[name] == 0:
                raise ValueError(f"mixture weight of source {name!r} ({w}) is below 1/{RESOLUTION} of the total "
                                 f"({total}): give it 0 to leave it out, or a larger weight")
    divisor = math.gcd(*scaled.values())
    return {name: v // divisor for name, v in scaled.items() if v}


class Interleave:
    """Which source fills each global position, and each source's cursor (its samples before a position)."""

    def __init__(self, weights: dict[str, int]):
        self.names = list(weights)
        self.counts = np.array([weights[n] for n in self.names], dtype=np.int64)
        self.period = int(self.counts.sum())
        events = sorted(((2 * k + 1) / (2 * w), j) for j, w in enumerate(self.counts) for k in range(w))
        self.pattern = np.array([j for _, j in events], dtype=np.int64)
        # before[j, o]: source j's positions among the first o of a period.
        self.before = np.zeros((len(self.names), self.period + 1), dtype=np.int64)
        for j in range(len(self.names)):
            self.before[j, 1:] = np.cumsum(self.pattern == j)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, that source's cursor) of every global position."""
        period, offset = np.divmod(np.asarray(positions, dtype=np.int64), self.period)
        source = self.pattern[offset]
        return source, period * self.counts[source] + self.before[source, offset]

    def cursors(self, position: int) -> np.ndarray:
        """Samples each source gave to the positions before `position`."""
        period, offset = divmod(position, self.period)
        return period * self.counts + self.before[:, offset]


@dataclass(frozen=True)
class SourceOrder:
    """A source's epochs: cursor c -> (epoch, shard, sample in shard). `key` tells sources apart."""

    key: int
    num_samples: int
    samples_per_shard: int
    window: int
    seed: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.samples_per_shard)

    def locate(self, cursors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        epoch, k = np.divmod(np.asarray(cursors, dtype=np.int64), self.num_samples)
        per_window = self.window * self.samples_per_shard
        window, local = np.divmod(k, per_window)
        size = np.minimum(per_window, self.num_samples - window * per_window)
        local = permute(local, size, key_of(self.seed, self.key, epoch, window, 1)).astype(np.int64)
        slot, member = np.divmod(window * per_window + local, self.samples_per_shard)
        last = self.num_shards - 1
        shard = np.where(slot < last,
                         permute(np.minimum(slot, max(last - 1, 0)), max(last, 1),
                                 key_of(self.seed, self.key, epoch, 0)).astype(np.int64),
                         last)
        return epoch, shard, member
