"""Write a jsonl corpus from this machine's Python standard library: the embedded default data.

    python tools/stdlib_corpus.py --output runs/tiny/corpus [--max-mb 8]

DIR/corpus.jsonl gets one {"text", "source", "path"} record per document: the stdlib's *.py
files (source "stdlib_code"; sorted, without site-packages and test/tests/idlelib directories,
up to --max-mb of code) and the prose of pydoc_data/topics.py, one document per topic (source
"stdlib_docs"). A second run with the same arguments on the same Python does nothing.
"""

import argparse
import ast
import json
import os
import sys
import sysconfig
import tokenize
from pathlib import Path

from tqdm import tqdm

from cromwell.data.corpus.stamp import done_before, forget, mark_done

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
TOPICS_FILE = Path("pydoc_data") / "topics.py"
CORPUS_NAME = "corpus.jsonl"


def stdlib_code_files(stdlib: Path) -> list[Path]:
    files = []
    for directory, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
        files += [Path(directory) / n for n in names if n.endswith(".py")]
    topics = stdlib / TOPICS_FILE
    return sorted((f for f in files if f != topics), key=lambda f: f.relative_to(stdlib).as_posix())


def topic_documents(stdlib: Path) -> list[tuple[str, str]]:
    """(topic name, prose) from pydoc_data/topics.py, read as a literal rather than imported so
    that it comes from the same stdlib directory as the code."""
    path = stdlib / TOPICS_FILE
    module = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in module.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            return sorted(ast.literal_eval(node.value).items())
    raise ValueError(f"{path} has no 'topics = {{...}}' assignment")


def write_corpus(output: Path, max_mb: float, stdlib: Path) -> dict:
    """Write output/corpus.jsonl; returns counts per source. Skips the work when done before."""
    args = {"stdlib": str(stdlib), "python": sys.version, "max_mb": max_mb}
    corpus = output / CORPUS_NAME
    counts = done_before(output, args)
    if counts is not None and corpus.is_file():
        return counts

    output.mkdir(parents=True, exist_ok=True)
    forget(output)
    budget = int(max_mb * 1024 * 1024)
    counts = {"stdlib_code": {"documents": 0, "bytes": 0}, "stdlib_docs": {"documents": 0, "bytes": 0}}
    unreadable = []
    tmp = corpus.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as out:

        def emit(text: str, source: str, path: str) -> None:
            out.write(json.dumps({"text": text, "source": source, "path": path}) + "\n")
            counts[source]["documents"] += 1
            counts[source]["bytes"] += len(text.encode("utf-8"))

        files = stdlib_code_files(stdlib)
        for path in tqdm(files, desc="stdlib code", unit="file"):
            try:
                # tokenize.open honours a file's coding declaration.
                with tokenize.open(path) as f:
                    text = f.read()
            except (SyntaxError, UnicodeDecodeError) as e:
                unreadable.append(f"{path}: {e}")
                continue
            if counts["stdlib_code"]["bytes"] + len(text.encode("utf-8")) > budget:
                break
            emit(text, "stdlib_code", str(path.relative_to(stdlib)))
        for name, prose in topic_documents(stdlib):
            emit(prose, "stdlib_docs", f"{TOPICS_FILE}:{name}")
    tmp.replace(corpus)
    mark_done(output, args, counts)

    code = counts["stdlib_code"]
    print(
        f"wrote {corpus}: {code['documents']} of {len(files)} code files ({code['bytes'] / 1e6:.1f} MB, "
        f"cap {max_mb} MB), {counts['stdlib_docs']['documents']} doc topics "
        f"({counts['stdlib_docs']['bytes'] / 1e6:.1f} MB)"
    )
    for line in unreadable:
        print(f"skipped unreadable file {line}")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="directory to write corpus.jsonl into")
    parser.add_argument("--max-mb", type=float, default=8.0, help="cap on the code text, in MiB")
    args = parser.parse_args(argv)
    if args.max_mb <= 0:
        parser.error(f"--max-mb must be positive, got {args.max_mb}")
    write_corpus(args.output, args.max_mb, Path(sysconfig.get_paths()["stdlib"]))

