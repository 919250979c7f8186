"""Shard building (per-source packing, counts, manifests, restartable builds, adapters) and the
shard format's reader (positioned reads, and a clear error for each kind of damage)."""

import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cromwell.data.shards import (
    Location, SampleError, ShardError, ShardReader, npy_header, read_corpus, sample_offsets, shard_bytes, shard_name,
    shard_problem, sha256_file, token_dtype,
)
from cromwell.data.tokenizer import ASSISTANT, END, EOS, EOS_ID, PAD_ID, USER, load_tokenizer, special_id
from cromwell.data import writer
from cromwell.tools import build_shards
from cromwell.tools import inspect_shards
from cromwell.tools import train_tokenizer

CONTEXT = 16
SPS = 7  # samples per shard
TINY_CONFIG = Path(__file__).parents[1] / "pretrain" / "configs" / "tiny.yaml"


def write_corpus(directory: Path) -> list[tuple[str, str]]:
    """Two sources of documents with distinct random words over two files; (text, source) in input order."""
    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyzäöü日本🙂"
    docs = []
    for i in range(160):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(0, 40))]
        docs.append((" ".join(words), "code" if i % 3 else "docs"))
    directory.mkdir(parents=True)
    for part, chunk in (("a", docs[:90]), ("b", docs[90:])):
        with open(directory / f"{part}.jsonl", "w") as f:
            for text, source in chunk:
                f.write(json.dumps({"text": text, "source": source}) + "\n")
    return docs


def build(root, out, workers=2, **kw):
    return writer.build_shards([root / "corpus"], root / "tokenizer.json", out, CONTEXT, workers=workers,
                                     samples_per_shard=kw.pop("samples_per_shard", SPS), show_progress=False, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    docs = write_corpus(root / "corpus")
    train_tokenizer.train_tokenizer([t for t, _ in docs], 320, show_progress=False).save(str(root / "tokenizer.json"))
    manifests = build(root, root / "out")
    return root, docs, manifests


def tar_rows(path: Path) -> list[np.ndarray]:
    """A shard's samples as any tar reader sees them (the reference for the positioned reader)."""
    with tarfile.open(path) as tar:
        return [np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False) for m in tar]


def test_packing_keeps_every_token_in_order_per_source(built):
    root, docs, manifests = built
    tokenizer = load_tokenizer(root / "tokenizer.json")
    streams = {}
    for text, source in docs:
        streams.setdefault(source, []).extend(tokenizer.encode(text).ids + [EOS_ID])
    location = Location(root / "out")
    assert sorted(read_corpus(location)) == sorted(streams) == sorted(manifests)
    for source, stream in streams.items():
        m = manifests[source]
        rows = [r for i in range(m.num_shards) for r in tar_rows(root / "out" / source / shard_name(i))]
        packed = np.concatenate(rows).tolist()
        assert packed == stream[: len(packed)] and len(stream) - len(packed) == m.leftover_tokens < CONTEXT + 1
        assert m.num_samples == len(rows) and m.documents == sum(s == source for _, s in docs)
        assert m.input_tokens == len(stream) and m.dtype == token_dtype(320)
        # Every shard full but the last; sha256sums lists each shard's digest on its fixed-width line.
        assert [m.shard_samples(i) for i in range(m.num_shards - 1)] == [SPS] * (m.num_shards - 1)
        assert 0 < m.shard_samples(m.num_shards - 1) <= SPS
        for i in range(m.num_shards):
            assert location.shard_sha256(m, i) == sha256_file(root / "out" / source / shard_name(i))


def test_positioned_reads_equal_what_tarfile_and_webdataset_read(built):
    import webdataset

    root, _, manifests = built
    m = manifests["code"]
    reader = ShardReader(Location(root / "out"), m, max_open=2)
    for shard in (0, 3, m.num_shards - 1):
        path = root / "out" / "code" / shard_name(shard)
        expected = tar_rows(path)
        assert len(expected) == m.shard_samples(shard)
        assert all((reader.read(shard, i) == row).all() for i, row in enumerate(expected))
        samples = list(webdataset.WebDataset(str(path), shardshuffle=False).decode())
        assert [s["__key__"] for s in samples] == [f"{shard * SPS + i:010d}" for i in range(len(expected))]
        assert all((s["tokens.npy"] == row).all() for s, row in zip(samples, expected))
    reader.close()


