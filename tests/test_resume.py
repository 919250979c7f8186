"""A 2-rank run stopped after step k and resumed continues bit-identically: the same losses, gradient
norms, learning rates and the very same samples (data fingerprints) as an uninterrupted run."""

import json


from conftest import launch, tiny_overrides

TOTAL, STOP = 6, 3


def _train(tiny_data, out_dir, extra=(), check=True, nproc=2):
    sets = tiny_overrides(tiny_data, out_dir) + [
        "--set", "training.batch_size=8", "--set", "training.micro_batch_size=2",
        "--set", f"training.train_tokens={TOTAL * 8 * 64}", "--set", "checkpoint.every_steps=100",
        "--set", "data.num_workers=1",  # the resumed position must survive the DataLoader worker too
    ]
    return launch("pretrain/train.py", ["--config", "pretrain/configs/tiny.yaml", *sets, *extra], nproc=nproc, check=check)


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_stopped_and_resumed_run_is_bit_identical(tiny_data, tmp_path):
    _train(tiny_data, tmp_path / "full")
    _train(tiny_data, tmp_path / "split", ["--stop-after", str(STOP)])
    assert [r["step"] for r in _records(tmp_path / "split")] == list(range(1, STOP + 1))
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text() == f"global_step{STOP}"
    _train(tiny_data, tmp_path / "split", ["--resume"])

    full, split = _records(tmp_path / "full"), _records(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, TOTAL + 1))
    for a, b in zip(full, split):
        for key in ("loss", "grad_norm", "lr", "tokens_seen", "data_fingerprint"):
            assert a[key] == b[key], f"step {a['step']}: {key} {a[key]!r} != {b[key]!r}"
    # Different steps read different samples, so equal fingerprints mean the same samples.
    assert len({r["data_fingerprint"] for r in full}) == TOTAL
    assert (tmp_path / "split" / "loss_curve.png").stat().st_size > 0


def test_resume_without_checkpoint_names_the_directory(tiny_data, tmp_path):
    proc = _train(tiny_data, tmp_path / "empty", ["--resume"], check=False, nproc=1)
    assert proc.returncode != 0
    assert f"no checkpoint in {tmp_path / 'empty' / 'checkpoints'}" in proc.stdout + proc.stderr


def test_truncated_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    out = tmp_path / "trunc"
    _train(tiny_data, out, ["--stop-after", "1"], nproc=1)
    states = sorted((out / "checkpoints" / "global_step1").glob("*model_states.pt"))
    assert states
    data = states[0].read_bytes()
    states[0].write_bytes(data[: len(data) // 3])
    proc = _train(tiny_data, out, ["--resume"], check=False, nproc=1)
    assert proc.returncode != 0
    assert "global_step1 is unreadable" in proc.stdout + proc.stderr
