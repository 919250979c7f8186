"""Source adapters: each data source's published format -> Documents (docs/design.md, Data: eight
sources and their mixture).

ADAPTERS maps the source names of the design's data-source table to readers of one file each:
`read(path, on_error="raise", skipped=None)` yields Documents. A bad record (not JSON, a missing
field, a wrong type, a member escaping its archive...) raises SourceError naming the file and the
line, member or chapter; with on_error="skip" it is counted in `skipped` (a Skipped, which may be
shared by many reads) and each file's count is logged as one warning line when the file is done.
"""

from pathlib import Path
from typing import Iterator, Protocol

from cromwell.data.sources import (
    arxiv, codecontests, financial_code, github_prs, openstax, stack_v2, stackoverflow, vision_text,
)
from cromwell.data.sources.errors import OnError, Skipped, SourceError
from cromwell.data.sources.record import Document

__all__ = ["ADAPTERS", "Adapter", "Document", "OnError", "Skipped", "SourceError"]


class Adapter(Protocol):
    def __call__(self, path: Path, on_error: OnError = "raise", skipped: Skipped | None = None) -> Iterator[Document]:
        ...


ADAPTERS: dict[str, Adapter] = {
    module.SOURCE: module.read
    for module in (stack_v2, codecontests, github_prs, arxiv, openstax, stackoverflow, vision_text, financial_code)
}
