"""The token shard format: per source, webdataset .tar shards, a manifest and a checksum list.

A corpus (a directory, or the same layout under an http(s):// URL) holds:

    corpus.json                  {"format_version": 2, "sources": [names]}
    <source>/manifest.json       the counts and sizes the loader plans with (SourceManifest)
    <source>/sha256sums          `sha256sum` lines, fixed width: shard i's line starts at i * width
    <source>/crc32               each sample's crc32 (of its ids' bytes, then its image's), uint32 little-endian
    <source>/offsets             an image source's only: where its samples start in their shards (below)
    <source>/shard-000000.tar    samples_per_shard samples each, the last shard possibly fewer

In a text source a sample is one tar member `<n>.tokens.npy`, n its 10-digit number in the source:
a 1-d .npy array of context_length + 1 ids of the manifest's dtype, packed from the source's
documents. Every member has the same size, so sample m of a shard starts at byte m * member_stride.
The loader reads a sample with one positioned read and checks its tar header (name, size, header
checksum), its .npy header and its crc32 (the shard's crc32s are read when the shard is opened),
instead of scanning archives: that is what lets each rank read only its own samples in an order that
does not depend on the number of ranks (data/loader.py). To any other tool the shards are ordinary
webdataset shards.

In an image source (manifest `images: true`) a sample is one document: its ids and eos, cut or
padded with <|pad|> to context_length + 1, as the same `<n>.tokens.npy`, then its image's bytes as
they were stored, `<n>.image.<png|jpg|webp>` (a document without an image has no such member). Image
members differ in size, so the offsets file holds, per shard, its samples' byte offsets and the
offset where the archive's end blocks start (uint64 little-endian; shard s's samples_per_shard + 1
entries, fewer for the short last shard, start at entry s * (samples_per_shard + 1)). They are read
with the crc32s when a shard is opened; the last gives the shard's size, and a sample is still one
positioned read, its members checked like a text sample's.

Start-up cost is O(sources): a manifest is a few hundred bytes whatever the number of shards, and
the checksum of shard i is read from its fixed-width line when (if) shard i is verified.
"""

import hashlib
import io
import json
import os
import tarfile
import zlib
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from cromwell.data import remote

FORMAT_VERSION = 2
CORPUS_NAME = "corpus.json"
MANIFEST_NAME = "manifest.json"
SUMS_NAME = "sha256sums"
CRC_NAME = "crc32"
OFFSETS_NAME = "offsets"
TOKENS_FIELD = "tokens.npy"
IMAGE_FIELD = "image"
# An image's format, as data.sources.vision_text names it -> its member's extension.
IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
EncodedImage = tuple[str, bytes]  # (format, the image file's bytes)
DTYPES = ("uint16", "uint32")
_BLOCK = tarfile.BLOCKSIZE


class ShardError(ValueError):
    """A corpus, manifest, shard or sample that is missing, malformed, truncated or corrupt."""


class SampleError(ShardError):
    """One sample (tar member) that cannot be used; the rest of its shard may be fine."""


