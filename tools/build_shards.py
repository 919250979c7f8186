"""Tokenize documents and pack them into per-source webdataset token shards.

    python tools/build_shards.py --tokenizer runs/tiny/tokenizer.json --output runs/tiny/shards \
        [--input FILE_OR_DIR ...] [--source stack_v2=DIR ...] [--context-length L | --config CFG.yaml] \
        [--workers N] [--samples-per-shard K] [--on-error raise|skip]

--input: plain files (one document each) and jsonl ({"text", "source"?} per line); --source NAME=PATH:
PATH's files through the adapter of source NAME (data/sources/). Interrupted, the same command continues
where it stopped; a finished build is not redone. Explicit flags win over the config
(training.lm.context_length). How documents become samples and shards: data/writer.py; the format and
its reader: data/shards.py.
"""

import argparse
import os
import time
from pathlib import Path

from cromwell.data.sources import ADAPTERS
from cromwell.data.tokenizer import load_tokenizer
from cromwell.data.writer import DEFAULT_SAMPLES_PER_SHARD, build_shards


def _from_config(path: Path):
    # Imported here: the run config is only needed when --config is given.
    from cromwell.pretrain.config import load_config

    return load_config(path)


def _source_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", type=Path, default=[], help="files, directories or jsonl")
    parser.add_argument("--source", nargs="+", type=_source_arg, default=[], metavar="NAME=PATH",
                        help=f"a data source read with its adapter: {', '.join(ADAPTERS)}")
    parser.add_argument("--tokenizer", required=True, type=Path, help="tokenizer.json from tools/train_tokenizer.py")
    parser.add_argument("--output", required=True, type=Path, help="corpus directory: one directory per source")
    parser.add_argument("--context-length", type=int, help="tokens a model sees per sequence")
    parser.add_argument("--config", type=Path, help="run config giving training.lm.context_length")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
    parser.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="a bad source record stops the build (raise) or is counted and skipped")
    args = parser.parse_args(argv)
    if not args.input and not args.source:
        parser.error("give --input or --source")
    if args.context_length is None and args.config is None:
        parser.error("give --context-length or --config")
    context_length = args.context_length
    if args.config is not None:
        cfg = _from_config(args.config)
        context_length = context_length if context_length is not None else cfg.training.lm.context_length
        vocab_size = load_tokenizer(args.tokenizer).get_vocab_size()
        if vocab_size > cfg.model.vocab_size:
            parser.error(
                f"tokenizer {args.tokenizer} has {vocab_size} tokens, more than model.vocab_size "
                f"{cfg.model.vocab_size} in {args.config}: the model could not embed every id"
            )
    start = time.perf_counter()
    build_shards(args.input, args.tokenizer, args.output, context_length, args.workers, args.samples_per_shard,
                 sources=args.source, on_error=args.on_error)
    print(f"took {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
