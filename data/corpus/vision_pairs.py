"""Generate image -> text pairs of the kinds the design names for vision_text, offline, as webdataset tar shards.

    python tools/make_vision_pairs.py --output DIR --count N [--seed S] [--samples-per-shard K] \
        [--kinds code,chart,ui,statement,doc]

Each pair's image is rendered from its text, so the text is exactly what the image shows:
- code: a syntax-highlighted screenshot (pygments' ImageFormatter) of a function or a 10-30 line
  window of this machine's Python standard library -> that source, verbatim (the .json names the file
  and lines);
- chart: a line, bar, scatter or pie chart -> the matplotlib program that drew it (the program is
  written first and then executed, Agg backend, to draw the image);
- ui: a mockup of a small page (a header bar, rows of buttons, text inputs and cards) -> its HTML/CSS,
  drawn by a layout renderer for exactly that vocabulary;
- statement: an income statement, balance sheet or cash flow statement table -> Python that builds
  its rows and computes its totals;
- doc: a formula (matplotlib mathtext) -> its LaTeX, or a short Markdown note with a heading, a
  sentence and a display formula -> the Markdown.

DIR/pairs-000000.tar, ... hold the samples in the format data/sources/vision_text.py reads (feed them
to `tools/build_shards.py --source vision_text=DIR`): members `<key>.json`, `<key>.png`, `<key>.txt`,
adjacent, keys `000000123` (the sample's index), the .json {"kind", "generator", "seed", ...}. Kinds
cycle over --kinds in order. Sample i depends only on the seed, i and its kind, and tar members carry
no times or owners, so a seed gives the same bytes every time (on the same Python and libraries).
Each shard is written under a hidden temporary name and renamed when complete; the directory's
pairs-NNNNNN.tar that a run does not write are deleted, so that a smaller rerun leaves no stale shards.
Images are at most 512 px on a side, texts a few KB.
"""

import argparse
import functools
import inspect
import io
import json
import random
import re
import sys
import sysconfig
import tarfile
import time
import tokenize
from pathlib import Path
from typing import Callable

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.font_manager import FontProperties
from matplotlib.mathtext import MathTextParser
from PIL import Image, ImageDraw, ImageFont
from pygments import highlight
from pygments.formatters import ImageFormatter
from pygments.lexers import PythonLexer
from tqdm import tqdm

from cromwell.data.corpus.stamp import done_before, forget, mark_done
from cromwell.data.corpus.stdlib import stdlib_code_files

matplotlib.use("Agg")   # charts are drawn off-screen, the same on any machine

GENERATOR = "make_vision_pairs"
KINDS = ("code", "chart", "ui", "statement", "doc")
MAX_SIDE = 512
# matplotlib's bundled fonts: the same files on every machine, no fontconfig lookup needed.
FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"

Pair = tuple[bytes, str, dict]   # PNG bytes, text, metadata for the .json


# --- Shared drawing helpers ---

@functools.cache
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_DIR / f"{name}.ttf"), size)


def png_bytes(image: Image.Image) -> bytes:
    if max(image.size) > MAX_SIDE:
        scale = MAX_SIDE / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- code: stdlib source screenshots ---

CODE_STYLES = ["default", "friendly", "monokai", "solarized-light", "solarized-dark", "github-dark", "vs",
               "xcode", "one-dark", "dracula", "gruvbox-light", "nord"]
MAX_CODE_COLUMNS = 100
DEF = re.compile(r"\s*(async\s+)?def\s")


