"""The Stack v2 (bigcode/the-stack-v2, -dedup, -train-*): one source file per JSON line.

Fields as the dataset card lists them (blob_id, directory_id, path, content_id, detected_licenses,
license_type, repo_name, snapshot_id, revision_id, branch_name, ..., src_encoding, language,
is_vendor, is_generated, length_bytes, extension) plus `content`, the file's text: the published
rows carry only the blob_id, and the card's download step (Software Heritage S3, decoded with
src_encoding) adds `content`, as its text-carrying mirrors ship it. Parquet shards are converted to
JSON lines first (e.g. `datasets`' to_json). Document text = content.
"""

from pathlib import Path
from typing import Any, Iterator

from cromwell.data.sources.errors import OnError, Skipped
from cromwell.data.sources.fields import optional, require
from cromwell.data.sources.jsonl import read_jsonl
from cromwell.data.sources.record import Document

SOURCE = "stack_v2"


def read(path: Path, on_error: OnError = "raise", skipped: Skipped | None = None) -> Iterator[Document]:
    return read_jsonl(path, _document, on_error, skipped)


def _document(record: dict[str, Any]) -> Document:
    return Document(
        text=require(record, "content", str),
        source=SOURCE,
        metadata={
            "blob_id": require(record, "blob_id", str),
            "repo_name": require(record, "repo_name", str),
            "path": require(record, "path", str),
            "language": require(record, "language", str),
            "src_encoding": optional(record, "src_encoding", str),
            "license_type": optional(record, "license_type", str),
            "detected_licenses": optional(record, "detected_licenses", list[str]),
        },
    )
