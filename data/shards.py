"""The token shard format: per source, webdataset .tar shards, a manifest and a checksum list.

A corpus (a directory, or the same layout under an http(s):// URL) holds:

    corpus.json                  {"format_version": 2, "sources": [names]}
    <source>/manifest.json       the counts and sizes the loader plans with (SourceManifest)
    <source>/sha256sums          `sha256sum` lines, fixed width: shard i's line starts at i * width
    <source>/crc32               each sample's crc32 (of its ids' bytes), uint32 little-endian, in order
    <source>/shard-000000.tar    samples_per_shard samples each, the last shard possibly fewer

A sample is one tar member `<n>.tokens.npy`, n its 10-digit number in the source: a 1-d .npy array
of context_length + 1 ids of the manifest's dtype. Every member has the same size, so sample m of a
shard starts at byte m * member_stride. The loader reads a sample with one positioned read and
checks its tar header (name, size, header checksum), its .npy header and its crc32 (the shard's
crc32s are read when the shard is opened), instead of scanning archives:
that is what lets each rank read only its own samples in an order that does not depend on the
number of ranks (data/loader.py). To any other tool the shards are ordinary webdataset shards.

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
from pathlib import Path

import numpy as np

from data import remote

FORMAT_VERSION = 2
CORPUS_NAME = "corpus.json"
MANIFEST_NAME = "manifest.json"
SUMS_NAME = "sha256sums"
CRC_NAME = "crc32"
TOKENS_FIELD = "tokens.npy"
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


def _archive_size(members: int, stride: int) -> int:
    """Bytes of a tar of such members as tarfile writes it: two zero blocks, padding to a record."""
    return -(-(members * stride + 2 * _BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def shard_bytes(first_sample: int, rows: np.ndarray) -> bytes:
    """A shard holding `rows` ([n, sequence length] ids; samples first_sample, first_sample + 1, ...):
    the bytes tarfile would write for members `<n>.tokens.npy` (USTAR headers, mode 0444, mtime 0,
    so the same samples give the same bytes), built for the whole shard at once. Written here, not
    by tarfile or webdataset's TarWriter, because the fixed member layout is the contract the reader
    relies on, and because their per-member header code was most of tokenization's time."""
    n, length = rows.shape
    npy = npy_header(rows.dtype.name, length)
    data_size = len(npy) + rows.nbytes // max(n, 1)
    stride = _stride(data_size)
    info = tarfile.TarInfo(member_name(0))
    info.size, info.mode, info.mtime, info.uname, info.gname = data_size, 0o444, 0, "bigdata", "bigdata"
    template = np.frombuffer(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"), np.uint8).copy()
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
    return out.tobytes() + bytes(_archive_size(n, stride) - n * stride)


def sample_crcs(rows: np.ndarray) -> bytes:
    """The crc32 file's entries for these samples."""
    return np.array([zlib.crc32(row.tobytes()) for row in rows], dtype="<u4").tobytes()


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
    # Tokens at the end of the source that did not fill a last sequence: in no shard.
    leftover_tokens: int
    # What the shards were built from, for a rebuild to recognise finished work.
    build: dict = field(default_factory=dict)
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
        return _stride(len(self.npy_header) + self.sequence_length * np.dtype(self.dtype).itemsize)

    def shard_size(self, index: int) -> int:
        return _archive_size(self.shard_samples(index), self.member_stride)

    def to_json(self) -> dict:
        return asdict(self)


_MANIFEST_FIELDS = {
    "format_version": int, "source": str, "context_length": int, "dtype": str, "vocab_size": int,
    "tokenizer_sha256": str, "samples_per_shard": int, "num_samples": int, "documents": int, "input_tokens": int,
    "leftover_tokens": int, "build": dict,
}


def parse_manifest(raw: bytes, where: str) -> SourceManifest:
    """A manifest's bytes, every field checked; `where` names the file in errors."""
    try:
        tree = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"shard manifest {where} is not valid JSON: {e}") from None
    if not isinstance(tree, dict):
        raise ShardError(f"shard manifest {where} should hold a JSON object")
    for name, kind in _MANIFEST_FIELDS.items():
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
    unknown = set(tree) - set(_MANIFEST_FIELDS)
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
        self._files: dict[int, tuple[int, Path, np.ndarray]] = {}
        self._header = manifest.npy_header
        self._dtype = np.dtype(manifest.dtype)

    def _open(self, shard: int) -> tuple[int, Path, np.ndarray]:
        if shard in self._files:
            return self._files[shard]
        m = self.manifest
        first = shard * m.samples_per_shard
        crcs = self.location.read_bytes(m.source, CRC_NAME,
                                        byte_range=(4 * first, 4 * (first + m.shard_samples(shard))))
        if len(crcs) != 4 * m.shard_samples(shard):
            raise ShardError(f"{self.location.name(m.source, CRC_NAME)} ends before shard {shard}'s samples")
        path = self.location.local_shard(self.manifest, shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ShardError(f"shard {path} does not exist") from None
        size, expected = os.fstat(fd).st_size, self.manifest.shard_size(shard)
        if size != expected:
            os.close(fd)
            raise ShardError(f"shard {path} is {'truncated' if size < expected else 'too long'}: {size} bytes, "
                             f"{self.manifest.shard_samples(shard)} samples make {expected}")
        if len(self._files) >= self.max_open:
            oldest = next(iter(self._files))
            os.close(self._files.pop(oldest)[0])
        self._files[shard] = (fd, path, np.frombuffer(crcs, "<u4"))
        return self._files[shard]

    def read(self, shard: int, member: int) -> np.ndarray:
        """Sample `member` of `shard`: its ids, checked against its tar and .npy headers."""
        m = self.manifest
        fd, path, crcs = self._open(shard)
        stride = m.member_stride
        raw = os.pread(fd, stride, member * stride)
        name = member_name(shard * m.samples_per_shard + member)
        data_size = len(self._header) + m.sequence_length * self._dtype.itemsize

        def bad(why: str) -> SampleError:
            return SampleError(f"shard {path} member {name}: {why}")

        if len(raw) != stride:
            raise bad("the file ends inside it")
        try:
            info = tarfile.TarInfo.frombuf(raw[:_BLOCK], "utf-8", "strict")
        except tarfile.TarError as e:
            raise bad(f"bad tar header ({e})") from None
        if info.name != name:
            escapes = info.name.startswith("/") or ".." in Path(info.name).parts
            raise bad(f"{'a name that escapes the archive' if escapes else 'another member'}, {info.name!r}, "
                      "is in its place")
        if info.size != data_size or not info.isfile():
            raise bad(f"a {'regular file' if info.isfile() else 'non-file member'} of {info.size} bytes, expected "
                      f"a file of {data_size}")
        if raw[_BLOCK:_BLOCK + len(self._header)] != self._header:
            raise bad(f"not a {m.dtype} array of {m.sequence_length} ids")
        ids = raw[_BLOCK + len(self._header):_BLOCK + data_size]
        if zlib.crc32(ids) != crcs[member]:
            raise bad(f"its ids do not match their checksum in {self.location.name(m.source, CRC_NAME)}")
        return np.frombuffer(ids, self._dtype)

    def close(self) -> None:
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files.clear()


def shard_problem(location: Location, manifest: SourceManifest, index: int) -> str | None:
    """What is wrong with shard `index`'s file (missing, wrong size, another sha256 than
    sha256sums lists), or None."""
    try:
        path = location.local_shard(manifest, index)
        if not path.is_file():
            return f"shard {path} does not exist"
        size, expected = path.stat().st_size, manifest.shard_size(index)
        if size != expected:
            return f"shard {path} is {size} bytes, {manifest.shard_samples(index)} samples make {expected}"
        if sha256_file(path) != location.shard_sha256(manifest, index):
            return f"shard {path} does not match its sha256 in {location.name(manifest.source, SUMS_NAME)}"
    except (ShardError, remote.RemoteError) as e:
        return str(e)
    return None