@functools.cache
def stdlib_files() -> tuple[Path, list[Path]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return stdlib, stdlib_code_files(stdlib)


def code_pair(rng: random.Random) -> Pair:
    stdlib, files = stdlib_files()
    while True:
        path = rng.choice(files)
        try:
            # tokenize.open honours a file's coding declaration.
            with tokenize.open(path) as f:
                lines = f.read().split("\n")
        except (SyntaxError, UnicodeDecodeError):
            continue
        snippet = pick_function(lines, rng) if rng.random() < 0.5 else None
        snippet = snippet or pick_window(lines, rng)
        if snippet:
            break
    first, last, what = snippet
    source = "\n".join(lines[first - 1:last])
    style = rng.choice(CODE_STYLES)
    formatter = ImageFormatter(
        image_format="bmp",   # uncompressed: the image is encoded once, as PNG, by png_bytes
        # A file rather than a font name, which pygments would look up with fontconfig (fc-list).
        font_name=str(FONT_DIR / "DejaVuSansMono.ttf"), font_size=rng.choice([12, 13, 14]),
        style=style, line_numbers=rng.random() < 0.7, line_number_start=first, line_number_chars=len(str(last)),
        line_number_bg=None,   # the gutter in the style's background, as editors draw it
    )
    # Given a font file, pygments draws every style with it: give it the bold and italic files too.
    for style_name, suffix in (("BOLD", "-Bold"), ("ITALIC", "-Oblique"), ("BOLDITALIC", "-BoldOblique")):
        formatter.fonts.fonts[style_name] = font("DejaVuSansMono" + suffix, formatter.fonts.font_size)
    image = Image.open(io.BytesIO(highlight(source, PythonLexer(), formatter)))
    meta = {"language": "python", "source_file": path.relative_to(stdlib).as_posix(), "first_line": first,
            "last_line": last, "snippet": what, "style": style}
    return png_bytes(image), source, meta


def pick_function(lines: list[str], rng: random.Random) -> tuple[int, int, str] | None:
    """(first line, last line, "function") of a random 5-30 line function or method, if a few tries find one."""
    starts = [i for i, line in enumerate(lines) if DEF.match(line)]
    for i in rng.sample(starts, min(3, len(starts))):
        try:
            # The tokenizer finds where the block ends (multi-line signatures, nested blocks).
            block = inspect.getblock([line + "\n" for line in lines[i:]])
        except (SyntaxError, tokenize.TokenError, IndentationError):
            continue
        first = i
        while first > 0 and lines[first - 1].strip().startswith("@"):
            first -= 1
        last = i + len(block)
        if 5 <= last - first <= 30 and fits(lines[first:last]):
            return first + 1, last, "function"
    return None


def pick_window(lines: list[str], rng: random.Random) -> tuple[int, int, str] | None:
    """(first line, last line, "window") of 10-30 lines, trimmed of blank lines at its ends."""
    size = rng.randint(10, 30)
    if len(lines) < size:
        return None
    first = rng.randint(1, len(lines) - size + 1)
    last = first + size - 1
    while first < last and not lines[first - 1].strip():
        first += 1
    while last > first and not lines[last - 1].strip():
        last -= 1
    window = lines[first - 1:last]
    if sum(bool(line.strip()) for line in window) < 5 or not fits(window):
        return None
    return first, last, "window"


def fits(lines: list[str]) -> bool:
    # Very long lines would shrink the whole screenshot to fit MAX_SIDE.
    return all(len(line.expandtabs(4)) <= MAX_CODE_COLUMNS for line in lines)


# --- chart: matplotlib programs and what they draw ---

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
          "steelblue", "darkorange", "seagreen", "crimson", "slateblue", "teal", "goldenrod", "gray"]
FIGURE_SIZES = [(4, 3), (4.5, 3), (5, 3.5), (4, 4), (5, 4)]
X_AXES = {
    "months": ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"],
    "days": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"],
    "quarters": ["Q1 2023", "Q2 2023", "Q3 2023", "Q4 2023", "Q1 2024", "Q2 2024"],
    "epochs": list(range(1, 13)),
}
LINE_TOPICS = [   # title, x axis, x label, y label, series, typical value
    ("Monthly revenue", "months", "Month", "Revenue (thousands)", ["Store A", "Store B", "Online"], 120),
    ("Training curve", "epochs", "Epoch", "Loss", ["Train", "Validation"], 2.5),
    ("Average temperature", "months", "Month", "Temperature (C)", ["Oslo", "Madrid", "Cairo"], 18),
    ("Daily visitors", "days", "Day", "Visitors", ["Desktop", "Mobile", "Tablet"], 900),
    ("Units sold", "quarters", "Quarter", "Units", ["Product X", "Product Y"], 450),
]
BAR_TOPICS = [   # title, category label, value label, categories, typical value
    ("Most used languages", "Language", "Developers (%)", ["Python", "JavaScript", "Java", "C++", "Go", "Rust"], 30),
    ("Fruit sales", "Fruit", "Kilograms", ["Apples", "Bananas", "Cherries", "Grapes", "Mangoes", "Pears"], 200),
    ("Headcount by department", "Department", "Employees", ["Sales", "R&D", "Support", "Finance", "HR"], 60),
    ("City population", "City", "Population (millions)", ["Tokyo", "Delhi", "Lagos", "Lima", "Paris"], 12),
]
SCATTER_TOPICS = [   # title, x label, y label, x range, intercept, slope, noise
    ("Height and weight", "Height (cm)", "Weight (kg)", (150, 195), -60, 0.8, 6),
    ("Study time and score", "Hours studied", "Exam score", (0, 12), 45, 4.0, 8),
    ("Engine size and mileage", "Engine size (L)", "Mileage (mpg)", (1, 5), 45, -5.5, 3),
    ("Ad spend and sales", "Ad spend (thousands)", "Sales (thousands)", (5, 50), 20, 2.2, 12),
]
PIE_TOPICS = [   # title, labels
    ("Market share", ["Alpha", "Beta", "Gamma", "Delta", "Other"]),
    ("Time spent per day", ["Work", "Sleep", "Leisure", "Commute", "Meals"]),
    ("Monthly budget", ["Rent", "Food", "Transport", "Savings", "Other"]),
    ("Traffic sources", ["Search", "Direct", "Social", "Email"]),
]


def chart_pair(rng: random.Random) -> Pair:
    chart = rng.choice(["line", "bar", "scatter", "pie"])
    width, height = rng.choice(FIGURE_SIZES)
    dpi = rng.choice([80, 100])
    data, plots, title = CHARTS[chart](rng)
    code = "\n".join([
        "import matplotlib.pyplot as plt", "",
        *data, "",
        f"fig, ax = plt.subplots(figsize=({width}, {height}), dpi={dpi})",
        *plots,
        f"ax.set_title({title!r})",
        "fig.tight_layout()",
    ]) + "\n"
    return render_chart(code), code, {"chart": chart, "title": title}


