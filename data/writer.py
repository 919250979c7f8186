"""The shard writer: documents tokenized and packed into per-source webdataset token shards, the format
data/shards.py defines and reads (tools/build_shards.py is the command).

`build_shards` reads plain files (one document each, source: the input's name) and jsonl ({"text",
"source"?} per line); `sources` [(NAME, PATH)] reads PATH's files with the adapter of data source NAME
(data/sources/). Documents are tokenized by `workers` processes, results taken in input order, so
a build gives the same bytes every time. Each document, followed by <|eos|>, is appended to its
source's token stream, cut into sequences of context_length + 1 tokens: a sample never mixes
sources. Tokens at the end of a source that fill no sequence are counted as leftover_tokens.

A chat document (a jsonl record with "messages", or a vision_text sample with a "prompt") is encoded
as <|user|>prompt<|end|><|assistant|>answer<|end|>: the role markers are special tokens, the messages'
text stays data, as all text is (a literal "<|eos|>" in a document is text, not the eos id).

A source whose first document has an image (vision_text's do) is an image source: each document is
one sample, its tokens and <|eos|> cut or padded to context_length + 1 (the tokens cut off are
counted as leftover_tokens), its image stored beside them as it came (data/shards.py).

A build can be interrupted at any point and run again with the same arguments: it continues after
the last shard it finished (the progress is saved in OUTPUT/.build/ after every shard, with the
partly filled shards' tokens and the place in the input), so no document is lost or repeated and
the shards are the same as an uninterrupted build's. A finished build with the same inputs,
tokenizer and sizes is not redone.
"""

import hashlib
import json
import os
import shutil
import sys
from collections import Counter, deque
from dataclasses import dataclass
from itertools import islice
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from cromwell.data.documents import Chat, file_documents, input_files, input_source, plain_text
from cromwell.data.shards import (
    CORPUS_NAME, CRC_NAME, FORMAT_VERSION, MANIFEST_NAME, OFFSETS_NAME, SUMS_NAME, EncodedImage, ShardError,
    SourceManifest, parse_manifest, sample_crcs, sample_offsets, shard_bytes, sha256_file, shard_name, sums_line,
    token_dtype, write_json_atomically,
)
from cromwell.data.sources import ADAPTERS, Skipped
from cromwell.data.tokenizer import ASSISTANT, END, EOS_ID, PAD_ID, SYSTEM, USER, load_tokenizer, special_id

# 256 samples per shard gives the tiny run (about 2.5M tokens, 257-token samples) some 38 shards.
DEFAULT_SAMPLES_PER_SHARD = 256
# A task for a tokenizing process: documents up to this many characters (at least one document).
# Small enough that the processes finish together (a large last task leaves the others idle),
# large enough that sending it costs little next to tokenizing it.
TASK_CHARS = 1 << 18
STATE_DIR = ".build"
# In the fingerprint: raised when the same inputs would give other files (2: image documents become
# image samples), or the saved progress changes form, so that neither is taken for this build's.
BUILDER_VERSION = 2
_EOS = np.array([EOS_ID], np.uint32)

_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)
    # Raw text is data: a literal "<|eos|>" in a document is text, not the end-of-sequence id.
    _worker_tokenizer.encode_special_tokens = True


_ROLE_IDS = {"system": special_id(SYSTEM), "user": special_id(USER), "assistant": special_id(ASSISTANT)}
_END_ID = special_id(END)


def _encode(documents: list[tuple[str | Chat, str]]) -> list[tuple[np.ndarray, str]]:
    """Ids of each document: a chat's messages are encoded as data, each between its role's special
    token and <|end|> (the layout training.hybrid.instruction reads)."""
    parts = [[text] if isinstance(text, str) else [content for _, content in text] for text, _ in documents]
    encodings = iter(_worker_tokenizer.encode_batch([p for doc in parts for p in doc], add_special_tokens=False))
    out = []
    for text, source in documents:
        if isinstance(text, str):
            ids = next(encodings).ids
        else:
            ids = [i for role, _ in text for i in (_ROLE_IDS[role], *next(encodings).ids, _END_ID)]
        out.append((np.asarray(ids, dtype=np.uint32), source))
    return out


