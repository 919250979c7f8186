"""GitHub pull requests from GH Archive (gharchive.org): its hourly files hold one GitHub event per
JSON line, {"id", "type", "actor", "repo": {"name": "owner/name", ...}, "payload", "public",
"created_at"}; a PullRequestEvent's payload is {"action", "number", "pull_request": the REST API's
pull-request object (title, body, state, merged, html_url, user, base, head, ...)}.

GH Archive carries the diff only as pull_request.diff_url, so the crawler that fetches it stores
the unified diff beside the event as a top-level "diff" field; an event without one is a bad record.
Only "closed" events make documents: a pull request has one, with its final title, body and merge
state, where opened/edited/synchronize events would repeat it. Other event types and actions are
passed over, not counted as bad. Document text = title, body (when not empty) and diff.
"""

from pathlib import Path
from typing import Any, Iterator

from cromwell.data.sources.errors import OnError, Skipped
from cromwell.data.sources.fields import optional, require
from cromwell.data.sources.jsonl import read_jsonl
from cromwell.data.sources.record import Document

SOURCE = "github_prs"


def read(path: Path, on_error: OnError = "raise", skipped: Skipped | None = None) -> Iterator[Document]:
    return read_jsonl(path, _document, on_error, skipped)


def _document(event: dict[str, Any]) -> Document | None:
    if require(event, "type", str) != "PullRequestEvent" or require(event, "payload.action", str) != "closed":
        return None
    title = require(event, "payload.pull_request.title", str)
    body = optional(event, "payload.pull_request.body", str)
    diff = require(event, "diff", str)
    return Document(
        text="\n\n".join(part for part in (title, body, diff) if part),
        source=SOURCE,
        metadata={
            "repo": require(event, "repo.name", str),
            "number": require(event, "payload.number", int),
            "state": require(event, "payload.pull_request.state", str),
            "merged": optional(event, "payload.pull_request.merged", bool),
            "url": optional(event, "payload.pull_request.html_url", str),
            "created_at": optional(event, "created_at", str),
        },
    )
