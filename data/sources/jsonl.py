"""JSON lines: one record (a JSON object) per line, streamed, each line's problems its own."""

import json
from pathlib import Path
from typing import Any, Callable, Iterator

from cromwell.data.sources.errors import OnError, RecordError, Skipped, read_records
from cromwell.data.sources.record import Document


def read_jsonl(
    path: Path, convert: Callable[[dict[str, Any]], Document | None], on_error: OnError, skipped: Skipped | None,
) -> Iterator[Document]:
    return read_records(path, _lines(path), lambda line: convert(_object(line)), on_error, skipped)


def _lines(path: Path) -> Iterator[tuple[str, bytes]]:
    # Bytes, decoded per line, so that one line of bad UTF-8 is one bad record, not a dead file.
    with path.open("rb") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                yield f"line {line_no}", line


def _object(line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecordError(f"not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"not valid JSON: {e}") from None
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    return record
