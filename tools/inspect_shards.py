"""Summarise a token shard corpus, decode samples, and with --verify check every shard's sha256.

    python tools/inspect_shards.py runs/tiny/shards [--source NAME] [--decode N] [--verify]

The summary (per source: shards, documents, samples, tokens, leftover tokens, whether it holds
images and their bytes; dtype, context length) comes from the manifests alone. --decode N prints the
first N samples of each source (of --source only, if given) as text with the corpus' tokenizer, and
each sample's image's format, size and bytes. --verify reads every shard, printing progress on
stderr, and exits non-zero naming each shard that is missing, of the wrong size (an image source's
offsets give its size), or not matching its line in sha256sums.
"""

import argparse
import io
import sys
import time

from cromwell.data.shards import Location, ShardError, ShardReader, SourceManifest, read_corpus, shard_problem


def summary(location: Location, manifests: dict[str, SourceManifest]) -> str:
    first = next(iter(manifests.values()))
    lines = [
        f"{location.base}: {len(manifests)} sources, {sum(m.num_shards for m in manifests.values()):,} shards, "
        f"{sum(m.num_samples for m in manifests.values()):,} samples of {first.sequence_length} tokens (context "
        f"length {first.context_length}), {first.dtype}, vocabulary {first.vocab_size}",
        f"  {'source':<20} {'shards':>8} {'documents':>10} {'samples':>12} {'tokens':>14} {'leftover':>10} "
        f"{'images':>6} {'image bytes':>14}",
    ]
    for name, m in manifests.items():
        lines.append(f"  {name:<20} {m.num_shards:>8,} {m.documents:>10,} {m.num_samples:>12,} "
                     f"{m.num_samples * m.sequence_length:>14,} {m.leftover_tokens:>10,} "
                     f"{'yes' if m.images else 'no':>6} {m.image_bytes:>14,}")
    return "\n".join(lines)


def decode(location: Location, manifest: SourceManifest, count: int, tokenizer) -> list[str]:
    reader = ShardReader(location, manifest)
    try:
        out = []
        for n in range(min(count, manifest.num_samples)):
            shard, member = divmod(n, manifest.samples_per_shard)
            ids, image = reader.read_sample(shard, member)
            out.append(f"--- {manifest.source} sample {n} (shard {shard}, member {member}{describe(image)}) ---\n"
                       + tokenizer.decode(ids.tolist(), skip_special_tokens=False))
        return out
    finally:
        reader.close()


def describe(image: bytes | None) -> str:
    """A sample's image's format and size, from its header."""
    if image is None:
        return ""
    from PIL import Image

    from cromwell.data.images import FORMATS

    try:
        with Image.open(io.BytesIO(image), formats=FORMATS) as decoded:
            return f"; image {decoded.format} {decoded.width}x{decoded.height}, {len(image):,} bytes"
    except OSError as e:
        return f"; an image of {len(image):,} bytes that does not open: {e}"


def verify(location: Location, manifests: dict[str, SourceManifest]) -> list[str]:
    """Every shard's problem, with progress (shards/s, ETA) on stderr."""
    todo = [(m, i) for m in manifests.values() for i in range(m.num_shards)]
    problems, start, done_bytes = [], time.perf_counter(), 0
    for n, (m, i) in enumerate(todo, start=1):
        problem = shard_problem(location, m, i)
        if problem:
            problems.append(problem)
        else:
            done_bytes += location.shard_size(m, i)
        elapsed = max(time.perf_counter() - start, 1e-9)
        print(f"\rverified {n}/{len(todo)} shards, {done_bytes / elapsed / 1e6:.1f} MB/s, "
              f"ETA {(len(todo) - n) * elapsed / n:.0f}s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("corpus", help="corpus directory (or http(s) URL) holding corpus.json")
    parser.add_argument("--source", help="only this source")
    parser.add_argument("--decode", type=int, default=0, metavar="N", help="print the first N samples as text")
    parser.add_argument("--tokenizer", help="tokenizer.json for --decode (default: the one the build recorded)")
    parser.add_argument("--cache-dir", help="where remote shards are downloaded")
    parser.add_argument("--verify", action="store_true", help="recompute every shard's sha256")
    args = parser.parse_args(argv)
    try:
        location = Location(args.corpus, args.cache_dir)
        manifests = read_corpus(location)
    except ShardError as e:
        sys.exit(f"error: {e}")
    if args.source:
        if args.source not in manifests:
            sys.exit(f"error: {args.corpus} has no source {args.source!r} (it has {sorted(manifests)})")
        manifests = {args.source: manifests[args.source]}
    print(summary(location, manifests))
    if args.decode:
        from cromwell.data.tokenizer import load_tokenizer

        path = args.tokenizer or next(iter(manifests.values())).build.get("tokenizer_path")
        if not path:
            sys.exit("error: --decode needs --tokenizer (the manifest records none)")
        tokenizer = load_tokenizer(path)
        for m in manifests.values():
            print("\n".join(decode(location, m, args.decode, tokenizer)))
    if args.verify:
        problems = verify(location, manifests)
        if problems:
            sys.exit("\n".join(f"error: {p}" for p in problems))
        print(f"all {sum(m.num_shards for m in manifests.values())} shards match their sha256")


if __name__ == "__main__":
    main()