@pytest.mark.parametrize("dtype,first,n", [("uint16", 0, 7), ("uint32", 123_456_789, 3)])
def test_shard_bytes_are_what_tarfile_writes(dtype, first, n):
    rows = np.random.default_rng(0).integers(0, 60_000, (n, CONTEXT + 1)).astype(dtype)
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, row in enumerate(rows):
            data = npy_header(dtype, CONTEXT + 1) + row.tobytes()
            info = tarfile.TarInfo(f"{first + i:010d}.tokens.npy")
            info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o444, 0, "bigdata", "bigdata"
            tar.addfile(info, io.BytesIO(data))
    assert shard_bytes(first, rows) == expected.getvalue()


def test_dtype_fits_the_vocabulary():
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def test_literal_special_token_text_is_not_the_special_id(tmp_path, built):
    root = built[0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "doc.txt").write_text(f"abc {EOS} def " * 10)
    m = writer.build_shards([tmp_path / "in"], root / "tokenizer.json", tmp_path / "out", 8, workers=1,
                                  samples_per_shard=4, show_progress=False)["in"]
    tokens = np.concatenate([r for i in range(m.num_shards) for r in tar_rows(tmp_path / "out" / "in" / shard_name(i))])
    assert np.flatnonzero(tokens == EOS_ID).tolist() in ([], [len(tokens) - 1])  # only the document's own end


def test_chats_get_role_markers_and_their_text_stays_data(tmp_path, built):
    root = built[0]
    messages = [{"role": "user", "content": f"say {END}"}, {"role": "assistant", "content": "abc def"}]
    (tmp_path / "chats.jsonl").write_text((json.dumps({"messages": messages, "source": "chats"}) + "\n") * 10)
    m = writer.build_shards([tmp_path / "chats.jsonl"], root / "tokenizer.json", tmp_path / "out", CONTEXT,
                                  workers=1, samples_per_shard=4, show_progress=False)["chats"]
    tokenizer = load_tokenizer(root / "tokenizer.json")
    tokenizer.encode_special_tokens = True
    text = [tokenizer.encode(c["content"], add_special_tokens=False).ids for c in messages]
    want = [special_id(USER), *text[0], special_id(END), special_id(ASSISTANT), *text[1], special_id(END), EOS_ID]
    assert m.input_tokens == 10 * len(want)
    tokens = np.concatenate([r for i in range(m.num_shards) for r in tar_rows(tmp_path / "out" / "chats" / shard_name(i))])
    assert tokens.tolist() == (want * 10)[:len(tokens)]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: message 0 must be"):
        writer.build_shards([tmp_path / "bad.jsonl"], root / "tokenizer.json", tmp_path / "out2", CONTEXT,
                                  workers=1, samples_per_shard=4, show_progress=False)


def test_a_build_smaller_than_a_shard_finishes(tmp_path, built, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "doc.txt").write_text("abc def " * 10)
    args = ([tmp_path / "in"], built[0] / "tokenizer.json", tmp_path / "out", 8)
    m = writer.build_shards(*args, workers=1, samples_per_shard=100, show_progress=False)["in"]
    assert m.num_shards == 1 and m.num_samples < 100
    writer.build_shards(*args, workers=1, samples_per_shard=100, show_progress=False)
    assert "nothing to do" in capsys.readouterr().out


def digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.glob("*/*")) if p.is_file()}


