"""The trainer treated as a flaky cluster and a careless user would treat it: stop signals, kill -9 at
random steps, a killed launcher, a save cut short, changed resumes, planted pickles, a huge LR, two
runs on one directory. Every interrupted run, once resumed, must equal an uninterrupted one bit for
bit: the same losses, gradient norms, learning rates and samples (data fingerprints)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import DEEPSPEED, PYTHON, REPO, free_port, launch, tiny_overrides

TOTAL, EVERY = 24, 6
KEYS = ("loss", "grad_norm", "lr", "tokens_seen", "data_fingerprint")


def _args(tiny_data, out_dir, extra=()) -> list[str]:
    sets = tiny_overrides(tiny_data, out_dir) + [
        "--set", "training.batch_size=8", "--set", "training.micro_batch_size=2",
        "--set", f"training.train_steps={TOTAL}", "--set", f"checkpoint.every_steps={EVERY}",
        "--set", "data.num_workers=1",  # the resumed position must survive the DataLoader worker too
    ]
    return ["pretrain/train.py", "--config", "pretrain/configs/tiny.yaml", *sets, *extra]


def _config(tiny_data, out_dir, sets=()):
    """The run config the trainer would build, for checks made in this process."""
    from cromwell.pretrain.config import load_config

    return load_config(REPO / "pretrain/configs/tiny.yaml", [a for a in _args(tiny_data, out_dir)[3:] if a != "--set"]
                       + list(sets))


def _train(tiny_data, out_dir, extra=(), nproc=2, check=True):
    script, *args = _args(tiny_data, out_dir, extra)
    return launch(script, args, nproc=nproc, check=check)


def _start(tiny_data, out_dir, extra=(), nproc=2) -> tuple[subprocess.Popen, Path]:
    """A run in its own process group, its output in a file (a pipe could fill and block it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir.parent / f"{out_dir.name}.{time.monotonic_ns()}.log"
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port())] if nproc > 1 else [PYTHON]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd + _args(tiny_data, out_dir, extra), cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _records(out_dir) -> dict:
    """step -> record; a resumed run's records replace those of the steps it redid."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return {r["step"]: r for r in rows}


def _wait_for_step(proc, out_dir, step: int, what: str) -> None:
    while max(_records(out_dir), default=0) < step:
        assert proc.poll() is None, f"{what} ended (rc {proc.returncode}) before step {step}"
        time.sleep(0.05)


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess):  # a process exiting as we look
        return ""


def _ranks(launcher: subprocess.Popen, with_workers: bool = False) -> list[psutil.Process]:
    """The training processes under a launcher (forked DataLoader workers share their command line)."""
    found = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "--local_rank" in _cmdline(p)]
    pids = {p.pid for p in found}
    return found if with_workers else [p for p in found if p.ppid() not in pids]


def _assert_same_run(out_dir, reference):
    got = _records(out_dir)
    assert sorted(got) == list(range(1, TOTAL + 1))
    for step, ref in reference.items():
        for key in KEYS:
            assert got[step][key] == ref[key], f"step {step}: {key} {got[step][key]!r} != {ref[key]!r}"


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("faults") / "reference"
    _train(tiny_data, out)
    records = _records(out)
    # Different steps read different samples, so equal fingerprints below mean the same samples.
    assert len({r["data_fingerprint"] for r in records.values()}) == TOTAL
    return out, records


def _shm_segments() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.mark.parametrize("how", ["SIGTERM to every rank", "SIGUSR1 to the launcher's process group"])
def test_stop_signal_checkpoints_the_current_step_and_resumes_bit_identically(tiny_data, tmp_path, reference, how):
    """What Slurm does before a time limit (SIGTERM to each task) or a preemption (--signal=USR1);
    the probe's SIGUSR1 to the group killed every process with no log line."""
    shm_before = _shm_segments()
    out = tmp_path / "signalled"
    proc, log = _start(tiny_data, out)
    _wait_for_step(proc, out, 2, "the run")
    ranks = _ranks(proc, with_workers=True)  # as Slurm does: every process of the job
    if how.startswith("SIGTERM"):
        for rank in ranks:
            rank.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGUSR1)  # the launchers die of it; the ranks stop and checkpoint
    proc.wait(timeout=300)
    psutil.wait_procs(ranks, timeout=300)
    output = log.read_text()
    name = how.split()[0]
    stopped = max(_records(out))
    assert f"{name}: stopped after step {stopped} of {TOTAL}" in output, output[-3000:]
    assert stopped < TOTAL
    assert (out / "checkpoints" / f"global_step{stopped}" / "complete.json").is_file()
    # DeepSpeed's CPU shared-memory transport is not used: a run leaves nothing in /dev/shm.
    assert not {s for s in _shm_segments() - shm_before if "deepspeed" in s}
    if how.startswith("SIGTERM"):  # the launchers died of SIGUSR1; resuming is the same either way
        assert proc.returncode == 0, output[-3000:]
        _train(tiny_data, out, ["--resume"])
        _assert_same_run(out, reference[1])


