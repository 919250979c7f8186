"""The one training loop as a user meets it through pretrain/train.py: Step-JEPA trains and resumes
bit-exactly through it, the validation loop, non-finite steps, Weights & Biases, seeding, and the
launcher port of `make train`."""

import json
import math
import random
import shutil
import socket
import subprocess

import numpy as np
import pytest
import torch

from conftest import DEEPSPEED, PYTHON, REPO, free_port, launch, run, tiny_overrides


def _args(tiny_data, out, sets=()):
    return ["--config", "pretrain/configs/tiny.yaml", *tiny_overrides(tiny_data, out),
            *[a for s in ["training.batch_size=8", "training.micro_batch_size=2", *sets] for a in ("--set", s)]]


def _train(tiny_data, out, sets=(), extra=(), nproc=1):
    return launch("pretrain/train.py", _args(tiny_data, out, sets) + list(extra), nproc)


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


CHATS = [("lines with the string 'dog'", "Find dog.\n\nThen .*dog.*"),
         ("lines ending with a vowel", "A vowel ends it.\n\nSo .*[AEIOUaeiou]"),
         ("lines with a number", ".*[0-9].*"),
         ("lines starting with the word 'cat'", "Start with cat.\n\nThen anything.\n\ncat.*")]


def test_step_jepa_through_the_trainer_resumes_bit_identically(tiny_data, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{u} ({i})"},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                             for i in range(5) for u, a in CHATS))
    sets = ["training.objective=step_jepa", f"data.chats={chats}", "training.step_jepa.mode=multistep",
            "training.step_jepa.jepa_weight=1.0", "training.batch_size=4", "training.micro_batch_size=1",
            "training.train_steps=6", "checkpoint.every_steps=100"]
    _train(tiny_data, tmp_path / "full", sets, nproc=2)
    _train(tiny_data, tmp_path / "split", sets, ["--stop-after", "3"], nproc=2)
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text() == "global_step3"
    _train(tiny_data, tmp_path / "split", sets, ["--resume"], nproc=2)
    full, split = _records(tmp_path / "full"), _records(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 7)) and full[0]["jepa"] > 0
    for a, b in zip(full, split):
        for key in ("loss", "lm", "jepa", "grad_norm", "lr", "tokens_seen", "data_fingerprint"):
            assert a[key] == b[key], f"step {a['step']}: {key} {a[key]!r} != {b[key]!r}"
    assert len({r["data_fingerprint"] for r in full}) == 6


def test_unreadable_samples_are_skipped_counted_and_training_goes_on(tiny_data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_data["shards"], shards)
    lost = sorted((shards / "stdlib_code").glob("shard-*.tar"))[::2]
    for path in lost:
        path.unlink()
    out = tmp_path / "skip"
    proc = _train(tiny_data, out, [f"data.shards={shards}", "data.on_error=skip", "training.train_steps=4"])
    records = _records(out)
    skipped = [r["data_skipped_samples"] for r in records]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in records)
    assert skipped == sorted(skipped) and skipped[-1] > 0
    assert any(f"skipped a sample (data.on_error=skip): shard {path} does not exist" in proc.stderr for path in lost)
    state = torch.load(out / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["data_skipped_samples"] == skipped[-1]


def test_validation_loop_logs_and_checkpoints_held_out_loss(tiny_data, tmp_path):
    out = tmp_path / "val"
    _train(tiny_data, out, ["validation.every_steps=2", "validation.micro_batches=3",
                            f"data.valid_shards={tiny_data['valid_shards']}", "training.train_steps=4"])
    records = _records(out)
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    last = records[-1]
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_lm"])) and last["val_loss"] == last["val_lm"]
    state = torch.load(out / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["eval_metrics"] == {k: v for k, v in last.items() if k.startswith("val_")}
    assert (out / "loss_curve.png").stat().st_size > 0


def test_validation_reads_the_same_batches_every_time(tiny_data, tmp_path):
    """With the learning rate at 0 and the training shards as held-out data, validation at any step
    is the loss of the first training step: it reads the stream's first micro batches every time,
    weighted as the training step weighs them."""
    out = tmp_path / "lr0"
    _train(tiny_data, out, ["validation.every_steps=2", "validation.micro_batches=4", "training.optimizer.lr=0",
                            "training.scheduler.min_lr=0", f"data.valid_shards={tiny_data['shards']}",
                            "training.train_steps=4"])
    records = _records(out)
    assert records[1]["val_loss"] == pytest.approx(records[0]["loss"], rel=1e-6)
    assert records[3]["val_loss"] == records[1]["val_loss"]
    assert records[0]["loss"] != records[1]["loss"]  # training moved on to other batches


@pytest.mark.parametrize("nproc,zero", [(1, 0), (2, 1)])
def test_non_finite_steps_are_skipped_and_a_streak_stops_the_run(tiny_data, tmp_path, nproc, zero):
    """NaN losses at steps 2-3 (rank 0 only) are skipped on every rank and training goes on; three in
    a row at 6-8 stop the run with an error that names the last good checkpoint. ZeRO-0 is the
    trainer's own check, ZeRO-1 DeepSpeed's."""
    out = tmp_path / "nan"
    args = _args(tiny_data, out, [f"parallel.zero_stage={zero}", "training.train_steps=10",
                                  "checkpoint.every_steps=4", "training.max_nonfinite_steps=3"])
    env = ["env", "NAN_STEPS=2,3,6,7,8", f"ACCUM={4 // nproc}"]
    cmd = [PYTHON] if nproc == 1 else [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port())]
    proc = run(env + cmd + ["tests/dist/nonfinite_worker.py", *args], check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "3 steps in a row (the last: step 8)" in output, output[-3000:]
    assert f"the last good checkpoint is {out / 'checkpoints' / 'global_step4'}" in output
    records = {r["step"]: r for r in _records(out)}
    assert sorted(records) == list(range(1, 9))
    assert [records[s]["nonfinite_steps"] for s in range(1, 9)] == [0, 1, 2, 2, 2, 3, 4, 5]
    # A skipped step leaves weights and schedule alone: the LR does not move, and the steps after
    # the streak train on finite weights.
    assert records[1]["lr"] == records[2]["lr"] == records[3]["lr"] != records[4]["lr"]
    assert all(math.isfinite(records[s]["loss"]) for s in (1, 4, 5))
    assert not any(math.isfinite(records[s]["grad_norm"]) for s in (2, 3))


def test_wandb_offline_logs_without_network(tiny_data, tmp_path):
    pytest.importorskip("wandb", reason="wandb is optional (an offline install leaves it out)")
    out = tmp_path / "wb"
    _train(tiny_data, out, ["logging.wandb.enabled=true", "logging.wandb.mode=offline", "training.train_steps=2"])
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    for key in (b"data_fingerprint", b"grad_norm", b"mfu", b"tokens_per_s"):
        assert key in data


def test_seed_everything_seeds_python_numpy_and_torch():
    from cromwell.pretrain.trainer import seed_everything

    draws = []
    for seed in (7, 7, 8):
        seed_everything(seed)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
    assert draws[0] == draws[1] and all(a != b for a, b in zip(draws[0], draws[2]))


def test_make_train_launches_on_a_free_port():
    """`make train` must not clash with another distributed job on the launcher's default 29500."""
    ports = []
    for _ in range(2):
        cmd = subprocess.run(["make", "-n", "train"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        line = next(line for line in cmd.splitlines() if "--master_port" in line)
        ports.append(int(line.split("--master_port")[1].split()[0]))
    for port in ports:
        assert port != 29500
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when make chose it