def render_chart(code: str) -> bytes:
    """Run a chart program (it leaves its figure in `fig`) and return the figure as PNG bytes."""
    namespace = {"__name__": "__chart__"}
    # matplotlib's own defaults, whatever matplotlibrc this machine has.
    with plt.style.context("default"):
        exec(compile(code, "<chart>", "exec"), namespace)
        fig = namespace["fig"]
        # tight_layout leaves a placeholder layout engine, for which savefig draws the figure once more
        # to no effect (the same bytes without it).
        fig.set_layout_engine(None)
        buffer = io.BytesIO()
        # No "Software" text chunk: the bytes do not depend on matplotlib's version string.
        fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def line_chart(rng: random.Random) -> tuple[list[str], list[str], str]:
    title, axis, xlabel, ylabel, names, typical = rng.choice(LINE_TOPICS)
    x = X_AXES[axis][:rng.randint(5, len(X_AXES[axis]))]
    series = rng.sample(names, rng.randint(1, len(names)))
    colors = rng.sample(COLORS, len(series))
    data = [f"{axis} = {x!r}"]
    plots = []
    for name, color in zip(series, colors):
        data.append(f"{identifier(name)} = {random_walk(rng, len(x), typical)!r}")
        style = rng.choice(['marker="o"', 'linestyle="--"', 'marker="s"', "linewidth=2"])
        plots.append(f"ax.plot({axis}, {identifier(name)}, color={color!r}, {style}, label={name!r})")
    plots += [f"ax.set_xlabel({xlabel!r})", f"ax.set_ylabel({ylabel!r})"]
    if len(series) > 1:
        plots.append("ax.legend()")
    if rng.random() < 0.5:
        plots.append("ax.grid(alpha=0.3)")
    return data, plots, title


def bar_chart(rng: random.Random) -> tuple[list[str], list[str], str]:
    title, xlabel, ylabel, names, typical = rng.choice(BAR_TOPICS)
    categories = rng.sample(names, rng.randint(3, len(names)))
    values = [round(typical * rng.uniform(0.3, 1.7)) for _ in categories]
    horizontal = rng.random() < 0.3
    data = [f"categories = {categories!r}", f"values = {values!r}"]
    plots = [f"bars = ax.{'barh' if horizontal else 'bar'}(categories, values, color={rng.choice(COLORS)!r})"]
    if horizontal:
        xlabel, ylabel = ylabel, xlabel
    plots += [f"ax.set_xlabel({xlabel!r})", f"ax.set_ylabel({ylabel!r})"]
    if rng.random() < 0.5:
        plots.append("ax.bar_label(bars)")
    if rng.random() < 0.5:
        plots.append('ax.spines[["top", "right"]].set_visible(False)')
    return data, plots, title


def scatter_chart(rng: random.Random) -> tuple[list[str], list[str], str]:
    title, xlabel, ylabel, (low, high), intercept, slope, noise = rng.choice(SCATTER_TOPICS)
    x = [round(rng.uniform(low, high), 1) for _ in range(rng.randint(8, 25))]
    y = [round(intercept + slope * v + rng.gauss(0, noise), 1) for v in x]
    marker = rng.choice(['"o"', '"s"', '"^"', '"D"'])
    plots = [f"ax.scatter(x, y, color={rng.choice(COLORS)!r}, marker={marker}, alpha={rng.choice([0.6, 0.8, 1.0])})",
             f"ax.set_xlabel({xlabel!r})", f"ax.set_ylabel({ylabel!r})"]
    if rng.random() < 0.5:
        plots.append("ax.grid(alpha=0.3)")
    return [f"x = {x!r}", f"y = {y!r}"], plots, title


def pie_chart(rng: random.Random) -> tuple[list[str], list[str], str]:
    title, names = rng.choice(PIE_TOPICS)
    labels = names[:rng.randint(3, len(names))]
    shares = [rng.randint(5, 40) for _ in labels]
    colors = rng.sample(COLORS, len(labels))
    data = [f"labels = {labels!r}", f"shares = {shares!r}", f"colors = {colors!r}"]
    plots = [f'ax.pie(shares, labels=labels, colors=colors, autopct="%1.0f%%", startangle={rng.choice([0, 90, 140])})']
    return data, plots, title


# Each returns the program's data lines, its drawing lines and the chart's title.
CHARTS = {"line": line_chart, "bar": bar_chart, "scatter": scatter_chart, "pie": pie_chart}


def random_walk(rng: random.Random, n: int, typical: float) -> list[float]:
    value, values = typical * rng.uniform(0.5, 1.5), []
    trend = rng.uniform(-0.08, 0.08)
    for _ in range(n):
        values.append(round(value, 2 if typical < 10 else 1))
        value *= 1 + trend + rng.gauss(0, 0.08)
    return values


def identifier(label: str) -> str:
    return re.sub(r"\W+", "_", label.lower()).strip("_")


