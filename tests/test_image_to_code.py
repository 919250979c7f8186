"""pretrain/evaluation/image_to_code.py: the generator's own texts score 1 on held-out pairs (charts redrawn in the
sandbox match their images), small chart mistakes and broken programs score 0, the text metrics and
the summary give hand-computed numbers."""

import io
from dataclasses import replace

import pytest
from PIL import Image

from cromwell.pretrain.evaluation.image_to_code import (CHART_THRESHOLD, chart_score, image_distance, normalise, pixels, read_pairs, score,
                                 score_many, summarize)
from cromwell.data.corpus.vision_pairs import KINDS, make_pairs, render_chart
from cromwell.pretrain.evaluation.sandbox import SandboxResult

# Two series, so that one can go missing; values far enough apart that a changed one moves its marker.
CHART = """import matplotlib.pyplot as plt

months = ['Jan', 'Feb', 'Mar', 'Apr', 'May']
store_a = [120.0, 131.5, 128.2, 140.9, 151.3]
store_b = [98.4, 97.1, 105.6, 110.2, 108.8]

fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
ax.plot(months, store_a, color='#1f77b4', marker="o", label='Store A')
ax.plot(months, store_b, color='#ff7f0e', linestyle="--", label='Store B')
ax.legend()
ax.set_title('Monthly revenue')
fig.tight_layout()
"""
MISTAKES = {   # name: (text replaced, replacement)
    "wrong colour": ("color='#ff7f0e'", "color='#d62728'"),
    "missing series": ("ax.plot(months, store_b, color='#ff7f0e', linestyle=\"--\", label='Store B')\n", ""),
    "changed value": ("140.9", "145.0"),
    "changed title": ("'Monthly revenue'", "'Monthly revenues'"),
    "other figure size": ("figsize=(4, 3)", "figsize=(4.5, 3)"),
}
BROKEN = {   # name: (program, what the reason says)
    "syntax error": (CHART.replace("ax.legend()", "ax.legend("), "SyntaxError"),
    "exception": (CHART.replace("ax.legend()", "ax.legend(undefined)"), "NameError"),
    "no fig": (CHART.replace("fig, ax", "figure, ax").replace("fig.", "figure."), "no matplotlib Figure in `fig`"),
}


