"""Tokenize documents and pack them into webdataset token shards with a manifest.

    python tools/build_shards.py --input runs/tiny/corpus --tokenizer runs/tiny/tokenizer.json \
        --output runs/tiny/shards [--context-length L | --config CFG.yaml] [--workers N] [--samples-per-shard K]

Each document is tokenized (several processes, results taken in input order so the shards are
the same on every run), followed by <|eos|>, and appended to its source's token stream; each
stream is cut into sequences of context_length + 1 tokens, so a sample never mixes sources.
Tokens at the end of a stream that do not fill a sequence are counted in the manifest's
leftover_tokens and printed. Explicit flags win over the config (training.lm.context_length).
A rerun with the same inputs, tokenizer and sizes keeps the existing shards.
"""

import argparse
import os
from collections import Counter
from itertools import islice
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset
from tqdm import tqdm

from data.shards import (
    MANIFEST_NAME, SOURCE_FIELD, TOKENS_FIELD, Manifest, ShardError, ShardInfo, read_manifest, sha256_file,
    token_dtype, write_manifest,
)
from data.documents import input_files, iter_documents
from data.tokenizer import EOS_ID, load_tokenizer

# 256 samples per shard gives the tiny run (about 2.5M tokens, 257-token samples) some 38 shards:
# enough for 2 ranks x several loader workers, each of which needs shards of its own.
DEFAULT_SAMPLES_PER_SHARD = 256
DOCUMENTS_PER_TASK = 64
SHARD_PATTERN = "shard-{:06d}.tar"

_EMPTY = np.empty(0, np.uint32)
_EOS = np.array([EOS_ID], np.uint32)
_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)
    # Raw text is data: a literal "<|eos|>" in a document is text, not the end-of-sequence id.
    _worker_tokenizer.encode_special_tokens = True


def _encode(documents: list[tuple[str, str]]) -> list[tuple[np.ndarray, str]]:
    encodings = _worker_tokenizer.encode_batch([text for text, _ in documents], add_special_tokens=False)
    return [(np.asarray(e.ids, dtype=np.uint32), source) for e, (_, source) in zip(encodings, documents)]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class ShardWriter:
    """Writes samples into numbered .tar shards of samples_per_shard samples each."""

    def __init__(self, directory: Path, samples_per_shard: int, sequence_length: int):
        self.directory = directory
        self.samples_per_shard = samples_per_shard
        self.sequence_length = sequence_length
        self.shards: list[ShardInfo] = []
        self.num_samples = 0
        self._tar = None
        self._sources = Counter()

    def write(self, tokens: np.ndarray, source: str) -> None:
        if self._tar is None:
            self._path = SHARD_PATTERN.format(len(self.shards))
            # mtime fixed so that the same input gives byte-identical shards.
            self._tar = webdataset.TarWriter(str(self.directory / self._path), mtime=0)
        self._tar.write({"__key__": f"{self.num_samples:09d}", TOKENS_FIELD: tokens, SOURCE_FIELD: source})
        self.num_samples += 1
        self._sources[source] += 1
        if sum(self._sources.values()) == self.samples_per_shard:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        samples = sum(self._sources.values())
        self.shards.append(ShardInfo(
            path=self._path,
            samples=samples,
            tokens=samples * self.sequence_length,
            sha256=sha256_file(self.directory / self._path),
            sources=dict(sorted(self._sources.items())),
        ))
        self._tar, self._sources = None, Counter()


