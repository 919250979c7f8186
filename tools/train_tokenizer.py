"""Train the project's byte-level BPE tokenizer.

    python tools/train_tokenizer.py --input runs/tiny/corpus --output runs/tiny/tokenizer.json \
        [--vocab-size N | --config pretrain/configs/tiny.yaml]

Inputs are files, directories of files or jsonl (field "text"; see data.documents.iter_documents).
The vocabulary size counts the special tokens, which take the first ids in the fixed order of
data.tokenizer.SPECIAL_TOKENS, and the 256 byte tokens, so every string encodes and decodes back
exactly. --vocab-size wins over the config's model.vocab_size.
"""

import argparse
import time
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cromwell.data.documents import iter_documents, plain_text
from cromwell.data.tokenizer import SPECIAL_TOKENS

BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(BYTE_ALPHABET)


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab size {vocab_size} is too small: the {len(SPECIAL_TOKENS)} special tokens and "
            f"{len(BYTE_ALPHABET)} byte tokens alone need {MIN_VOCAB_SIZE}"
        )
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: it would add a character that decoding cannot tell from the text's own.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=BYTE_ALPHABET,
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def vocab_size_from_config(path: Path) -> int:
    # Imported here: the run config is only needed when --config is given.
    from cromwell.pretrain.config import load_config

    return load_config(path).model.vocab_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, nargs="+", type=Path, help="files, directories or jsonl")
    parser.add_argument("--output", required=True, type=Path, help="tokenizer.json to write")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size including the special tokens")
    parser.add_argument("--config", type=Path, help="run config giving model.vocab_size")
    args = parser.parse_args(argv)
    if args.vocab_size is None and args.config is None:
        parser.error("give --vocab-size or --config")
    vocab_size = args.vocab_size if args.vocab_size is not None else vocab_size_from_config(args.config)

    read = {"documents": 0, "bytes": 0}

    def texts() -> Iterable[str]:
        for document, _source in iter_documents(args.input):
            text = plain_text(document)
            read["documents"] += 1
            read["bytes"] += len(text.encode("utf-8"))
            yield text

    start = time.perf_counter()
    tokenizer = train_tokenizer(texts(), vocab_size)
    seconds = time.perf_counter() - start
    print(
        f"read {read['documents']} documents, {read['bytes'] / 1e6:.1f} MB of text; "
        f"trained in {seconds:.1f} s ({read['bytes'] / 1e6 / max(seconds, 1e-9):.2f} MB/s)"
    )
    if read["documents"] == 0:
        raise SystemExit(f"no documents found in {', '.join(map(str, args.input))}")
    actual = tokenizer.get_vocab_size()
    if actual < vocab_size:
        print(f"note: the corpus only supports {actual} tokens, fewer than the requested {vocab_size}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.output))
    print(f"wrote {args.output}: vocab size {actual} ({len(SPECIAL_TOKENS)} special tokens first)")


if __name__ == "__main__":
    main()
