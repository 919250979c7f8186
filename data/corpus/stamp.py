"""Generators that make `make train`'s data skip their work when rerun with the same arguments: the
arguments (and what the run produced) are written last, into a hidden file beside the output."""

import json
from pathlib import Path

STAMP_NAME = ".args.json"


def done_before(output: Path, args: dict) -> dict | None:
    """What the run that wrote `output` with exactly `args` recorded, or None (not done, or other args)."""
    stamp = output / STAMP_NAME
    if stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved["args"] == args:
            print(f"{output} already written with the same arguments; nothing to do")
            return saved["result"]
    return None


def forget(output: Path) -> None:
    """Before rewriting: a run cut short must not look done."""
    (output / STAMP_NAME).unlink(missing_ok=True)


def mark_done(output: Path, args: dict, result: dict) -> None:
    (output / STAMP_NAME).write_text(json.dumps({"args": args, "result": result}))
