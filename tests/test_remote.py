"""Shards over HTTP: a server on 127.0.0.1 (an ephemeral port) serves a corpus; the loader and a
training run read it, dropped connections are retried with backoff, and failures name the URL."""

import http.server
import logging
import shutil
import threading
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from cromwell.data.loader import TokenBatches
from cromwell.data.remote import RemoteError
from cromwell.data.shards import Location, shard_name
from tests.conftest import PYTHON, TINY_MODEL, run
from cromwell.data.writer import write_source

CONTEXT = 8
VOCAB = 500


class Handler(http.server.BaseHTTPRequestHandler):
    """GET with Range support. server.flaky[path] = n: the next n answers to that path send half the
    body and drop the connection."""

    def do_GET(self):
        self.server.requests.append(self.path)
        path = self.server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end, status = 0, len(data), 200
        if "Range" in self.headers:
            first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
            start, end, status = int(first), int(last) + 1 if last else len(data), 206
        body = data[start:end]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if self.server.flaky.get(self.path, 0) > 0:
            self.server.flaky[self.path] -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    rng = np.random.default_rng(0)
    for name, n in (("code", 50), ("docs", 23)):
        write_source(root, name, rng.integers(0, VOCAB, (n, CONTEXT + 1)), 8, VOCAB)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.root, httpd.flaky, httpd.requests = root, {}, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def batches(base, cache, n=12, retries=5, limit=None):
    location = Location(base, cache, retries=retries, backoff_s=0.01, cache_limit_bytes=limit)
    loader = TokenBatches(location, weights=None, vocab_size=VOCAB, global_batch=4, micro_batch_size=2, dp_rank=0,
                          dp_size=1, seed=3)
    return [b[0] for b in islice(loader, n)]


def test_the_loader_reads_the_same_batches_over_http(server, tmp_path):
    httpd, url = server
    local = batches(httpd.root, None)
    remote = batches(url, tmp_path / "cache")
    assert all((a == b).all() for a, b in zip(local, remote)) and len(remote) == 12
    assert list((tmp_path / "cache").rglob("shard-*.tar"))  # downloaded once, read locally


def test_the_cache_keeps_under_its_limit(server, tmp_path):
    httpd, url = server
    shard = (httpd.root / "code" / shard_name(0)).stat().st_size
    local = batches(httpd.root, None, n=40)
    remote = batches(url, tmp_path / "cache", n=40, limit=3 * shard)
    assert all((a == b).all() for a, b in zip(local, remote))
    cached = list((tmp_path / "cache").rglob("shard-*.tar"))
    assert 0 < len(cached) <= 3


def test_a_dropped_connection_is_retried_with_backoff(server, tmp_path, caplog):
    httpd, url = server
    for i in range(7):
        httpd.flaky[f"/code/{shard_name(i)}"] = 2
    with caplog.at_level(logging.WARNING):
        remote = batches(url, tmp_path / "cache", retries=2)
    assert all((a == b).all() for a, b in zip(batches(httpd.root, None), remote))
    assert "attempt 1 of 3 failed" in caplog.text and "attempt 2 of 3 failed" in caplog.text


def test_when_retries_run_out_the_error_names_the_url(server, tmp_path):
    httpd, url = server
    for i in range(7):
        httpd.flaky[f"/code/{shard_name(i)}"] = 5
    with pytest.raises(RemoteError, match=rf"{url}/code/shard-00000\d.tar: failed 3 times; the last: "):
        batches(url, tmp_path / "cache", retries=2)


def test_a_download_that_does_not_match_its_checksum_is_refused(server, tmp_path):
    httpd, url = server
    shard = httpd.root / "docs" / shard_name(1)
    raw = bytearray(shard.read_bytes())
    raw[600] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(RemoteError, match=rf"{url}/docs/{shard_name(1)}: the download's sha256 \w+ is not the listed"):
        batches(url, tmp_path / "cache", n=40)
    assert not list((tmp_path / "cache").rglob(f"docs/{shard_name(1)}"))  # nothing half-checked is kept


def test_a_missing_file_is_not_retried(server, tmp_path):
    httpd, url = server
    (httpd.root / "code" / shard_name(0)).unlink()
    with pytest.raises(RemoteError, match=rf"{url}/code/{shard_name(0)}: HTTP Error 404"):
        batches(url, tmp_path / "cache", n=40)
    assert httpd.requests.count(f"/code/{shard_name(0)}") == 1


def test_remote_shards_need_a_cache_directory(server):
    with pytest.raises(ValueError, match="are remote: set data.cache_dir"):
        batches(server[1], None)


def test_a_run_trains_from_shards_served_over_http(server, tmp_path, tiny_data):
    httpd, url = server
    shutil.rmtree(httpd.root)
    shutil.copytree(tiny_data["shards"], httpd.root)
    out = tmp_path / "run"
    sets = TINY_MODEL + [f"data.tokenizer={tiny_data['tokenizer']}", f"data.shards={url}",
                         f"data.cache_dir={tmp_path / 'cache'}", f"run.output_dir={out}", "training.train_steps=3",
                         "training.batch_size=4", "training.micro_batch_size=2", "data.num_workers=1"]
    run([PYTHON, "pretrain/train.py", "--config", "pretrain/configs/tiny.yaml", "--overwrite"]
        + [a for s in sets for a in ("--set", s)])
    assert (out / "checkpoints" / "global_step3" / "complete.json").is_file()
    assert any(r.endswith(".tar") for r in httpd.requests)
    assert Path(tmp_path / "cache").is_dir()