def test_sigkill_at_three_random_steps_then_resume_equals_an_uninterrupted_run(tiny_data, tmp_path, reference):
    """kill -9 of every process, at random points (during a save too, now and then)."""
    out = tmp_path / "soak"
    rng = random.Random(int(os.environ.get("SOAK_SEED", "0")))
    extra = ["--set", "checkpoint.every_steps=3"]  # a checkpoint interval may change on resume
    for i, step in enumerate(sorted(rng.sample(range(2, TOTAL - 2), 3))):
        # A kill before the first complete checkpoint leaves nothing to resume: start over.
        started = any((d / "complete.json").is_file() for d in (out / "checkpoints").glob("global_step*"))
        proc, log = _start(tiny_data, out, extra + ["--resume" if started else "--overwrite"])
        _wait_for_step(proc, out, step, f"attempt {i} ({log})")
        with contextlib.suppress(ProcessLookupError):  # on a slow poll the run may have ended already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _train(tiny_data, out, extra + ["--resume"])
    _assert_same_run(out, reference[1])


ASYNC = ["--set", "checkpoint.async=true", "--set", "checkpoint.every_steps=2"]


def _writing(ranks: list[psutil.Process]) -> bool:
    """Whether a rank's background checkpoint writer thread is running."""
    from cromwell.pretrain.checkpoint import WRITER_THREAD

    for rank in ranks:
        for comm in Path(f"/proc/{rank.pid}/task").glob("*/comm"):
            with contextlib.suppress(OSError):
                if comm.read_text().strip() == WRITER_THREAD:
                    return True
    return False


def _freeze_in_background_write(proc, out: Path, rng: random.Random) -> Path:
    """Stop every process of the run (SIGSTOP) at random moments until one finds a checkpoint being written
    behind training; return its folder, the run still frozen."""
    while True:
        time.sleep(rng.uniform(0, 0.02))
        assert proc.poll() is None, "the run ended before a background write was caught in flight"
        ranks = _ranks(proc)
        os.killpg(proc.pid, signal.SIGSTOP)
        if len(ranks) == 2 and _writing(ranks):
            partial = [d for d in (out / "checkpoints").glob("global_step*") if not (d / "complete.json").is_file()]
            assert len(partial) == 1, partial
            return partial[0]
        os.killpg(proc.pid, signal.SIGCONT)


