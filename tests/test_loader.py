"""The mixture loader: the documented global order, weights, rank/worker/micro-batch independence,
exact and elastic resumption, nothing left out, and bad samples raised or skipped."""

import json
import logging
import shutil
from itertools import islice

import numpy as np
import pytest
import torch

from cromwell.data.loader import Plan, TokenBatches, rank_positions
from cromwell.data.mixture import Interleave, SourceOrder, integer_weights, key_of, permute
from cromwell.data.multimodal import JEPASamples
from cromwell.data.shards import Location, SampleError, ShardError, read_corpus, shard_name
from cromwell.data.tokenizer import IGNORE, PAD_ID
from test_shards import image_bytes
from cromwell.data.writer import write_source

CONTEXT = 8
SPS = 11  # samples per shard
SEED = 7
VOCAB = 3000
# Sources of different sizes, each with a short last shard: a 30 shards, b 7, c 3.
SIZES = {"a": 30 * SPS - 4, "b": 7 * SPS - 10, "c": 2 * SPS + 1}


def rows_of(source_id: int, n: int) -> np.ndarray:
    """Samples that say who they are: [source id, sample number, ...]."""
    rows = np.zeros((n, CONTEXT + 1), dtype=np.int64)
    rows[:, 0] = source_id
    rows[:, 1] = np.arange(n)
    rows[:, 2:] = (np.arange(n)[:, None] * 7 + np.arange(CONTEXT - 1)) % VOCAB
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i, (name, n) in enumerate(SIZES.items()):
        write_source(root, name, rows_of(i, n), SPS, VOCAB)
    return root


NAMES = list(SIZES)


def loader(corpus, *, weights=None, global_batch=12, micro=3, dp_rank=0, dp_size=1, workers=0, window=4, **kw):
    return TokenBatches(corpus, weights=weights, vocab_size=VOCAB, global_batch=global_batch, micro_batch_size=micro,
                        dp_rank=dp_rank, dp_size=dp_size, seed=SEED, num_workers=workers, shuffle_window=window, **kw)


def samples(batches) -> list[tuple[str, int]]:
    """(source, sample number) of every row of (input_ids, labels) batches, checking the shift."""
    out = []
    for inputs, labels in batches:
        assert inputs.shape == labels.shape == (inputs.shape[0], CONTEXT) and inputs.dtype == torch.int64
        assert (inputs[:, 1:] == labels[:, :-1]).all()
        out += [(NAMES[int(r[0])], int(r[1])) for r in inputs]
    return out


def global_sequence(corpus, steps, *, dp_size=1, micro=3, global_batch=12, workers=0, **kw) -> list:
    """The samples of `steps` optimizer steps, rank by rank within each step: the global order."""
    accum = global_batch // (micro * dp_size)
    ranks = [loader(corpus, dp_rank=r, dp_size=dp_size, micro=micro, global_batch=global_batch, workers=workers, **kw)
             for r in range(dp_size)]
    per_rank = [samples(islice(r, steps * accum)) for r in ranks]
    for r in ranks:
        r.close()
    per_step = global_batch // dp_size
    return [s for step in range(steps) for rank in per_rank for s in rank[step * per_step:(step + 1) * per_step]]


def test_permute_is_a_bijection_for_any_size_and_differs_by_key():
    for n in (1, 2, 3, 7, 64, 65, 1000, 4099):
        assert sorted(permute(np.arange(n), n, key_of(1, n)).tolist()) == list(range(n))
    a, b = permute(np.arange(100), 100, key_of(1)), permute(np.arange(100), 100, key_of(2))
    assert (a != b).mean() > 0.9 and (a != np.arange(100)).mean() > 0.9


