"""A checkpoint outlives its layout (pretrain/checkpoint/relayout.py): one run, stopped after step 3 and then
resumed on another tensor x pipeline x data-parallel size and ZeRO stage every 10 steps, follows the
uninterrupted run's trajectory step for step; the converter carries the optimizer state of a full
checkpoint to another layout; the VL-JEPA moves with its EMA target; a curriculum stage hands its weights
on from ZeRO-3 to TP=2.

Tolerances, relative: 1e-5 on each step's loss (and its components), 5e-5 on its gradient norm. The
layouts add the same numbers in different orders (ZeRO's reduce-scatter, tensor-parallel all-reduces, the
pipeline's split of the model), so fp32 rounding differs from the reference's: over 150 steps and 15 moves
the loss differed by at most 9e-8, the gradient norm (a root of a sum of squares in which rounding does not
average out) by at most 4.3e-6. A resume that loses the AdamW moments is off by 3e-3 in the loss and 20% in
the gradient norm at the second step after it (test_an_export_restarts_the_moments_and_leaves_the_trajectory
shows this check catches that).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, launch, run, tiny_overrides, vl_sets

STOP, SEGMENT = 3, 10
TOLERANCE = 1e-5
GRAD_NORM_TOLERANCE = 5e-5
# One run moved across layouts: stopped after step 3, then resumed on the next layout every 10 steps. Every
# required move is one of these transitions (and a few more): DP 2 -> 1 and 1 -> 2 at ZeRO-1, -2 and -3,
# TP 2 -> 1, PP 2 -> 1 and 1 -> 2, TP2 x PP2 -> 1, and ZeRO-0 onto 2 ranks.
CHAIN = ["dp2_zero1", "dp1_zero1", "dp2_zero1", "dp2_zero2", "dp1_zero2", "dp2_zero2", "dp2_zero3", "dp1_zero3",
         "dp2_zero3", "tp2", "single", "pp2", "single", "tp2pp2", "single", "dp2_zero0"]
LM_STEPS = STOP + SEGMENT * (len(CHAIN) - 1)
VL_STEPS = STOP + SEGMENT
LM = ["training.batch_size=8", "training.micro_batch_size=2", f"training.train_steps={LM_STEPS}",
      "checkpoint.every_steps=1000", "data.num_workers=1"]


def _layouts(zero3_json: str) -> dict:
    """name: (processes, settings, how the trainer names the layout)."""
    zero3 = ["parallel.zero_stage=3", f"parallel.ds_config={zero3_json}"]
    return {
        "single": (1, ["parallel.zero_stage=0"], "TP1 x PP1 x DP1 ZeRO-0"),
        "dp2_zero0": (2, ["parallel.zero_stage=0"], "TP1 x PP1 x DP2 ZeRO-0"),
        "dp1_zero1": (1, ["parallel.zero_stage=1"], "TP1 x PP1 x DP1 ZeRO-1"),
        "dp2_zero1": (2, ["parallel.zero_stage=1"], "TP1 x PP1 x DP2 ZeRO-1"),
        "dp1_zero2": (1, ["parallel.zero_stage=2"], "TP1 x PP1 x DP1 ZeRO-2"),
        "dp2_zero2": (2, ["parallel.zero_stage=2"], "TP1 x PP1 x DP2 ZeRO-2"),
        "dp1_zero3": (1, zero3, "TP1 x PP1 x DP1 ZeRO-3"),
        "dp2_zero3": (2, zero3, "TP1 x PP1 x DP2 ZeRO-3"),
        "tp2": (2, ["parallel.tensor=2", "parallel.zero_stage=1"], "TP2 x PP1 x DP1 ZeRO-1"),
        "pp2": (2, ["parallel.pipeline=2", "parallel.zero_stage=1"], "TP1 x PP2 x DP1 ZeRO-1"),
        "tp2pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1"], "TP2 x PP2 x DP1 ZeRO-1"),
    }


def _lm(tiny_data, out: Path, nproc: int, sets: list[str], *extra: str, check: bool = True):
    args = ["--config", "pretrain/configs/tiny.yaml", *tiny_overrides(tiny_data, out),
            *[a for s in [*LM, *sets] for a in ("--set", s)], *extra]
    return launch("pretrain/train.py", args, nproc, check=check)


def _records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _assert_follows(reference: dict, resumed: dict, first: int, last: int, keys=("loss", "grad_norm")) -> None:
    """Steps first..last: the same samples and learning rate, losses and grad norm within the tolerances."""
    assert sorted(k for k in resumed if first <= k <= last) == list(range(first, last + 1))
    for step in range(first, last + 1):
        a, b = reference[step], resumed[step]
        assert a["data_fingerprint"] == b["data_fingerprint"] and a["tokens_seen"] == b["tokens_seen"], step
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12), step
        for key in keys:
            tolerance = GRAD_NORM_TOLERANCE if key == "grad_norm" else TOLERANCE
            assert b[key] == pytest.approx(a[key], rel=tolerance), f"step {step}: {key} {b[key]!r} vs {a[key]!r}"


@pytest.fixture(scope="module")
def lm_reference(tiny_data, tmp_path_factory) -> dict:
    """The uninterrupted run, on one process."""
    out = tmp_path_factory.mktemp("lm_reference")
    _lm(tiny_data, out, 1, ["parallel.zero_stage=0"])
    return _records(out)


@pytest.fixture(scope="module")
def stopped(tiny_data, zero3_json, tmp_path_factory):
    """folder -> a copy in it of a run on 2 ranks at ZeRO-1 stopped after step 3."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    nproc, sets, _ = _layouts(zero3_json)["dp2_zero1"]
    _lm(tiny_data, run_dir, nproc, sets, "--stop-after", str(STOP))
    return lambda out: shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("run.lock"))


