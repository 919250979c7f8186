"""Stack Overflow questions with their answers, from the Stack Exchange data dump's Posts.xml
(archive.org; columns as in meta.stackexchange.com/q/2677, "Database schema documentation for the
public data dump and SEDE"): `<posts><row Id= PostTypeId= ParentId= AcceptedAnswerId= Score= Title=
Body= Tags= .../></posts>`, PostTypeId 1 a question, 2 an answer to question ParentId, Body rendered
HTML, Tags "<a><b>" (or "|a|b|", as newer dumps write them). Other post types (tag wikis...) are passed over.

One document per question: "Q: " title and body, then its answers as "A: " blocks, the accepted one
first, then by score; HTML becomes text with code blocks kept verbatim. Answers follow their
question anywhere later in the file, so the rows are streamed once into a temporary SQLite database
(in $TMPDIR; about the size of the dump) and read back per question: memory stays flat whatever the
dump's size. Answers whose question is not in the file are left out.
"""

import re
import sqlite3
import tempfile
from contextlib import closing
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator
from xml.parsers import expat

from cromwell.data.sources.errors import BadRecords, OnError, RecordError, Skipped, SourceError
from cromwell.data.sources.record import Document
from cromwell.data.sources.text import TextBuilder

SOURCE = "stackoverflow"
QUESTION, ANSWER = 1, 2
_CHUNK = 1 << 20
_TAG = re.compile(r"[^<>|]+")


def read(path: Path, on_error: OnError = "raise", skipped: Skipped | None = None) -> Iterator[Document]:
    bad = BadRecords(path, on_error, skipped)
    with tempfile.TemporaryDirectory() as tmp, closing(sqlite3.connect(Path(tmp) / "posts.db")) as db:
        db.execute("CREATE TABLE posts (id INTEGER PRIMARY KEY, type INTEGER, parent INTEGER, accepted INTEGER,"
                   " score INTEGER, title TEXT, body TEXT, tags TEXT)")
        db.execute("CREATE INDEX answers ON posts (parent)")
        for place, attributes in _rows(path):
            bad.attempt(place, lambda row: _store(db, row), attributes)
        questions = db.execute("SELECT id, accepted, score, title, body, tags FROM posts WHERE type = ? ORDER BY id",
                               (QUESTION,))
        for question in questions:
            yield _document(db, *question)
    bad.finish()


def _rows(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    # expat rather than ElementTree: it streams and tells each row's line, for errors that name it.
    parser = expat.ParserCreate()
    rows: list[tuple[str, dict[str, str]]] = []

    def start(name: str, attributes: dict[str, str]) -> None:
        if name == "row":
            rows.append((f"line {parser.CurrentLineNumber}", attributes))

    parser.StartElementHandler = start
    with path.open("rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            try:
                parser.Parse(chunk, not chunk)
            except expat.ExpatError as e:
                # The rest of a file that is not well-formed XML cannot be read: no record to skip.
                raise SourceError(f"{path} line {e.lineno}: not well-formed XML: {expat.ErrorString(e.code)}") from None
            yield from rows
            rows.clear()
            if not chunk:
                return


def _store(db: sqlite3.Connection, row: dict[str, str]) -> None:
    kind = _integer(row, "PostTypeId")
    if kind == QUESTION:
        values = (_integer(row, "Id"), kind, None, _integer(row, "AcceptedAnswerId", required=False),
                  _integer(row, "Score"), _text(row, "Title"), _text(row, "Body"), row.get("Tags", ""))
    elif kind == ANSWER:
        values = (_integer(row, "Id"), kind, _integer(row, "ParentId"), None, _integer(row, "Score"), None,
                  _text(row, "Body"), None)
    else:
        return
    try:
        db.execute("INSERT INTO posts VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values)
    except sqlite3.IntegrityError:
        raise RecordError(f"a second post with Id {values[0]}") from None


def _integer(row: dict[str, str], name: str, required: bool = True) -> int | None:
    if name not in row:
        if required:
            raise RecordError(f"missing attribute '{name}'")
        return None
    try:
        return int(row[name])
    except ValueError:
        raise RecordError(f"attribute '{name}' must be an integer, got {row[name]!r}") from None


def _text(row: dict[str, str], name: str) -> str:
    if name not in row:
        raise RecordError(f"missing attribute '{name}'")
    return row[name]


def _document(db: sqlite3.Connection, question_id: int, accepted: int | None, score: int, title: str, body: str,
              tags: str) -> Document:
    answers = db.execute("SELECT id, body FROM posts WHERE parent = ? ORDER BY id = ? DESC, score DESC, id",
                         (question_id, accepted)).fetchall()
    parts = [f"Q: {title}", html_text(body)] + [f"A: {html_text(answer)}" for _, answer in answers]
    return Document(
        text="\n\n".join(part for part in parts if part),
        source=SOURCE,
        metadata={
            "question_id": question_id,
            "title": title,
            "tags": _TAG.findall(tags),
            "score": score,
            "accepted_answer_id": accepted,
            "answer_ids": [answer_id for answer_id, _ in answers],
        },
    )


def html_text(html: str) -> str:
    """The text of a post's HTML: paragraphs, list items and headings apart, <pre> blocks verbatim."""
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    return parser.out.result()


class _HtmlText(HTMLParser):
    BLOCKS = {"p", "div", "li", "ul", "ol", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "table", "tr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out = TextBuilder()
        self._pre_depth = 0
        self._code: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "pre":
            self._pre_depth += 1
        elif self._pre_depth:
            return
        elif tag == "br":
            self.out.line_break()
        elif tag in self.BLOCKS:
            self.out.block_break()
            if tag == "li":
                self.out.text("- ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre" and self._pre_depth:
            self._pre_depth -= 1
            if not self._pre_depth:
                self.out.verbatim("".join(self._code))
                self._code.clear()
        elif not self._pre_depth and tag in self.BLOCKS:
            self.out.block_break()

    def handle_data(self, data: str) -> None:
        (self._code.append if self._pre_depth else self.out.text)(data)
