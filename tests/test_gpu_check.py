"""`make gpu-check` on a machine without CUDA: every check reported skipped with its reason, nothing heavy
run, exit 0; and the arithmetic its report rests on."""

import json
import os
import subprocess

import pytest

from cromwell.bench import gpu_check
from conftest import PYTHON, REPO, needs_triton


def test_without_cuda_every_check_is_skipped_with_a_reason_and_the_command_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([PYTHON, "bench/gpu_check.py", "--out", str(tmp_path / "report.json"), "--data",
                           str(tmp_path / "data"), "--work", str(tmp_path / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["checks"]) == ["kernels", "train_gpt", "train_vljepa", "decode", "bf16_vs_fp32"]
    for name, check in report["checks"].items():
        assert check["status"] == "skipped" and "no CUDA device" in check["reason"], name
        assert f"check {name}: skipped (no CUDA device" in proc.stdout
    assert report["gpu"] is None and report["results"] == {} and report["targets"] == {}
    assert "RESULT" not in proc.stdout
    assert not (tmp_path / "data").exists() and not (tmp_path / "work").exists()  # nothing heavy ran
    # The planner's predictions need no GPU: a 1.1B GPT's bf16 ZeRO-1 states alone are 16 bytes per
    # parameter (weights 2, gradients 2, fp32 master 4, AdamW moments 8), 17 GiB.
    assert report["planned_peak_bytes"]["train_gpt"] > 16 * 1.1e9
    assert report["planned_peak_bytes"]["train_vljepa"] > 0


def test_only_an_unknown_check_is_refused(tmp_path):
    proc = subprocess.run([PYTHON, "bench/gpu_check.py", "--only", "kernels,warp_speed", "--out",
                           str(tmp_path / "r.json")], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=os.environ)
    assert proc.returncode == 2 and "unknown checks ['warp_speed']" in proc.stderr


def _rows(losses, mfus):
    return [{"loss": loss, "mfu": mfu, "tflops_per_device": 1000 * mfu, "tokens_per_s": 10.0 * (i + 1),
             "step_time_s": 1.0, "nonfinite_steps": 0, "peak_mem_gb": 1.0 + i}
            for i, (loss, mfu) in enumerate(zip(losses, mfus))]


def test_a_run_is_summarised_after_its_warm_up_steps():
    rows = _rows([10.0, 9.5, 9.0, 8.8, 8.6, 8.4, 8.2, 8.0], [0.05, 0.2, 0.3, 0.41, 0.45, 0.40, 0.44, 0.43])
    run = gpu_check.summarize_run(rows, warmup=3)
    assert run["mfu"] == pytest.approx(0.43)  # median of the five steps after the warm-up
    assert run["tokens_per_s"] == pytest.approx(60.0)
    assert run["last_loss"] == pytest.approx((8.8 + 8.6 + 8.4 + 8.2 + 8.0) / 5)
    assert run["loss_falls"] and run["peak_memory_bytes"] == 8 * 2**30
    flat = gpu_check.summarize_run(_rows([10.0] * 8, [0.4] * 8), warmup=3)
    assert not flat["loss_falls"]
    with pytest.raises(ValueError, match="3 steps logged"):
        gpu_check.summarize_run(rows[:3], warmup=3)


def test_targets_are_judged_by_their_direction():
    met = gpu_check.targets_met({"mfu_gpt_1b": 0.44, "plan_memory_error_gpt": -0.08,
                                 "plan_memory_error_vljepa": 0.12, "ce_triton_vs_torch_time": 1.1})
    assert {k: v["met"] for k, v in met.items()} == {"mfu_gpt_1b": False, "plan_memory_error_gpt": True,
                                                     "plan_memory_error_vljepa": False,
                                                     "ce_triton_vs_torch_time": True}


@needs_triton
def test_the_kernel_agreement_check_passes_the_kernels_and_catches_a_wrong_one(monkeypatch):
    """The same comparison as on the GPU, here through Triton's interpreter at a small shape."""
    agreement, problems = gpu_check.kernel_agreement("cpu", ce_shape=(37, 16, 300), mse_shape=(50, 16))
    assert problems == []
    assert set(agreement) == {"cross_entropy_float32", "cross_entropy_bfloat16", "masked_mse_float32",
                              "masked_mse_bfloat16"}
    from cromwell.bench import kernels

    fused = kernels.fused_ce("triton")
    monkeypatch.setattr(kernels, "fused_ce", lambda impl: lambda h, w, t: fused(h, 1.01 * w, t))
    _, problems = gpu_check.kernel_agreement("cpu", ce_shape=(37, 16, 300), mse_shape=(50, 16))
    assert problems and all(p.startswith("cross_entropy") for p in problems)


def test_the_decode_check_runs_at_test_size_on_cpu_and_its_report_reads_back():
    result = gpu_check.check_decode("cpu", size=(64, 2, 4, 512), batches=(1, 4), tokens=8)
    assert result["hbm_bound_batch1"] is None  # no datasheet bandwidth for a CPU
    checks = json.loads(json.dumps({"decode": {**result, "status": "passed"}}))  # as a child hands it over
    figures = gpu_check.headline(checks)
    assert set(figures) == {"decode_tokens_per_s_b1", "decode_tokens_per_s_b4"}
    assert figures["decode_tokens_per_s_b4"] == result["rates"]["4"]["cached_tokens_per_s"] > 0


@pytest.mark.parametrize("name", ["train_gpt", "train_vljepa"])
def test_the_training_configs_train_through_the_check_at_test_size(name, vl_data, tmp_path):
    """What train_gpt and train_vljepa run on the GPU, shrunk (the model, context 64, fp32) for a CPU: the
    configs load and train, the metrics are read back, nothing is compiled, no checkpoint is kept."""
    from conftest import VL

    small = [s for s in VL if not s.startswith(("model.type", "training.objective", "data.mixture", "logging"))]
    small += ["data.mixture={stdlib_code: 1}" if name == "train_gpt" else "data.mixture={stdlib_code: 1, vision_text: 1}"]
    sets = small + ["training.train_steps=5", "training.precision=fp32", "data.num_workers=0"]
    rows, compiled = gpu_check.train(gpu_check.CONFIGS[name], vl_data, tmp_path / name, sets, timeout=600)
    run = gpu_check.summarize_run(rows)
    assert run["steps"] == 5 and run["nonfinite_steps"] == 0 and compiled == []
    assert any(key.startswith("jepa") for key in rows[0]) == (name == "train_vljepa")
    assert not (tmp_path / name / "checkpoints").exists() or not any((tmp_path / name / "checkpoints").iterdir())