def test_a_run_moved_across_layouts_follows_the_uninterrupted_one(tiny_data, zero3_json, lm_reference, tmp_path):
    layouts = _layouts(zero3_json)
    out = tmp_path / "run"
    nproc, sets, _ = layouts[CHAIN[0]]
    _lm(tiny_data, out, nproc, sets, "--stop-after", str(STOP))
    for before, after, stop in zip(CHAIN, CHAIN[1:], range(STOP + SEGMENT, LM_STEPS + 1, SEGMENT)):
        nproc, sets, name = layouts[after]
        proc = _lm(tiny_data, out, nproc, sets, "--resume", "--stop-after", str(stop))
        assert f"resharded from {layouts[before][2]} to {name}" in proc.stdout, proc.stdout[-3000:]
        _assert_follows(lm_reference, _records(out), stop - SEGMENT + 1, stop)


def _convert(*args: str) -> None:
    run([PYTHON, "tools/convert_ckpt.py", *args])


def test_an_export_restarts_the_moments_and_leaves_the_trajectory(tiny_data, lm_reference, stopped, tmp_path):
    """--to-deepspeed from the checkpoint itself carries the optimizer state to PP=2 and the run follows the
    reference; from a weights-only export it says the moments start from zero, the first step's loss is
    still the reference's (the same weights) and then the run leaves the trajectory: the check above
    would catch a resume that dropped the moments."""
    out = stopped(tmp_path / "run")
    end = ["--resume", "--stop-after", str(STOP + SEGMENT)]
    _convert("--to-deepspeed", "--checkpoint", str(out / "checkpoints"), "--out", str(tmp_path / "full"), "--pp", "2")
    launch("pretrain/train.py", ["--config", str(tmp_path / "full" / "run_config.yaml"), *end], 2)
    _assert_follows(lm_reference, _records(tmp_path / "full"), STOP + 1, STOP + SEGMENT)

    _convert("--checkpoint", str(out / "checkpoints"), "--out", str(tmp_path / "export"))
    proc = run([PYTHON, "tools/convert_ckpt.py", "--to-deepspeed", "--checkpoint", str(tmp_path / "export"),
                "--out", str(tmp_path / "zeroed")])
    assert "AdamW's moments start from zero" in proc.stderr
    launch("pretrain/train.py", ["--config", str(tmp_path / "zeroed" / "run_config.yaml"), *end], 1)
    zeroed = _records(tmp_path / "zeroed")
    assert zeroed[STOP + 1]["loss"] == pytest.approx(lm_reference[STOP + 1]["loss"], rel=TOLERANCE)
    worst = max(abs(zeroed[s]["loss"] / lm_reference[s]["loss"] - 1) for s in range(STOP + 2, STOP + SEGMENT + 1))
    assert worst > 100 * TOLERANCE, worst


