"""The streaming loader: order, rank and worker splits, resuming, and clear errors."""

import json
import logging
import random
from itertools import islice

import numpy as np
import pytest
import torch

import data.loader
from data.loader import TokenBatches
from data.shards import ShardError, read_manifest, read_shard
from tools import build_shards, train_tokenizer

CONTEXT = 8
BATCH = 3
SEED = 7
VOCAB = 300


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    rng = random.Random(3)
    texts = [" ".join(f"w{rng.randrange(10**6)}" for _ in range(rng.randint(5, 25))) for _ in range(30)]
    with open(root / "corpus.jsonl", "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "source": "a" if i % 4 else "b"}) + "\n")
    train_tokenizer.train_tokenizer(texts, VOCAB, show_progress=False).save(str(root / "tokenizer.json"))
    build_shards.build_shards(
        [root / "corpus.jsonl"], root / "tokenizer.json", root / "shards", CONTEXT, workers=1,
        samples_per_shard=11, show_progress=False,
    )
    manifest = read_manifest(root / "shards")
    # The fixture must exercise uneven shards and samples that identify themselves.
    assert len(manifest.shards) >= 8 and manifest.shards[-1].samples < 11
    rows = np.concatenate([read_shard(manifest, i)[0] for i in range(len(manifest.shards))])
    assert len({r.tobytes() for r in rows}) == len(rows)
    return root / "shards"


def expected_epoch(shard_dir, epoch, dp_rank, dp_size, workers, window) -> list[np.ndarray]:
    """One rank's batches of one epoch, computed from the order the loader documents."""
    manifest = read_manifest(shard_dir)
    counts = [s.samples for s in manifest.shards]
    readers = dp_size * workers
    per_reader = sum(sorted(counts)[: len(counts) // readers]) // BATCH
    order = np.random.default_rng([SEED, epoch]).permutation(len(counts))
    reader_batches = []
    for w in range(workers):
        reader = dp_rank * workers + w
        shards = order[reader::readers]
        rows = []
        for start in range(0, len(shards), window):
            tokens = np.concatenate([read_shard(manifest, shard)[0] for shard in shards[start : start + window]])
            group_rng = np.random.default_rng([SEED, epoch, reader, start // window])
            rows.extend(tokens[group_rng.permutation(len(tokens))])
        rows = np.array(rows[: per_reader * BATCH], dtype=np.int64)
        reader_batches.append(rows.reshape(per_reader, BATCH, CONTEXT + 1))
    return [reader_batches[w][b] for b in range(per_reader) for w in range(workers)]


def loader(shard_dir, dp_rank=0, dp_size=1, workers=0, window=8):
    return TokenBatches(shard_dir, vocab_size=VOCAB, micro_batch_size=BATCH, dp_rank=dp_rank, dp_size=dp_size,
                        seed=SEED, num_workers=workers, shuffle_window=window)


def shard_of_row(shard_dir) -> dict[bytes, int]:
    """The shard of every sample, by content (the fixture's samples are all distinct)."""
    manifest = read_manifest(shard_dir)
    return {r.tobytes(): i for i in range(len(manifest.shards)) for r in read_shard(manifest, i)[0].astype(np.int64)}


def sequences(batches) -> list[np.ndarray]:
    """Rebuild [batch, context + 1] sequences from (input_ids, labels) and check their shapes."""
    out = []
    for input_ids, labels in batches:
        assert input_ids.shape == labels.shape == (BATCH, CONTEXT)
        assert input_ids.dtype == labels.dtype == torch.int64
        assert torch.equal(input_ids[:, 1:], labels[:, :-1])
        out.append(torch.cat([input_ids, labels[:, -1:]], dim=1).numpy())
    return out


def assert_same(actual, expected):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert np.array_equal(a, e), f"batch {i} differs"


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("dp_rank,dp_size,workers", [(0, 1, 0), (1, 2, 0), (0, 1, 2), (1, 2, 2)])
def test_stream_follows_the_documented_order_for_two_epochs(shard_dir, dp_rank, dp_size, workers, window):
    batches = loader(shard_dir, dp_rank, dp_size, workers, window)
    expected = [expected_epoch(shard_dir, e, dp_rank, dp_size, max(1, workers), window) for e in (0, 1)]
    assert batches.batches_per_epoch == len(expected[0])
    assert batches.tokens_per_batch == BATCH * CONTEXT
    assert_same(sequences(islice(batches, 2 * batches.batches_per_epoch)), expected[0] + expected[1])


def test_same_seed_same_batches_other_epoch_other_order(shard_dir):
    first = sequences(islice(loader(shard_dir), 40))
    assert_same(sequences(islice(loader(shard_dir), 40)), first)
    batches = loader(shard_dir)
    epochs = sequences(islice(batches, 2 * batches.batches_per_epoch))
    epoch0, epoch1 = epochs[: batches.batches_per_epoch], epochs[batches.batches_per_epoch :]
    assert not np.array_equal(np.stack(epoch0), np.stack(epoch1))
    other_seed = TokenBatches(shard_dir, vocab_size=VOCAB, micro_batch_size=BATCH, dp_rank=0, dp_size=1, seed=SEED + 1)
    assert not np.array_equal(np.stack(sequences(islice(other_seed, 5))), np.stack(first[:5]))


def test_a_micro_batch_mixes_shards_of_the_window(shard_dir):
    shard_of = shard_of_row(shard_dir)

    def shards_per_batch(batches):
        return [len({shard_of[r.tobytes()] for r in b}) for b in sequences(islice(batches, batches.batches_per_epoch))]

    one_shard_at_a_time = shards_per_batch(loader(shard_dir, window=1))
    # Only the batches that straddle two consecutive shards mix them.
    assert sum(n > 1 for n in one_shard_at_a_time) < len(read_manifest(shard_dir).shards)
    # Without shuffle_window, to check that the default mixes.
    mixed = shards_per_batch(TokenBatches(shard_dir, vocab_size=VOCAB, micro_batch_size=BATCH, dp_rank=0, dp_size=1,
                                          seed=SEED))
    assert mixed[0] > 1
    assert sum(n > 1 for n in mixed) > 0.9 * len(mixed)


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_see_disjoint_samples_covering_the_kept_ones(shard_dir, workers):
    manifest = read_manifest(shard_dir)
    all_rows = {r.tobytes() for i in range(len(manifest.shards)) for r in read_shard(manifest, i)[0].astype(np.int64)}
    seen = []
    for rank in range(2):
        batches = loader(shard_dir, rank, 2, workers)
        assert batches.batches_per_epoch == loader(shard_dir, 1 - rank, 2, workers).batches_per_epoch
        seen.append({r.tobytes() for b in sequences(islice(batches, batches.batches_per_epoch)) for r in b})
    readers = 2 * max(1, workers)
    counts = [s.samples for s in manifest.shards]
    kept = readers * (sum(sorted(counts)[: len(counts) // readers]) // BATCH) * BATCH
    assert not seen[0] & seen[1]
    assert len(seen[0]) == len(seen[1]) == kept // 2
    assert seen[0] | seen[1] <= all_rows


@pytest.mark.parametrize("window", [2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(shard_dir, workers, window):
    reference = loader(shard_dir, 1, 2, workers, window)
    per_epoch = reference.batches_per_epoch
    stream = sequences(islice(reference, 2 * per_epoch + 3))
    manifest, per_rank = read_manifest(shard_dir), max(1, workers)
    # The batch of worker 0 (reader per_rank) that holds the first sample of its second group: it
    # spans two groups under window 2 and starts the second one under window 3.
    shards = np.random.default_rng([SEED, 0]).permutation(len(manifest.shards))[per_rank :: 2 * per_rank]
    second_group = sum(manifest.shards[s].samples for s in shards[:window]) // BATCH * per_rank
    assert 0 < second_group < per_epoch - 1
    for position in (0, 1, 5, second_group, second_group + 1, per_epoch - 1, per_epoch, per_epoch + 3, 2 * per_epoch):
        interrupted = loader(shard_dir, 1, 2, workers, window)
        assert_same(sequences(islice(interrupted, position)), stream[:position])
        state = interrupted.state_dict()
        assert (state["epoch"], state["batch_in_epoch"]) == divmod(position, per_epoch)
        resumed = loader(shard_dir, 1, 2, workers, window)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        assert_same(sequences(islice(resumed, 3)), stream[position : position + 3])


def test_resume_does_not_read_skipped_groups(shard_dir, monkeypatch):
    manifest = read_manifest(shard_dir)
    order = np.random.default_rng([SEED, 0]).permutation(len(manifest.shards))
    counts = [manifest.shards[s].samples for s in order]
    # Resume at the start of the third group of two shards of epoch 0 (one reader reads all shards).
    position = (sum(counts[:4]) + BATCH - 1) // BATCH
    read = []
    monkeypatch.setattr(data.loader, "read_shard", lambda m, i, vocab: read.append(i) or read_shard(m, i, vocab))
    batches = loader(shard_dir, window=2)
    batches.load_state_dict({**batches.state_dict(), "batch_in_epoch": position})
    next(batches)
    assert sorted(read) == sorted(order[4:6])


def test_balancing_loss_is_logged_once(shard_dir, caplog):
    with caplog.at_level(logging.INFO, logger="data.loader"):
        batches = loader(shard_dir, 0, 2, 0)
        loader(shard_dir, 1, 2, 0)
    manifest = read_manifest(shard_dir)
    left_out = manifest.num_samples - 2 * batches.batches_per_epoch * BATCH
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert f"{left_out} of {manifest.num_samples} samples" in messages[0]


def test_fewer_shards_than_readers_names_both_numbers(shard_dir):
    shards = len(read_manifest(shard_dir).shards)
    with pytest.raises(ValueError, match=f"has {shards} shards, fewer than the {shards + 1} readers"):
        TokenBatches(shard_dir, vocab_size=VOCAB, micro_batch_size=1, dp_rank=0, dp_size=shards + 1, seed=0)
    with pytest.raises(ValueError, match=rf"\(dp_size 2 x {shards} per rank\)"):
        TokenBatches(shard_dir, vocab_size=VOCAB, micro_batch_size=1, dp_rank=0, dp_size=2, seed=0, num_workers=shards)


def test_bad_arguments_and_state_are_named(shard_dir, tmp_path):
    with pytest.raises(ShardError, match=f"shard manifest {tmp_path / 'manifest.json'} does not exist"):
        TokenBatches(tmp_path, vocab_size=VOCAB, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(ValueError, match="dp_rank 2 is outside 0..1"):
        loader(shard_dir, 2, 2)
    with pytest.raises(ValueError, match="micro_batch_size 1000 is larger than the samples"):
        TokenBatches(shard_dir, vocab_size=VOCAB, micro_batch_size=1000, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(ValueError, match="shuffle_window must be at least 1, got 0"):
        loader(shard_dir, window=0)
    with pytest.raises(ValueError, match="loader state has shuffle_window=8 but this loader has 2"):
        loader(shard_dir, window=2).load_state_dict(loader(shard_dir).state_dict())
    batches = loader(shard_dir)
    state = batches.state_dict()
    with pytest.raises(ValueError, match="loader state has seed=8 but this loader has 7"):
        batches.load_state_dict({**state, "seed": 8})
    with pytest.raises(ValueError, match=f"batch_in_epoch must be an int in 0..{batches.batches_per_epoch}, got"):
        batches.load_state_dict({**state, "batch_in_epoch": batches.batches_per_epoch})