def test_sigkill_during_background_writes_leaves_the_previous_checkpoint_and_resumes_bit_identically(
        tiny_data, tmp_path, reference):
    """checkpoint.async: kill -9 of every process while a checkpoint is written behind training, three
    times: that checkpoint stays invisible, `latest` names the one before, and the resumed run equals the
    uninterrupted (synchronously saving) one bit for bit."""
    from cromwell.pretrain.checkpoint import newest_complete, step_of

    out = tmp_path / "async"
    rng = random.Random(int(os.environ.get("SOAK_SEED", "0")))
    for attempt in range(3):
        started = any((d / "complete.json").is_file() for d in (out / "checkpoints").glob("global_step*"))
        proc, log = _start(tiny_data, out, ASYNC + ["--resume" if started else "--overwrite"])
        partial = _freeze_in_background_write(proc, out, rng)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (partial / "complete.json").is_file()
        newest, skipped = newest_complete(out / "checkpoints")
        assert newest is None or step_of(newest) < step_of(partial), (newest, partial)
        assert partial in [d for d, _ in skipped]
        if newest:
            assert (out / "checkpoints" / "latest").read_text() == newest.name
    _train(tiny_data, out, ASYNC + ["--resume" if newest else "--overwrite"])
    _assert_same_run(out, reference[1])


def test_sigterm_during_a_background_write_waits_for_it(tiny_data, tmp_path, reference):
    """A stop signal while a checkpoint is written behind training: the run completes that write, saves
    the step it stopped at, and exits cleanly; both checkpoints are complete and the run resumes."""
    out = tmp_path / "async_term"
    proc, log = _start(tiny_data, out, ASYNC)
    partial = _freeze_in_background_write(proc, out, random.Random(1))
    ranks = _ranks(proc)
    os.killpg(proc.pid, signal.SIGCONT)
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    stopped = max(_records(out))
    assert f"SIGTERM: stopped after step {stopped}" in output, output[-3000:]
    assert (partial / "complete.json").is_file()
    assert (out / "checkpoints" / f"global_step{stopped}" / "complete.json").is_file()
    _train(tiny_data, out, ["--resume"])
    _assert_same_run(out, reference[1])


def test_a_background_save_writes_the_files_a_synchronous_one_does(tiny_data, tmp_path, reference):
    """Bit for bit: every optimizer partition and RNG file; the model states too but for the run config
    saved inside them (checkpoint.async and the output folder differ)."""
    from cromwell.pretrain.checkpoint import safe_load

    out = tmp_path / "async_all"
    _train(tiny_data, out, ASYNC)
    sync, background = (d / "checkpoints" / f"global_step{TOTAL}" for d in (reference[0], out))
    names = sorted(p.name for p in sync.iterdir() if p.name != "complete.json")
    assert names == sorted(p.name for p in background.iterdir() if p.name != "complete.json")
    for name in names:
        if "model_states" in name:
            a, b = safe_load(sync / name), safe_load(background / name)
            a.pop("config"), b.pop("config")
            assert a.keys() == b.keys()
            for key in a:
                assert str(a[key]) == str(b[key]), key
            for (ka, ta), (kb, tb) in zip(a["module"].items(), b["module"].items()):
                assert ka == kb and (ta is None and tb is None or ta.equal(tb)), ka
        else:
            assert (sync / name).read_bytes() == (background / name).read_bytes(), name
    marker = json.loads((background / "complete.json").read_text())
    assert sorted(marker["files"]) == names


def test_a_save_cut_short_is_skipped_on_resume(tiny_data, tmp_path, reference):
    """The probe: rank 1 slowed while writing its partition, `latest` already naming the new step,
    then a kill. Without its marker the newest folder is invisible; resume takes the one before."""
    out = tmp_path / "cut"
    shutil.copytree(reference[0], out)
    newest = out / "checkpoints" / f"global_step{TOTAL}"
    (newest / "complete.json").unlink()
    partition = next(newest.glob("zero_pp_rank_1_*optim_states.pt"))
    partition.write_bytes(partition.read_bytes()[:1000])
    assert (out / "checkpoints" / "latest").read_text() == newest.name
    proc = _train(tiny_data, out, ["--resume"])
    assert f"skipping incomplete checkpoint {newest}: no complete.json" in proc.stdout + proc.stderr
    assert f"resumed from {out / 'checkpoints' / f'global_step{TOTAL - EVERY}'} (step {TOTAL - EVERY})" in proc.stdout
    _assert_same_run(out, reference[1])


