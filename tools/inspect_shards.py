"""Summarise a shard directory's manifest, and with --verify check every shard against its sha256.

    python tools/inspect_shards.py runs/tiny/shards [--verify]

The summary (shards, samples and tokens per source, dtype, context length) comes from manifest.json
alone. --verify reads every shard, printing progress on stderr, and exits non-zero naming each
shard that is missing or does not match the manifest's checksum.
"""

import argparse
import sys
import time
from pathlib import Path

from data.shards import Manifest, ShardError, parse_manifest, shard_file_problem


def summary(manifest: Manifest) -> str:
    samples, shards = {}, {}
    for shard in manifest.shards:
        for source, n in shard.sources.items():
            samples[source] = samples.get(source, 0) + n
            shards[source] = shards.get(source, 0) + 1
    lines = [
        f"{manifest.directory}: {len(manifest.shards)} shards, {manifest.num_samples:,} samples of "
        f"{manifest.sequence_length} tokens (context length {manifest.context_length}), {manifest.dtype}, "
        f"vocabulary {manifest.vocab_size} ({manifest.tokenizer_path})",
        f"  {'source':<24} {'shards':>8} {'samples':>12} {'tokens':>14} {'leftover tokens':>16}",
    ]
    for source in sorted(samples):
        lines.append(f"  {source:<24} {shards[source]:>8} {samples[source]:>12,} "
                     f"{samples[source] * manifest.sequence_length:>14,} {manifest.leftover_tokens.get(source, 0):>16,}")
    return "\n".join(lines)


def verify(manifest: Manifest) -> list[str]:
    """Every shard's problem (missing, or another sha256 than listed), with progress on stderr."""
    paths = [manifest.shard_path(i) for i in range(len(manifest.shards))]
    sizes = [p.stat().st_size if p.is_file() else 0 for p in paths]
    done_bytes, problems, start = 0, [], time.perf_counter()
    for i in range(len(paths)):
        problem = shard_file_problem(manifest, i, verify_checksum=True)
        if problem:
            problems.append(problem)
        done_bytes += sizes[i]
        rate = done_bytes / max(time.perf_counter() - start, 1e-9)
        eta = (sum(sizes) - done_bytes) / rate if rate else 0.0
        print(f"\rverified {i + 1}/{len(paths)} shards, {rate / 1e6:.1f} MB/s, ETA {eta:.0f}s", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help="directory holding manifest.json")
    parser.add_argument("--verify", action="store_true", help="recompute every shard's sha256")
    args = parser.parse_args(argv)
    try:
        manifest = parse_manifest(args.directory)
    except ShardError as e:
        sys.exit(f"error: {e}")
    print(summary(manifest))
    if args.verify:
        problems = verify(manifest)
        if problems:
            sys.exit("\n".join(f"error: {p}" for p in problems))
        print(f"all {len(manifest.shards)} shards match their sha256")


if __name__ == "__main__":
    main()