# --- ui: HTML/CSS mockups ---

THEMES = [   # header/primary, page background, card background, text
    ("#3451b2", "#f5f6fa", "#ffffff", "#222222"),
    ("#0f766e", "#f0fdfa", "#ffffff", "#1f2937"),
    ("#b91c1c", "#fef2f2", "#ffffff", "#292524"),
    ("#7c3aed", "#f5f3ff", "#ffffff", "#1e1b4b"),
    ("#111827", "#f3f4f6", "#ffffff", "#111827"),
    ("#ea580c", "#fff7ed", "#fffbeb", "#292524"),
    ("#2563eb", "#0f172a", "#1e293b", "#e2e8f0"),
]
PAGES = [   # header title, button labels, input placeholders, (card title, card text)
    ("Dashboard", ["Refresh", "Export", "Settings"], ["Search reports"],
     [("Revenue", "$48,210 this month"), ("Orders", "1,284 orders, 3% more than last week"), ("Visitors", "9,870")]),
    ("Sign in", ["Sign in", "Create account", "Forgot password?"], ["Email address", "Password"],
     [("Welcome back", "Sign in to continue to your workspace."), ("New here?", "Create a free account.")]),
    ("Orders", ["New order", "Filter", "Print"], ["Search orders", "Customer name"],
     [("Open", "12 orders waiting to ship"), ("Shipped", "87 orders this week"), ("Returns", "3 pending")]),
    ("Settings", ["Save", "Cancel", "Reset"], ["Display name", "Time zone"],
     [("Profile", "Your name and photo are visible to your team."), ("Notifications", "Email me about new comments.")]),
    ("Inbox", ["Compose", "Archive", "Mark as read"], ["Search mail"],
     [("Team meeting", "Moved to Thursday at 10:00."), ("Invoice #2041", "Payment received, thank you!")]),
]


# The rules every page shares; ui_pair adds the theme's. The renderer reads its sizes and colours from
# them and lays out what they say: border-box elements, each row a flex box of equal columns, centred.
UI_BASE_CSS = {
    "*": {"box-sizing": "border-box", "margin": "0"},
    "body": {"padding-bottom": "16px", "font-family": "'DejaVu Sans', sans-serif"},
    "header": {"height": "48px", "padding-left": "16px", "line-height": "48px", "font-weight": "bold",
               "color": "#ffffff"},
    ".row": {"display": "flex", "align-items": "center", "gap": "12px", "padding-left": "16px",
             "padding-right": "16px"},
    ".row > *": {"flex": "1", "min-width": "0"},
    "button": {"height": "36px", "border": "none", "font-size": "14px", "color": "#ffffff"},
    "input": {"height": "36px", "padding-left": "10px", "border": "1px solid #9ca3af", "font-size": "14px"},
    "input::placeholder": {"color": "#6b7280"},
    ".card": {"padding": "10px", "overflow": "hidden"},
    ".card h3": {"font-size": "15px", "margin-bottom": "6px"},
    ".card p": {"font-size": "13px", "line-height": "16px"},
}


def ui_pair(rng: random.Random) -> Pair:
    accent, page, card, text = rng.choice(THEMES)
    title, buttons, inputs, cards = rng.choice(PAGES)
    theme = {
        "body": {"width": f"{rng.choice([360, 400, 440, 480])}px", "background": page, "color": text},
        "header": {"background": accent, "font-size": f"{rng.choice([18, 20])}px"},
        ".row": {"padding-top": f"{rng.choice([12, 16])}px"},
        "button": {"border-radius": f"{rng.choice([0, 4, 8])}px", "background": accent},
        "button.secondary": {"background": card, "color": text},
        "input": {"background": card},
        ".card": {"height": f"{rng.choice([72, 88, 104])}px", "border-radius": f"{rng.choice([0, 6, 10])}px",
                  "background": card},
    }
    css = {selector: {**UI_BASE_CSS.get(selector, {}), **theme.get(selector, {})}
           for selector in dict.fromkeys([*UI_BASE_CSS, *theme])}
    layouts = rng.choices(["buttons", "form", "cards"], k=rng.randint(2, 4))
    rows = [ui_row(rng, layout, buttons, inputs, cards) for layout in layouts]
    return render_ui(css, title, rows), ui_html(css, title, rows), {"page": title, "rows": len(rows)}


def ui_row(rng: random.Random, layout: str, buttons: list[str], inputs: list[str],
           cards: list[tuple[str, str]]) -> list[tuple]:
    """A row's elements: ("button", label, secondary?), ("input", placeholder) or ("card", title, text)."""
    if layout == "buttons":
        return [("button", label, i > 0) for i, label in enumerate(rng.sample(buttons, rng.randint(1, 3)))]
    if layout == "form":
        fields = [("input", placeholder) for placeholder in rng.sample(inputs, rng.randint(1, len(inputs)))]
        return fields + [("button", buttons[0], False)] * (rng.random() < 0.7)
    return [("card", *c) for c in rng.sample(cards, rng.randint(1, min(3, len(cards))))]