def test_ranks_exit_when_their_launcher_is_killed(tiny_data, tmp_path):
    out = tmp_path / "orphans"
    proc, log = _start(tiny_data, out)
    _wait_for_step(proc, out, 2, "the run")
    ranks = _ranks(proc)
    assert len(ranks) == 2
    everything = _ranks(proc, with_workers=True)
    ranks[0].parent().kill()  # the launcher that started the ranks, alone
    gone, alive = psutil.wait_procs(everything, timeout=120)
    assert not alive, f"ranks still running: {alive}\n{log.read_text()[-3000:]}"
    assert "SIGHUP: stopped after step" in log.read_text()


def _copy_of(reference, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out, ignore=shutil.ignore_patterns("run.lock"))
    return out


def test_resume_applies_a_new_learning_rate_and_lists_the_change(tiny_data, tmp_path, reference):
    """The probe's hybrid schedule: the old peak LR scaled by the new schedule's ratio."""
    out = _copy_of(reference, tmp_path)
    shutil.rmtree(out / "checkpoints" / f"global_step{TOTAL}")
    proc = _train(tiny_data, out, ["--resume", "--set", "training.optimizer.lr=0.002",
                                   "--set", "training.scheduler.min_lr=0.0002"])
    assert "; training.optimizer.lr: 0.003 -> 0.002; training.scheduler.min_lr: 0.0001 -> 0.0002" in proc.stdout, proc.stdout[-2000:]
    from cromwell.pretrain.optim import lr_at

    cfg = _config(tiny_data, out, ["training.optimizer.lr=0.002", "training.scheduler.min_lr=0.0002"])
    records = _records(out)
    for step in (TOTAL - EVERY + 1, TOTAL - 2, TOTAL):
        assert records[step]["lr"] == pytest.approx(lr_at(step, cfg), rel=1e-9), step
    assert records[TOTAL]["lr"] == pytest.approx(0.0002)


def test_resume_refuses_a_changed_model_or_data_layout_listing_the_differences(tiny_data, reference):
    """The probe: a changed hidden size was 'truncated or incomplete', a changed micro batch a traceback."""
    from cromwell.pretrain.checkpoint import CheckpointError
    from cromwell.pretrain.trainer import _resume_point

    cfg = _config(tiny_data, reference[0], ["model.hidden_size=32", "training.batch_size=16"])
    with pytest.raises(CheckpointError) as e:
        _resume_point(cfg, dp_size=2)
    assert "these cannot change on resume:\n  model.hidden_size: 64 -> 32" in str(e.value)
    assert "change the data layout" in str(e.value) and "training.batch_size: 8 -> 16" in str(e.value)
    # Another split of the same global batch is fine for the data, and another layout for the state
    # (tests/test_relayout.py shows it continues the same trajectory).
    cfg = _config(tiny_data, reference[0], ["training.micro_batch_size=4"])
    assert "training.micro_batch_size: 2 -> 4" in _resume_point(cfg, dp_size=2)[1]
    cfg = _config(tiny_data, reference[0], ["parallel.tensor=2", "parallel.zero_stage=3"])
    changes = _resume_point(cfg, dp_size=1)[1]
    assert "data-parallel size: 2 -> 1" in changes and "parallel.tensor: 1 -> 2" in changes, changes
    with pytest.raises(CheckpointError, match=f"no complete checkpoint in {reference[0].parent / 'none'}"):
        _resume_point(_config(tiny_data, reference[0].parent / "none"), dp_size=2)


