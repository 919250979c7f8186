"""The document record every source adapter produces."""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Document:
    text: str
    source: str                  # the adapter's name in data.sources.ADAPTERS
    metadata: dict[str, Any]     # the source's own fields (repository, id, licence, ...), JSON-serialisable
    image: bytes | None = None   # encoded image bytes (JPEG, PNG or WebP) for vision_text, else None
