"""Corpus input for the tools: files, directories of files, or jsonl documents, in a fixed order.

A document's text is a string, or a Chat: (role, content) messages, whose role markers become the
tokenizer's special tokens when tools/build_shards.py encodes it (its contents stay data: a literal
"<|end|>" in a message is text).
"""

import json
from pathlib import Path
from typing import Iterator

ROLES = ("system", "user", "assistant")
Chat = tuple[tuple[str, str], ...]


def chat(messages, where: str) -> Chat:
    """A Chat from [{"role", "content"}, ...], checked; errors name `where`."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': a string}}, got {m!r}")
        out.append((m["role"], m["content"]))
    return tuple(out)


def plain_text(text: "str | Chat") -> str:
    """A document's text with a chat's messages joined (what a tokenizer is trained on)."""
    return text if isinstance(text, str) else "\n".join(content for _, content in text)


def iter_documents(inputs: list[str | Path]) -> Iterator[tuple[str, str]]:
    """Yield (text, source) for every document of the inputs, in a deterministic order.

    An input is a file or a directory (its files, recursively, sorted, hidden ones skipped).
    A `.jsonl` file holds one document per line in the field "text" (or a chat in "messages"), with an
    optional field "source"; any other file is one document. A document without a source gets the name of the
    input it came from, so that `--input corpus/` tags its plain files "corpus".
    """
    for given in inputs:
        given = Path(given)
        if not given.exists():
            raise FileNotFoundError(f"input {given} does not exist")
        for path in input_files(given):
            yield from file_documents(path, input_source(given))


def input_source(given: Path) -> str:
    """The source of an input's documents that name none: the input's name ("corpus" for corpus/)."""
    return given.stem if given.is_file() else given.name


def file_documents(path: Path, default_source: str) -> Iterator[tuple[str, str]]:
    """(text, source) of one input file, as iter_documents reads it."""
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
    if isinstance(record, dict) and "messages" in record:
        text = chat(record["messages"], f"{path}:{line_no}")
    elif not isinstance(text, str):
        raise ValueError(f"{path}:{line_no}: a record needs a string field 'text' or a chat's 'messages'")
    source = record.get("source", default_source)
    if not isinstance(source, str) or not source:
        raise ValueError(f"{path}:{line_no}: field 'source' must be a non-empty string, got {source!r}")
    return text, source
