"""Shared fixtures: a small real corpus (stdlib source) tokenized into shards once per session, and
a launcher for real multi-process runs (gloo, CPU)."""

from __future__ import annotations

import importlib.util
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


def _triton_problem() -> str | None:
    """Why the kernels cannot run in Triton's interpreter here: make setup installs a Triton that can; a CPU-only
    torch brings none, and torch 2.11's Triton 3.6 cannot run beside NumPy 2.4 (model/kernels/dispatch.py)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (a CPU-only torch does not bring it): the kernels cannot run in its interpreter"
    import numpy
    import triton

    from cromwell.model.kernels.dispatch import interpreter_problem

    return interpreter_problem(triton.__version__, numpy.__version__)


TRITON_PROBLEM = _triton_problem()
HAS_TRITON = TRITON_PROBLEM is None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=TRITON_PROBLEM or "")


def pytest_collection_modifyitems(items):
    """Every case parametrized with impl="triton" needs Triton."""
    for item in items:
        if getattr(item, "callspec", None) and item.callspec.params.get("impl") == "triton":
            item.add_marker(needs_triton)


PYTHON = sys.executable
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
SHARED_DATA = REPO.parent / "shared" / "data"

# A model small enough that 2-4 CPU processes run several steps in seconds.
TINY_MODEL = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=128",
    "training.lm.context_length=64", "model.vocab_size=512", "model.predictor.embedding_dim=64",
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
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def launch(script: str, args: list[str], nproc: int, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc script args` (plain python for one process). torchrun, a launcher the
    project supports (the Slurm scripts use it), starts in a third of the deepspeed launcher's time, which
    imports DeepSpeed itself before it starts the ranks; the tests of the deepspeed launcher's own behaviour
    (tests/test_faults.py) start it themselves."""
    if nproc == 1:
        return run([PYTHON, script, *args], check=check)
    return run([TORCHRUN, "--nproc-per-node", str(nproc), "--master-port", str(free_port()), script, *args], check=check)


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


@pytest.fixture(scope="session")
def zero3_json(tmp_path_factory):
    """ds_configs/zero3.json with no parameter kept whole, so that every tensor of the tiny model
    (all below the default persistence threshold) is really partitioned."""
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_partition_all.json"
    path.write_text(json.dumps(ds))
    return str(path)


# The VL-JEPA (vision encoder, fusion, language model, both heads) at test size, trained by the
# hybrid objective on text and generated image -> code pairs.
VL = [
    "model.type=vljepa", "training.objective=hybrid", "model.hidden_size=64", "model.num_layers=2",
    "model.num_heads=4", "model.ffn_hidden_size=128", "model.vision.image_size=64", "model.vision.hidden_size=64",
    "model.vision.num_layers=2", "model.vision.num_heads=4", "model.vision.ffn_hidden_size=128",
    "model.fusion.every=1", "model.predictor.num_layers=1", "model.predictor.num_heads=4",
    "training.lm.context_length=64", "model.vocab_size=600", "model.predictor.embedding_dim=64",
    "training.jepa.span_length=8", "training.scheduler.warmup_tokens=1024", "training.batch_size=8",
    "training.micro_batch_size=2", "logging.log_every=1", "logging.tensorboard=false", "data.num_workers=0",
    "data.mixture={stdlib_code: 1, vision_text: 1}", "training.jepa.collapse.every_steps=1",
]


@pytest.fixture(scope="session")
def vl_data(tiny_data, tmp_path_factory):
    """The session's tokenizer, its stdlib text and 40 generated image -> code pairs, in one corpus (and
    the pairs alone as held-out shards)."""
    root = tmp_path_factory.mktemp("vl_data")
    data = Path(tiny_data["tokenizer"]).parent
    run([PYTHON, "tools/make_vision_pairs.py", "--output", str(root / "pairs"), "--count", "40",
         "--samples-per-shard", "20"])
    run([PYTHON, "tools/build_shards.py", "--input", str(data / "train.jsonl"), "--source",
         f"vision_text={root / 'pairs'}", "--tokenizer", tiny_data["tokenizer"], "--context-length", "64",
         "--samples-per-shard", "32", "--output", str(root / "shards"), "--workers", "2"])
    # Held out: the image pairs alone, so that a few validation micro batches surely hold images.
    run([PYTHON, "tools/build_shards.py", "--source", f"vision_text={root / 'pairs'}", "--tokenizer",
         tiny_data["tokenizer"], "--context-length", "64", "--samples-per-shard", "32", "--output",
         str(root / "valid_shards"), "--workers", "1"])
    return {"tokenizer": tiny_data["tokenizer"], "shards": str(root / "shards"), "valid_shards": str(root / "valid_shards")}


def vl_sets(vl_data, out, *more):
    return [a for s in [*VL, f"data.tokenizer={vl_data['tokenizer']}", f"data.shards={vl_data['shards']}",
                        f"run.output_dir={out}", *more] for a in ("--set", s)]


VL_STEPS = 3


def vl_parity_run(vl_data, root: Path, name: str, nproc: int, *more) -> dict:
    """parity_worker.py on the VL-JEPA: {"result": its JSON, "checkpoint": the global_step folder it saved}."""
    out = root / f"{name}.json"
    launch("tests/dist/parity_worker.py", ["--config", "pretrain/configs/tiny.yaml", *vl_sets(vl_data, root / name, *more),
                                           "--steps", str(VL_STEPS), "--out", str(out),
                                           "--save", str(root / name / "checkpoints")], nproc)
    return {"result": json.loads(out.read_text()), "checkpoint": root / name / "checkpoints" / f"global_step{VL_STEPS}"}


@pytest.fixture(scope="session")
def vl_layouts(vl_data, zero3_json, tmp_path_factory):
    """The same VL-JEPA, init and global batches trained 3 steps on one process and in each parallel
    layout, each saving a checkpoint: what the parity tests compare and checkpoint conversion reads."""
    root = tmp_path_factory.mktemp("vl_layouts")
    layouts = {
        "single": (1, ["parallel.zero_stage=0"]),
        "tp2": (2, ["parallel.tensor=2", "parallel.zero_stage=1"]),
        "zero3": (2, ["parallel.zero_stage=3", f"parallel.ds_config={zero3_json}"]),
        "pp2": (2, ["parallel.pipeline=2", "parallel.zero_stage=1"]),
        "tp2pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1"]),
    }
    return {name: vl_parity_run(vl_data, root, name, nproc, *more) for name, (nproc, more) in layouts.items()}