def test_a_planted_pickle_is_refused_and_never_runs(tiny_data, tmp_path, reference):
    out = _copy_of(reference, tmp_path)
    tag = out / "checkpoints" / f"global_step{TOTAL}"
    witness = tmp_path / "pwned"
    planted = tag / "rng_state_rank00000.pt"
    subprocess.run([PYTHON, "-c", f"""
import os, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch {witness}",))
torch.save({{"python": Evil()}}, "{planted}")
"""], check=True)
    # Whoever can plant a file can update the marker too: make the checkpoint look complete.
    from cromwell.pretrain.checkpoint import _sha256

    marker = json.loads((tag / "complete.json").read_text())
    marker["files"][planted.name] = {"size": planted.stat().st_size, "sha256": _sha256(planted)}
    (tag / "complete.json").write_text(json.dumps(marker))
    proc = _train(tiny_data, out, ["--resume"], check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"error: {planted}: refused to load, it holds pickled objects" in output, output[-3000:]
    assert not witness.exists()


def test_a_fresh_run_into_a_used_directory_is_refused_and_overwrite_starts_over(tiny_data, tmp_path, reference):
    from cromwell.pretrain.run_dir import RunDirError, release
    from cromwell.pretrain.trainer import _claim

    out = _copy_of(reference, tmp_path)
    cfg = _config(tiny_data, out)
    with pytest.raises(RunDirError, match=f"{out} already holds a run \\(checkpoints, metrics.jsonl"):
        _claim(cfg, resume=False, overwrite=False)
    assert len(_records(out)) == TOTAL  # nothing was touched
    release(_claim(cfg, resume=False, overwrite=True))
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_a_second_run_on_a_directory_in_use_is_refused(tiny_data, tmp_path, capsys):
    from cromwell.pretrain.run_dir import LOCK, RunDirError, _start_ticks, release
    from cromwell.pretrain.trainer import _claim

    out = tmp_path / "busy"
    out.mkdir()
    cfg = _config(tiny_data, out)
    holder = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(600)"])
    try:
        (out / LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid,
                                            "start_ticks": _start_ticks(holder.pid), "started": "earlier"}))
        with pytest.raises(RunDirError, match=f"{out} is in use by another run \\(pid {holder.pid} on host"):
            _claim(cfg, resume=False, overwrite=False)
    finally:
        holder.kill()
        holder.wait()
    # Its holder gone, the lock is stale: the next run takes it over.
    lock = _claim(cfg, resume=False, overwrite=False)
    assert "taking over" in capsys.readouterr().out
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release(lock)
    assert not lock.exists()


def test_divergence_stops_the_run_with_an_error(tiny_data, tmp_path):
    """The probe: a huge LR, every step skipped by DeepSpeed's overflow check, and 'finished'."""
    out = tmp_path / "diverged"
    proc = _train(tiny_data, out, ["--set", "training.optimizer.lr=1e30", "--set", "training.scheduler.warmup_steps=0",
                                   "--set", "training.scheduler.type=constant"], nproc=1, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "steps in a row" in output and "finished" not in output
    assert not math.isfinite(_records(out)[max(_records(out))]["grad_norm"])


def test_a_corrupt_checkpoint_file_is_named(tiny_data, tmp_path, reference):
    out = _copy_of(reference, tmp_path)
    states = next((out / "checkpoints" / f"global_step{TOTAL}").glob("mp_rank_00_model_states.pt"))
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, so the marker's sizes match: the checksum must catch it
    states.write_bytes(bytes(data))
    proc = _train(tiny_data, out, ["--resume"], check=False)
    assert proc.returncode != 0
    assert f"checkpoint {states.parent} is corrupt: {states.name} (sha256 differs)" in proc.stderr


def test_a_stale_extension_build_lock_is_named(tmp_path, capsys):
    """A build killed half-way left its lock; every later load of that op waited on it forever."""
    from cromwell.pretrain.distributed import _warn_about_stale_build_locks

    stale, busy = tmp_path / "py311_cpu" / "cpu_adam" / "lock", tmp_path / "py311_cpu" / "fused_adam" / "lock"
    for lock in (stale, busy):
        lock.parent.mkdir(parents=True)
        lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    _warn_about_stale_build_locks(tmp_path)
    out = capsys.readouterr().out
    assert f"warning: {stale} is 60 minutes old" in out and str(busy) not in out