def _input_fingerprint(inputs: list[Path]) -> list[list]:
    # Size and mtime rather than a hash, so that the check stays cheap for large corpora.
    files = [f for given in inputs for f in input_files(given)]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def build_shards(
    inputs: list[Path], tokenizer_path: Path, output: Path, context_length: int,
    workers: int, samples_per_shard: int, show_progress: bool = True,
) -> Manifest:
    if context_length < 1:
        raise ValueError(f"context length must be positive, got {context_length}")
    if samples_per_shard < 1:
        raise ValueError(f"samples per shard must be positive, got {samples_per_shard}")
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    sequence_length = context_length + 1
    build = {
        "inputs": _input_fingerprint(inputs),
        "tokenizer_sha256": sha256_file(tokenizer_path),
        "context_length": context_length,
        "samples_per_shard": samples_per_shard,
    }
    if (output / MANIFEST_NAME).is_file():
        try:
            existing = read_manifest(output, verify_checksums=True)
        except ShardError as e:
            print(f"rebuilding: {e}")
        else:
            if existing.build == build:
                print(f"{output} already holds these shards ({len(existing.shards)} shards); nothing to do")
                return existing

    output.mkdir(parents=True, exist_ok=True)
    # Shards of an earlier build would otherwise linger beside the new ones.
    (output / MANIFEST_NAME).unlink(missing_ok=True)
    for stale in output.glob("shard-*.tar"):
        stale.unlink()

    writer = ShardWriter(output, samples_per_shard, sequence_length)
    buffers: dict[str, np.ndarray] = {}
    per_source: dict[str, Counter] = {}
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    tasks = _chunks(iter_documents(inputs), DOCUMENTS_PER_TASK)
    progress = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not show_progress)
    pool = Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path),)) if workers > 1 else None
    if pool is None:
        _init_worker(str(tokenizer_path))
    try:
        for encoded in pool.imap(_encode, tasks) if pool else map(_encode, tasks):
            for ids, source in encoded:
                counts = per_source.setdefault(source, Counter())
                counts["documents"] += 1
                counts["input_tokens"] += len(ids) + 1
                stream = np.concatenate([buffers.get(source, _EMPTY), ids, _EOS])
                full = len(stream) // sequence_length
                for row in stream[: full * sequence_length].reshape(full, sequence_length):
                    writer.write(row.astype(dtype), source)
                counts["samples"] += full
                buffers[source] = stream[full * sequence_length:]
                progress.update(len(ids) + 1)
            progress.set_postfix(samples=writer.num_samples, shards=len(writer.shards))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        progress.close()
    writer.close()

    leftover = {source: len(buffers[source]) for source in sorted(buffers)}
    sources = {
        source: {**per_source[source], "leftover_tokens": leftover[source]} for source in sorted(per_source)
    }
    totals = {
        "documents": sum(c["documents"] for c in per_source.values()),
        "input_tokens": sum(c["input_tokens"] for c in per_source.values()),
        "samples": writer.num_samples,
        "sample_tokens": writer.num_samples * sequence_length,
        "leftover_tokens": sum(leftover.values()),
        "sources": sources,
    }
    manifest = Manifest(
        directory=output,
        context_length=context_length,
        dtype=dtype,
        vocab_size=vocab_size,
        tokenizer_path=str(tokenizer_path),
        tokenizer_sha256=build["tokenizer_sha256"],
        shards=tuple(writer.shards),
        leftover_tokens=leftover,
        totals=totals,
        build=build,
    )
    path = write_manifest(manifest)
    print(
        f"wrote {path}: {totals['documents']} documents, {totals['input_tokens']} tokens -> "
        f"{totals['samples']} samples of {sequence_length} tokens in {len(writer.shards)} shards ({dtype})"
    )
    for source, n in leftover.items():
        print(f"  {source}: {n} leftover tokens did not fill a last sequence and are in no shard")
    return manifest


def _from_config(path: Path):
    # Imported here: the run config is only needed when --config is given.
    from pretrain.config import load_config

    return load_config(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, nargs="+", type=Path, help="files, directories or jsonl")
    parser.add_argument("--tokenizer", required=True, type=Path, help="tokenizer.json from tools/train_tokenizer.py")
    parser.add_argument("--output", required=True, type=Path, help="directory for the shards and manifest.json")
    parser.add_argument("--context-length", type=int, help="tokens a model sees per sequence")
    parser.add_argument("--config", type=Path, help="run config giving training.lm.context_length")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
    parser.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    args = parser.parse_args(argv)
    if args.context_length is None and args.config is None:
        parser.error("give --context-length or --config")
    context_length = args.context_length
    if args.config is not None:
        lm = _from_config(args.config).training.lm
        context_length = context_length if context_length is not None else lm.context_length
        vocab_size = load_tokenizer(args.tokenizer).get_vocab_size()
        if vocab_size > lm.vocab_size:
            parser.error(
                f"tokenizer {args.tokenizer} has {vocab_size} tokens, more than training.lm.vocab_size "
                f"{lm.vocab_size} in {args.config}: the model could not embed every id"
            )
    build_shards(args.input, args.tokenizer, args.output, context_length, args.workers, args.samples_per_shard)


if __name__ == "__main__":
    main()
