"""Shard building (packing, counts, manifest) and reading (validation, clear errors)."""

import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data.shards import ShardError, read_manifest, read_shard, sha256_file, token_dtype
from data.tokenizer import EOS, EOS_ID, load_tokenizer
from tools import build_shards, train_tokenizer

CONTEXT = 16
TINY_CONFIG = Path(__file__).parents[1] / "pretrain" / "configs" / "tiny.yaml"


def write_corpus(directory: Path) -> list[tuple[str, str]]:
    """Two sources of documents with distinct random words; returns (text, source) in file order."""
    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyzäöü日本🙂"
    docs = []
    for i in range(120):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(0, 40))]
        docs.append((" ".join(words), "code" if i % 3 else "docs"))
    directory.mkdir(parents=True)
    with open(directory / "corpus.jsonl", "w") as f:
        for text, source in docs:
            f.write(json.dumps({"text": text, "source": source}) + "\n")
    return docs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    docs = write_corpus(root / "corpus")
    tokenizer_path = root / "tokenizer.json"
    tokenizer = train_tokenizer.train_tokenizer([t for t, _ in docs], 320, show_progress=False)
    tokenizer.save(str(tokenizer_path))
    manifest = build_shards.build_shards(
        [root / "corpus"], tokenizer_path, root / "out", CONTEXT, workers=2, samples_per_shard=7,
        show_progress=False,
    )
    return root, docs, tokenizer_path, manifest


def expected_streams(docs, tokenizer_path) -> dict[str, list[int]]:
    tokenizer = load_tokenizer(tokenizer_path)
    streams = {}
    for text, source in docs:
        streams.setdefault(source, []).extend(tokenizer.encode(text).ids + [EOS_ID])
    return streams


def test_packing_keeps_every_token_in_order_per_source(built):
    root, docs, tokenizer_path, manifest = built
    streams = expected_streams(docs, tokenizer_path)
    packed = {source: [] for source in streams}
    for i in range(len(manifest.shards)):
        tokens, sources = read_shard(manifest, i)
        assert tokens.shape == (manifest.shards[i].samples, CONTEXT + 1)
        for row, source in zip(tokens, sources):
            packed[source].extend(row.tolist())
    for source, stream in streams.items():
        leftover = manifest.leftover_tokens[source]
        assert leftover == len(stream) % (CONTEXT + 1)
        assert packed[source] == stream[: len(stream) - leftover]
        assert stream[len(stream) - leftover:][-1:] in ([], [EOS_ID])
        # One eos per document: packed + leftover hold each document's separator.
        assert stream.count(EOS_ID) == sum(1 for _, s in docs if s == source)


def test_manifest_counts_match_the_input(built):
    root, docs, tokenizer_path, manifest = built
    streams = expected_streams(docs, tokenizer_path)
    totals = manifest.totals
    assert totals["documents"] == len(docs)
    assert totals["input_tokens"] == sum(len(s) for s in streams.values())
    assert totals["sample_tokens"] + totals["leftover_tokens"] == totals["input_tokens"]
    assert totals["samples"] == manifest.num_samples == sum(s.samples for s in manifest.shards)
    assert [s.samples for s in manifest.shards[:-1]] == [7] * (len(manifest.shards) - 1)
    for source, stream in streams.items():
        assert totals["sources"][source]["samples"] == len(stream) // (CONTEXT + 1)
        assert sum(s.sources.get(source, 0) for s in manifest.shards) == len(stream) // (CONTEXT + 1)
    assert manifest.vocab_size == 320 and manifest.dtype == "uint16"
    assert manifest.tokenizer_sha256 == sha256_file(tokenizer_path)
    for i, shard in enumerate(manifest.shards):
        assert shard.sha256 == sha256_file(manifest.shard_path(i))
        assert shard.tokens == shard.samples * (CONTEXT + 1)
    assert read_manifest(manifest.directory, verify_checksums=True) == manifest


def test_dtype_fits_the_vocabulary():
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def test_literal_special_token_text_is_not_the_special_id(tmp_path, built):
    root, _, tokenizer_path, _ = built
    (tmp_path / "doc.txt").write_text(f"abc {EOS} def " * 10)
    manifest = build_shards.build_shards(
        [tmp_path / "doc.txt"], tokenizer_path, tmp_path / "out", 8, workers=1, samples_per_shard=4,
        show_progress=False,
    )
    tokens = np.concatenate([read_shard(manifest, i)[0].ravel() for i in range(len(manifest.shards))])
    eos_positions = np.flatnonzero(tokens == EOS_ID).tolist()
    assert eos_positions in ([], [len(tokens) - 1])  # only the document's own separator


