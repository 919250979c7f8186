"""A tokenizer for benchmarks whose figures do not depend on the text: trained by the project's own tool on a
few standard-library files (what every machine has)."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stdlib_tokenizer(root: Path) -> Path:
    """root/tokenizer.json (vocabulary 512), trained on ten standard-library modules written to root/corpus.jsonl."""
    corpus = root / "corpus.jsonl"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus.write_text("".join(json.dumps({"text": p.read_text(errors="replace")}) + "\n"
                              for p in sorted(stdlib.glob("[a-c]*.py"))[:10]))
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", str(corpus), "--vocab-size", "512",
                    "--output", str(root / "tokenizer.json")], cwd=ROOT, check=True, capture_output=True)
    return root / "tokenizer.json"
