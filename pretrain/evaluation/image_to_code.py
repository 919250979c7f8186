"""Score a model's image -> code outputs on held-out pairs from tools/make_vision_pairs.py.

    samples = read_pairs("heldout/")                       # {"kind", "text", "png", "meta"} per pair
    results = score_many(samples, generated_texts)         # one dict per sample
    summary = summarize(results)                           # per kind and overall

chart: the generated program is executed in pretrain/evaluation/sandbox.py and drawn exactly as
make_vision_pairs.render_chart draws a pair's image (Agg, matplotlib's default style, the figure
left in `fig`, no layout engine, a PNG without a Software chunk). It scores 1 when the drawing's
distance from the pair's image is at most CHART_THRESHOLD, else 0; a program that does not run
(syntax error, exception, time-out, no `fig`) scores 0 with distance 1.0.

The distance is the fraction of pixels that differ: both images are composited on white and laid
on a common canvas (the larger width by the larger height, top-left aligned); a pixel differs when
some channel differs by more than PIXEL_TOLERANCE levels of 255, and a pixel only one image covers
always differs. So an image of another size (another figsize or dpi) is far off, and the distance
stays in [0, 1].

Why this metric and threshold, measured on 80 generated charts (20 pie, 26 line, 18 scatter, 16 bar)
drawn by render_chart and compared with their own images (min / median over the charts):
- the generator's own program: 0 / 0 for all 80 (drawing is deterministic on one machine);
- a wrong colour for one series, even the nearest other colour of the generator's palette (e.g.
  steelblue for #1f77b4): 0.0035 / 0.015;
- a missing series (a line chart's series, a bar, a pie wedge, a scatter's points): 0.016 / 0.10;
- one data value changed by 1%: 0.00029 / 0.0034; by 5%: 0.00077 / 0.0053. A change smaller than
  a pixel draws the same image (32 of 80 changes by 0.1% measured 0); none measured between 0 and
  0.00029;
- one character of the title changed: 0.0027 / 0.0061; a word added to it: 0.0045 / 0.0086;
- the figure 0.5 inch wider: 0.12 / 0.18; dpi 80 <-> 100: 0.40 / 0.48.
The smallest real mistake differs in 0.00029 of the pixels (a 400x300 chart: ~35 pixels), so the
threshold is 1e-4, about a third of that: 8-20 pixels of slack (charts are 320x240 to 500x400)
for quantisation noise, none for anything the eye can see. The tolerance of 5 levels per channel
ignores off-by-a-few rounding, yet sees every nearest-colour swap (at 13 levels one of them
measured 0). No blur or perceptual metric (SSIM): the mistakes that matter (a data point, a title
letter) are a few dozen pixels, the size of difference such metrics are built to forgive.

The metric assumes the pairs were drawn by the same matplotlib and FreeType as the sandbox (as the
generator's byte-for-byte reproducibility does): other text hinting alone moves 2%-11% of the
pixels, more than most mistakes. Score pairs generated on the machine that evaluates.

code, doc, ui, statement: normalised exact match (line endings, trailing whitespace of each line,
leading and trailing blank lines; for doc also runs of spaces inside $...$ / $$...$$ formulas),
the score, and the character error rate beside it: Levenshtein distance / reference length on the
normalised texts (rapidfuzz), 1.0 for an empty output, above 1 for an output longer than the
reference by more than its length (left unclipped, so runaway outputs show in the mean).
"""

import io
import re
import warnings
from pathlib import Path
from statistics import fmean

import numpy as np
from PIL import Image
from rapidfuzz.distance import Levenshtein

from cromwell.data.sources import vision_text
from cromwell.pretrain.evaluation import sandbox
from cromwell.data.corpus.vision_pairs import KINDS

PIXEL_TOLERANCE = 5      # levels of 255 a channel may differ by before its pixel counts as different
CHART_THRESHOLD = 1e-4   # largest fraction of differing pixels that still scores 1 (see above)
MAX_CHART_SIDE = 4096    # a larger drawing is not decoded (the pairs' images are at most 512 px a side)
CHART_MEMORY_MB = 1024
CHART_PNG = "chart.png"
MATH = re.compile(r"\$\$.*?\$\$|\$[^$]*\$", re.S)

# Runs in the sandbox: render_chart's drawing, the program embedded as an ASCII string literal.
CHART_RUNNER = """\
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

namespace = {{"__name__": "__chart__"}}
with plt.style.context("default"):
    exec(compile({code}, "<chart>", "exec"), namespace)
    fig = namespace.get("fig")
    if not isinstance(fig, Figure):
        raise SystemExit(f"the program leaves no matplotlib Figure in `fig` (got {{type(fig).__name__}})")
    fig.set_layout_engine(None)
    fig.savefig({output!r}, format="png", metadata={{"Software": None}})
"""


def read_pairs(directory) -> list[dict]:
    """{"kind", "text", "png", "meta"} of every pair in directory's pairs-NNNNNN.tar, in order."""
    # make_pairs' shard names: its hidden temporaries and other files are not pairs.
    shards = sorted(Path(directory).glob(f"pairs-{'[0-9]' * 6}.tar"))
    if not shards:
        raise FileNotFoundError(f"{directory}: no pairs-NNNNNN.tar shards")
    return [{"kind": d.metadata["kind"], "text": d.text, "png": d.image, "meta": d.metadata}
            for shard in shards for d in vision_text.read(shard)]


