"""Shared fixtures: a small real corpus (stdlib source) tokenized into shards once per session, and
a launcher for real multi-process runs under the deepspeed launcher (gloo, CPU)."""

from __future__ import annotations

import json
import os

# Triton decides at import and decoration time whether its kernels (its own standard library's
# too) run in the interpreter; deepspeed imports it, so this must come before any test module's
# imports for the kernel tests to run on CPU.
os.environ["TRITON_INTERPRET"] = "1"
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
SHARED_DATA = REPO.parent / "shared" / "data"

# A model small enough that 2-4 CPU processes run several steps in seconds.
TINY_MODEL = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=128",
    "training.lm.context_length=64", "training.lm.vocab_size=512", "training.jepa.embedding_dim=64",
    "training.scheduler.warmup_tokens=1024", "logging.log_every=1", "logging.tensorboard=false",
    "data.num_workers=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    # A process group made inside pytest (tests of single-process code) leaves its rendezvous
    # variables in os.environ; a child must start its own.
    launcher_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    # The virtualenv's editable install may point at another checkout; children import this one.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def launch(script: str, args: list[str], nproc: int, check: bool = True) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus nproc script args` (plain python for one process)."""
    if nproc == 1:
        return run([PYTHON, script, *args], check=check)
    return run([DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args], check=check)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """Tokenizer (vocab 512) and shards (context 64) built by the project's tools from stdlib code."""
    root = tmp_path_factory.mktemp("tiny_data")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # Training text and held-out text from different files.
    for split, files in (("train", sorted(stdlib.glob("[a-m]*.py"))[:40]), ("valid", sorted(stdlib.glob("[n-z]*.py"))[:4])):
        with (root / f"{split}.jsonl").open("w") as f:
            for path in files:
                f.write(json.dumps({"text": path.read_text(errors="replace"), "source": "stdlib_code"}) + "\n")
    run([PYTHON, "tools/train_tokenizer.py", "--input", str(root / "train.jsonl"), "--vocab-size", "512",
         "--output", str(root / "tokenizer.json")])
    for split, shards in (("train", "shards"), ("valid", "valid_shards")):
        run([PYTHON, "tools/build_shards.py", "--input", str(root / f"{split}.jsonl"), "--tokenizer",
             str(root / "tokenizer.json"), "--context-length", "64", "--samples-per-shard", "32",
             "--output", str(root / shards), "--workers", "2"])
    return {"tokenizer": str(root / "tokenizer.json"), "shards": str(root / "shards"),
            "valid_shards": str(root / "valid_shards")}


def tiny_overrides(tiny_data: dict, out_dir: Path) -> list[str]:
    sets = TINY_MODEL + [
        f"data.tokenizer={tiny_data['tokenizer']}", f"data.shards={tiny_data['shards']}",
        f"run.output_dir={out_dir}",
    ]
    return [arg for s in sets for arg in ("--set", s)]
