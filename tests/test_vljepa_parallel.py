"""The VL-JEPA under parallelism, in real multi-process runs (deepspeed launcher, gloo, CPU): the full
model with images gives the hybrid loss, its components and the gradient norm of one process with
TP=2, with ZeRO-3 on 2 ranks, with PP=2 and with TP=2 x PP=2 on 4 ranks (the target activations travelling beside the online ones);
the EMA target update is exact there (m * before + (1 - m) * the online weights, gathered under
ZeRO-3, each stage's own layers under PP, bit for bit) and the same on every data-parallel rank. Then the trainer:
a mixed batch (rows with and without an image) trains, the collapse monitor can stop a run, and the
curriculum hands weights from stage to stage and skips finished stages.

Tolerance as in test_parallel_parity.py: 1e-4 relative over 3 steps (fp32, other reduction orders).
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import VL, launch, vl_sets as sets
from test_parallel_parity import _assert_same

def test_one_process_trains_every_component_and_moves_the_ema(vl_layouts):
    baseline = vl_layouts["single"]["result"]
    first, last = baseline["losses"][0], baseline["losses"][-1]
    assert first["lm"] > 5.0 and first["jepa_text"] > 0 and first["jepa_vision"] > 0  # images really in the batch
    assert last["loss"] < first["loss"]
    assert baseline["ema_exact"] and baseline["ema_moved"]


@pytest.mark.parametrize("name", ["tp2", "zero3", "pp2", "tp2pp2"])
def test_parallel_layouts_match_one_process(vl_layouts, name):
    result, baseline = vl_layouts[name]["result"], vl_layouts["single"]["result"]
    _assert_same(result, baseline)
    for key in ("jepa_text", "jepa_vision", "lm"):
        assert [s[key] for s in result["losses"]] == pytest.approx([s[key] for s in baseline["losses"]], rel=1e-4)
    assert result["ema_exact"] and result["ema_same_on_data_parallel_ranks"] and result["ema_moved"]


def test_the_collapse_monitor_can_stop_a_run(vl_data, tmp_path):
    proc = launch("pretrain/train.py", ["--config", "pretrain/configs/tiny.yaml",
                                        *sets(vl_data, tmp_path / "run", "parallel.zero_stage=0",
                                              "training.train_steps=4", "training.jepa.collapse.min_rank=1000",
                                              "training.jepa.collapse.stop=true")], 1, check=False)
    assert proc.returncode != 0
    assert "representation collapse at step 1" in proc.stderr
    assert "target embeddings' effective rank" in proc.stdout  # the loud warning, with what fell below what


def curriculum_file(vl_data, tmp_path, steps=3) -> Path:
    """stage1_jepa then stage2_lm (pure LM: the ViT, fusion and JEPA head frozen) on the tiny model."""
    tokens = steps * 8 * 64
    common = [*VL[2:], "parallel.tensor=1", "parallel.zero_stage=0", "training.scheduler.warmup_tokens=0",
              f"data.tokenizer={vl_data['tokenizer']}", f"data.shards={vl_data['shards']}",
              "checkpoint.every_steps=100"]
    path = tmp_path / "curriculum.yaml"
    path.write_text(json.dumps({
        "output_dir": str(tmp_path / "curriculum"), "total_tokens": 2 * tokens, "set": common,
        "stages": [{"name": "one", "config": "pretrain/configs/stage1_jepa.yaml", "tokens": 0.5,
                    "set": ["training.optimizer.lr=1e-3", "training.scheduler.min_lr=1e-4",
                            "validation.every_steps=3", "validation.micro_batches=2",
                            f"data.valid_shards={vl_data['valid_shards']}"]},
                   {"name": "two", "config": "pretrain/configs/stage2_lm.yaml", "tokens": 0.5,
                    "set": ["training.optimizer.lr=5e-4", "training.scheduler.min_lr=2e-4",
                            "data.mixture={stdlib_code: 1}"]}]}))
    return path


def module_weights(tag_dir: Path) -> dict:
    from cromwell.pretrain.checkpoint import safe_load

    return safe_load(tag_dir / "mp_rank_00_model_states.pt")


def test_the_curriculum_hands_weights_on_and_skips_finished_stages(vl_data, tmp_path):
    from cromwell.pretrain.config import load_curriculum, stage_configs
    from cromwell.pretrain.optim import lr_at

    path = curriculum_file(vl_data, tmp_path)
    out = launch("pretrain/curriculum.py", ["--curriculum", str(path)], 1).stdout
    assert "== stage one: starting" in out and "== stage two: starting" in out
    assert "loss curve" in out and (tmp_path / "curriculum" / "loss_curve.png").stat().st_size > 10_000
    one, two = (tmp_path / "curriculum" / n / "checkpoints" / "global_step3" for n in ("one", "two"))
    a, b = module_weights(one), module_weights(two)
    # Stage two starts from stage one's final weights: what it freezes is still exactly stage one's,
    # what it trains has moved on.
    vision = [k for k, v in a["module"].items() if k.startswith("model.1.") and v is not None]  # a ViT block
    assert vision and all(torch.equal(a["module"][k], b["module"][k]) for k in vision)
    assert not torch.equal(a["module"]["model.5.word.weight"], b["module"]["model.5.word.weight"])
    # ...with a fresh optimizer (its own step count) and its own learning rates, from its peak to its floor.
    steps = {int(s["step"]) for s in b["optimizer"]["state"].values()}
    assert steps == {3}
    cfg_two = stage_configs(load_curriculum(path), [])[1]
    rows = [json.loads(line) for line in (tmp_path / "curriculum" / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(k, cfg_two) for k in (1, 2, 3)])
    assert rows[-1]["lr"] == pytest.approx(2e-4)
    assert "started from the weights of" in out
    # Evaluation during training: held-out perplexity and JEPA MSE, logged like the training metrics.
    first = json.loads((tmp_path / "curriculum" / "one" / "metrics.jsonl").read_text().splitlines()[-1])
    assert first["val_jepa_text"] > 0 and first["val_jepa_vision"] > 0 and first["val_ppl"] > 1
    assert first["val_jepa_mse"] > 0 and -1 <= first["val_jepa_cosine"] <= 1 and first["val_jepa_rank"] >= 1
    # Each stage's checkpoint evaluates (tools/evaluate.py), the LM stage's too though it saved no EMA target.
    report = tmp_path / "report.json"
    launch("tools/evaluate.py", ["--checkpoint", f"one={one.parent}", "--checkpoint", f"two={two.parent}", "--tasks",
                                 "perplexity,jepa_mse", "--valid-shards", vl_data["valid_shards"], "--out", str(report)], 1)
    scores = json.loads(report.read_text())
    assert all(scores[n]["perplexity"]["ppl"] > 1 and scores[n]["jepa_mse"]["jepa_mse"] > 0 for n in ("one", "two"))
    # Rerun: both stages are finished, nothing is trained or rewritten.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "curriculum").rglob("*") if p.is_file()
              and p.suffix != ".png"}
    again = launch("pretrain/curriculum.py", ["--curriculum", str(path)], 1).stdout
    assert "== stage one: finished" in again and "== stage two: finished" in again
    assert {p: p.stat().st_mtime_ns for p in before} == before