def test_builds_are_deterministic_and_reruns_are_skipped(tmp_path, built, capsys):
    root, _, tokenizer_path, manifest = built
    again = build_shards.build_shards(
        [root / "corpus"], tokenizer_path, tmp_path / "one_worker", CONTEXT, workers=1, samples_per_shard=7,
        show_progress=False,
    )
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]
    first_mtime = (tmp_path / "one_worker" / "manifest.json").stat().st_mtime_ns
    build_shards.build_shards(
        [root / "corpus"], tokenizer_path, tmp_path / "one_worker", CONTEXT, workers=1, samples_per_shard=7,
        show_progress=False,
    )
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "one_worker" / "manifest.json").stat().st_mtime_ns == first_mtime
    # Other sizes rebuild, and leave no shard of the earlier build behind.
    rebuilt = build_shards.build_shards(
        [root / "corpus"], tokenizer_path, tmp_path / "one_worker", CONTEXT, workers=1, samples_per_shard=50,
        show_progress=False,
    )
    assert sorted(p.name for p in (tmp_path / "one_worker").glob("*.tar")) == [s.path for s in rebuilt.shards]


def test_cli_prints_leftover_and_takes_context_from_config(tmp_path, built, capsys):
    root, _, tokenizer_path, _ = built
    args = ["--input", str(root / "corpus"), "--tokenizer", str(tokenizer_path), "--workers", "1"]
    build_shards.main(args + ["--output", str(tmp_path / "a"), "--config", str(TINY_CONFIG), "--samples-per-shard", "2"])
    out = capsys.readouterr().out
    manifest = read_manifest(tmp_path / "a")
    assert manifest.context_length == 256
    for source, n in manifest.leftover_tokens.items():
        assert f"{source}: {n} leftover tokens" in out
    build_shards.main(args + ["--output", str(tmp_path / "b"), "--config", str(TINY_CONFIG), "--context-length", "8"])
    assert read_manifest(tmp_path / "b").context_length == 8


def copy_shards(manifest, directory: Path) -> Path:
    directory.mkdir()
    for path in manifest.directory.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    return directory


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(ShardError, match=f"shard manifest {tmp_path / 'manifest.json'} does not exist"):
        read_manifest(tmp_path)


def test_missing_shard_file_is_named(tmp_path, built):
    directory = copy_shards(built[3], tmp_path / "s")
    (directory / "shard-000003.tar").unlink()
    with pytest.raises(ShardError, match=f"shard file {directory / 'shard-000003.tar'} listed in .* does not exist"):
        read_manifest(directory)


def test_malformed_manifest_names_the_field(tmp_path, built):
    directory = copy_shards(built[3], tmp_path / "s")
    raw = json.loads((directory / "manifest.json").read_text())
    del raw["shards"][2]["samples"]
    (directory / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardError, match=r"missing field shards\[2\]\.samples"):
        read_manifest(directory)
    raw["shards"][2]["samples"] = "7"
    (directory / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardError, match=r"field shards\[2\]\.samples should be int, got '7'"):
        read_manifest(directory)


def test_checksum_mismatch_is_named(tmp_path, built):
    directory = copy_shards(built[3], tmp_path / "s")
    shard = directory / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    read_manifest(directory)
    with pytest.raises(ShardError, match=f"shard file {shard} does not match the sha256"):
        read_manifest(directory, verify_checksums=True)


def member_offsets(path: Path) -> list[tuple[int, int]]:
    with tarfile.open(path) as tar:
        return [(m.offset, m.offset_data) for m in tar.getmembers()]


@pytest.mark.parametrize("cut", ["inside_data", "at_member_boundary", "inside_header"])
def test_truncated_shard_is_named(tmp_path, built, cut):
    directory = copy_shards(built[3], tmp_path / "s")
    shard = directory / "shard-000002.tar"
    offsets = member_offsets(shard)
    # Members alternate source.txt, tokens.npy; cut somewhere in the 4th sample.
    size = {
        "inside_data": offsets[7][1] + 20,
        "at_member_boundary": offsets[6][0],
        "inside_header": offsets[6][0] + 100,
    }[cut]
    shard.write_bytes(shard.read_bytes()[:size])
    manifest = read_manifest(directory)
    with pytest.raises(ShardError, match=rf"{shard} is truncated or corrupt \(expected 7 samples, read 3\)"):
        read_shard(manifest, 2)
