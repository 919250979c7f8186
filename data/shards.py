"""The token shard format: a directory of webdataset .tar shards and the manifest.json that lists them.

One sample of a shard is a packed sequence of context_length + 1 token ids of one source:
`<key>.tokens.npy` (a 1-d array of the manifest's dtype) and `<key>.source.txt`. The manifest
holds the counts the loader plans with, so planning an epoch never opens a shard.
"""

import hashlib
import io
import json
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENS_FIELD = "tokens.npy"
SOURCE_FIELD = "source.txt"
DTYPES = ("uint16", "uint32")


class ShardError(ValueError):
    """A manifest or shard file that is missing, malformed, truncated or corrupt."""


def token_dtype(vocab_size: int) -> str:
    """The smallest dtype of DTYPES that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the manifest's directory
    samples: int
    tokens: int
    sha256: str
    sources: dict[str, int]  # samples per source


@dataclass(frozen=True)
class Manifest:
    directory: Path
    context_length: int
    dtype: str
    vocab_size: int
    tokenizer_path: str
    tokenizer_sha256: str
    shards: tuple[ShardInfo, ...]
    # Input tokens per source that did not fill a last sequence and are in no shard.
    leftover_tokens: dict[str, int]
    totals: dict
    # What the shards were built from, so that a rebuild with the same inputs can be skipped.
    build: dict
    format_version: int = FORMAT_VERSION

    @property
    def sequence_length(self) -> int:
        return self.context_length + 1

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def shard_path(self, index: int) -> Path:
        return self.directory / self.shards[index].path

    def to_json(self) -> dict:
        d = asdict(self)
        del d["directory"]
        return d


def write_manifest(manifest: Manifest) -> Path:
    path = manifest.directory / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    tmp.replace(path)
    return path


def read_manifest(directory: str | Path, verify_checksums: bool = False) -> Manifest:
    """Read and check directory/manifest.json: its fields, and that every listed shard exists
    (and, with verify_checksums, has the listed sha256)."""
    manifest = parse_manifest(directory)
    for i in range(len(manifest.shards)):
        problem = shard_file_problem(manifest, i, verify_checksums)
        if problem:
            raise ShardError(problem)
    return manifest


def shard_file_problem(manifest: Manifest, index: int, verify_checksum: bool = False) -> str | None:
    """What is wrong with shard `index`'s file: missing, or (with verify_checksum) another sha256
    than the manifest lists; None when nothing is."""
    path = manifest.shard_path(index)
    listed_in = manifest.directory / MANIFEST_NAME
    if not path.is_file():
        return f"shard file {path} listed in {listed_in} does not exist"
    if verify_checksum and sha256_file(path) != manifest.shards[index].sha256:
        return f"shard file {path} does not match the sha256 listed in {listed_in}"
    return None


def parse_manifest(directory: str | Path) -> Manifest:
    """directory/manifest.json with its fields checked, without looking at the shard files."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"shard manifest {path} does not exist (build shards with tools/build_shards.py)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"shard manifest {path} is not valid JSON: {e}") from e

    def field(d: dict, name: str, kind: type, where: str = ""):
        if not isinstance(d, dict) or name not in d:
            raise ShardError(f"shard manifest {path}: missing field {where}{name}")
        value = d[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ShardError(f"shard manifest {path}: field {where}{name} should be {kind.__name__}, got {value!r}")
        return value

    version = field(raw, "format_version", int)
    if version != FORMAT_VERSION:
        raise ShardError(f"shard manifest {path}: format_version {version}, this code reads {FORMAT_VERSION}")
    dtype = field(raw, "dtype", str)
    if dtype not in DTYPES:
        raise ShardError(f"shard manifest {path}: dtype {dtype!r} is not one of {DTYPES}")
    shards = []
    for i, s in enumerate(field(raw, "shards", list)):
        where = f"shards[{i}]."
        shards.append(ShardInfo(
            path=field(s, "path", str, where),
            samples=field(s, "samples", int, where),
            tokens=field(s, "tokens", int, where),
            sha256=field(s, "sha256", str, where),
            sources=field(s, "sources", dict, where),
        ))
    manifest = Manifest(
        directory=directory,
        format_version=version,
        context_length=field(raw, "context_length", int),
        dtype=dtype,
        vocab_size=field(raw, "vocab_size", int),
        tokenizer_path=field(raw, "tokenizer_path", str),
        tokenizer_sha256=field(raw, "tokenizer_sha256", str),
        shards=tuple(shards),
        leftover_tokens=field(raw, "leftover_tokens", dict),
        totals=field(raw, "totals", dict),
        build=field(raw, "build", dict),
    )
    for i, shard in enumerate(manifest.shards):
        if shard.tokens != shard.samples * manifest.sequence_length:
            raise ShardError(
                f"shard manifest {path}: shards[{i}] ({shard.path}) lists {shard.tokens} tokens, but "
                f"{shard.samples} samples of {manifest.sequence_length} tokens are {shard.samples * manifest.sequence_length}"
            )
    return manifest


def read_shard(manifest: Manifest, index: int, vocab_size: int | None = None) -> tuple[np.ndarray, list[str]]:
    """The samples of shard `index` in stored order: tokens [samples, context_length + 1] and
    the source of each sample. Raises ShardError naming the file when it is not what the
    manifest lists, or holds an id >= vocab_size (when given)."""
    info = manifest.shards[index]
    path = manifest.shard_path(index)
    rows, sources = [], []

    def corrupt(reason: str) -> ShardError:
        return ShardError(
            f"{path} is truncated or corrupt (expected {info.samples} samples, read {len(rows)}): {reason}"
        )

    def add(key: str, fields: dict[str, bytes]) -> None:
        if set(fields) != {TOKENS_FIELD, SOURCE_FIELD}:
            raise corrupt(f"sample {key} has fields {sorted(fields)}, expected {[SOURCE_FIELD, TOKENS_FIELD]}")
        tokens = np.load(io.BytesIO(fields[TOKENS_FIELD]), allow_pickle=False)
        if tokens.shape != (manifest.sequence_length,) or tokens.dtype != manifest.dtype:
            raise corrupt(
                f"sample {key} holds {tokens.dtype} {tokens.shape}, expected {manifest.dtype} ({manifest.sequence_length},)"
            )
        rows.append(tokens)
        sources.append(fields[SOURCE_FIELD].decode("utf-8"))

    try:
        # Stream mode: a cut inside a member's data raises instead of reading short.
        with tarfile.open(path, "r|") as tar:
            key, fields = None, {}
            for member in tar:
                if not member.isfile():
                    raise corrupt(f"member {member.name} is not a regular file")
                member_key, _, name = member.name.partition(".")
                if member_key != key and key is not None:
                    add(key, fields)
                    fields = {}
                key = member_key
                fields[name] = tar.extractfile(member).read()
            if key is not None:
                add(key, fields)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if isinstance(e, ShardError):
            raise
        raise corrupt(f"{type(e).__name__}: {e}") from e
    if len(rows) != info.samples:
        raise corrupt("the archive ends early" if len(rows) < info.samples else "it holds more samples than listed")
    tokens = np.stack(rows)
    # One max() per shard: an id past the model's embedding would otherwise be an IndexError
    # deep in the forward pass, naming no file.
    if vocab_size is not None and tokens.max() >= vocab_size:
        sample, position = np.argwhere(tokens >= vocab_size)[0]
        raise ShardError(
            f"{path}: sample {sample} holds token id {tokens[sample, position]}, outside the model's vocabulary "
            f"of {vocab_size} ids (the shards were built with a larger tokenizer, or are corrupt)"
        )
    return tokens, sources