def token_dtype(vocab_size: int) -> str:
    """The smallest dtype of DTYPES that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def member_name(sample: int) -> str:
    return f"{sample:010d}.{TOKENS_FIELD}"


def image_member_name(sample: int, image_format: str) -> str:
    if image_format not in IMAGE_EXTENSIONS:
        raise ValueError(f"sample {sample}: image format {image_format!r} is not one of {sorted(IMAGE_EXTENSIONS)}")
    return f"{sample:010d}.{IMAGE_FIELD}.{IMAGE_EXTENSIONS[image_format]}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def npy_header(dtype: str, length: int) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                "shape": (length,)})
    return out.getvalue()


def _stride(data_size: int) -> int:
    """Bytes a member takes in a tar: its header block, its data padded to whole blocks."""
    return _BLOCK + -(-data_size // _BLOCK) * _BLOCK


def _tokens_size(dtype: str, length: int) -> int:
    return len(npy_header(dtype, length)) + length * np.dtype(dtype).itemsize


def _archive_size(end: int) -> int:
    """Bytes of a tar whose members end at byte `end`, as tarfile writes it: two zero blocks, padding
    to a record."""
    return -(-(end + 2 * _BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _tar_header(name: str, size: int) -> bytes:
    """The USTAR header tarfile writes for a member (mode 0444, mtime 0: the same samples give the
    same bytes)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o444, 0, "bigdata", "bigdata"
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def shard_bytes(first_sample: int, rows: np.ndarray, images: list[EncodedImage | None] | None = None) -> bytes:
    """A shard holding `rows` ([n, sequence length] ids; samples first_sample, first_sample + 1, ...):
    the bytes tarfile would write for members `<n>.tokens.npy`, each followed, in an image source
    (`images`: one per row, None for a sample without one), by its `<n>.image.<ext>`. The token
    members are built for the whole shard at once. Written here, not by tarfile or webdataset's
    TarWriter, because the member layout is the contract the reader relies on, and because their
    per-member header code was most of tokenization's time."""
    members = _token_members(first_sample, rows)
    if images is None:
        return members.tobytes() + bytes(_archive_size(members.size) - members.size)
    parts = []
    for n, (tokens, image) in enumerate(zip(members, images, strict=True), start=first_sample):
        parts.append(tokens.tobytes())
        if image is not None:
            image_format, data = image
            parts += [_tar_header(image_member_name(n, image_format), len(data)), data, bytes(-len(data) % _BLOCK)]
    end = sum(map(len, parts))
    return b"".join(parts) + bytes(_archive_size(end) - end)


def _token_members(first_sample: int, rows: np.ndarray) -> np.ndarray:
    """[n, member stride] bytes: the members `<n>.tokens.npy` of `rows`, headers and all."""
    n, length = rows.shape
    npy = npy_header(rows.dtype.name, length)
    data_size = _tokens_size(rows.dtype.name, length)
    stride = _stride(data_size)
    template = np.frombuffer(_tar_header(member_name(0), data_size), np.uint8).copy()
    template[148:156] = ord(" ")  # the checksum field counts as spaces in its own sum
    out = np.zeros((n, stride), np.uint8)
    out[:, :_BLOCK] = template
    digits = len(member_name(0).split(".")[0])
    numbers = np.arange(first_sample, first_sample + n, dtype=np.int64)[:, None] // 10 ** np.arange(digits - 1, -1, -1)
    out[:, :digits] = ord("0") + numbers % 10
    sums = out[:, :_BLOCK].sum(axis=1, dtype=np.int64)
    out[:, 148:156] = np.frombuffer(b"".join(b"%06o\0 " % c for c in sums.tolist()), np.uint8).reshape(n, 8)
    out[:, _BLOCK:_BLOCK + len(npy)] = np.frombuffer(npy, np.uint8)
    out[:, _BLOCK + len(npy):_BLOCK + data_size] = np.ascontiguousarray(rows).view(np.uint8).reshape(n, -1)
    return out


def sample_crcs(rows: np.ndarray, images: list[EncodedImage | None] | None = None) -> bytes:
    """The crc32 file's entries for these samples (as shard_bytes takes them)."""
    images = [None] * len(rows) if images is None else images
    return np.array([zlib.crc32(b"" if image is None else image[1], zlib.crc32(row.tobytes()))
                     for row, image in zip(rows, images, strict=True)], dtype="<u4").tobytes()


def sample_offsets(rows: np.ndarray, images: list[EncodedImage | None]) -> bytes:
    """The offsets file's entries for a shard of these samples of an image source (as shard_bytes
    takes them)."""
    stride = _stride(_tokens_size(rows.dtype.name, rows.shape[1]))
    sizes = [stride + (0 if image is None else _stride(len(image[1]))) for image in images]
    return np.cumsum([0, *sizes]).astype("<u8").tobytes()