@dataclass(frozen=True)
class Input:
    """One input file and how to read it: (text, source) per document."""
    path: Path
    adapter: str | None  # a data.sources adapter, or None for --input files
    default_source: str  # of --input documents that name none


def _inputs(paths: list[Path], sources: list[tuple[str, Path]]) -> list[Input]:
    found = []
    for given in paths:
        if not given.exists():
            raise FileNotFoundError(f"input {given} does not exist")
        found += [Input(f, None, input_source(given)) for f in input_files(given)]
    for name, given in sources:
        if name not in ADAPTERS:
            raise ValueError(f"--source {name}={given}: no adapter named {name!r} (there are {sorted(ADAPTERS)})")
        if not given.exists():
            raise FileNotFoundError(f"--source {name}={given}: {given} does not exist")
        found += [Input(f, name, name) for f in input_files(given)]
    return found


def _documents(item: Input, on_error: str, skipped: Skipped) -> Iterator[tuple[str, str, EncodedImage | None]]:
    if item.adapter is None:
        for text, source in file_documents(item.path, item.default_source):
            yield text, source, None
        return
    for doc in ADAPTERS[item.adapter](item.path, on_error=on_error, skipped=skipped):
        # An instruction sample (vision_text's "prompt"): the prompt asks, the text answers.
        text = doc.text if "prompt" not in doc.metadata else (("user", doc.metadata["prompt"]), ("assistant", doc.text))
        yield text, doc.source, None if doc.image is None else (doc.metadata["image_format"], doc.image)


def _positioned(inputs: list[Input], start: tuple[int, int], on_error: str,
                skipped: Skipped) -> Iterator[tuple[tuple[int, int], str, str, EncodedImage | None]]:
    """((file index, document index in it), text, source, image) from `start` on; earlier files are not opened."""
    for f in range(start[0], len(inputs)):
        docs = _documents(inputs[f], on_error, skipped)
        for d, doc in enumerate(islice(docs, start[1] if f == start[0] else 0, None),
                                start=start[1] if f == start[0] else 0):
            yield (f, d), *doc


def write_shard(directory: Path, index: int, first_sample: int, rows: np.ndarray,
                images: list[EncodedImage | None] | None = None) -> str:
    """Shard `index` of a source holding `rows` (its samples first_sample, first_sample + 1, ...) and,
    in an image source, `images`, written whole under a temporary name and renamed; returns its sha256."""
    path = directory / shard_name(index)
    tmp = path.with_name(path.name + ".tmp")
    data = shard_bytes(first_sample, rows, images)
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