def test_a_source_epoch_visits_every_sample_once_in_windows_of_shards():
    order = SourceOrder(key=5, num_samples=30 * SPS - 4, samples_per_shard=SPS, window=4, seed=SEED)
    n = order.num_samples
    epoch, shard, member = order.locate(np.arange(3 * n))
    assert (epoch == np.repeat([0, 1, 2], n)).all()
    first, second = [set(zip(shard[e * n:(e + 1) * n].tolist(), member[e * n:(e + 1) * n].tolist())) for e in (0, 1)]
    everything = {(s, m) for s in range(30) for m in range(SPS if s < 29 else SPS - 4)}
    assert first == second == everything
    assert (shard[:n] != shard[n:2 * n]).any()  # each epoch is shuffled anew
    # The first 4 shards' worth of samples come from 4 shards, mixed: not one shard after another.
    window = shard[:4 * SPS]
    assert len(set(window.tolist())) == 4 and (np.diff(window) != 0).sum() > 2 * SPS
    # The short last shard is read in the epoch's last window (slots 28 and 29).
    assert np.flatnonzero(shard[:n] == 29).min() >= 28 * SPS


def test_integer_weights_keep_the_proportions():
    assert integer_weights({"a": 30, "b": 10, "c": 10, "d": 10, "e": 5, "f": 5, "g": 25, "h": 5}) == dict(
        a=6, b=2, c=2, d=2, e=1, f=1, g=5, h=1)
    assert integer_weights({"code": 0.8, "text": 0.2}) == {"code": 4, "text": 1}
    assert integer_weights({"a": 1, "b": 0}) == {"a": 1}
    with pytest.raises(ValueError, match=r"weight of source 'b' \(1e-06\) is below 1/10000 of the total"):
        integer_weights({"a": 1, "b": 1e-6})
    with pytest.raises(ValueError, match=r"weight of source 'a' must be a finite number >= 0, got -1"):
        integer_weights({"a": -1})


def test_the_interleave_gives_every_run_of_positions_its_share():
    """Tolerance: in any run of positions a source's count is within 2 of share x length (each source's
    positions are evenly spaced; a run's ends cut at most one spacing off each side). A random draw
    would be off by about sqrt(length), 8 samples in a run of 1,000."""
    weights = integer_weights({"a": 30, "b": 10, "c": 10, "d": 10, "e": 5, "f": 5, "g": 25, "h": 5})
    mix = Interleave(weights)
    source, cursor = mix.locate(np.arange(20_000))
    shares = np.array(list(weights.values())) / sum(weights.values())
    for start, length in ((0, 20_000), (137, 1000), (5, 17), (999, 64)):
        counts = np.bincount(source[start:start + length], minlength=8)
        assert np.abs(counts - shares * length).max() < 2
    for j in range(8):  # each source's cursor counts its own earlier positions
        assert (cursor[source == j] == np.arange((source == j).sum())).all()
    assert (mix.cursors(20_000) == np.bincount(source, minlength=8)).all()


def test_batches_hold_the_samples_the_plan_names(corpus):
    got = global_sequence(corpus, 10, weights={"a": 3, "b": 2, "c": 1})
    plan = Plan(read_corpus(Location(corpus)), integer_weights({"a": 3, "b": 2, "c": 1}), SEED, 4)
    source, shard, member = plan.locate(np.arange(120))
    assert got == [(plan.names[j], s * SPS + m) for j, s, m in zip(source, shard, member)]


def test_realised_proportions_match_the_weights(corpus):
    got = global_sequence(corpus, 50, weights={"a": 3, "b": 2, "c": 1})
    counts = {n: sum(s == n for s, _ in got) for n in NAMES}
    assert counts == {"a": 300, "b": 200, "c": 100}  # 600 samples: exact, by the interleave's period of 6
    assert {s for s, _ in global_sequence(corpus, 5, weights={"a": 1, "b": 1})} == {"a", "b"}  # c left out


def test_by_default_sources_are_weighted_by_their_size(corpus):
    got = global_sequence(corpus, 40)
    total = sum(SIZES.values())
    for name, n in SIZES.items():
        assert abs(sum(s == name for s, _ in got) - 480 * n / total) <= 1.5


@pytest.mark.parametrize("workers", [1, 2])
def test_the_stream_does_not_depend_on_the_number_of_workers(corpus, workers):
    for rank in (0, 1):
        expected = samples(islice(loader(corpus, dp_rank=rank, dp_size=2), 9))
        other = loader(corpus, dp_rank=rank, dp_size=2, workers=workers)
        assert samples(islice(other, 9)) == expected
        other.close()