def _vl(vl_data, out: Path, nproc: int, *sets: str, extra=()):
    args = ["--config", "pretrain/configs/tiny.yaml",
            *vl_sets(vl_data, out, f"training.train_steps={VL_STEPS}", "checkpoint.every_steps=100", *sets), *extra]
    return launch("pretrain/train.py", args, nproc)


def test_the_vljepa_with_its_ema_target_resumes_from_zero3_on_a_pipeline(vl_data, zero3_json, tmp_path):
    """The hybrid objective's EMA target moves with the model: ZeRO-3 on 2 ranks, then PP=2."""
    _vl(vl_data, tmp_path / "reference", 1, "parallel.zero_stage=0")
    out = tmp_path / "run"
    _vl(vl_data, out, 2, "parallel.zero_stage=3", f"parallel.ds_config={zero3_json}", extra=["--stop-after", str(STOP)])
    proc = _vl(vl_data, out, 2, "parallel.pipeline=2", "parallel.zero_stage=1", extra=["--resume"])
    assert "resharded from TP1 x PP1 x DP2 ZeRO-3 to TP1 x PP2 x DP1 ZeRO-1" in proc.stdout, proc.stdout[-3000:]
    reference = _records(tmp_path / "reference")
    assert reference[VL_STEPS]["jepa_vision"] > 0 and reference[VL_STEPS]["jepa_text"] > 0
    _assert_follows(reference, _records(out), STOP + 1, VL_STEPS, keys=("loss", "lm", "jepa_text", "jepa_vision", "grad_norm"))


def test_a_stage_at_zero3_hands_its_weights_to_a_stage_at_tp2(vl_data, zero3_json, tmp_path):
    """Stage 1 (JEPA only) at ZeRO-3 on 2 ranks, stage 2 (LM, the vision encoder and fusion frozen) at TP=2
    from its weights: what stage 2 froze is bit for bit what stage 1 left; what it trained moved."""
    first, second = tmp_path / "stage1", tmp_path / "stage2"
    _vl(vl_data, first, 2, "parallel.zero_stage=3", f"parallel.ds_config={zero3_json}", "training.train_steps=2",
        "training.hybrid.alpha=1.0", "training.hybrid.beta=0.0")
    proc = _vl(vl_data, second, 2, "parallel.tensor=2", "parallel.zero_stage=1", "training.train_steps=2",
               "training.hybrid.alpha=0.0", "training.hybrid.beta=1.0",
               "training.hybrid.freeze=[vision_encoder, cross_modal_fusion]", f"run.init_from={first / 'checkpoints'}")
    assert "started from the weights of" in proc.stdout, proc.stdout[-3000:]
    for stage in (first, second):
        _convert("--checkpoint", str(stage / "checkpoints"), "--out", str(stage / "export"))
    before, after = (load_file(stage / "export" / "model.safetensors") for stage in (first, second))
    frozen = [n for n in before if n.startswith(("vision_encoder.", "cross_modal_fusion.", "jepa_head."))]
    trained = [n for n in before if n.startswith(("language_encoder.", "autoregressive_head."))]
    assert frozen and trained
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    assert all(not torch.equal(before[n], after[n]) for n in trained if not n.endswith("vocab_padding"))


def test_a_resume_on_another_layout_refuses_a_damaged_checkpoint(tiny_data, stopped, tmp_path):
    """A file whose bytes changed (its size did not): the layout-free path checks every file's hash, as the
    same-layout path does, names the file and changes nothing."""
    out = stopped(tmp_path / "run")
    tag_dir = out / "checkpoints" / f"global_step{STOP}"
    optim = tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optim.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in tag_dir.iterdir()}
    proc = _lm(tiny_data, out, 1, ["parallel.zero_stage=0"], "--resume", check=False)
    assert proc.returncode != 0
    assert f"checkpoint {tag_dir} is corrupt: {optim.name} (sha256 differs)" in proc.stdout + proc.stderr
    assert {p.name: p.read_bytes() for p in tag_dir.iterdir()} == before
