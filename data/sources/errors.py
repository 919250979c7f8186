"""Bad records: raised naming the file and where in it, or skipped, counted and summarised per file."""

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, TypeVar

from cromwell.data.sources.record import Document

OnError = Literal["raise", "skip"]
T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class RecordError(ValueError):
    """One record is not in its source's format; the message says what is wrong, not where."""


class SourceError(ValueError):
    """A file, or a record of it, that cannot be read; the message names the file and the record's place."""


@dataclass
class Skipped:
    """Bad records passed over under on_error="skip", per file; pass one to several reads to total them."""
    counts: Counter[Path] = field(default_factory=Counter)
    first: dict[Path, str] = field(default_factory=dict)   # each file's first error, as an example

    def add(self, path: Path, error: str) -> None:
        self.counts[path] += 1
        self.first.setdefault(path, error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self, path: Path) -> str:
        return f"{path}: skipped {self.counts[path]} bad record(s); the first: {self.first[path]}"


class BadRecords:
    """Turns a RecordError from one record of `path` into a SourceError naming the place, or a skip."""

    def __init__(self, path: Path, on_error: OnError, skipped: Skipped | None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path = path
        self.on_error = on_error
        self.skipped = skipped if skipped is not None else Skipped()

    def attempt(self, place: str, convert: Callable[[T], R], item: T) -> R | None:
        """convert(item), or None for a bad record skipped; `place` is "line 12", "sample 'k'", "chapter 'c'"..."""
        try:
            return convert(item)
        except RecordError as e:
            if self.on_error == "raise":
                raise SourceError(f"{self.path} {place}: {e}") from None
            self.skipped.add(self.path, f"{place}: {e}")
            return None

    def finish(self) -> None:
        # One line per file, however many records were skipped: a summary, not a flood.
        if self.skipped.counts[self.path]:
            log.warning(self.skipped.summary(self.path))


def read_records(
    path: Path, items: Iterable[tuple[str, T]], convert: Callable[[T], Document | None],
    on_error: OnError, skipped: Skipped | None,
) -> Iterator[Document]:
    """The documents of `items`, (place, raw record) pairs; convert returns None for a record that is
    well-formed but holds no document (another event type, say)."""
    bad = BadRecords(path, on_error, skipped)
    for place, item in items:
        document = bad.attempt(place, convert, item)
        if document is not None:
            yield document
    bad.finish()
