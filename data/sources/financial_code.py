"""Financial code (trading, pricing, risk and modelling programs). No public dataset has a standard
format for it, so this project defines one: JSON lines of {"code": source text, "language": e.g.
"python", "path": file path in its repository, "repo": "owner/name", "domain": e.g. "trading",
"pricing", "risk", "modelling"}; code and language are required, the rest may be missing or null.
Document text = code.
"""

from pathlib import Path
from typing import Any, Iterator

from cromwell.data.sources.errors import OnError, Skipped
from cromwell.data.sources.fields import optional, require
from cromwell.data.sources.jsonl import read_jsonl
from cromwell.data.sources.record import Document

SOURCE = "financial_code"


def read(path: Path, on_error: OnError = "raise", skipped: Skipped | None = None) -> Iterator[Document]:
    return read_jsonl(path, _document, on_error, skipped)


def _document(record: dict[str, Any]) -> Document:
    return Document(
        text=require(record, "code", str),
        source=SOURCE,
        metadata={
            "language": require(record, "language", str),
            "path": optional(record, "path", str),
            "repo": optional(record, "repo", str),
            "domain": optional(record, "domain", str),
        },
    )