class SourceShards:
    """One source's token stream cut into samples and written as whole shards. Samples wait in
    memory until a shard is full, so that the saved progress is closed shards plus these tokens
    (and an image source's images). Each shard's sha256sums line, its samples' crc32s and an image
    source's offsets are appended to `.part` files as it is written (constant work per shard,
    however many came before), renamed when the source is done."""

    def __init__(self, directory: Path, source: str, samples_per_shard: int, sequence_length: int, dtype: str,
                 images: bool = False):
        self.directory, self.source = directory, source
        self.samples_per_shard, self.sequence_length, self.dtype = samples_per_shard, sequence_length, dtype
        self.images = images
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.pending_images: list[EncodedImage | None] = []  # an image source's, one per pending sample
        self.shards = 0
        self.counts = Counter()

    @property
    def shard_tokens(self) -> int:
        return self.samples_per_shard * self.sequence_length

    def _part(self, name: str) -> Path:
        return self.directory / f"{name}.part"

    def _part_sizes(self) -> dict[str, int]:
        """The `.part` files and their sizes once the shards so far are written."""
        sizes = {SUMS_NAME: self.shards * len(sums_line("0" * 64, 0)), CRC_NAME: self.counts["samples"] * 4}
        if self.images:
            sizes[OFFSETS_NAME] = (self.counts["samples"] + self.shards) * 8
        return sizes

    def add(self, ids: np.ndarray, image: EncodedImage | None = None) -> int:
        """Append one document's ids (and eos), in an image source as a sample of its own with its
        image; returns the number of shards written."""
        self.counts["documents"] += 1
        self.counts["input_tokens"] += len(ids) + 1
        if not self.images:
            return self.extend(ids, _EOS)
        tokens = np.concatenate([ids, _EOS])[: self.sequence_length]
        self.counts["leftover_tokens"] += len(ids) + 1 - len(tokens)
        return self.extend(tokens, np.full(self.sequence_length - len(tokens), PAD_ID, np.uint32), images=[image])

    def extend(self, *tokens: np.ndarray, images: Iterable[EncodedImage | None] = ()) -> int:
        """Append tokens to the stream (an image source's: whole samples, and their images); returns
        the number of shards written."""
        self.pending += tokens
        self.pending_tokens += sum(len(t) for t in tokens)
        self.pending_images += images
        written = 0
        if self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            while len(stream) >= self.shard_tokens:
                self._write(stream[: self.shard_tokens], self.samples_per_shard)
                stream = stream[self.shard_tokens:]
                written += 1
            self.pending, self.pending_tokens = [stream], len(stream)
        return written

    def finish(self) -> None:
        """Write the last, short shard from the pending whole samples (the rest is leftover), and
        give the checksum files their final names."""
        stream = np.concatenate(self.pending) if self.pending else np.empty(0, np.uint32)
        samples = len(stream) // self.sequence_length
        if samples:
            self._write(stream[: samples * self.sequence_length], samples)
        self.pending, self.pending_tokens = [], 0
        self.counts["leftover_tokens"] += len(stream) - samples * self.sequence_length
        if self.shards:
            for name in self._part_sizes():
                self._part(name).replace(self.directory / name)

    def _write(self, tokens: np.ndarray, samples: int) -> None:
        rows = tokens.astype(self.dtype).reshape(samples, self.sequence_length)
        images = self.pending_images[:samples] if self.images else None
        del self.pending_images[:samples]
        digest = write_shard(self.directory, self.shards, self.shards * self.samples_per_shard, rows, images)
        parts = {SUMS_NAME: sums_line(digest, self.shards).encode(), CRC_NAME: sample_crcs(rows, images)}
        if images is not None:
            parts[OFFSETS_NAME] = sample_offsets(rows, images)
            self.counts["image_bytes"] += sum(len(image[1]) for image in images if image is not None)
        for name, data in parts.items():
            with open(self._part(name), "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # before the progress that counts this shard
        self.shards += 1
        self.counts["samples"] += samples

    def state(self) -> dict:
        return {"shards": self.shards, "counts": dict(self.counts), "images": self.images}

    def pending_arrays(self) -> dict[str, np.ndarray]:
        """The samples not in a shard yet, for the saved progress (restore takes them back)."""
        images = self.pending_images
        return {
            "tokens": (np.concatenate(self.pending) if self.pending else np.empty(0)).astype(np.uint32),
            "image_formats": np.array(["" if image is None else image[0] for image in images], "U8"),
            "image_sizes": np.array([0 if image is None else len(image[1]) for image in images], np.int64),
            "image_bytes": np.frombuffer(b"".join(image[1] for image in images if image is not None), np.uint8),
        }

    def restore(self, state: dict, pending: dict[str, np.ndarray]) -> None:
        """Back to a saved state: checksum lines of shards written after it are cut off."""
        self.shards, self.counts = state["shards"], Counter(state["counts"])
        self.pending, self.pending_tokens = [pending["tokens"]], len(pending["tokens"])
        data, sizes = pending["image_bytes"].tobytes(), pending["image_sizes"].tolist()
        ends = np.cumsum(sizes, dtype=np.int64).tolist()
        self.pending_images = [(f, data[end - size:end]) if f else None
                               for f, size, end in zip(pending["image_formats"].tolist(), sizes, ends)]
        for name, size in self._part_sizes().items():
            with open(self._part(name), "ab") as f:
                if f.tell() < size:
                    raise ValueError(f"{self._part(name)} is shorter than the saved progress says: remove "
                                     f"{self.directory.parent / STATE_DIR} to build from the start")
                f.truncate(size)


class Progress:
    """OUTPUT/.build/: where a build stands, saved after every shard so that a rerun continues there."""

    def __init__(self, output: Path, fingerprint: dict):
        self.dir = output / STATE_DIR
        self.fingerprint = fingerprint

    def load(self) -> dict | None:
        path = self.dir / "progress.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        return state if state.get("fingerprint") == self.fingerprint else None

    def save(self, next_document: tuple[int, int], writers: dict[str, SourceShards], skipped: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Every source's pending samples in one file, a new one each time, written before the
        # progress.json that names it: wherever a build is interrupted, the progress.json it leaves
        # has its own pending samples.
        pending = f"pending-{sum(w.shards for w in writers.values()):09d}.npz"
        tmp = self.dir / f"{pending}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **{f"{name}.{key}": array for name, w in writers.items()
                           for key, array in w.pending_arrays().items()})
        tmp.replace(self.dir / pending)
        write_json_atomically(self.dir / "progress.json", {
            "fingerprint": self.fingerprint, "next_document": list(next_document), "skipped_records": skipped,
            "sources": {name: w.state() for name, w in writers.items()}, "pending": pending,
        })
        self.remove_pending(keep=pending)

    def pending(self, state: dict, source: str) -> dict[str, np.ndarray]:
        with np.load(self.dir / state["pending"], allow_pickle=False) as arrays:
            return {key[len(source) + 1:]: arrays[key] for key in arrays.files if key.startswith(f"{source}.")}

    def remove_pending(self, keep: str | None = None) -> None:
        for path in self.dir.glob("pending-*.npz*"):
            if path.name != keep:
                path.unlink()

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _fingerprint(inputs: list[Input], tokenizer_sha256: str, context_length: int, samples_per_shard: int,
                 on_error: str) -> dict:
    # Size and mtime rather than a hash, so that the check stays cheap for large corpora.
    return {
        "inputs": [[str(i.path), i.adapter, i.path.stat().st_size, i.path.stat().st_mtime_ns] for i in inputs],
        "tokenizer_sha256": tokenizer_sha256, "context_length": context_length,
        "samples_per_shard": samples_per_shard, "on_error": on_error, "format_version": FORMAT_VERSION,
        "builder_version": BUILDER_VERSION,
    }