def test_builds_are_deterministic_and_reruns_are_skipped(tmp_path, built, capsys):
    root, _, _ = built
    build(root, tmp_path / "one", workers=1)
    assert digests(tmp_path / "one") == digests(root / "out")
    stamp = (tmp_path / "one" / "code" / "manifest.json").stat().st_mtime_ns
    build(root, tmp_path / "one", workers=1)
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "one" / "code" / "manifest.json").stat().st_mtime_ns == stamp
    # A finished build missing one of its files is built again, not reported done.
    (tmp_path / "one" / "code" / "crc32").unlink()
    build(root, tmp_path / "one", workers=1)
    assert "nothing to do" not in capsys.readouterr().out
    assert digests(tmp_path / "one") == digests(root / "out")
    # Other sizes rebuild, and leave no shard of the earlier build behind.
    rebuilt = build(root, tmp_path / "one", workers=1, samples_per_shard=50)
    assert sorted(p.name for p in (tmp_path / "one" / "code").glob("*.tar")) == [
        shard_name(i) for i in range(rebuilt["code"].num_shards)]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_after", [1, 30, 80])
def test_an_interrupted_build_continues_to_the_same_shards(tmp_path, built, stop_after, capsys, monkeypatch):
    root, _, manifests = built
    monkeypatch.setattr(writer, "TASK_CHARS", 300)  # progress is saved per task: many of them

    def interrupt(n):
        if n >= stop_after:
            raise Interrupt

    with pytest.raises(Interrupt):
        build(root, tmp_path / "out", after_shard=interrupt)
    written = sorted((tmp_path / "out").glob("*/shard-*.tar"))
    assert 0 < len(written) < sum(m.num_shards for m in manifests.values())
    # Shards written after the last saved progress (whole, or cut short) are redone, not kept.
    saved = json.loads((tmp_path / "out" / writer.STATE_DIR / "progress.json").read_text())
    done = saved["sources"]["code"]["shards"]
    (tmp_path / "out" / "code" / shard_name(done)).write_bytes(b"garbage")
    (tmp_path / "out" / "code" / (shard_name(done + 1) + ".tmp")).write_bytes(b"half")
    build(root, tmp_path / "out")
    assert "continuing an interrupted build" in capsys.readouterr().out
    assert digests(tmp_path / "out") == digests(root / "out")
    assert not (tmp_path / "out" / writer.STATE_DIR / "progress.json").exists()


def test_cli_takes_context_from_config_and_reports_leftovers(tmp_path, built, capsys):
    root, _, _ = built
    args = ["--input", str(root / "corpus"), "--tokenizer", str(root / "tokenizer.json"), "--workers", "1"]
    build_shards.main(args + ["--output", str(tmp_path / "a"), "--config", str(TINY_CONFIG), "--samples-per-shard", "2"])
    out = capsys.readouterr().out
    manifests = read_corpus(Location(tmp_path / "a"))
    assert {m.context_length for m in manifests.values()} == {256}
    for m in manifests.values():
        assert f"{m.leftover_tokens} leftover tokens" in out
    build_shards.main(args + ["--output", str(tmp_path / "b"), "--config", str(TINY_CONFIG), "--context-length", "8"])
    assert {m.context_length for m in read_corpus(Location(tmp_path / "b")).values()} == {8}