@dataclass(frozen=True)
class SourceManifest:
    source: str
    context_length: int
    dtype: str
    vocab_size: int
    tokenizer_sha256: str
    samples_per_shard: int
    num_samples: int
    documents: int
    input_tokens: int
    # Input tokens in no sample: at the end of a text source, those that did not fill a last sequence;
    # in an image source, those cut off documents longer than a sample.
    leftover_tokens: int
    # What the shards were built from, for a rebuild to recognise finished work.
    build: dict = field(default_factory=dict)
    # An image source: one document per sample, with its image (see the module docstring), and the
    # bytes of all its images.
    images: bool = False
    image_bytes: int = 0
    format_version: int = FORMAT_VERSION

    @property
    def sequence_length(self) -> int:
        return self.context_length + 1

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.samples_per_shard)

    def shard_samples(self, index: int) -> int:
        return min(self.samples_per_shard, self.num_samples - index * self.samples_per_shard)

    @property
    def npy_header(self) -> bytes:
        return npy_header(self.dtype, self.sequence_length)

    @property
    def member_stride(self) -> int:
        """Bytes of a `<n>.tokens.npy` member."""
        return _stride(_tokens_size(self.dtype, self.sequence_length))

    def shard_size(self, index: int) -> int:
        """A text source's shard's bytes (an image source's are in its offsets: Location.shard_size)."""
        if self.images:
            raise ValueError(f"source {self.source} holds images: its shard sizes are in its {OFFSETS_NAME} file")
        return _archive_size(self.shard_samples(index) * self.member_stride)

    def to_json(self) -> dict:
        tree = asdict(self)
        if not self.images:  # a text source's manifest stays what it was before image sources
            for name in _IMAGE_FIELDS:
                del tree[name]
        return tree


_MANIFEST_FIELDS = {
    "format_version": int, "source": str, "context_length": int, "dtype": str, "vocab_size": int,
    "tokenizer_sha256": str, "samples_per_shard": int, "num_samples": int, "documents": int, "input_tokens": int,
    "leftover_tokens": int, "build": dict,
}
# Optional: manifests written before image sources have neither.
_IMAGE_FIELDS = {"images": bool, "image_bytes": int}


