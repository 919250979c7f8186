"""Vision-text pairs: this project's multimodal sample format (the design's vision-text pairs; the
generator that writes them is a later issue's), webdataset tar shards, since the token shards are too.

A shard (`.tar`, or compressed `.tar.gz`...) holds samples whose members share a key, adjacent, the
key being the member name up to the first dot of its base name (webdataset's grouping):
- `<key>.jpg`, `.jpeg`, `.png` or `.webp`: the image, exactly one per sample;
- `<key>.txt`: the UTF-8 text read with it (required);
- `<key>.json`: optional metadata, a JSON object. Its "kind" (default "caption") says what the text is:
  "caption" (describes the image), "ocr" (the text in it), "vqa" (a question about it and the answer),
  or the design's generated pairs, the image rendered from the text: "code" (a code screenshot -> the source
  code), "chart" (-> plotting code), "ui" (a UI mockup -> frontend code), "statement" (a financial
  statement -> extraction code), "doc" (a documentation image -> LaTeX/Markdown). A "prompt" string
  makes the sample an instruction: the prompt asks about the image, the text answers (tools/build_shards.py
  encodes it as a chat). Its other fields are kept in the document's metadata.
Document text = the .txt, image = the image's bytes as stored. Members with names that escape the
archive (absolute, or with ..), links and other non-files, unknown extensions, and images whose bytes
are not of their extension's format make their sample a bad record.
"""

import json
import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from cromwell.data.sources.errors import OnError, RecordError, Skipped, SourceError, read_records
from cromwell.data.sources.record import Document

SOURCE = "vision_text"
KINDS = {"caption", "ocr", "vqa", "code", "chart", "ui", "statement", "doc"}
IMAGE_FORMATS = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}
_KEY_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")   # as webdataset's base_plus_ext

Member = tuple[tarfile.TarInfo, bytes | None]   # bytes for regular files only


def read(path: Path, on_error: OnError = "raise", skipped: Skipped | None = None) -> Iterator[Document]:
    return read_records(path, _samples(path), _document, on_error, skipped)


def _samples(path: Path) -> Iterator[tuple[str, list[Member]]]:
    key, members = None, []
    try:
        # Streaming mode: a shard is read once, front to back, as webdataset reads it.
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                if info.isdir():
                    continue
                data = tar.extractfile(info).read() if info.isfile() else None
                member_key = _split(info.name)[0]
                if members and member_key != key:
                    yield f"sample {key!r}", members
                    members = []
                key = member_key
                members.append((info, data))
    except (tarfile.TarError, EOFError) as e:
        # A damaged archive cannot be read on past the damage: no record to skip.
        raise SourceError(f"{path}: not a readable tar archive: {e}") from None
    if members:
        yield f"sample {key!r}", members


def _split(name: str) -> tuple[str, str]:
    match = _KEY_EXTENSION.match(name)
    return (match[1], match[2].lower()) if match else (name, "")


def _document(members: list[Member]) -> Document:
    fields: dict[str, bytes] = {}
    for info, data in members:
        name = PurePosixPath(info.name)
        if name.is_absolute() or ".." in name.parts:
            raise RecordError(f"member {info.name!r} escapes the archive")
        if data is None:
            raise RecordError(f"member {info.name!r} is not a regular file")
        key, extension = _split(info.name)
        if extension not in IMAGE_FORMATS and extension not in ("txt", "json"):
            raise RecordError(f"member {info.name!r}: unknown extension {extension!r}")
        if extension in fields:
            raise RecordError(f"member {info.name!r}: a second .{extension} for key {key!r}")
        fields[extension] = data
    images = [extension for extension in fields if extension in IMAGE_FORMATS]
    if len(images) != 1:
        raise RecordError(f"a sample needs exactly one image (.jpg, .jpeg, .png or .webp), has {len(images)}")
    if "txt" not in fields:
        raise RecordError("a sample needs a .txt")
    image_format = IMAGE_FORMATS[images[0]]
    image = fields[images[0]]
    if not _looks_like(image, image_format):
        raise RecordError(f"the .{images[0]} image is not {image_format} data")
    extra = _metadata(fields.get("json", b"{}"))
    if not isinstance(extra.get("prompt", ""), str):
        raise RecordError(f"'prompt' must be a string, got {extra['prompt']!r}")
    kind = extra.pop("kind", "caption")
    if kind not in KINDS:
        raise RecordError(f"'kind' must be one of {sorted(KINDS)}, got {kind!r}")
    return Document(
        text=_utf8(fields["txt"], "txt"),
        source=SOURCE,
        metadata={**extra, "key": _split(members[0][0].name)[0], "kind": kind, "image_format": image_format},
        image=image,
    )


def _metadata(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(_utf8(data, "json"))
    except json.JSONDecodeError as e:
        raise RecordError(f"the .json is not valid JSON: {e}") from None
    if not isinstance(record, dict):
        raise RecordError(f"the .json must be a JSON object, got {type(record).__name__}")
    return record


def _utf8(data: bytes, extension: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"the .{extension} is not UTF-8: {e}") from None


def _looks_like(image: bytes, image_format: str) -> bool:
    # The file signatures: a mislabelled or non-image file would otherwise fail far from here, in training.
    if image_format == "jpeg":
        return image.startswith(b"\xff\xd8\xff")
    if image_format == "png":
        return image.startswith(b"\x89PNG\r\n\x1a\n")
    return image[:4] == b"RIFF" and image[8:12] == b"WEBP"