def test_adapter_sources_are_built_and_bad_records_skipped_and_counted(tmp_path, built, capsys):
    root = built[0]
    stack = tmp_path / "stack"
    stack.mkdir()
    good = [{"content": f"def f{i}():\n    return {i}\n", "blob_id": f"b{i}", "repo_name": "r/r", "path": f"f{i}.py",
             "language": "Python"} for i in range(40)]
    lines = [json.dumps(r) for r in good]
    lines.insert(5, "{not json")
    (stack / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    args = dict(sources=[("stack_v2", stack)])
    with pytest.raises(ValueError, match=rf"{stack / 'part-0.jsonl'} line 6"):
        writer.build_shards([], root / "tokenizer.json", tmp_path / "out", 8, workers=1, samples_per_shard=4,
                                  show_progress=False, **args)
    m = writer.build_shards([], root / "tokenizer.json", tmp_path / "out", 8, workers=1, samples_per_shard=4,
                                  show_progress=False, on_error="skip", **args)["stack_v2"]
    assert m.documents == 40
    assert "skipped 1 bad input records" in capsys.readouterr().out


def test_an_unknown_adapter_is_named(tmp_path, built):
    with pytest.raises(ValueError, match=r"no adapter named 'stack_v3' \(there are \["):
        writer.build_shards([], built[0] / "tokenizer.json", tmp_path / "o", 8, workers=1, samples_per_shard=4,
                                  show_progress=False, sources=[("stack_v3", tmp_path)])


def copy_corpus(built, directory: Path) -> Path:
    shutil.copytree(built[0] / "out", directory)
    return directory


def test_missing_corpus_and_malformed_manifest_are_named(tmp_path, built):
    with pytest.raises(ShardError, match=f"shard corpus {tmp_path / 'corpus.json'} does not exist"):
        read_corpus(Location(tmp_path))
    directory = copy_corpus(built, tmp_path / "c")
    path = directory / "code" / "manifest.json"
    raw = json.loads(path.read_text())
    del raw["num_samples"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ShardError, match=f"shard manifest {path}: missing field num_samples"):
        read_corpus(Location(directory))
    raw["num_samples"] = "7"
    path.write_text(json.dumps(raw))
    with pytest.raises(ShardError, match=f"shard manifest {path}: field num_samples should be int, got '7'"):
        read_corpus(Location(directory))


def test_a_format_1_manifest_asks_for_a_rebuild(tmp_path, built):
    directory = copy_corpus(built, tmp_path / "c")
    (directory / "code" / "manifest.json").write_text(json.dumps({"format_version": 1, "shards": []}))
    with pytest.raises(ShardError, match="a format 1 manifest: rebuild with tools/build_shards.py"):
        read_corpus(Location(directory))


@pytest.fixture
def damaged(tmp_path, built):
    directory = copy_corpus(built, tmp_path / "c")
    m = read_corpus(Location(directory))["code"]
    return directory, m, ShardReader(Location(directory), m)


@pytest.mark.parametrize("cut", [100, 2 * 512 * 3 + 20, -1])
def test_a_truncated_shard_is_named_with_its_sizes(damaged, cut):
    directory, m, reader = damaged
    path = directory / "code" / shard_name(2)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ShardError, match=rf"shard {path} is truncated: \d+ bytes, {SPS} samples make {m.shard_size(2)}"):
        reader.read(2, 0)
    assert reader.read(1, 0) is not None  # the other shards are still read


def patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_a_corrupt_member_header_names_shard_and_member(damaged):
    directory, m, reader = damaged
    path = directory / "code" / shard_name(1)
    patch(path, 3 * m.member_stride + 124, b"99999999999")  # the size field of member 3's header
    with pytest.raises(SampleError, match=rf"shard {path} member {3 + SPS:010d}.tokens.npy: bad tar header"):
        reader.read(1, 3)
    assert reader.read(1, 4).shape == (CONTEXT + 1,)  # the shard's other members are still read


def test_a_corrupt_array_header_is_named(damaged):
    directory, m, reader = damaged
    path = directory / "code" / shard_name(0)
    patch(path, 2 * m.member_stride + 512 + 20, b"<f8")
    with pytest.raises(SampleError, match=rf"member {2:010d}.tokens.npy: not a uint16 array of {CONTEXT + 1} ids"):
        reader.read(0, 2)


def test_flipped_bits_in_the_ids_fail_their_checksum(damaged):
    directory, m, reader = damaged
    path = directory / "code" / shard_name(2)
    ids_start = 5 * m.member_stride + 512 + len(m.npy_header)
    patch(path, ids_start + 3, bytes([path.read_bytes()[ids_start + 3] ^ 0x10]))
    with pytest.raises(SampleError, match=rf"shard {path} member {2 * SPS + 5:010d}.tokens.npy: its ids do not match "
                                          rf"their checksum in {directory / 'code' / 'crc32'}"):
        reader.read(2, 5)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/0000000001.tokens.npy"])