def png(width: int, height: int, colour=(255, 255, 255, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def distance(a: bytes, b: bytes) -> float:
    return image_distance(pixels(a, "a"), pixels(b, "b"))


def chart_sample(program: str) -> dict:
    return {"kind": "chart", "text": program, "png": render_chart(program), "meta": {}}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[dict]:
    # Three of each kind, over three shards.
    directory = tmp_path_factory.mktemp("heldout")
    make_pairs(directory, count=15, seed=11, samples_per_shard=6)
    return read_pairs(directory)


def test_read_pairs_gives_every_pair_in_order(pairs):
    assert [p["kind"] for p in pairs] == list(KINDS) * 3
    assert [p["meta"]["index"] for p in pairs] == list(range(15))
    assert all(p["png"].startswith(b"\x89PNG") and p["text"] for p in pairs)


def test_read_pairs_names_a_directory_without_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_pairs(tmp_path)


def test_the_generators_own_texts_score_1(pairs):
    results = score_many(pairs, [p["text"] for p in pairs])
    assert [r["score"] for r in results] == [1] * len(pairs), [r["reason"] for r in results]
    for result in results:
        if result["kind"] == "chart":
            assert result["distance"] == 0.0   # the sandbox draws the same pixels as the generator
        else:
            assert result["exact"] and result["cer"] == 0.0
    summary = summarize(results)
    assert summary["overall"] == {"n": 15, "accuracy": 1.0}
    assert summary["chart"] == {"n": 3, "accuracy": 1.0, "mean_distance": 0.0}


def test_chart_mistakes_and_broken_programs_score_0():
    reference = chart_sample(CHART)
    programs = [CHART] + [CHART.replace(old, new, 1) for old, new in MISTAKES.values()]
    programs += [program for program, _ in BROKEN.values()]
    assert all(program != CHART for program in programs[1:])
    results = score_many([reference] * len(programs), programs)
    assert results[0]["score"] == 1 and results[0]["distance"] == 0.0
    for name, result in zip(MISTAKES, results[1:]):
        assert result["score"] == 0 and result["distance"] > 3 * CHART_THRESHOLD, (name, result)
    for (name, (_, says)), result in zip(BROKEN.items(), results[1 + len(MISTAKES):]):
        assert result["score"] == 0 and result["distance"] == 1.0, (name, result)
        assert says in result["reason"], (name, result)


def test_score_runs_one_chart_and_stops_one_that_never_ends():
    reference = chart_sample(CHART)
    assert score("chart", CHART, reference["png"], CHART)["score"] == 1
    result = score("chart", CHART, reference["png"], "while True:\n    pass\n", timeout_s=2)
    assert result["score"] == 0 and result["distance"] == 1.0
    # The sandbox's CPU limit is its timeout: either may stop the loop first.
    assert "timed out" in result["reason"] or "SIGXCPU" in result["reason"], result


def test_image_distance_counts_differing_and_uncovered_pixels():
    assert distance(png(10, 10), png(10, 10)) == 0.0
    assert distance(png(10, 10), png(10, 10, (252, 252, 252, 255))) == 0.0   # within the per-channel tolerance
    assert distance(png(10, 10), png(10, 10, (255, 0, 0, 255))) == 1.0
    assert distance(png(10, 10), png(10, 10, (0, 0, 0, 0))) == 0.0   # transparent is compared on white
    # Another size: the 100 pixels only the larger image covers differ, the 100 shared ones do not.
    assert distance(png(10, 10), png(20, 10)) == 0.5
    assert distance(png(20, 10), png(10, 20)) == 300 / 400
    with pytest.raises(ValueError, match="b is not a readable image"):
        pixels(b"not a png", "b")


def test_an_unreadable_or_huge_drawing_scores_0():
    reference = png(10, 10)
    ok = SandboxResult(ok=True, returncode=0, timed_out=False, reason="", stdout="", stderr="", outputs={})
    assert "exited before" in chart_score(reference, ok)["reason"]
    for drawing, says in ((b"junk", "not a readable image"), (png(5000, 10), "over 4096")):
        result = chart_score(reference, replace(ok, outputs={"chart.png": drawing}))
        assert result["score"] == 0 and result["distance"] == 1.0 and says in result["reason"], result


def test_text_is_normalised_before_matching():
    reference = "def f():\n    return 1\n"
    generated = "\n\ndef f():   \r\n    return 1\t\r\n\r\n\n"
    assert normalise("code", generated) == "def f():\n    return 1"
    assert score("code", reference, b"", generated) == {
        "kind": "code", "score": 1, "exact": True, "cer": 0.0, "reason": "exact match"}
    # Indentation is kept: only whole blank lines go.
    assert score("code", "    x = 1", b"", "x = 1")["cer"] == 4 / 9
    # Runs of spaces collapse inside doc formulas only.
    assert normalise("doc", "$a  +\t b$") == "$a + b$"
    assert normalise("doc", "Two  words, $$x  =  1$$") == "Two  words, $$x = 1$$"
    assert score("doc", "$a + b$", b"", "$a  +   b$")["exact"]
    assert score("code", "a + b", b"", "a  +   b")["cer"] == 3 / 5


def test_character_error_rate_of_known_edits():
    one_deletion = score("statement", "hello world", b"", "hello wrld")
    assert one_deletion["score"] == 0 and not one_deletion["exact"] and one_deletion["cer"] == 1 / 11
    assert score("ui", "kitten", b"", "sitting")["cer"] == 3 / 6   # 2 substitutions, 1 insertion
    empty = score("code", "print(1)\n", b"", "")
    assert empty["score"] == 0 and empty["cer"] == 1.0
    assert score("code", "ab", b"", "abcdef")["cer"] == 2.0   # unclipped: longer outputs count every extra


def test_unknown_kinds_and_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="'caption'"):
        score("caption", "a", b"", "a")
    with pytest.raises(ValueError, match="2 samples but 1 generated"):
        score_many([{"kind": "code", "text": "a", "png": b"", "meta": {}}] * 2, ["a"])


def test_summarize_per_kind_and_overall():
    results = [
        {"kind": "code", "score": 1, "exact": True, "cer": 0.0},
        {"kind": "code", "score": 0, "exact": False, "cer": 0.5},
        {"kind": "chart", "score": 1, "distance": 0.0},
        {"kind": "chart", "score": 0, "distance": 1.0},
        {"kind": "chart", "score": 0, "distance": 0.5},
        {"kind": "doc", "score": 1, "exact": True, "cer": 0.0},
    ]
    assert summarize(results) == {
        "code": {"n": 2, "accuracy": 0.5, "mean_cer": 0.25},
        "chart": {"n": 3, "accuracy": 1 / 3, "mean_distance": 0.5},
        "doc": {"n": 1, "accuracy": 1.0, "mean_cer": 0.0},
        "overall": {"n": 6, "accuracy": 0.5},
    }
    with pytest.raises(ValueError, match="no results"):
        summarize([])
