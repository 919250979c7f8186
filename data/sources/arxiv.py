"""ArXiv papers as RedPajama-1T publishes them (togethercomputer/RedPajama-Data-1T, arxiv/*.jsonl):
one paper per JSON line, {"text": cleaned LaTeX, "meta": {"timestamp", "yymm", "arxiv_id",
"language", "url", "source"}}, the record data_prep/arxiv/arxiv_cleaner.py writes. Document text = text.
"""

from pathlib import Path
from typing import Any, Iterator

from cromwell.data.sources.errors import OnError, Skipped
from cromwell.data.sources.fields import optional, require
from cromwell.data.sources.jsonl import read_jsonl
from cromwell.data.sources.record import Document

SOURCE = "arxiv"


def read(path: Path, on_error: OnError = "raise", skipped: Skipped | None = None) -> Iterator[Document]:
    return read_jsonl(path, _document, on_error, skipped)


def _document(record: dict[str, Any]) -> Document:
    return Document(
        text=require(record, "text", str),
        source=SOURCE,
        metadata={
            "arxiv_id": require(record, "meta.arxiv_id", str),
            "url": optional(record, "meta.url", str),
            "yymm": optional(record, "meta.yymm", str),
            "timestamp": optional(record, "meta.timestamp", str),
            "language": optional(record, "meta.language", str),
        },
    )