def test_a_member_name_escaping_the_archive_is_rejected(damaged, name):
    directory, m, reader = damaged
    path = directory / "code" / shard_name(0)
    header = tarfile.TarInfo(name)
    header.size = len(m.npy_header) + (CONTEXT + 1) * 2
    header.mode = 0o444
    patch(path, m.member_stride, header.tobuf(tarfile.USTAR_FORMAT))
    with pytest.raises(SampleError, match=rf"member {1:010d}.tokens.npy: a name that escapes the archive"):
        reader.read(0, 1)


def test_a_missing_shard_is_named(damaged):
    directory, m, reader = damaged
    (directory / "code" / shard_name(4)).unlink()
    with pytest.raises(ShardError, match=f"shard {directory / 'code' / shard_name(4)} does not exist"):
        reader.read(4, 0)


def test_inspect_summarises_decodes_and_verifies(tmp_path, built, capsys):
    directory = copy_corpus(built, tmp_path / "c")
    m = read_corpus(Location(directory))["code"]
    inspect_shards.main([str(directory), "--decode", "1", "--tokenizer", str(built[0] / "tokenizer.json"), "--verify"])
    captured = capsys.readouterr()
    assert f"{m.num_shards:>8,} {m.documents:>10,} {m.num_samples:>12,}" in captured.out
    assert "--- code sample 0 (shard 0, member 0) ---" in captured.out
    assert f"all {sum(x.num_shards for x in read_corpus(Location(directory)).values())} shards match" in captured.out
    assert "MB/s" in captured.err and "ETA" in captured.err
    corrupt = directory / "code" / shard_name(1)
    patch(corrupt, 700, bytes([corrupt.read_bytes()[700] ^ 1]))
    (directory / "code" / shard_name(3)).unlink()
    with pytest.raises(SystemExit) as e:
        inspect_shards.main([str(directory), "--verify"])
    assert e.value.code == (f"error: shard {corrupt} does not match its sha256 in {directory / 'code' / 'sha256sums'}\n"
                            f"error: shard {directory / 'code' / shard_name(3)} does not exist")
    assert shard_problem(Location(directory), m, 0) is None


# --- Image sources: one document and its image per sample ---

def image_bytes(image_format: str, shade: int, size: tuple[int, int] = (4, 3)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (shade, 30, 30)).save(out, format=image_format)
    return out.getvalue()


# 7 samples, 3 per shard: every format, a sample without an image, a short last shard.
IMAGES = [("png", image_bytes("PNG", 0)), ("jpeg", image_bytes("JPEG", 40, (9, 7))), ("png", image_bytes("PNG", 80)),
          ("webp", image_bytes("WEBP", 120)), None, ("png", image_bytes("PNG", 160)), ("jpeg", image_bytes("JPEG", 200))]
IMAGE_SPS = 3


def image_member(n: int, image: tuple[str, bytes]) -> str:
    return f"{n:010d}.image.{'jpg' if image[0] == 'jpeg' else image[0]}"


@pytest.fixture
def image_source(tmp_path):
    rows = np.random.default_rng(1).integers(1, 320, (len(IMAGES), CONTEXT + 1))
    m = writer.write_source(tmp_path, "v", rows, IMAGE_SPS, 320, images=IMAGES)
    return tmp_path, m, rows, ShardReader(Location(tmp_path), m)