def parse_manifest(raw: bytes, where: str) -> SourceManifest:
    """A manifest's bytes, every field checked; `where` names the file in errors."""
    try:
        tree = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"shard manifest {where} is not valid JSON: {e}") from None
    if not isinstance(tree, dict):
        raise ShardError(f"shard manifest {where} should hold a JSON object")
    for name, kind in (_MANIFEST_FIELDS | _IMAGE_FIELDS).items():
        if name not in tree and name in _IMAGE_FIELDS:
            continue
        if name not in tree:
            raise ShardError(f"shard manifest {where}: missing field {name}"
                             + (" (a format 1 manifest: rebuild with tools/build_shards.py)"
                                if name == "source" and "shards" in tree else ""))
        value = tree[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ShardError(f"shard manifest {where}: field {name} should be {kind.__name__}, got {value!r}")
    if tree["format_version"] != FORMAT_VERSION:
        raise ShardError(f"shard manifest {where}: format_version {tree['format_version']}, this code reads "
                         f"{FORMAT_VERSION} (rebuild with tools/build_shards.py)")
    if tree["dtype"] not in DTYPES:
        raise ShardError(f"shard manifest {where}: dtype {tree['dtype']!r} is not one of {DTYPES}")
    for name in ("context_length", "vocab_size", "samples_per_shard", "num_samples"):
        if tree[name] < 1:
            raise ShardError(f"shard manifest {where}: {name} must be at least 1, got {tree[name]}")
    unknown = set(tree) - set(_MANIFEST_FIELDS) - set(_IMAGE_FIELDS)
    if unknown:
        raise ShardError(f"shard manifest {where}: unknown fields {sorted(unknown)}")
    return SourceManifest(**tree)


class Location:
    """A corpus directory or URL, and where its files are read: a local path, or a download into
    cache_dir (with retries, checked against sha256sums) for http(s) URLs. With cache_limit_bytes,
    the shards downloaded longest ago are deleted once the cache holds more (a process that has one
    open keeps reading it; one that needs it again downloads it again)."""

    def __init__(self, base: str | Path, cache_dir: str | Path | None = None, retries: int = 5,
                 backoff_s: float = 1.0, cache_limit_bytes: int | None = None):
        self.base = str(base).rstrip("/")
        self.remote = remote.is_url(self.base)
        if self.remote and cache_dir is None:
            raise ShardError(f"shards at {self.base} are remote: set data.cache_dir for their local copies")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.retries = retries
        self.backoff_s = backoff_s
        self.cache_limit_bytes = cache_limit_bytes

    def name(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def read_bytes(self, *parts: str, byte_range: tuple[int, int] | None = None) -> bytes:
        where = self.name(*parts)
        if self.remote:
            return remote.fetch(where, retries=self.retries, backoff_s=self.backoff_s, byte_range=byte_range)
        try:
            with open(where, "rb") as f:
                if byte_range is None:
                    return f.read()
                return os.pread(f.fileno(), byte_range[1] - byte_range[0], byte_range[0])
        except FileNotFoundError:
            raise ShardError(f"{where} does not exist") from None

    def local_shard(self, manifest: SourceManifest, index: int) -> Path:
        """A local path holding shard `index` of `manifest`'s source (downloaded first when remote)."""
        if not self.remote:
            return Path(self.name(manifest.source, shard_name(index)))
        path = self.cache_dir / manifest.tokenizer_sha256[:16] / manifest.source / shard_name(index)
        if not path.is_file():
            remote.download(self.name(manifest.source, shard_name(index)), path, self.shard_sha256(manifest, index),
                            retries=self.retries, backoff_s=self.backoff_s)
            if self.cache_limit_bytes is not None:
                self._evict(keep=path)
        return path

    def _evict(self, keep: Path) -> None:
        sizes = {}
        for p in self.cache_dir.rglob("shard-*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            sizes[p] = (st.st_mtime_ns, st.st_size)
        total = sum(size for _, size in sizes.values())
        for p in sorted(sizes, key=lambda p: sizes[p][0]):
            if total <= self.cache_limit_bytes:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                total -= sizes[p][1]

    def shard_entries(self, manifest: SourceManifest, name: str, index: int) -> np.ndarray:
        """Shard `index`'s entries in a per-sample file of its source: its samples' crc32s (CRC_NAME),
        or their offsets and that of its end (OFFSETS_NAME), checked to be whole members' offsets."""
        m = manifest
        if name == CRC_NAME:
            dtype, first, count = "<u4", index * m.samples_per_shard, m.shard_samples(index)
        else:
            dtype, first, count = "<u8", index * (m.samples_per_shard + 1), m.shard_samples(index) + 1
        size = np.dtype(dtype).itemsize
        raw = self.read_bytes(m.source, name, byte_range=(size * first, size * (first + count)))
        if len(raw) != size * count:
            raise ShardError(f"{self.name(m.source, name)} ends before shard {index}'s samples")
        entries = np.frombuffer(raw, dtype)
        if name == OFFSETS_NAME:
            gaps = np.diff(entries.astype(np.int64))
            if entries[0] != 0 or (gaps < m.member_stride).any() or (entries % _BLOCK).any():
                raise ShardError(f"{self.name(m.source, name)}: shard {index}'s entries are not offsets of whole "
                                 f"samples, each at least a {m.member_stride}-byte tokens member, from 0")
        return entries

    def shard_size(self, manifest: SourceManifest, index: int) -> int:
        """The bytes shard `index` of `manifest`'s source has."""
        if not manifest.images:
            return manifest.shard_size(index)
        return _archive_size(int(self.shard_entries(manifest, OFFSETS_NAME, index)[-1]))

    def shard_sha256(self, manifest: SourceManifest, index: int) -> str:
        width = len(sums_line("0" * 64, 0))
        line = self.read_bytes(manifest.source, SUMS_NAME, byte_range=(index * width, (index + 1) * width))
        digest, _, name = line.decode("ascii", "replace").rstrip("\n").partition("  ")
        if name != shard_name(index) or len(digest) != 64:
            raise ShardError(f"{self.name(manifest.source, SUMS_NAME)}: line {index + 1} should be the sha256 of "
                             f"{shard_name(index)}, got {line!r}")
        return digest


def sums_line(digest: str, index: int) -> str:
    return f"{digest}  {shard_name(index)}\n"


def read_corpus(location: Location) -> dict[str, SourceManifest]:
    """Every source's manifest, by name, in corpus.json's order."""
    where = location.name(CORPUS_NAME)
    try:
        raw = location.read_bytes(CORPUS_NAME)
    except ShardError:
        raise ShardError(f"shard corpus {where} does not exist (build shards with tools/build_shards.py)") from None
    try:
        tree = json.loads(raw)
        sources = tree["sources"]
        version = tree["format_version"]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as e:
        raise ShardError(f"shard corpus {where} should be a JSON object with format_version and sources: {e}") from None
    if version != FORMAT_VERSION:
        raise ShardError(f"shard corpus {where}: format_version {version}, this code reads {FORMAT_VERSION}")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
        raise ShardError(f"shard corpus {where}: sources should be a non-empty list of names, got {sources!r}")
    manifests = {}
    for source in sources:
        manifest = parse_manifest(location.read_bytes(source, MANIFEST_NAME), location.name(source, MANIFEST_NAME))
        if manifest.source != source:
            raise ShardError(f"{location.name(source, MANIFEST_NAME)} describes source {manifest.source!r}, "
                             f"but sits in {source}/")
        manifests[source] = manifest
    first = next(iter(manifests.values()))
    for m in manifests.values():
        for name in ("context_length", "dtype", "vocab_size", "tokenizer_sha256"):
            if getattr(m, name) != getattr(first, name):
                raise ShardError(f"shard corpus {where}: sources {first.source} and {m.source} differ in {name} "
                                 f"({getattr(first, name)!r} vs {getattr(m, name)!r}); build them with one tokenizer "
                                 "and context length")
    return manifests


def write_json_atomically(path: Path, tree: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(tree, indent=1) + "\n")
    tmp.replace(path)


class ShardReader:
    """Random access to one source's samples on one process: open shards are kept (up to max_open)."""

    def __init__(self, location: Location, manifest: SourceManifest, max_open: int = 64):
        self.location = location
        self.manifest = manifest
        self.max_open = max_open
        self._files: dict[int, tuple[int, Path, np.ndarray, np.ndarray | None]] = {}
        self._header = manifest.npy_header
        self._dtype = np.dtype(manifest.dtype)
        self._data_size = _tokens_size(manifest.dtype, manifest.sequence_length)

    def _open(self, shard: int) -> tuple[int, Path, np.ndarray, np.ndarray | None]:
        if shard in self._files:
            return self._files[shard]
        m = self.manifest
        crcs = self.location.shard_entries(m, CRC_NAME, shard)
        offsets = self.location.shard_entries(m, OFFSETS_NAME, shard) if m.images else None
        path = self.location.local_shard(m, shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ShardError(f"shard {path} does not exist") from None
        size = os.fstat(fd).st_size
        expected = m.shard_size(shard) if offsets is None else _archive_size(int(offsets[-1]))
        if size != expected:
            os.close(fd)
            raise ShardError(f"shard {path} is {'truncated' if size < expected else 'too long'}: {size} bytes, "
                             f"{m.shard_samples(shard)} samples make {expected}"
                             + ("" if offsets is None else f" (by {self.location.name(m.source, OFFSETS_NAME)})"))
        if len(self._files) >= self.max_open:
            oldest = next(iter(self._files))
            os.close(self._files.pop(oldest)[0])
        self._files[shard] = (fd, path, crcs, offsets)
        return self._files[shard]

    def read(self, shard: int, member: int) -> np.ndarray:
        """Sample `member` of `shard`'s ids (see read_sample)."""
        return self.read_sample(shard, member)[0]

    def read_sample(self, shard: int, member: int) -> tuple[np.ndarray, bytes | None]:
        """Sample `member` of `shard`: its ids and its image's bytes (None in a text source, and for an
        image source's sample without one), read with one positioned read and checked against their
        tar headers, the .npy header and the sample's crc32."""
        m = self.manifest
        fd, path, crcs, offsets = self._open(shard)
        n = shard * m.samples_per_shard + member
        stride = m.member_stride
        start = member * stride if offsets is None else int(offsets[member])
        end = start + stride if offsets is None else int(offsets[member + 1])
        raw = os.pread(fd, end - start, start)
        tokens_name = member_name(n)

        def bad(name: str, why: str) -> SampleError:
            return SampleError(f"shard {path} member {name}: {why}")

        if len(raw) != end - start:
            raise bad(tokens_name, "the file ends inside it")
        _check_header(raw[:_BLOCK], {tokens_name}, range(self._data_size, self._data_size + 1),
                      partial(bad, tokens_name))
        if raw[_BLOCK:_BLOCK + len(self._header)] != self._header:
            raise bad(tokens_name, f"not a {m.dtype} array of {m.sequence_length} ids")
        ids = raw[_BLOCK + len(self._header):_BLOCK + self._data_size]
        image = None
        if end - start > stride:  # the offsets leave room for an image member
            image_name, padded = f"{n:010d}.{IMAGE_FIELD}", end - start - stride - _BLOCK
            info = _check_header(raw[stride:stride + _BLOCK],
                                 {f"{image_name}.{ext}" for ext in IMAGE_EXTENSIONS.values()},
                                 range(max(padded - _BLOCK + 1, 0), padded + 1), partial(bad, image_name))
            image = raw[stride + _BLOCK:stride + _BLOCK + info.size]
        if zlib.crc32(image or b"", zlib.crc32(ids)) != crcs[member]:
            raise bad(tokens_name if image is None else f"{tokens_name} and {info.name}",
                      f"its {'ids' if image is None else 'ids and image'} do not match their checksum in "
                      f"{self.location.name(m.source, CRC_NAME)}")
        return np.frombuffer(ids, self._dtype), image

    def close(self) -> None:
        for fd, *_ in self._files.values():
            os.close(fd)
        self._files.clear()


def _check_header(block: bytes, names: set[str], sizes: range, bad: Callable[[str], SampleError]) -> tarfile.TarInfo:
    """The tar header in `block`, which must be a regular file of one of `names` and `sizes`."""
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
    except tarfile.TarError as e:
        raise bad(f"bad tar header ({e})") from None
    if info.name not in names:
        escapes = info.name.startswith("/") or ".." in Path(info.name).parts
        raise bad(f"{'a name that escapes the archive' if escapes else 'another member'}, {info.name!r}, "
                  "is in its place")
    if info.size not in sizes or not info.isfile():
        expected = sizes.start if len(sizes) == 1 else f"{sizes.start} to {sizes.stop - 1}"
        raise bad(f"a {'regular file' if info.isfile() else 'non-file member'} of {info.size} bytes, expected "
                  f"a file of {expected}")
    return info


def shard_problem(location: Location, manifest: SourceManifest, index: int) -> str | None:
    """What is wrong with shard `index`'s file (missing, wrong size, another sha256 than
    sha256sums lists), or None."""
    try:
        path = location.local_shard(manifest, index)
        if not path.is_file():
            return f"shard {path} does not exist"
        size, expected = path.stat().st_size, location.shard_size(manifest, index)
        if size != expected:
            return f"shard {path} is {size} bytes, {manifest.shard_samples(index)} samples make {expected}"
        if sha256_file(path) != location.shard_sha256(manifest, index):
            return f"shard {path} does not match its sha256 in {location.name(manifest.source, SUMS_NAME)}"
    except (ShardError, remote.RemoteError) as e:
        return str(e)
    return None
