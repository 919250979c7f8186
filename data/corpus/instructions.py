"""Instruction-tuning chats for the curriculum's stage 4 (code editing tasks, multimodal QA; docs/design.md,
The curriculum), made offline from what every machine has:

    python tools/make_instructions.py --output DIR [--pairs PAIRS_DIR] [--count N] [--seed S]

- DIR/code_edits.jsonl: {"messages", "source": "code_edits"} chats over real functions of this machine's
  Python standard library. Each task is one of: fix a planted bug (a comparison or arithmetic operator
  swapped; the answer is the original function), or rename an identifier (the answer is the function
  with every occurrence renamed, token by token).
- DIR/vision_qa/: with --pairs (tools/make_vision_pairs.py's shards), the same images and texts with a
  "prompt" that fits the image's kind: the question, the text its answer. Written in the vision_text
  shard format, so tools/build_shards.py --source vision_text=DIR/vision_qa reads it.

tools/build_shards.py encodes a chat as `<|user|>question<|end|><|assistant|>answer<|end|>`: with
training.hybrid.instruction the LM loss covers the answer and its <|end|> only.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import random
import sys
import sysconfig
import tarfile
import tokenize
from pathlib import Path

from tqdm import tqdm

from cromwell.data.sources import vision_text
from cromwell.data.corpus.stamp import done_before, forget, mark_done

SWAPS = {"==": "!=", "!=": "==", "<": "<=", "<=": "<", ">": ">=", ">=": ">", "+": "-", "-": "+", "and": "or",
         "or": "and"}
QUESTIONS = {
    "code": "Transcribe the code in this screenshot.",
    "chart": "Write the matplotlib code that draws this chart.",
    "ui": "Write the HTML and CSS of this page.",
    "statement": "Write Python code that extracts this statement's figures.",
    "doc": "Write the LaTeX or Markdown that renders this.",
}
MAX_FUNCTION_CHARS = 1500


def chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def functions(stdlib: Path) -> list[str]:
    """Top-level functions of stdlib modules, as source text, short enough for a small context."""
    found = []
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                source = ast.get_source_segment(text, node)
                if source and 80 < len(source) <= MAX_FUNCTION_CHARS:
                    found.append(source)
    return found


def _tokens(source: str) -> list[tokenize.TokenInfo]:
    return list(tokenize.generate_tokens(io.StringIO(source).readline))


def plant_bug(source: str, rng: random.Random) -> str | None:
    """The function with one operator swapped, or None when it has none to swap."""
    tokens = _tokens(source)
    spots = [i for i, t in enumerate(tokens) if t.string in SWAPS and t.type in (tokenize.OP, tokenize.NAME)]
    if not spots:
        return None
    i = rng.choice(spots)
    tokens[i] = tokens[i]._replace(string=SWAPS[tokens[i].string])
    return tokenize.untokenize(tokens)


def local_names(source: str) -> list[str]:
    """The function's parameters and the names it assigns: renaming one of them everywhere in the
    function (attributes named alike aside) keeps its meaning."""
    function = ast.parse(source).body[0]
    names = {a.arg for a in ast.walk(function.args) if isinstance(a, ast.arg)}
    names |= {n.id for n in ast.walk(function) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return sorted(n for n in names if len(n) > 2)


def rename(source: str, rng: random.Random) -> tuple[str, str, str] | None:
    """(old name, new name, renamed function) for one of its local names, or None."""
    tokens = _tokens(source)
    names = local_names(source)
    if not names:
        return None
    old = rng.choice(names)
    new = f"{old}_{rng.choice(['value', 'item', 'renamed', 'new'])}"
    # A NAME token after a "." is an attribute, another object's name, not the local one.
    renamed = [t._replace(string=new) if t.type == tokenize.NAME and t.string == old
               and (i == 0 or tokens[i - 1].string != ".") else t for i, t in enumerate(tokens)]
    return old, new, tokenize.untokenize(renamed)


def code_edits(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = functions(Path(sysconfig.get_paths()["stdlib"]))
    chats = []
    with tqdm(total=count, desc="code edits", unit="chat") as bar:
        while len(chats) < count:
            source = rng.choice(pool)
            if rng.random() < 0.5:
                buggy = plant_bug(source, rng)
                if buggy is None or buggy == source:
                    continue
                chats.append(chat(f"Fix the bug in this function:\n```python\n{buggy}\n```",
                                  f"```python\n{source}\n```"))
            else:
                found = rename(source, rng)
                if found is None:
                    continue
                old, new, renamed = found
                chats.append(chat(f"Rename `{old}` to `{new}` in this function:\n```python\n{source}\n```",
                                  f"```python\n{renamed}\n```"))
            bar.update()
    return chats


def vision_qa(pairs: Path, output: Path) -> int:
    """Rewrite each pair shard with the text as a chat; returns the number of samples."""
    output.mkdir(parents=True, exist_ok=True)
    samples = 0
    for shard in tqdm(sorted(pairs.glob("*.tar")), desc="vision QA", unit="shard"):
        tmp = output / (shard.name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as out:
            for doc in vision_text.read(shard):
                key, ext = doc.metadata["key"], {"jpeg": "jpg"}.get(doc.metadata["image_format"],
                                                                     doc.metadata["image_format"])
                meta = {k: v for k, v in doc.metadata.items() if k not in ("key", "image_format")}
                meta["prompt"] = QUESTIONS.get(meta["kind"], "Describe this image.")
                for name, data in ((f"{key}.{ext}", doc.image), (f"{key}.txt", doc.text.encode()),
                                   (f"{key}.json", json.dumps(meta, sort_keys=True).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    out.addfile(info, io.BytesIO(data))
                samples += 1
        tmp.replace(output / shard.name)
    return samples


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--pairs", type=Path, help="tools/make_vision_pairs.py's output, for the vision QA chats")
    p.add_argument("--count", type=int, default=2000, help="code-edit chats")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    stamp = {"pairs": str(args.pairs), "count": args.count, "seed": args.seed, "python": sys.version}
    if done_before(args.output, stamp) is not None:
        return
    args.output.mkdir(parents=True, exist_ok=True)
    forget(args.output)
    path = args.output / "code_edits.jsonl"
    with open(path.with_suffix(".tmp"), "w") as f:
        for messages in code_edits(args.count, args.seed):
            f.write(json.dumps({"messages": messages, "source": "code_edits"}) + "\n")
    path.with_suffix(".tmp").replace(path)
    print(f"{args.count} code-edit chats -> {path}")
    qa = vision_qa(args.pairs, args.output / "vision_qa") if args.pairs else 0
    if args.pairs:
        print(f"{qa} vision QA chats -> {args.output / 'vision_qa'}")
    mark_done(args.output, stamp, {"code_edits": args.count, "vision_qa": qa})