def test_image_samples_read_back_and_are_ordinary_webdataset_samples(image_source):
    import webdataset

    directory, m, rows, reader = image_source
    assert m.images and m.num_shards == 3 and m.image_bytes == sum(len(i[1]) for i in IMAGES if i)
    assert read_corpus(Location(directory))["v"] == m
    for n, (row, image) in enumerate(zip(rows, IMAGES)):
        ids, got = reader.read_sample(*divmod(n, IMAGE_SPS))
        assert (ids == row).all() and got == (image[1] if image else None)
    for shard in range(m.num_shards):
        path = directory / "v" / shard_name(shard)
        with tarfile.open(path) as tar:
            members = {info.name: tar.extractfile(info).read() for info in tar}
        samples = list(webdataset.WebDataset(str(path), shardshuffle=False))
        for n in range(shard * IMAGE_SPS, min(len(IMAGES), (shard + 1) * IMAGE_SPS)):
            names = [f"{n:010d}.tokens.npy"] + ([image_member(n, IMAGES[n])] if IMAGES[n] else [])
            assert all(name in members for name in names)
            assert (np.load(io.BytesIO(members[names[0]])) == rows[n]).all()
            sample = samples[n - shard * IMAGE_SPS]
            assert sample["__key__"] == f"{n:010d}"
            assert [sample[k] for k in sample if k.startswith("image.")] == ([IMAGES[n][1]] if IMAGES[n] else [])
        assert len(members) == sum(1 + (IMAGES[n] is not None) for n in range(len(IMAGES)) if n // IMAGE_SPS == shard)


def test_image_shard_bytes_are_what_tarfile_writes():
    rows = np.random.default_rng(0).integers(0, 60_000, (4, CONTEXT + 1)).astype("uint16")
    images = IMAGES[:4]
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for n, (row, image) in enumerate(zip(rows, images), start=50):
            for name, data in [(f"{n:010d}.tokens.npy", npy_header("uint16", CONTEXT + 1) + row.tobytes())] + (
                    [(image_member(n, image), image[1])] if image else []):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o444, 0, "bigdata", "bigdata"
                tar.addfile(info, io.BytesIO(data))
    assert shard_bytes(50, rows, images) == expected.getvalue()
    # The offsets: where each sample's tokens member starts, then where the end-of-archive blocks do.
    with tarfile.open(fileobj=io.BytesIO(expected.getvalue())) as tar:
        starts = [info.offset for info in tar if info.name.endswith(".tokens.npy")]
        end = tar.offset
    assert np.frombuffer(sample_offsets(rows, images), "<u8").tolist() == starts + [end]
    with pytest.raises(ValueError, match="sample 50: image format 'gif' is not one of"):
        shard_bytes(50, rows[:1], [("gif", b"GIF89a")])


def test_an_image_shard_is_sized_by_its_offsets(image_source):
    directory, m, _, reader = image_source
    path = directory / "v" / shard_name(1)
    offsets = np.fromfile(directory / "v" / "offsets", "<u8")
    end = int(offsets[2 * (IMAGE_SPS + 1) - 1])  # shard 1's end-of-archive entry
    assert path.stat().st_size == Location(directory).shard_size(m, 1) == -(-(end + 1024) // 10240) * 10240
    path.write_bytes(path.read_bytes()[:end - 100])  # into its last image
    with pytest.raises(ShardError, match=rf"shard {path} is truncated: {end - 100} bytes, 3 samples make \d+ "
                                         rf"\(by {directory / 'v' / 'offsets'}\)"):
        reader.read_sample(1, 0)
    assert shard_problem(Location(directory), m, 1).startswith(f"shard {path} is {end - 100} bytes")
    with pytest.raises(ValueError, match="source v holds images: its shard sizes are in its offsets file"):
        m.shard_size(0)
    offsets[1], offsets[2] = offsets[2], offsets[1]
    offsets.tofile(directory / "v" / "offsets")
    with pytest.raises(ShardError, match=rf"{directory / 'v' / 'offsets'}: shard 0's entries are not offsets of "
                                         "whole samples"):
        reader.read_sample(0, 0)


def image_start(directory: Path, n: int, m) -> int:
    """Where sample n's image member (its header) starts in its shard."""
    shard, member = divmod(n, IMAGE_SPS)
    return int(np.fromfile(directory / "v" / "offsets", "<u8")[shard * (IMAGE_SPS + 1) + member]) + m.member_stride


def test_a_flipped_image_byte_fails_the_sample_checksum(image_source):
    directory, m, _, reader = image_source
    path = directory / "v" / shard_name(1)
    at = image_start(directory, 5, m) + 512 + 30
    patch(path, at, bytes([path.read_bytes()[at] ^ 1]))
    with pytest.raises(SampleError, match=rf"shard {path} member 0000000005.tokens.npy and 0000000005.image.png: its "
                                          rf"ids and image do not match their checksum in {directory / 'v' / 'crc32'}"):
        reader.read_sample(1, 2)
    assert reader.read_sample(1, 0)[1] == IMAGES[3][1]  # the shard's other samples are still read


@pytest.mark.parametrize("name,why", [("../../0000000002.image.png", "a name that escapes the archive"),
                                      ("/0000000002.image.png", "a name that escapes the archive"),
                                      ("0000000001.image.png", "another member"),
                                      ("0000000002.image.gif", "another member")])
def test_an_image_member_out_of_place_is_named(image_source, name, why):
    directory, m, _, reader = image_source
    header = tarfile.TarInfo(name)
    header.size, header.mode = len(IMAGES[2][1]), 0o444
    patch(directory / "v" / shard_name(0), image_start(directory, 2, m), header.tobuf(tarfile.USTAR_FORMAT))
    with pytest.raises(SampleError, match=rf"shard {directory / 'v' / shard_name(0)} member 0000000002.image: "
                                          rf"{why}, {name!r}, is in its place"):
        reader.read_sample(0, 2)


def test_an_image_member_of_another_size_or_kind_is_named(image_source):
    directory, m, _, reader = image_source
    header = tarfile.TarInfo("0000000000.image.png")
    header.size, header.mode = 1000, 0o444
    patch(directory / "v" / shard_name(0), image_start(directory, 0, m), header.tobuf(tarfile.USTAR_FORMAT))
    with pytest.raises(SampleError, match=r"member 0000000000.image: a regular file of 1000 bytes, expected a file "
                                          r"of 1 to 512"):
        reader.read_sample(0, 0)


def write_vision_text(directory: Path, texts: list[str]) -> list[bytes]:
    """Raw vision_text shards (data/sources/vision_text.py's format) of these texts over two files; the images."""
    images = [image_bytes("PNG", 10 * i) for i in range(len(texts))]
    directory.mkdir()
    for part, numbers in (("a", range(3)), ("b", range(3, len(texts)))):
        with tarfile.open(directory / f"{part}.tar", "w") as tar:
            for i in numbers:
                for name, data in ((f"pairs/{i:04d}.png", images[i]), (f"pairs/{i:04d}.txt", texts[i].encode()),
                                   (f"pairs/{i:04d}.json", b'{"kind": "code"}')):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return images


# Short captions (padded) and long ones (cut), of about the same length with their image, so that
# a task of 150 characters holds two documents.
VISION_TEXTS = ["abc def", "ghij " * 4, "x", "kl mn op qr " * 3, "a b", "stu vw", "yz " * 9, "qq"]


@pytest.fixture
def vision(tmp_path, built):
    root = built[0]
    raw = tmp_path / "raw"
    images = write_vision_text(raw, VISION_TEXTS)
    (tmp_path / "notes.txt").write_text("plain text notes " * 3)  # one sample, written when the build ends

    def run(out, **kw):
        return writer.build_shards([tmp_path / "notes.txt"], root / "tokenizer.json", out, CONTEXT, workers=1,
                                         samples_per_shard=3, show_progress=False, sources=[("vision_text", raw)], **kw)
    return root, images, run


def test_vision_text_documents_become_image_samples(tmp_path, vision):
    root, images, run = vision
    manifests = run(tmp_path / "out")
    m = manifests["vision_text"]
    tokenizer = load_tokenizer(root / "tokenizer.json")
    encoded = [tokenizer.encode(t, add_special_tokens=False).ids + [EOS_ID] for t in VISION_TEXTS]
    assert m.images and not manifests["notes"].images
    assert m.num_samples == m.documents == len(VISION_TEXTS) and m.image_bytes == sum(map(len, images))
    assert m.input_tokens == sum(map(len, encoded)) and m.leftover_tokens == sum(max(len(e) - CONTEXT - 1, 0)
                                                                                  for e in encoded)
    assert any(len(e) > CONTEXT + 1 for e in encoded) and any(len(e) < CONTEXT + 1 for e in encoded)
    reader = ShardReader(Location(tmp_path / "out"), read_corpus(Location(tmp_path / "out"))["vision_text"])
    for n, (ids, image) in enumerate(zip(encoded, images)):
        row, got = reader.read_sample(*divmod(n, 3))
        assert row.tolist() == (ids + [PAD_ID] * CONTEXT)[:CONTEXT + 1] and got == image
    with tarfile.open(tmp_path / "out" / "vision_text" / shard_name(0)) as tar:
        assert tar.getnames()[:2] == ["0000000000.tokens.npy", "0000000000.image.png"]


# Tasks of two documents and shards of three: the first save holds one document not in a shard yet.
@pytest.mark.parametrize("stop_after,pending_images", [(1, 1), (2, 0)])
def test_an_interrupted_image_build_continues_to_the_same_files(tmp_path, vision, stop_after, pending_images,
                                                                  monkeypatch, capsys):
    _, _, run = vision
    run(tmp_path / "whole")
    monkeypatch.setattr(writer, "TASK_CHARS", 150)

    def interrupt(n):
        if n >= stop_after:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tmp_path / "out", after_shard=interrupt)
    state = tmp_path / "out" / writer.STATE_DIR
    saved = json.loads((state / "progress.json").read_text())
    with np.load(state / saved["pending"]) as pending:
        assert len(pending["vision_text.image_sizes"]) == pending_images
    assert [p.name for p in state.glob("pending-*")] == [saved["pending"]]
    # A shard written after the saved progress is redone.
    (tmp_path / "out" / "vision_text" / shard_name(saved["sources"]["vision_text"]["shards"])).write_bytes(b"garbage")
    run(tmp_path / "out")
    assert "continuing an interrupted build" in capsys.readouterr().out
    assert digests(tmp_path / "out") == digests(tmp_path / "whole")
    assert not list(state.glob("pending-*"))


def test_an_image_after_text_only_documents_of_its_source_is_refused(tmp_path, vision, built):
    _, _, run = vision
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "no image", "source": "vision_text"}) + "\n")
    with pytest.raises(ValueError, match="source 'vision_text': a document with an image follows documents without"):
        writer.build_shards([tmp_path / "text.jsonl"], built[0] / "tokenizer.json", tmp_path / "o", CONTEXT,
                                  workers=1, samples_per_shard=3, show_progress=False,
                                  sources=[("vision_text", tmp_path / "raw")])


def test_inspect_shows_and_verifies_image_sources(tmp_path, vision, capsys):
    root, images, run = vision
    m = run(tmp_path / "out")["vision_text"]
    inspect_shards.main([str(tmp_path / "out"), "--decode", "2", "--tokenizer", str(root / "tokenizer.json"),
                         "--verify"])
    out = capsys.readouterr().out
    assert f"{m.leftover_tokens:>10,} {'yes':>6} {m.image_bytes:>14,}" in out and f"{'no':>6} {0:>14,}" in out
    assert f"--- vision_text sample 1 (shard 0, member 1; image PNG 4x3, {len(images[1]):,} bytes) ---" in out
    assert f"all {m.num_shards + 1} shards match" in out
    corrupt = tmp_path / "out" / "vision_text" / shard_name(1)
    patch(corrupt, 2000, b"x")
    with pytest.raises(SystemExit) as e:
        inspect_shards.main([str(tmp_path / "out"), "--verify"])
    assert e.value.code == f"error: shard {corrupt} does not match its sha256 in {corrupt.parent / 'sha256sums'}"
