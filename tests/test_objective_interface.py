"""The objective interface is the whole contract: an objective written outside pretrain/objectives/
(tests/dist/custom_objective_worker.py) trains through the loop, on one process and through a
two-stage pipeline, with the same losses."""

import json
import math

import pytest

from conftest import launch, tiny_overrides

STEPS = 3


def _metrics(tiny_data, tmp_path, name, nproc, sets):
    out = tmp_path / name
    args = ["--config", "pretrain/configs/tiny.yaml", *tiny_overrides(tiny_data, out),
            *[a for s in ["model.vocab_size=600", "training.batch_size=8", "training.micro_batch_size=2",
                          f"training.train_steps={STEPS}", "checkpoint.every_steps=100", *sets] for a in ("--set", s)]]
    launch("tests/dist/custom_objective_worker.py", args, nproc)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_an_objective_defined_outside_the_package_trains_on_one_rank_and_through_a_pipeline(tiny_data, tmp_path):
    single = _metrics(tiny_data, tmp_path, "single", 1, ["parallel.zero_stage=0"])
    piped = _metrics(tiny_data, tmp_path, "pp2", 2, ["parallel.pipeline=2", "parallel.zero_stage=1"])
    assert len(single) == len(piped) == STEPS
    for row in single:
        # Its own components, weighted as it declares them; near ln(vocab) for a fresh model.
        assert row["loss"] == pytest.approx(row["next"] + 0.5 * row["skip"], rel=1e-6)
        assert 5.0 < row["next"] < 8.0 and 5.0 < row["skip"] < 8.0 and row["next"] != row["skip"]
        assert "lm" not in row and math.isfinite(row["grad_norm"])
    assert single[-1]["loss"] < single[0]["loss"]
    for a, b in zip(single, piped):
        for key in ("loss", "next", "skip", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