@pytest.mark.parametrize("dp_size,micro", [(2, 3), (2, 6), (3, 2), (4, 1), (1, 12)])
def test_the_global_sequence_does_not_depend_on_ranks_or_micro_batches(corpus, dp_size, micro):
    assert global_sequence(corpus, 8, dp_size=dp_size, micro=micro) == global_sequence(corpus, 8)


def test_every_sample_is_read_once_per_source_epoch_and_ranks_never_run_dry(corpus):
    """The old loader dropped up to 97% of an epoch to balance shards over readers; this one leaves
    nothing out. 40 steps of 12 cross several epochs of c and b; every rank yields every batch."""
    got = global_sequence(corpus, 40, dp_size=4, micro=1, weights={"a": 1, "b": 1, "c": 1})
    per_source = {n: [i for s, i in got if s == n] for n in NAMES}
    for name in ("b", "c"):
        seq, n = per_source[name], SIZES[name]
        for e in range(len(seq) // n):
            assert sorted(seq[e * n:(e + 1) * n]) == list(range(n)), (name, e)
    assert len(set(per_source["a"])) == len(per_source["a"])  # a is still in its first epoch


def test_rank_positions_cut_each_step_into_contiguous_slices():
    assert rank_positions(0, global_batch=12, micro_batch_size=3, dp_rank=1, dp_size=2).tolist() == [6, 7, 8]
    assert rank_positions(3, global_batch=12, micro_batch_size=3, dp_rank=1, dp_size=2).tolist() == [21, 22, 23]


@pytest.mark.parametrize("stop", [1, 7, 23])  # mid-shard; c's first epoch ends within step 7 and again by 23
def test_resume_continues_exactly(corpus, stop):
    whole = global_sequence(corpus, stop + 6, dp_size=2)
    ranks = [loader(corpus, dp_rank=r, dp_size=2) for r in range(2)]
    for r in ranks:
        list(islice(r, stop * 2))
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict() and state["samples"] == stop * 12
    assert state["sources"]["c"]["cursor"] == sum(s == "c" for s, _ in whole[:stop * 12])
    resumed = [loader(corpus, dp_rank=r, dp_size=2, workers=1) for r in range(2)]
    for r in resumed:
        r.load_state_dict(state)
    tail = [samples(islice(r, 12)) for r in resumed]
    assert [s for step in range(6) for rank in tail for s in rank[step * 6:(step + 1) * 6]] == whole[stop * 12:]
    for r in resumed:
        r.close()


@pytest.mark.parametrize("before,after", [((2, 3), (1, 6)), ((1, 6), (2, 3)), ((2, 6), (4, 1))])
def test_resume_on_another_number_of_ranks_keeps_the_global_sequence(corpus, before, after):
    (dp0, micro0), (dp1, micro1) = before, after
    whole = global_sequence(corpus, 9)
    ranks = [loader(corpus, dp_rank=r, dp_size=dp0, micro=micro0) for r in range(dp0)]
    for r in ranks:
        list(islice(r, 4 * 12 // (micro0 * dp0)))
    state = ranks[0].state_dict()
    resumed = [loader(corpus, dp_rank=r, dp_size=dp1, micro=micro1) for r in range(dp1)]
    for r in resumed:
        r.load_state_dict(state)
    per_rank = [samples(islice(r, 5 * 12 // (micro1 * dp1))) for r in resumed]
    per_step = 12 // dp1
    assert [s for step in range(5) for rank in per_rank for s in rank[step * per_step:(step + 1) * per_step]] \
        == whole[4 * 12:]


def test_a_state_is_taken_at_a_step_boundary_and_refused_by_another_stream(corpus):
    source = loader(corpus, dp_size=1, micro=3)
    next(source)
    with pytest.raises(ValueError, match="1 micro batches into a step of 4"):
        source.state_dict()
    list(islice(source, 3))
    state = source.state_dict()
    for kw, field in (({"global_batch": 24}, "global_batch"), ({"window": 2}, "shuffle_window")):
        with pytest.raises(ValueError, match=f"loader state has {field}="):
            loader(corpus, **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="loader state was saved for sources"):
        loader(corpus, weights={"a": 1, "b": 1}).load_state_dict(state)
    with pytest.raises(ValueError, match="written by an older version"):
        loader(corpus).load_state_dict({"epoch": 0, "batch_in_epoch": 3})


def test_bad_arguments_are_named(corpus):
    with pytest.raises(ValueError, match="global batch 10 is not a multiple of micro batch 3 x data-parallel size 1"):
        loader(corpus, global_batch=10)
    with pytest.raises(ShardError, match=r"mixture weights name sources \['z'\] that the corpus does not have"):
        loader(corpus, weights={"a": 1, "z": 1})
    with pytest.raises(ValueError, match="dp_rank 2 is outside 0..1"):
        loader(corpus, dp_rank=2, dp_size=2, global_batch=6)


@pytest.fixture
def damaged(tmp_path, corpus):
    shutil.copytree(corpus, tmp_path / "c")
    return tmp_path / "c"


def plan_names(corpus, positions) -> list[tuple[str, int]]:
    """(source, shard) the default mixture reads at each position."""
    plan = Plan(read_corpus(Location(corpus)), integer_weights({n: SIZES[n] for n in NAMES}), SEED, 4)
    source, shard, _ = plan.locate(np.asarray(positions))
    return [(NAMES[j], s) for j, s in zip(source.tolist(), shard.tolist())]


def test_a_truncated_shard_stops_the_run_naming_it(damaged):
    path = damaged / "b" / shard_name(3)
    path.write_bytes(path.read_bytes()[:-700])
    step = plan_names(damaged, range(40 * 12)).index(("b", 3)) // 12
    source = loader(damaged)
    list(islice(source, step * 4))  # the steps before it read fine
    with pytest.raises(ShardError, match=f"shard {path} is truncated"):
        list(islice(source, 4))


def test_with_skip_unreadable_samples_leave_the_loss_and_are_counted(damaged, caplog):
    path = damaged / "b" / shard_name(3)
    path.unlink()
    steps = 40
    source = loader(damaged, on_error="skip")
    with caplog.at_level(logging.WARNING):
        batches = list(islice(source, steps * 4))
    ignored = sum(int((labels == IGNORE).all(dim=1).sum()) for _, labels in batches)
    in_missing_shard = plan_names(damaged, range(steps * 12)).count(("b", 3))
    assert source.skipped_samples == ignored == in_missing_shard > 0
    assert f"shard {path} does not exist" in caplog.text
    assert all(inputs.shape == (3, CONTEXT) for inputs, _ in batches)


def test_close_after_a_reader_error_leaves_no_worker_behind(damaged):
    """A worker's error reaches the rank with a traceback that keeps the DataLoader alive; workers
    ignore SIGTERM (a Slurm signal must not kill them), so nothing but close() would ever end them
    and the interpreter's exit would wait for them forever."""
    import psutil

    (damaged / "b" / shard_name(0)).unlink()
    before = set(psutil.Process().children())
    source = loader(damaged, workers=2)
    with pytest.raises(ShardError, match="does not exist"):
        list(islice(source, 400))
    workers = list(set(psutil.Process().children()) - before)
    assert len(workers) == 2
    source.close()
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive


def test_a_script_that_never_closes_its_loader_still_exits(corpus):
    import subprocess
    import sys

    script = (f"from cromwell.data.loader import TokenBatches\n"
              f"b = TokenBatches({str(corpus)!r}, weights=None, vocab_size={VOCAB}, global_batch=6, "
              f"micro_batch_size=3, dp_rank=0, dp_size=1, seed=1, num_workers=2)\n"
              f"next(b)\nraise SystemExit(3)\n")
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 3


def test_an_id_past_the_vocabulary_names_shard_and_member(corpus):
    with pytest.raises(ShardError, match=r"shard .*/shard-\d{6}.tar member \d{10}.tokens.npy holds token id \d+, "
                                         r"outside the model's vocabulary of 5 ids"):
        next(TokenBatches(corpus, weights=None, vocab_size=5, global_batch=3, micro_batch_size=3, dp_rank=0,
                          dp_size=1, seed=SEED))


def test_start_up_reads_no_shard_and_state_does_not_grow_with_shards(tmp_path):
    """A manifest of the full corpus's scale (120,000 shards) and one of 100: the loader is built from the
    manifests alone (no shard file exists here), and the state is the same size."""
    states = []
    for shards in (100, 120_000):
        root = tmp_path / str(shards)
        (root / "big").mkdir(parents=True)
        manifest = {"format_version": 2, "source": "big", "context_length": CONTEXT, "dtype": "uint16",
                    "vocab_size": VOCAB, "tokenizer_sha256": "0" * 64, "samples_per_shard": 300,
                    "num_samples": shards * 300 - 17, "documents": 1, "input_tokens": 1, "leftover_tokens": 0,
                    "build": {}}
        (root / "big" / "manifest.json").write_text(json.dumps(manifest))
        (root / "corpus.json").write_text(json.dumps({"format_version": 2, "sources": ["big"]}))
        source = TokenBatches(root, weights=None, vocab_size=VOCAB, global_batch=12, micro_batch_size=3, dp_rank=0,
                              dp_size=1, seed=SEED)
        states.append(json.dumps(source.state_dict()).replace(str(shards * 300 - 17), "N"))
        with pytest.raises(ShardError, match=r"/big/crc32 does not exist"):  # the first read, not before
            next(source)
    assert states[0] == states[1]


# --- Image sources and sample_fn ---

V = 2 * SPS + 3  # samples of the image source


def image_rows(n: int) -> np.ndarray:
    """An image source's samples: [7, sample number + 1, ids >= 100..., then i % 4 <|pad|>s for sample i]."""
    rows = np.zeros((n, CONTEXT + 1), dtype=np.int64)
    rows[:, 0], rows[:, 1] = 7, np.arange(n) + 1
    rows[:, 2:] = 100 + np.arange(n)[:, None] + np.arange(CONTEXT - 1)
    for i in range(n):
        rows[i, CONTEXT + 1 - i % 4:] = PAD_ID
    return rows


def text_rows(n: int) -> np.ndarray:
    """rows_of(0, n) with an id 0 at the end: a text source's id like any other, trained on."""
    rows = rows_of(0, n)
    rows[:, -1] = PAD_ID
    return rows


V_IMAGES = [None if i % 5 == 4 else ("png", image_bytes("PNG", 10 * i)) for i in range(V)]
MIXED = {"a": 1, "v": 1}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A text source and an image source (some of whose samples have no image) in one corpus."""
    root = tmp_path_factory.mktemp("mixed")
    write_source(root, "a", text_rows(SIZES["a"]), SPS, VOCAB)
    write_source(root, "v", image_rows(V), SPS, VOCAB, images=V_IMAGES)
    return root


def expected_sample(ids) -> tuple[list[int], bytes | None]:
    """The ids and image the corpus holds for the sample whose ids start with `ids`' first two."""
    if int(ids[0]) == 7:
        n = int(ids[1]) - 1
        return image_rows(V)[n].tolist(), V_IMAGES[n] and V_IMAGES[n][1]
    return text_rows(SIZES["a"])[int(ids[1])].tolist(), None


def report(position, ids, image, where):
    """A sample_fn: what the worker was given."""
    return {"position": np.int64(position), "ids": ids.copy(), "has_image": np.bool_(image is not None),
            "image": np.frombuffer(image or b"", np.uint8), "where": np.str_(where)}


class FailOn:
    """A sample_fn that cannot use image sample n."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, position, ids, image, where):
        if ids[0] == 7 and ids[1] == self.n + 1:
            raise ValueError("cannot decode the image")
        return report(position, ids, image, where)


def seen(corpus, steps, *, dp_size=1, workers=0, micro=3) -> dict[int, tuple]:
    """Global position -> (ids, image, where) as sample_fn saw it, over `steps` steps of every rank;
    each row's extras checked against its input ids."""
    out = {}
    for rank in range(dp_size):
        source = loader(corpus, weights=MIXED, dp_rank=rank, dp_size=dp_size, micro=micro, workers=workers,
                        sample_fn=report)
        for inputs, _, extras in islice(source, steps * 12 // (micro * dp_size)):
            assert len(extras) == len(inputs) == micro
            for row, extra in zip(inputs, extras):
                assert extra["ids"][:-1].tolist() == row.tolist()
                out[int(extra["position"])] = (extra["ids"].tolist(),
                                               extra["image"].tobytes() if extra["has_image"] else None,
                                               str(extra["where"]))
        source.close()
    return out


def test_sample_fn_gets_each_sample_its_image_and_global_position(mixed):
    got = seen(mixed, 6)
    assert sorted(got) == list(range(72))
    plan = Plan(read_corpus(Location(mixed)), integer_weights(MIXED), SEED, 4)
    source, shard, member = plan.locate(np.arange(72))
    for position, (j, s, m) in enumerate(zip(source.tolist(), shard.tolist(), member.tolist())):
        ids, image, where = got[position]
        name = plan.names[j]
        assert where == f"shard {mixed / name / shard_name(s)} sample {s * SPS + m:010d}"
        assert (ids, image) == expected_sample(ids) and ids[0] == (7 if name == "v" else 0)
    images = [image for _, image, _ in got.values()]
    assert any(images) and None in images and any(ids[0] == 7 and image is None for ids, image, _ in got.values())
    for dp_size, workers, micro in ((2, 0, 3), (2, 1, 2), (1, 1, 6)):
        assert seen(mixed, 6, dp_size=dp_size, workers=workers, micro=micro) == got


def test_jepa_masks_are_the_same_after_a_resume_on_another_layout(mixed):
    """The masks come from (seed, global position) in the workers: a resumed run, here with other
    workers and micro batches, draws the same masks for the same samples."""
    masks = JEPASamples(seed=5, pad_id=PAD_ID, image_size=32, patch_size=16, masks=True, span_length=3)

    def units(batches):
        return [e["units"].tolist() for _, _, extras in batches for e in extras]

    first = loader(mixed, weights={"a": 1}, sample_fn=masks)
    list(islice(first, 4))  # one step of 12 samples
    state = first.state_dict()
    expected = units(islice(first, 8))
    first.close()
    resumed = loader(mixed, weights={"a": 1}, sample_fn=masks, micro=2, workers=1)
    resumed.load_state_dict(state)
    assert units(islice(resumed, 12)) == expected and any(expected)
    resumed.close()


def test_padding_of_image_samples_is_not_trained_on(mixed):
    source = loader(mixed, weights=MIXED)
    padded = 0
    for inputs, labels in islice(source, 12):
        for row, label in zip(inputs, labels):
            ids = expected_sample(row)[0]
            assert row.tolist() == ids[:-1]
            targets = torch.tensor(ids[1:])
            if ids[0] == 7:
                padded += int((targets == PAD_ID).sum())
                targets[targets == PAD_ID] = IGNORE
            assert label.tolist() == targets.tolist()
    assert padded > 0


def test_a_sample_fn_value_error_names_the_sample(mixed):
    plan = Plan(read_corpus(Location(mixed)), integer_weights(MIXED), SEED, 4)
    source, shard, member = plan.locate(np.arange(120))
    first = next(p for p in range(120) if plan.names[source[p]] == "v" and shard[p] * SPS + member[p] == 3)
    batches = loader(mixed, weights=MIXED, workers=1, sample_fn=FailOn(3))
    list(islice(batches, first // 3))  # the batches before it
    with pytest.raises(SampleError, match=rf"shard {mixed / 'v' / shard_name(0)} sample 0000000003: "
                                          "cannot decode the image"):
        next(batches)
    batches.close()


def test_with_skip_a_sample_fn_value_error_skips_its_row(mixed, caplog):
    plan = Plan(read_corpus(Location(mixed)), integer_weights(MIXED), SEED, 4)
    source, shard, member = plan.locate(np.arange(120))
    bad = [p for p in range(120) if plan.names[source[p]] == "v" and shard[p] * SPS + member[p] == 3]
    assert len(bad) > 1  # in more than one epoch of v
    batches = loader(mixed, weights=MIXED, sample_fn=FailOn(3), on_error="skip")
    with caplog.at_level(logging.WARNING):
        rows = [(inputs[i], labels[i], extras[i]) for inputs, labels, extras in islice(batches, 40) for i in range(3)]
    assert batches.skipped_samples == len(bad)
    assert [p for p, (_, _, extra) in enumerate(rows) if extra == {}] == bad
    for p in bad:
        inputs, labels, _ = rows[p]
        assert (labels == IGNORE).all() and (inputs == 0).all()
    assert all(int(extra["position"]) == p for p, (_, _, extra) in enumerate(rows) if extra)
    assert "sample 0000000003: cannot decode the image" in caplog.text