def _finished(output: Path, fingerprint: dict) -> dict[str, SourceManifest] | None:
    """The sources' manifests of a finished build of exactly this fingerprint in `output`, or None."""
    path = output / STATE_DIR / "done.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    if done.get("fingerprint") != fingerprint:
        return None
    manifests = {}
    for source in done["sources"]:
        manifest = output / source / MANIFEST_NAME
        try:
            manifests[source] = parse_manifest(manifest.read_bytes(), str(manifest))
        except (OSError, ShardError):
            return None
        files = (SUMS_NAME, CRC_NAME) + ((OFFSETS_NAME,) if manifests[source].images else ())
        if not all((output / source / name).is_file() for name in files):
            return None
    return manifests


def write_corpus_index(output: Path) -> list[str]:
    """corpus.json listing every source directory of `output` that has a manifest: sources built
    by separate runs (on separate machines, say) into one corpus directory are all listed."""
    sources = sorted(p.parent.name for p in output.glob(f"*/{MANIFEST_NAME}"))
    write_json_atomically(output / CORPUS_NAME, {"format_version": FORMAT_VERSION, "sources": sources})
    return sources


def build_shards(
    inputs: list[Path], tokenizer_path: Path, output: Path, context_length: int, workers: int,
    samples_per_shard: int, show_progress: bool = True, sources: list[tuple[str, Path]] = (),
    on_error: str = "raise", after_shard: Callable[[int], None] | None = None,
) -> dict[str, SourceManifest]:
    """Build (or continue building) the shards; returns each source's manifest. after_shard(n) is
    called after the n-th shard of this call is saved with its progress (for tests and tools)."""
    if context_length < 1:
        raise ValueError(f"context length must be positive, got {context_length}")
    if samples_per_shard < 1:
        raise ValueError(f"samples per shard must be positive, got {samples_per_shard}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    found = _inputs(list(inputs), list(sources))
    if not found:
        raise ValueError("no input files: give --input or --source with files in them")
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    sequence_length = context_length + 1
    tokenizer_sha256 = sha256_file(tokenizer_path)
    fingerprint = _fingerprint(found, tokenizer_sha256, context_length, samples_per_shard, on_error)
    done = _finished(output, fingerprint)
    if done is not None:
        print(f"{output} already holds these shards (sources {', '.join(done)}); nothing to do")
        return done

    output.mkdir(parents=True, exist_ok=True)
    progress = Progress(output, fingerprint)
    saved = progress.load()
    writers: dict[str, SourceShards] = {}

    def writer(source: str, images: bool) -> SourceShards:
        if source not in writers:
            directory = output / source
            directory.mkdir(exist_ok=True)
            writers[source] = SourceShards(directory, source, samples_per_shard, sequence_length, dtype, images)
        elif images and not writers[source].images:
            raise ValueError(f"source {source!r}: a document with an image follows documents without one, packed "
                             "as text; give the text-only documents another source, or put them after the images")
        return writers[source]

    start = (0, 0)
    skipped = Skipped()
    skipped_before = 0
    if saved is None:
        progress.clear()
        # Files of an earlier build (format 1 ones at the top too) would otherwise linger beside the new.
        for pattern in (MANIFEST_NAME, "shard-*.tar*", f"*/{MANIFEST_NAME}", "*/shard-*.tar*", f"*/{SUMS_NAME}*",
                        f"*/{CRC_NAME}*", f"*/{OFFSETS_NAME}*"):
            for stale in output.glob(pattern):
                stale.unlink()
    else:
        start, skipped_before = tuple(saved["next_document"]), saved["skipped_records"]
        for name, state in saved["sources"].items():
            writer(name, state["images"]).restore(state, progress.pending(saved, name))
        for name, w in writers.items():  # shards past the saved progress are redone: same bytes again
            for extra in (output / name).glob("shard-*.tar*"):
                if extra.name.endswith(".tmp") or int(extra.name[6:12]) >= w.shards:
                    extra.unlink()
        print(f"continuing an interrupted build at input file {start[0] + 1} of {len(found)} "
              f"({sum(w.shards for w in writers.values())} shards already written)")

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    total_bytes = sum(i.path.stat().st_size for i in found)
    done_bytes = sum(i.path.stat().st_size for i in found[: start[0]])
    bar = tqdm(total=total_bytes, initial=done_bytes, desc="tokenizing", unit="B", unit_scale=True,
               disable=not show_progress, file=sys.stderr)
    positioned = _positioned(found, start, on_error, skipped)
    # Per task, in order: its last document's place, the records skipped by then, its size, and its
    # images, which stay in this process (the tokenizing ones need only the text).
    places: deque[tuple[tuple[int, int], int, int, list[EncodedImage | None]]] = deque()

    def task(chunk: list, chars: int) -> list[tuple[str, str]]:
        places.append((chunk[-1][0], skipped.total, chars, [image for *_, image in chunk]))
        return [(text, source) for _, text, source, _ in chunk]

    def tasks() -> Iterator[list[tuple[str, str]]]:
        chunk, chars = [], 0
        for item in positioned:
            chunk.append(item)
            # Characters and image bytes approximate the input bytes the bar counts (a file's end
            # comes late in big files).
            chars += len(plain_text(item[1])) + (0 if item[3] is None else len(item[3][1]))
            if chars >= TASK_CHARS:
                yield task(chunk, chars)
                chunk, chars = [], 0
        if chunk:
            yield task(chunk, chars)

    pool = Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path),)) if workers > 1 else None
    if pool is None:
        _init_worker(str(tokenizer_path))
    written = 0
    try:
        for encoded in pool.imap(_encode, tasks(), chunksize=1) if pool else map(_encode, tasks()):
            last, skipped_so_far, chars, images = places.popleft()
            bar.update(min(chars, total_bytes - bar.n))
            new = 0
            for (ids, source), image in zip(encoded, images, strict=True):
                new += writer(source, image is not None).add(ids, image)
            if new:
                progress.save((last[0], last[1] + 1), writers, skipped_before + skipped_so_far)
                written += new
                bar.set_postfix(shards=sum(w.shards for w in writers.values()))
                if after_shard is not None:
                    after_shard(written)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    bar.update(total_bytes - bar.n)
    bar.close()

    manifests = {}
    for name, w in sorted(writers.items()):
        manifest = _finish_source(w, vocab_size, tokenizer_sha256, {"tokenizer_path": str(tokenizer_path)})
        if manifest is None:
            print(f"  {name}: {w.counts['input_tokens']} tokens fill no sequence of {sequence_length}: no shards")
            continue
        manifests[name] = manifest
        print(f"  {name}: {manifest.documents} documents, {manifest.input_tokens} tokens -> {manifest.num_samples} "
              f"samples of {sequence_length} in {manifest.num_shards} shards; "
              + (f"{manifest.image_bytes} image bytes, {manifest.leftover_tokens} tokens cut off documents longer "
                 "than a sample" if manifest.images else f"{manifest.leftover_tokens} leftover tokens"))
    write_corpus_index(output)
    total_skipped = skipped_before + skipped.total
    if total_skipped:
        print(f"skipped {total_skipped} bad input records (--on-error skip); each file's count is in the log above")
    progress.dir.mkdir(exist_ok=True)  # not made yet if no shard was full before the end
    write_json_atomically(progress.dir / "done.json", {"fingerprint": fingerprint, "sources": sorted(manifests),
                                                       "skipped_records": total_skipped})
    progress.remove_pending()
    (output / STATE_DIR / "progress.json").unlink(missing_ok=True)
    print(f"wrote {output / CORPUS_NAME}: {len(manifests)} sources, "
          f"{sum(m.num_shards for m in manifests.values())} shards ({dtype})")
    return manifests


