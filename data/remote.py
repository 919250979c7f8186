"""Shards over HTTP(S): fetches with retries and exponential backoff, downloads checked by sha256.

A dropped connection, a timeout or a 5xx answer is retried `retries` times, waiting backoff_s,
2 * backoff_s, 4 * backoff_s... between attempts; a download that broke off resumes with a Range
request from the bytes it has. A 4xx answer is not retried: the file is not there. The last
failure is raised as RemoteError naming the URL.
"""

import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)
TIMEOUT_S = 60
_CHUNK = 1 << 20


class RemoteError(OSError):
    """A URL that could not be read after every retry (or at all: a 4xx answer)."""


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _attempts(url: str, retries: int, backoff_s: float):
    """Attempt numbers 0..retries, sleeping the backoff between them; the caller stops on success."""
    for attempt in range(retries + 1):
        yield attempt
        if attempt < retries:
            time.sleep(backoff_s * 2**attempt)


def _transient(error: Exception) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code == 429
    return isinstance(error, (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError))


def _open(url: str, start: int = 0, end: int | None = None):
    headers = {}
    if start or end is not None:
        headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)


def fetch(url: str, *, retries: int, backoff_s: float, byte_range: tuple[int, int] | None = None) -> bytes:
    """The bytes of `url` (or of [start, end) of it)."""
    last = None
    for attempt in _attempts(url, retries, backoff_s):
        try:
            with _open(url, *(byte_range or (0, None))) as response:
                data = response.read()
            if byte_range is not None and response.status != 206:
                data = data[byte_range[0]:byte_range[1]]  # a server that ignores Range sends it all
            return data
        except Exception as e:
            if not _transient(e):
                raise RemoteError(f"{url}: {e}") from None
            last = e
            log.warning("%s: attempt %d of %d failed (%s)", url, attempt + 1, retries + 1, e)
    raise RemoteError(f"{url}: failed {retries + 1} times; the last: {last}")


def download(url: str, dest: Path, sha256: str, *, retries: int, backoff_s: float) -> None:
    """Download `url` to `dest` atomically (other processes see all of it or nothing), resuming a
    broken transfer from the bytes received, and check its sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest, received, last = hashlib.sha256(), 0, None
    try:
        with open(tmp, "wb") as out:
            for attempt in _attempts(url, retries, backoff_s):
                try:
                    with _open(url, received) as response:
                        if received and response.status != 206:
                            out.seek(0)
                            out.truncate()
                            digest, received = hashlib.sha256(), 0
                        length = response.headers.get("Content-Length")
                        end = received + int(length) if length is not None else None
                        while block := response.read(_CHUNK):
                            out.write(block)
                            digest.update(block)
                            received += len(block)
                        # http.client ends a read(n) early at a dropped connection without an error.
                        if end is not None and received < end:
                            raise http.client.IncompleteRead(b"", end - received)
                    break
                except Exception as e:
                    if not _transient(e):
                        raise RemoteError(f"{url}: {e}") from None
                    last = e
                    log.warning("%s: attempt %d of %d failed after %d bytes (%s)", url, attempt + 1, retries + 1,
                                received, e)
            else:
                raise RemoteError(f"{url}: failed {retries + 1} times; the last: {last}")
        if digest.hexdigest() != sha256:
            raise RemoteError(f"{url}: the download's sha256 {digest.hexdigest()} is not the listed {sha256}")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