def score(kind: str, reference_text: str, reference_png: bytes, generated: str, *, timeout_s: float = 20.0) -> dict:
    """One sample's result: {"kind", "score", "reason"} and "exact", "cer" (text kinds) or "distance" (chart)."""
    check_kind(kind)
    if kind != "chart":
        return text_score(kind, reference_text, generated)
    result = sandbox.run_python(chart_program(generated), timeout_s=timeout_s, memory_mb=CHART_MEMORY_MB,
                                outputs=(CHART_PNG,))
    return chart_score(reference_png, result)


def score_many(samples: list[dict], generated: list[str], workers: int = 2, *, timeout_s: float = 20.0) -> list[dict]:
    """score() of each sample and its generated text; the charts run in the sandbox, `workers` at a time."""
    if len(samples) != len(generated):
        raise ValueError(f"{len(samples)} samples but {len(generated)} generated texts")
    for sample in samples:
        check_kind(sample["kind"])
    charts = [i for i, sample in enumerate(samples) if sample["kind"] == "chart"]
    runs = sandbox.run_many([chart_program(generated[i]) for i in charts], workers=workers, progress="drawing charts",
                            timeout_s=timeout_s, memory_mb=CHART_MEMORY_MB, outputs=(CHART_PNG,))
    drawn = dict(zip(charts, runs))
    return [chart_score(sample["png"], drawn[i]) if i in drawn else text_score(sample["kind"], sample["text"], text)
            for i, (sample, text) in enumerate(zip(samples, generated))]


def summarize(results: list[dict]) -> dict:
    """{kind: {"n", "accuracy", "mean_cer" or "mean_distance"}, ..., "overall": {"n", "accuracy"}}."""
    if not results:
        raise ValueError("no results to summarize")
    summary = {}
    for kind in KINDS:
        rows = [r for r in results if r["kind"] == kind]
        if rows:
            measure = "distance" if kind == "chart" else "cer"
            summary[kind] = {"n": len(rows), "accuracy": fmean(r["score"] for r in rows),
                             f"mean_{measure}": fmean(r[measure] for r in rows)}
    summary["overall"] = {"n": len(results), "accuracy": fmean(r["score"] for r in results)}
    return summary


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")


# --- Text kinds ---

def normalise(kind: str, text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    # Blank lines are empty now: stripping newlines drops the leading and trailing ones, not indentation.
    text = "\n".join(lines).strip("\n")
    if kind == "doc":
        # Spacing inside a formula does not change how it is typeset.
        text = MATH.sub(lambda math: re.sub(r"[ \t]+", " ", math[0]), text)
    return text


def text_score(kind: str, reference: str, generated: str) -> dict:
    reference, generated = normalise(kind, reference), normalise(kind, generated)
    edits = Levenshtein.distance(generated, reference)
    exact = edits == 0
    reason = "exact match" if exact else f"{edits} edits from the reference's {len(reference)} characters"
    return {"kind": kind, "score": int(exact), "exact": exact, "cer": edits / max(len(reference), 1),
            "reason": reason}


# --- Charts ---

def chart_program(generated: str) -> str:
    # ascii(): a literal that survives any encoding the sandbox writes the program in.
    return CHART_RUNNER.format(code=ascii(generated), output=CHART_PNG)


def chart_score(reference_png: bytes, result: sandbox.SandboxResult) -> dict:
    if result.timed_out:
        return chart_failure(f"the program timed out: {result.reason}")
    if not result.ok:
        # After an exit status, the last line of stderr names the exception (or why there is no figure).
        last = result.stderr.strip().splitlines()[-1:] if result.returncode > 0 else []
        return chart_failure(f"the program failed: {': '.join([result.reason, *last])}")
    if CHART_PNG not in result.outputs:
        return chart_failure("the program exited before its figure was saved")
    try:
        drawn = pixels(result.outputs[CHART_PNG], "drawing")
    except ValueError as e:
        return chart_failure(str(e))
    # A bad reference is the data's fault, not the model's: its error is raised.
    distance = image_distance(pixels(reference_png, "reference"), drawn)
    return {"kind": "chart", "score": int(distance <= CHART_THRESHOLD), "distance": distance,
            "reason": f"{distance:.6f} of the pixels differ (threshold {CHART_THRESHOLD})"}


def chart_failure(reason: str) -> dict:
    return {"kind": "chart", "score": 0, "distance": 1.0, "reason": reason}


def image_distance(reference: np.ndarray, drawn: np.ndarray) -> float:
    """Fraction of two images' (pixels()) common canvas where they differ (see the module's docstring)."""
    height, width = max(reference.shape[0], drawn.shape[0]), max(reference.shape[1], drawn.shape[1])
    h, w = min(reference.shape[0], drawn.shape[0]), min(reference.shape[1], drawn.shape[1])
    differ = int((np.abs(reference[:h, :w] - drawn[:h, :w]).max(axis=2) > PIXEL_TOLERANCE).sum())
    return (differ + height * width - h * w) / (height * width)


def pixels(png: bytes, what: str) -> np.ndarray:
    """The PNG's RGB values (int16, for differences) on white; ValueError naming `what` if unreadable."""
    try:
        with warnings.catch_warnings():
            # PIL's warning about a very large image: its size is refused just below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(png))
        if max(image.size) > MAX_CHART_SIDE:
            raise ValueError(f"the {what} is {image.width}x{image.height} px, over {MAX_CHART_SIDE} a side")
        image = image.convert("RGBA")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"the {what} is not a readable image: {e}") from None
    # On white, as a viewer shows it: a transparent figure compares by what it looks like.
    return np.asarray(Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB"),
                      dtype=np.int16)