def ui_html(css: dict[str, dict[str, str]], title: str, rows: list[list[tuple]]) -> str:
    rules = [f"{selector} {{ " + " ".join(f"{k}: {v};" for k, v in props.items()) + " }"
             for selector, props in css.items()]
    body = [f"<header>{title}</header>"]
    for row in rows:
        body.append('<div class="row">')
        for element in row:
            if element[0] == "button":
                attribute = ' class="secondary"' if element[2] else ""
                body.append(f"  <button{attribute}>{element[1]}</button>")
            elif element[0] == "input":
                body.append(f'  <input placeholder="{element[1]}">')
            else:
                body.append(f'  <div class="card"><h3>{element[1]}</h3><p>{element[2]}</p></div>')
        body.append("</div>")
    return "\n".join(["<!DOCTYPE html>", "<html>", "<head>", "<style>", *rules, "</style>", "</head>", "<body>",
                      *body, "</body>", "</html>"]) + "\n"


def px(css: dict[str, dict[str, str]], selector: str, prop: str) -> int:
    return int(css[selector][prop].removesuffix("px"))


def ui_selector(element: tuple) -> str:
    """The rule an element's box comes from (a secondary button's colours come from button.secondary)."""
    return ".card" if element[0] == "card" else element[0]


def render_ui(css: dict[str, dict[str, str]], title: str, rows: list[list[tuple]]) -> bytes:
    width, header = px(css, "body", "width"), px(css, "header", "height")
    gap, left_pad, right_pad = px(css, ".row", "gap"), px(css, ".row", "padding-left"), px(css, ".row", "padding-right")
    row_top = px(css, ".row", "padding-top")
    heights = [max(px(css, ui_selector(e), "height") for e in row) for row in rows]
    page_height = header + sum(row_top + h for h in heights) + px(css, "body", "padding-bottom")
    image = Image.new("RGB", (width, page_height), css["body"]["background"])
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width - 1, header - 1), fill=css["header"]["background"])
    draw.text((px(css, "header", "padding-left"), header // 2), title, fill=css["header"]["color"],
              font=font("DejaVuSans-Bold", px(css, "header", "font-size")), anchor="lm")
    top = header
    for row, row_height in zip(rows, heights):
        top += row_top
        column = (width - left_pad - right_pad - gap * (len(row) - 1)) / len(row)
        for i, element in enumerate(row):
            left = round(left_pad + i * (column + gap))
            height = px(css, ui_selector(element), "height")
            element_top = top + (row_height - height) // 2
            draw_ui_element(draw, css, element, (left, element_top, round(left + column) - 1, element_top + height - 1))
        top += row_height
    return png_bytes(image)


def draw_ui_element(draw: ImageDraw.ImageDraw, css: dict[str, dict[str, str]], element: tuple,
                    box: tuple[int, int, int, int]) -> None:
    left, top, right, bottom = box
    style = {**css[ui_selector(element)], **(css["button.secondary"] if element[0] == "button" and element[2] else {})}
    outline = style["border"].split()[-1] if style.get("border", "none") != "none" else None
    radius = int(style.get("border-radius", "0px").removesuffix("px"))
    draw.rounded_rectangle(box, radius=radius, fill=style["background"], outline=outline)
    middle = (top + bottom) // 2
    if element[0] == "button":
        draw.text(((left + right) // 2, middle), element[1], fill=style["color"],
                  font=font("DejaVuSans", px(css, "button", "font-size")), anchor="mm")
    elif element[0] == "input":
        draw.text((left + px(css, "input", "padding-left"), middle), element[1],
                  fill=css["input::placeholder"]["color"], font=font("DejaVuSans", px(css, "input", "font-size")),
                  anchor="lm")
    else:
        padding, ink = px(css, ".card", "padding"), css["body"]["color"]
        title_size = px(css, ".card h3", "font-size")
        draw.text((left + padding, top + padding), element[1], fill=ink, font=font("DejaVuSans-Bold", title_size))
        text_font = font("DejaVuSans", px(css, ".card p", "font-size"))
        y = top + padding + title_size + px(css, ".card h3", "margin-bottom")
        for line in wrap(element[2], text_font, right - left - 2 * padding):
            if y + text_font.size > bottom - padding:   # overflow: hidden
                break
            draw.text((left + padding, y), line, fill=ink, font=text_font)
            y += px(css, ".card p", "line-height")


def wrap(text: str, face: ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines = []
    for word in text.split():
        if lines and face.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


# --- statement: financial statement tables -> extraction code ---

# (label, low, high): a line item, a random fraction of the statement's scale (negative: a cost or
# an outflow); (label, [labels]): a total of the lines named.
STATEMENTS = {
    "income statement": [
        ("Revenue", 1.0, 1.0),
        ("Cost of revenue", -0.6, -0.35),
        ("Gross profit", ["Revenue", "Cost of revenue"]),
        ("Research and development", -0.15, -0.05),
        ("Selling, general and administrative", -0.2, -0.08),
        ("Operating income", ["Gross profit", "Research and development", "Selling, general and administrative"]),
        ("Interest expense", -0.03, -0.005),
        ("Income before income taxes", ["Operating income", "Interest expense"]),
        ("Income tax expense", -0.06, -0.02),
        ("Net income", ["Income before income taxes", "Income tax expense"]),
    ],
    "balance sheet": [
        ("Cash and equivalents", 0.05, 0.3),
        ("Accounts receivable", 0.05, 0.2),
        ("Inventories", 0.02, 0.2),
        ("Total current assets", ["Cash and equivalents", "Accounts receivable", "Inventories"]),
        ("Property and equipment", 0.1, 0.5),
        ("Goodwill", 0.0, 0.2),
        ("Total assets", ["Total current assets", "Property and equipment", "Goodwill"]),
        ("Accounts payable", 0.03, 0.15),
        ("Long-term debt", 0.05, 0.4),
        ("Total liabilities", ["Accounts payable", "Long-term debt"]),
        ("Common stock", 0.05, 0.2),
        ("Retained earnings", 0.0, 0.0),   # set so that the statement balances
        ("Total equity", ["Common stock", "Retained earnings"]),
        ("Total liabilities and equity", ["Total liabilities", "Total equity"]),
    ],
    "cash flow statement": [
        ("Net income", 0.05, 0.15),
        ("Depreciation and amortization", 0.02, 0.06),
        ("Change in working capital", -0.04, 0.04),
        ("Net cash from operations", ["Net income", "Depreciation and amortization", "Change in working capital"]),
        ("Capital expenditures", -0.1, -0.03),
        ("Acquisitions", -0.05, 0.0),
        ("Net cash from investing", ["Capital expenditures", "Acquisitions"]),
        ("Dividends paid", -0.04, -0.01),
        ("Repayment of debt", -0.05, 0.0),
        ("Net cash from financing", ["Dividends paid", "Repayment of debt"]),
        ("Net change in cash", ["Net cash from operations", "Net cash from investing", "Net cash from financing"]),
    ],
}
COMPANIES = ["Northwind Traders", "Contoso Ltd.", "Globex Corporation", "Initech Inc.", "Umbrella Foods plc",
             "Stark Components AG", "Wayne Logistics", "Acme Robotics"]
UNITS = ["thousands of USD", "millions of USD", "thousands of EUR", "millions of GBP"]
TABLE_COLORS = [("#ffffff", "#111111", "#f2f4f7"), ("#fbfaf5", "#222222", "#efece0"), ("#ffffff", "#1f3a5f", "#e8eef6")]


def statement_pair(rng: random.Random) -> Pair:
    name = rng.choice(list(STATEMENTS))
    company, units = rng.choice(COMPANIES), rng.choice(UNITS)
    year, prefix = rng.randint(2015, 2024), rng.choice(["FY", ""])
    periods = [f"{prefix}{year - i}" for i in range(rng.randint(1, 3))]
    rows = statement_rows(rng, STATEMENTS[name], len(periods))
    image = render_statement(rng, company, name, units, periods, rows)
    code = statement_code(f"{company}, {name} (in {units})", periods, rows)
    return png_bytes(image), code, {"statement": name, "company": company, "periods": periods, "rows": len(rows)}


def statement_rows(rng: random.Random, spec: list[tuple], n_periods: int) -> list[tuple[str, list[int], list | None]]:
    """(label, values per period, the labels it totals or None) in the statement's order."""
    scale = rng.uniform(500, 90000)
    items = {}
    for line in spec:
        if len(line) == 3:
            items[line[0]] = [round(scale * (1 - 0.07 * p) * rng.uniform(line[1], line[2])) for p in range(n_periods)]
    totals = statement_totals(spec, items, n_periods)
    if "Retained earnings" in items:
        items["Retained earnings"] = [
            assets - claims for assets, claims in zip(totals["Total assets"], totals["Total liabilities and equity"])
        ]
        totals = statement_totals(spec, items, n_periods)
    return [(line[0], {**items, **totals}[line[0]], line[1] if len(line) == 2 else None) for line in spec]


def statement_totals(spec: list[tuple], items: dict[str, list[int]], n_periods: int) -> dict[str, list[int]]:
    values = dict(items)
    for line in spec:
        if len(line) == 2:
            values[line[0]] = [sum(values[label][p] for label in line[1]) for p in range(n_periods)]
    return {line[0]: values[line[0]] for line in spec if len(line) == 2}


def statement_code(heading: str, periods: list[str], rows: list[tuple]) -> str:
    lines = [f"# {heading}", f"periods = {periods!r}", "rows = {}", "", "",
             "def total(*labels):",
             "    return [sum(rows[label][i] for label in labels) for i in range(len(periods))]", "", ""]
    for label, values, parts in rows:
        value = f"total({', '.join(map(repr, parts))})" if parts else repr(values)
        lines.append(f"rows[{label!r}] = {value}")
    lines += ["", "for label, values in rows.items():",
              '    print(f"{label:<40}" + "".join(f"{value:>14,}" for value in values))']
    return "\n".join(lines) + "\n"


def render_statement(rng: random.Random, company: str, name: str, units: str, periods: list[str],
                     rows: list[tuple]) -> Image.Image:
    background, ink, shade = rng.choice(TABLE_COLORS)
    size = rng.choice([12, 13])
    regular, bold = font("DejaVuSans", size), font("DejaVuSans-Bold", size)
    line_height, column, pad = size + 9, 92, 14
    label_width = max(bold.getlength(label) for label, _, _ in rows) + 16
    width = round(2 * pad + label_width + column * len(periods))
    height = pad + 62 + line_height * (len(rows) + 1) + pad
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), company, fill=ink, font=font("DejaVuSans-Bold", size + 3))
    draw.text((pad, pad + 22), name.capitalize(), fill=ink, font=regular)
    draw.text((pad, pad + 40), f"(in {units})", fill=ink, font=font("DejaVuSans-Oblique", size - 1))
    y = pad + 62
    for p, period in enumerate(periods):
        draw.text((pad + label_width + column * (p + 1), y), period, fill=ink, font=bold, anchor="ra")
    draw.line((pad, y + line_height - 3, width - pad, y + line_height - 3), fill=ink)
    striped = rng.random() < 0.5
    for r, (label, values, parts) in enumerate(rows):
        y += line_height
        if striped and r % 2:
            draw.rectangle((pad, y - 2, width - pad, y + line_height - 4), fill=shade)
        if parts:
            draw.line((pad + label_width, y - 2, width - pad, y - 2), fill=ink)
        face = bold if parts else regular
        draw.text((pad + (0 if parts else 8), y), label, fill=ink, font=face)
        for p, value in enumerate(values):
            shown = f"({-value:,})" if value < 0 else f"{value:,}"
            draw.text((pad + label_width + column * (p + 1), y), shown, fill=ink, font=face, anchor="ra")
    return image


# --- doc: formulas and Markdown notes ---

GREEK = ["alpha", "beta", "gamma", "delta", "epsilon", "theta", "lambda", "mu", "sigma", "phi", "omega", "pi",
         "rho", "tau", "eta", "kappa"]
LETTERS = "abcnkxyztuvw"
LEFT_SIDES = ["f(x)", "E", "L(\\theta)", "y_i", "S_n", "F(t)", "p(x)", "g(z)", "\\hat{y}", "\\mathcal{L}"]
NOTES = [   # Markdown heading, sentence before the formula
    ("Definition", "For every $n \\geq 1$ we define"),
    ("Update rule", "At step $t$ the parameters change by"),
    ("Loss function", "The model is trained to minimize"),
    ("Lemma 2", "For all $x > 0$ the following holds:"),
    ("Normalization", "Each value is rescaled with"),
    ("Expected value", "Under the assumptions above,"),
    ("Energy", "The total energy of the system is"),
]
OPERATORS = ["+", "-", "\\cdot"]
INTEGRAL_BOUNDS = ["1", "t", "\\infty"]
MATH_FONTS = ["cm", "stix", "dejavusans", "dejavuserif", "stixsans"]
MATH = MathTextParser("agg")


def doc_pair(rng: random.Random) -> Pair:
    math_font = rng.choice(MATH_FONTS)
    ink = rng.choice(["#000000", "#1a1a1a", "#1f2d5a"])
    markdown = rng.random() < 0.5
    heading, sentence = rng.choice(NOTES)
    while True:
        formula = f"{rng.choice(LEFT_SIDES)} = {expression(rng, 2)}"
        if markdown:
            lines = [(heading, 20, "bold", "left"), (sentence, 14, "normal", "left"),
                     (f"${formula}$", 18, "normal", "center")]
            text = f"## {heading}\n\n{sentence}\n\n$${formula}$$\n"
        else:
            lines, text = [(f"${formula}$", 20, "normal", "center")], f"${formula}$"
        image = render_lines(lines, math_font, ink)
        # A formula too wide to show at its size is drawn again rather than shrunk.
        if image.width <= MAX_SIDE:
            return png_bytes(image), text, {"format": "markdown" if markdown else "latex", "math_font": math_font}


def expression(rng: random.Random, depth: int) -> str:
    text = term(rng, depth)
    for _ in range(rng.randint(0, 2)):
        text += f" {rng.choice(OPERATORS)} {term(rng, depth)}"
    return text


def term(rng: random.Random, depth: int) -> str:
    if depth == 0:
        return atom(rng)
    choice = rng.choice(["atom", "power", "frac", "sqrt", "sum", "integral", "paren", "function"])
    if choice == "power":
        return f"{atom(rng)}^{{{rng.choice(['2', '3', 'n', 'k', '-1'])}}}"
    if choice == "frac":
        return f"\\frac{{{expression(rng, depth - 1)}}}{{{expression(rng, depth - 1)}}}"
    if choice == "sqrt":
        return f"\\sqrt{{{expression(rng, depth - 1)}}}"
    if choice == "sum":
        index = rng.choice("ijk")
        return f"\\sum_{{{index}=1}}^{{{rng.choice(['n', 'N', 'm'])}}} {rng.choice(LETTERS)}_{{{index}}}"
    if choice == "integral":
        return f"\\int_{{0}}^{{{rng.choice(INTEGRAL_BOUNDS)}}} {term(rng, depth - 1)} \\, dx"
    if choice == "paren":
        return f"\\left({expression(rng, depth - 1)}\\right)^{{2}}"
    if choice == "function":
        return f"\\{rng.choice(['sin', 'cos', 'log', 'exp'])}({atom(rng)})"
    return atom(rng)


def atom(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        return f"\\{rng.choice(GREEK)}"
    if kind < 0.75:
        return rng.choice(LETTERS) + (f"_{{{rng.choice('ijkn0')}}}" if rng.random() < 0.3 else "")
    return str(rng.randint(1, 9))


def render_lines(lines: list[tuple[str, int, str, str]], math_font: str, ink: str) -> Image.Image:
    """Stack (text with $math$, size, weight, alignment) lines, each typeset by mathtext, on white."""
    masks = []
    for text, size, weight, align in lines:
        prop = FontProperties(family="DejaVu Sans", size=size, weight=weight, math_fontfamily=math_font)
        masks.append((Image.fromarray(MATH.parse(text, dpi=100, prop=prop).image), align))
    pad, spacing = 16, 14
    width = max(mask.width for mask, _ in masks) + 2 * pad
    height = sum(mask.height for mask, _ in masks) + spacing * (len(masks) - 1) + 2 * pad
    image = Image.new("RGB", (width, height), "#ffffff")
    y = pad
    for mask, align in masks:
        x = (width - mask.width) // 2 if align == "center" else pad
        image.paste(ink, (x, y, x + mask.width, y + mask.height), mask)
        y += mask.height + spacing
    return image


# --- Shards ---

GENERATORS: dict[str, Callable[[random.Random], Pair]] = {
    "code": code_pair, "chart": chart_pair, "ui": ui_pair, "statement": statement_pair, "doc": doc_pair,
}


def make_pairs(output: Path, count: int, seed: int = 0, samples_per_shard: int = 256,
               kinds: tuple[str, ...] | list[str] = KINDS) -> list[Path]:
    """Write `count` pairs to output/pairs-000000.tar, ...; returns the shards' paths."""
    check_arguments(count, samples_per_shard, kinds)
    output.mkdir(parents=True, exist_ok=True)
    shards = []
    start_time = time.perf_counter()
    with tqdm(total=count, unit="pair", desc="vision pairs") as progress:
        for first in range(0, count, samples_per_shard):
            path = output / f"pairs-{len(shards):06d}.tar"
            # Hidden: tools reading the directory skip it until it is complete.
            tmp = output / f".{path.name}.tmp"
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for index in range(first, min(count, first + samples_per_shard)):
                    kind = kinds[index % len(kinds)]
                    # A string seed is hashed with SHA-512: the same stream on every run and machine.
                    image, text, meta = GENERATORS[kind](random.Random(f"{seed}/{index}"))
                    meta = {"kind": kind, "generator": GENERATOR, "seed": seed, "index": index, **meta}
                    add_sample(tar, f"{index:09d}", image, text, meta)
                    progress.update()
            tmp.replace(path)
            shards.append(path)
    for stale in sorted(set(output.glob(f"pairs-{'[0-9]' * 6}.tar")) - set(shards)):
        stale.unlink()
    elapsed = time.perf_counter() - start_time
    print(f"wrote {count} pairs in {len(shards)} shards to {output} ({count / max(elapsed, 1e-9):.1f} pairs/s)")
    return shards


def check_arguments(count: int, samples_per_shard: int, kinds: tuple[str, ...] | list[str]) -> None:
    if not kinds or any(k not in GENERATORS for k in kinds):
        raise ValueError(f"kinds must be some of {list(GENERATORS)}, got {list(kinds)}")
    if count < 0 or samples_per_shard < 1:
        raise ValueError(f"need count >= 0 and samples_per_shard >= 1, got {count} and {samples_per_shard}")


def add_sample(tar: tarfile.TarFile, key: str, image: bytes, text: str, meta: dict) -> None:
    members = {"json": json.dumps(meta, sort_keys=True).encode(), "png": image, "txt": text.encode("utf-8")}
    for extension in sorted(members):
        info = tarfile.TarInfo(f"{key}.{extension}")
        info.size, info.mode, info.mtime = len(members[extension]), 0o644, 0
        tar.addfile(info, io.BytesIO(members[extension]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="directory to write pairs-*.tar into")
    parser.add_argument("--count", required=True, type=int, help="number of pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, some of {','.join(KINDS)}")
    args = parser.parse_args(argv)
    kinds = tuple(args.kinds.split(","))
    try:
        check_arguments(args.count, args.samples_per_shard, kinds)
    except ValueError as e:
        parser.error(str(e))
    stamp = {"count": args.count, "seed": args.seed, "samples_per_shard": args.samples_per_shard, "kinds": list(kinds),
             "python": sys.version}
    if done_before(args.output, stamp) is None:
        args.output.mkdir(parents=True, exist_ok=True)
        forget(args.output)
        shards = make_pairs(args.output, args.count, args.seed, args.samples_per_shard, kinds)
        mark_done(args.output, stamp, {"shards": len(shards)})

