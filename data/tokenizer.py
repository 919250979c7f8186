"""The project's special tokens, loading a trained tokenizer, and reading corpus documents.

Special tokens sit at the start of the vocabulary in the fixed order of SPECIAL_TOKENS, so
their ids are the same constants in every tokenizer the project trains; load_tokenizer checks
that a file keeps to this.
"""

import json
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer

PAD = "<|pad|>"
BOS = "<|bos|>"
EOS = "<|eos|>"
NUM_PREDICTOR_TOKENS = 8
IMAGE = "<|image|>"
IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"


def predictor_token(i: int) -> str:
    """The JEPA predictor token for prediction step i, counted from 1 like the token names."""
    if not 1 <= i <= NUM_PREDICTOR_TOKENS:
        raise ValueError(f"predictor token index {i} is outside 1..{NUM_PREDICTOR_TOKENS}")
    return f"<|predictor_{i}|>"


SPECIAL_TOKENS = (
    PAD,
    BOS,
    EOS,
    *(predictor_token(i) for i in range(1, NUM_PREDICTOR_TOKENS + 1)),
    IMAGE,
    IMAGE_START,
    IMAGE_END,
    SYSTEM,
    USER,
    ASSISTANT,
    END,
)


def special_id(token: str) -> int:
    """The fixed id of a special token (its position in SPECIAL_TOKENS)."""
    try:
        return SPECIAL_TOKENS.index(token)
    except ValueError:
        raise ValueError(f"{token!r} is not one of the special tokens {SPECIAL_TOKENS}") from None


PAD_ID = special_id(PAD)
BOS_ID = special_id(BOS)
EOS_ID = special_id(EOS)


def predictor_token_id(i: int) -> int:
    return special_id(predictor_token(i))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json, checking that the special tokens have their fixed ids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist (train one with tools/train_tokenizer.py)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"tokenizer file {path} is not a valid tokenizers JSON file: {e}") from e
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual = tokenizer.token_to_id(token)
        if actual != expected_id:
            raise ValueError(
                f"tokenizer file {path}: special token {token} has id {actual}, expected {expected_id}; "
                "it was not trained by tools/train_tokenizer.py with the current special tokens"
            )
    return tokenizer


def iter_documents(inputs: list[str | Path]) -> Iterator[tuple[str, str]]:
    """Yield (text, source) for every document of the inputs, in a deterministic order.

    An input is a file or a directory (its files, recursively, sorted, hidden ones skipped).
    A `.jsonl` file holds one document per line in the field "text", with an optional field
    "source"; any other file is one document. A document without a source gets the name of the
    input it came from, so that `--input corpus/` tags its plain files "corpus".
    """
    for given in inputs:
        given = Path(given)
        if not given.exists():
            raise FileNotFoundError(f"input {given} does not exist")
        default_source = given.stem if given.is_file() else given.name
        for path in input_files(given):
            if path.suffix == ".jsonl":
                yield from _jsonl_documents(path, default_source)
            else:
                yield _read_text(path), default_source


def input_files(path: Path) -> list[Path]:
    """The files an input stands for: itself, or a directory's files as iter_documents reads them."""
    if path.is_file():
        return [path]
    files = [
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    return sorted(files)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"input file {path} is not UTF-8 text: {e}") from e


def _jsonl_documents(path: Path, default_source: str) -> Iterator[tuple[str, str]]:
    # Streamed line by line: a corpus file may be much larger than memory.
    with path.open(encoding="utf-8") as f:
        try:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield _jsonl_record(path, line_no, line, default_source)
        except UnicodeDecodeError as e:
            raise ValueError(f"input file {path} is not UTF-8 text: {e}") from e


def _jsonl_record(path: Path, line_no: int, line: str, default_source: str) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid JSON: {e}") from e
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"{path}:{line_no}: a record needs a string field 'text'")
    source = record.get("source", default_source)
    if not isinstance(source, str) or not source:
        raise ValueError(f"{path}:{line_no}: field 'source' must be a non-empty string, got {source!r}")
    return text, source
