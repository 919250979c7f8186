"""OpenStax textbook chapters, from a book's source repository as OpenStax publishes it
(github.com/openstax/osbooks-*): `collections/<slug>.collection.xml` (CollXML) lists the book's
chapters (col:subcollection with an md:title) and their modules (<col:module document="m00001"/>),
each module a section in `modules/<id>/index.cnxml` (CNXML: <document><title/><metadata/>
<content> sections, paras, lists, notes, exercises, code, MathML </content></document>).

`path` is the collection file. One document per chapter: its title, then each module's title and
text; modules outside any chapter (preface, appendices) are a document each. Code (<preformat>,
<code display="block">) is kept verbatim; MathML is reduced to its text. A module that is missing or
not well-formed makes its chapter a bad record; a collection that is not well-formed is an error.
"""

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

from cromwell.data.sources.errors import OnError, RecordError, Skipped, SourceError, read_records
from cromwell.data.sources.record import Document
from cromwell.data.sources.text import TextBuilder

SOURCE = "openstax"
COL = "{http://cnx.rice.edu/collxml}"
MD = "{http://cnx.rice.edu/mdml}"
CNXML = "{http://cnx.rice.edu/cnxml}"

# Structure whose text stands apart; everything else is inline (emphasis, term, link, code, math).
BLOCKS = {"section", "title", "para", "list", "item", "note", "example", "exercise", "problem", "solution",
          "commentary", "figure", "caption", "table", "row", "equation", "glossary", "definition", "meaning"}
# metadata repeats the title; media holds images and embedded players, no text.
SKIPPED = {"metadata", "media"}

_MODULE_ID = re.compile(r"[A-Za-z0-9_-]+")   # a directory of modules/, never a path out of it
Chapter = tuple[str | None, list[str | None]]   # title (None: front or back matter; "": missing), module ids


def read(path: Path, on_error: OnError = "raise", skipped: Skipped | None = None) -> Iterator[Document]:
    try:
        collection = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise SourceError(f"{path} line {e.position[0]}: not well-formed XML: {e}") from None
    content = collection.find(f"{COL}content")
    if content is None:
        raise SourceError(f"{path}: not a CollXML collection (no col:content)")
    license = collection.find(f"{COL}metadata/{MD}license")
    book = {
        "book": collection.findtext(f"{COL}metadata/{MD}title"),
        "slug": collection.findtext(f"{COL}metadata/{MD}slug"),
        "license": None if license is None else license.get("url"),
    }
    modules = path.parent.parent / "modules"
    yield from read_records(path, _chapters(content, None), lambda chapter: _document(chapter, modules, book),
                            on_error, skipped)


def _chapters(content: ET.Element, title: str | None) -> Iterator[tuple[str, Chapter]]:
    ids: list[str | None] = []
    for child in content:
        if child.tag == f"{COL}module" and title is None:
            yield f"module {child.get('document')!r}", (None, [child.get("document")])
        elif child.tag == f"{COL}module":
            ids.append(child.get("document"))
        elif child.tag == f"{COL}subcollection":
            for inner in child.findall(f"{COL}content"):
                yield from _chapters(inner, child.findtext(f"{MD}title") or "")
    if ids:
        yield f"chapter {title!r}", (title, ids)


def _document(chapter: Chapter, modules: Path, book: dict) -> Document:
    title, ids = chapter
    if title == "":
        raise RecordError("a chapter without an md:title")
    parts = [title] if title else []
    for module_id in ids:
        if not module_id or not _MODULE_ID.fullmatch(module_id):
            raise RecordError(f"a col:module needs a document attribute naming a module, got {module_id!r}")
        parts += _module(modules / module_id / "index.cnxml")
    return Document(
        text="\n\n".join(part for part in parts if part),
        source=SOURCE,
        metadata={**book, "chapter": title, "modules": ids},
    )


def _module(path: Path) -> list[str]:
    """A module's title and its content's text."""
    try:
        document = ET.parse(path).getroot()
    except FileNotFoundError:
        raise RecordError(f"module {path} is missing") from None
    except ET.ParseError as e:
        raise RecordError(f"module {path} line {e.position[0]}: not well-formed XML: {e}") from None
    content = document.find(f"{CNXML}content")
    if document.tag != f"{CNXML}document" or content is None:
        raise RecordError(f"module {path} is not a CNXML document with content")
    out = TextBuilder()
    _render(content, out)
    return [document.findtext(f"{CNXML}title") or "", out.result()]


def _render(element: ET.Element, out: TextBuilder) -> None:
    tag = element.tag.rsplit("}", 1)[-1]
    block = element.get("display") == "block"
    if tag == "preformat" or (tag == "code" and block):
        out.verbatim("".join(element.itertext()))
    elif tag not in SKIPPED:
        if tag in BLOCKS or block:
            out.block_break()
        if tag == "item":
            out.text("- ")
        if tag == "newline":
            out.line_break()
        out.text(element.text or "")
        for child in element:
            _render(child, out)
        if tag in BLOCKS or block:
            out.block_break()
        if tag == "entry":
            out.text(" ")   # table cells side by side, not run together
    out.text(element.tail or "")