def _finish_source(w: SourceShards, vocab_size: int, tokenizer_sha256: str, build: dict) -> SourceManifest | None:
    """Write a source's last shard, sha256sums and manifest (None, and no directory, if it has no sample)."""
    w.finish()
    if not w.shards:
        shutil.rmtree(w.directory)
        return None
    manifest = SourceManifest(
        source=w.source, context_length=w.sequence_length - 1, dtype=w.dtype, vocab_size=vocab_size,
        tokenizer_sha256=tokenizer_sha256, samples_per_shard=w.samples_per_shard, num_samples=w.counts["samples"],
        documents=w.counts["documents"], input_tokens=w.counts["input_tokens"],
        leftover_tokens=w.counts["leftover_tokens"], build=build, images=w.images, image_bytes=w.counts["image_bytes"],
    )
    write_json_atomically(w.directory / MANIFEST_NAME, manifest.to_json())
    return manifest


def write_source(output: Path, source: str, rows: np.ndarray, samples_per_shard: int, vocab_size: int,
                 tokenizer_sha256: str = "0" * 64, images: list[EncodedImage | None] | None = None) -> SourceManifest:
    """A source of exactly these samples ([n, context_length + 1] ids) in corpus `output`, listed in
    its corpus.json: for tests and benchmarks that need shards of known content. With `images`
    ((format, bytes) or None per row) an image source."""
    directory = output / source
    directory.mkdir(parents=True, exist_ok=True)
    w = SourceShards(directory, source, samples_per_shard, rows.shape[1], token_dtype(vocab_size), images is not None)
    w.extend(np.asarray(rows, np.uint32).reshape(-1), images=images or ())
    manifest = _finish_source(w, vocab_size, tokenizer_sha256, {})
    write_corpus_index(output)
    return manifest
