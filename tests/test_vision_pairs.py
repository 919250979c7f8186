"""tools/make_vision_pairs.py: each kind's image is rendered from its text (the chart program redraws its
image, the code is the named stdlib lines, the statement code computes its totals), in shards that
data.sources.vision_text reads without an error, the same bytes for the same seed."""

import io
import sysconfig
import tarfile
import tokenize
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from conftest import PYTHON, REPO, run
from cromwell.data.sources import vision_text
from cromwell.data.corpus.vision_pairs import KINDS, MAX_SIDE, make_pairs

SEED = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    # Two of each kind, so that every kind is drawn from more than one random stream.
    return make_pairs(tmp_path_factory.mktemp("pairs"), count=10, seed=SEED, samples_per_shard=4)


@pytest.fixture(scope="module")
def documents(shards):
    return [document for shard in shards for document in vision_text.read(shard)]


def of_kind(documents, kind: str) -> list:
    return [d for d in documents if d.metadata["kind"] == kind]


def test_shards_hold_samples_of_every_kind_in_order(shards, documents):
    assert [p.name for p in shards] == ["pairs-000000.tar", "pairs-000001.tar", "pairs-000002.tar"]
    assert not list(shards[0].parent.glob(".*")), "no temporary file is left behind"
    assert [d.metadata["kind"] for d in documents] == [KINDS[i % len(KINDS)] for i in range(10)]
    assert [d.metadata["key"] for d in documents] == [f"{i:09d}" for i in range(10)]
    assert all(d.source == "vision_text" and d.metadata["generator"] == "make_vision_pairs"
               and d.metadata["seed"] == SEED and d.metadata["image_format"] == "png" for d in documents)


def test_members_carry_no_times_or_owners(shards):
    with tarfile.open(shards[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000000.json", "000000000.png", "000000000.txt"]
    assert all(m.isfile() and m.mtime == 0 and m.uid == m.gid == 0 and not m.uname and m.mode == 0o644
               for m in members)


def test_every_image_is_a_modest_png_and_every_text_is_short(documents):
    for document in documents:
        image = Image.open(io.BytesIO(document.image))
        image.load()
        assert image.format == "PNG" and 48 <= min(image.size) and max(image.size) <= MAX_SIDE, document.metadata
        assert document.text.strip() and len(document.text.encode()) < 4096, document.metadata


def test_chart_text_is_the_program_that_draws_the_image(documents):
    charts = of_kind(documents, "chart")
    assert charts
    for chart in charts:
        namespace = {}
        with plt.style.context("default"):
            exec(chart.text, namespace)
            buffer = io.BytesIO()
            namespace["fig"].savefig(buffer, format="png")
        plt.close(namespace["fig"])
        redrawn = np.asarray(Image.open(buffer))
        assert np.array_equal(redrawn, np.asarray(Image.open(io.BytesIO(chart.image)))), chart.text


def test_code_text_is_the_named_stdlib_lines(documents):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for code in of_kind(documents, "code"):
        meta = code.metadata
        with tokenize.open(stdlib / meta["source_file"]) as f:
            lines = f.read().split("\n")
        assert code.text == "\n".join(lines[meta["first_line"] - 1:meta["last_line"]])
        assert 5 <= len(code.text.splitlines()) <= 30


def test_statement_text_builds_the_rows_and_totals(documents, capsys):
    for statement in of_kind(documents, "statement"):
        namespace = {}
        exec(statement.text, namespace)
        rows, periods = namespace["rows"], namespace["periods"]
        assert periods == statement.metadata["periods"] and len(rows) == statement.metadata["rows"]
        assert all(len(values) == len(periods) and all(isinstance(v, int) for v in values) for values in rows.values())
        if statement.metadata["statement"] == "balance sheet":
            assert rows["Total assets"] == rows["Total liabilities and equity"]
    assert capsys.readouterr().out


def test_ui_and_doc_texts(documents):
    for ui in of_kind(documents, "ui"):
        assert ui.text.startswith("<!DOCTYPE html>") and "<style>" in ui.text
        assert f"<header>{ui.metadata['page']}</header>" in ui.text
    for doc in of_kind(documents, "doc"):
        assert doc.text.count("$") >= 2
        assert doc.text.startswith("## ") == (doc.metadata["format"] == "markdown")


def test_same_seed_same_bytes_other_seed_other_bytes(shards, tmp_path):
    again = make_pairs(tmp_path / "again", count=10, seed=SEED, samples_per_shard=4)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in shards]
    other = make_pairs(tmp_path / "other", count=5, seed=SEED + 1, samples_per_shard=5)
    with tarfile.open(shards[0]) as a, tarfile.open(other[0]) as b:
        assert a.extractfile("000000001.png").read() != b.extractfile("000000001.png").read()
        assert a.extractfile("000000002.txt").read() != b.extractfile("000000002.txt").read()


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="kinds must be some of"):
        make_pairs(tmp_path, count=1, kinds=("code", "video"))


def test_cli_writes_shards_and_removes_stale_ones(tmp_path):
    (tmp_path / "pairs-000007.tar").write_bytes(b"from an earlier, larger run")
    cli = [PYTHON, str(REPO / "tools" / "make_vision_pairs.py"), "--output", str(tmp_path), "--count", "3",
           "--samples-per-shard", "2", "--kinds", "ui,statement", "--seed", "5"]
    run(cli)
    shards = sorted(tmp_path.glob("*.tar"))
    assert [p.name for p in shards] == ["pairs-000000.tar", "pairs-000001.tar"]
    documents = [d for p in shards for d in vision_text.read(p)]
    assert [d.metadata["kind"] for d in documents] == ["ui", "statement", "ui"]
    # Rerun with the same arguments (make train does): nothing to do, nothing rewritten.
    written = [p.stat().st_mtime_ns for p in shards]
    assert "nothing to do" in run(cli).stdout
    assert [p.stat().st_mtime_ns for p in shards] == written
