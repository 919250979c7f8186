"""The Slurm scripts (slurm/) on a real two-node Slurm cluster (tests/slurm_cluster.py: slurmctld and two
slurmd, each in its own network namespace and hostname): every job below is `sbatch`ed exactly as a
user would, with 2 nodes x 1 task on CPU (gloo), one torchrun per node rendezvousing across the bridge.

- The four curriculum stages, submitted by slurm/submit_curriculum.sh from a tiny curriculum file,
  run one after another (afterok dependencies, each from its predecessor's final checkpoint); each
  completes with its loss falling and its checkpoint written, and both nodes' hostnames in its log.
- slurm/step_jepa.sh fine-tunes a tiny local Llama.
- Preemption: a stage-1 job signalled with USR1 (`scancel --signal=USR1 --batch`, what --signal=B:USR1
  does before the time limit) checkpoints, requeues itself and resumes without being told, finishing
  with the same final loss and data fingerprint as the curriculum's uninterrupted stage 1.
- Node failure: a rank SIGKILLed on the second node fails the job, which requeues and resumes from its
  last periodic checkpoint, with the same final loss as the uninterrupted run.

The signals are sent while the ranks are frozen (SIGSTOP) and released once the signal is pending in
every rank, so where the run stops does not depend on how fast this machine is.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, VL, run

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import NODES, Cluster, Unavailable, install  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a local Slurm cluster needs root (network namespaces, "
                                                           "slurmd); run `make test` as root to include these tests")

STAGE1_STEPS = 12
EVERY = 3  # checkpoint interval: the killed job resumes from the last multiple before the kill
SBATCH = ["--nodes=2", "--gpus-per-node=0", "--time=30"]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        install()
    except Unavailable as e:
        pytest.skip(f"no Slurm cluster on this machine: {e}")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except Unavailable as e:
        pytest.skip(f"no Slurm cluster on this machine: {e}")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def curriculum(vl_data, tmp_path_factory):
    """A four-stage curriculum of the test-size VL-JEPA: stage 1 STAGE1_STEPS steps, the others 4."""
    root = tmp_path_factory.mktemp("curriculum")
    # Stage 4 tunes on instructions (loss on the responses only): chats made from the session's pairs.
    instructions = root / "instructions"
    run([PYTHON, "tools/make_instructions.py", "--output", str(instructions), "--pairs",
         str(Path(vl_data["shards"]).parent / "pairs"), "--count", "40"])
    run([PYTHON, "tools/build_shards.py", "--input", str(instructions / "code_edits.jsonl"), "--source",
         f"vision_text={instructions / 'vision_qa'}", "--tokenizer", vl_data["tokenizer"], "--context-length", "64",
         "--samples-per-shard", "32", "--output", str(instructions / "shards"), "--workers", "1"])
    tokens_per_step = 8 * 64  # VL's training.batch_size x context length
    total = tokens_per_step * (STAGE1_STEPS + 12)
    mixture = {"stage1_jepa": "{stdlib_code: 1, vision_text: 1}", "stage2_lm": "{stdlib_code: 1}",
               "stage3_hybrid": "{stdlib_code: 1, vision_text: 1}", "stage4_sft": "{code_edits: 1, vision_text: 1}"}
    stages = [{"name": name, "config": f"pretrain/configs/{name}.yaml",
               "tokens": (STAGE1_STEPS if name == "stage1_jepa" else 4) * tokens_per_step / total,
               "set": [f"data.mixture={mix}", "training.optimizer.lr=3.0e-3", "training.scheduler.min_lr=3.0e-4",
                       f"data.shards={instructions / 'shards' if name == 'stage4_sft' else vl_data['shards']}"]}
              for name, mix in mixture.items()]
    common = [s for s in VL if not s.startswith("data.mixture")] + [
        "parallel.tensor=1", f"data.tokenizer={vl_data['tokenizer']}", f"checkpoint.every_steps={EVERY}", "data.num_workers=1"]
    path = root / "curriculum.yaml"
    path.write_text(json.dumps({"output_dir": str(root / "runs"), "total_tokens": total, "set": common,
                                "stages": stages}))
    return path


def _sbatch(cluster, script: str, out: Path, *args: str, env: dict | None = None) -> str:
    proc = cluster.slurm("sbatch", "--parsable", *SBATCH, f"--output={out}/%x-%j.out", script, *args,
                         cwd=REPO, env=_job_env(env))
    return proc.stdout.strip().split(";")[0]


def _job_env(extra: dict | None = None) -> dict:
    launcher = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update({"PYTHON": PYTHON, "OMP_NUM_THREADS": "1", "STOP_GRACE_S": "120", **(extra or {})})
    return env


def _wait(cluster, job: str, timeout: float = 900) -> dict:
    """The job's final record (after any requeues)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job)
        if info.get("JobState") in DONE:
            return info
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            # Slurm holds a requeued job for two minutes before it may start again; an administrator's
            # override, so that the test does not sit out the wait. Not within the second of the requeue:
            # slurmctld takes a credential issued in the same second as the old one's revocation for revoked
            # ("Killing non-startable batch job: Job credential revoked").
            cluster.slurm("scontrol", "update", f"JobId={job}", "StartTime=now+2", check=False)
        time.sleep(1)
    raise AssertionError(f"job {job} not finished after {timeout} s: {cluster.job(job)}\n{cluster.logs()}")


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _log(out: Path, name: str, job: str) -> str:
    return (out / f"{name}-{job}.out").read_text()


def _ranks(cluster) -> list[int]:
    """The training processes on the cluster's nodes (torchrun's children), node 1's first."""
    pids = []
    for node in NODES:
        for pid in cluster.slurm("ip", "netns", "pids", cluster.netns[node]).stdout.split():
            try:
                if b"torch.distributed.run" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except FileNotFoundError:
                continue
    return pids


def _pending(pid: int, sig: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(m & (1 << (sig - 1)) for m in masks)


def _frozen_at_step(cluster, run_dir: Path, step: int, job: str) -> list[int]:
    """Wait for the job's ranks to log `step`, then SIGSTOP them; their pids."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        records = _records(run_dir)
        if records and records[-1]["step"] >= step:
            ranks = _ranks(cluster)
            assert len(ranks) == 2, f"expected a rank on each node, found {ranks}"
            for pid in ranks:
                os.kill(pid, signal.SIGSTOP)
            assert _records(run_dir)[-1]["step"] < STAGE1_STEPS, "the run ended before it could be interrupted"
            return ranks
        assert cluster.job(job).get("JobState") not in DONE, f"job {job} ended early: {cluster.job(job)}"
        time.sleep(0.2)
    raise AssertionError(f"job {job} never reached step {step}")


def _stage_args(curriculum: Path) -> dict[str, tuple[str, list[str]]]:
    """{stage: (run config, sbatch script arguments)} as submit_curriculum.sh passes them, but for the
    run directory."""
    lines = run([PYTHON, "-m", "cromwell.pretrain.curriculum", "--curriculum", str(curriculum), "--stages"]).stdout
    out = {}
    for line in lines.splitlines():
        if line.startswith("STAGE\t"):
            _, name, config, *sets = line.split("\t")  # the run directory: RUN_DIR, each test its own
            out[name] = (config, [a for s in sets if not s.startswith("run.output_dir=") for a in ("--set", s)])
    return out


@pytest.fixture(scope="module")
def curriculum_jobs(cluster, curriculum, tmp_path_factory):
    out = tmp_path_factory.mktemp("curriculum_logs")
    proc = subprocess.run(["bash", "slurm/submit_curriculum.sh", "--curriculum", str(curriculum), "--", *SBATCH,
                           f"--output={out}/%x-%j.out"], cwd=REPO, env=_job_env({"SLURM_CONF": str(cluster.conf)}),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = {}
    for line in proc.stdout.splitlines():  # "stage1_jepa: job 12 (run dir ...)"
        name, _, rest = line.partition(": job ")
        if rest:
            jobs[name] = rest.split()[0]
    assert list(jobs) == ["stage1_jepa", "stage2_lm", "stage3_hybrid", "stage4_sft"], proc.stdout
    return {"jobs": jobs, "finals": {name: _wait(cluster, job) for name, job in jobs.items()}, "out": out,
            "runs": Path(json.loads(curriculum.read_text())["output_dir"])}


def test_the_curriculum_runs_stage_after_stage_on_two_nodes(cluster, curriculum_jobs):
    jobs, finals, runs = curriculum_jobs["jobs"], curriculum_jobs["finals"], curriculum_jobs["runs"]
    previous = None
    for name, job in jobs.items():
        info = finals[name]
        log = _log(curriculum_jobs["out"], name, job)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{name}: {info}\n{log[-3000:]}"
        assert info["NodeList"] == "cw-n[1-2]" and info["NumNodes"] == "2"
        # One launcher per node, and the ranks on both hosts.
        assert "2 ranks on 2 hosts: cw-n1: ranks 0; cw-n2: ranks 1" in log, log[-3000:]
        records = _records(runs / name)
        assert records and records[-1]["step"] == (STAGE1_STEPS if name == "stage1_jepa" else 4)
        assert records[-1]["loss"] < records[0]["loss"], f"{name}: the loss did not fall: {records}"
        assert (runs / name / "checkpoints" / "latest").read_text() == f"global_step{records[-1]['step']}"
        if previous:  # afterok: started only after its predecessor ended, and from its final weights
            assert info["Dependency"] == "(null)" or "afterok" in info["Dependency"]
            assert info["StartTime"] >= finals[previous]["EndTime"], (previous, finals[previous], info)
            assert f"started from the weights of {runs / previous / 'checkpoints'}" in log, log[-3000:]
        previous = name


def test_step_jepa_fine_tunes_a_local_llama_on_two_nodes(cluster, tmp_path):
    from tests.test_trainer import CHATS
    from cromwell.tools.tiny_hf_model import build_tiny_llama

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{u} ({i})"},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                             for i in range(4) for u, a in CHATS))
    llama = build_tiny_llama(str(tmp_path / "llama"), [a for _, a in CHATS] * 4, hidden=32, layers=2, vocab=300)
    run_dir = tmp_path / "run"
    job = _sbatch(cluster, "slurm/step_jepa.sh", tmp_path, "--set", f"model.hf.path={llama}", "--set",
                  f"data.chats={chats}", "--set", "training.train_steps=4", "--set", "training.batch_size=4",
                  "--set", "training.micro_batch_size=2", "--set", "logging.tensorboard=false",
                  env={"RUN_DIR": str(run_dir)})
    info = _wait(cluster, job)
    log = _log(tmp_path, "step_jepa", job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-3000:]}"
    assert "2 ranks on 2 hosts" in log
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["jepa"] > 0


def _interrupted_stage1(cluster, curriculum, tmp_path, interrupt) -> tuple[list[dict], str, dict]:
    """Stage 1 of the curriculum as its own job, interrupted by `interrupt(ranks, job)` while its ranks
    are frozen after step EVERY + 1; (its metrics, its log, its final record)."""
    config, args = _stage_args(curriculum)["stage1_jepa"]
    run_dir = tmp_path / "run"
    job = _sbatch(cluster, "slurm/stage1_jepa.sh", tmp_path, *args,
                  env={"CONFIG": config, "RUN_DIR": str(run_dir), "MAX_REQUEUES": "2"})
    ranks = _frozen_at_step(cluster, run_dir, EVERY + 1, job)
    interrupt(ranks, job)
    info = _wait(cluster, job)
    return _records(run_dir), _log(tmp_path, "stage1_jepa", job), info


def _same_end(records: list[dict], reference: list[dict]) -> None:
    assert records[-1]["step"] == reference[-1]["step"] == STAGE1_STEPS
    for key in ("loss", "data_fingerprint", "tokens_seen"):
        assert records[-1][key] == reference[-1][key], (key, records[-1], reference[-1])


def test_a_preempted_job_checkpoints_requeues_and_resumes_to_the_same_end(cluster, curriculum, curriculum_jobs,
                                                                          tmp_path):
    def preempt(ranks, job):
        cluster.slurm("scancel", "--signal=USR1", "--batch", job)
        deadline = time.monotonic() + 120
        while not all(_pending(pid, signal.SIGUSR1) for pid in ranks):  # forwarded by srun and torchrun
            assert time.monotonic() < deadline, "USR1 never reached the ranks"
            time.sleep(0.1)
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)

    records, log, info = _interrupted_stage1(cluster, curriculum, tmp_path, preempt)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log[-4000:]}"
    # Frozen after step EVERY + 1 was logged; the ranks agree to stop after the step under way.
    stopped = int(re.search(rf"USR1: stopped after step (\d+) of {STAGE1_STEPS}", log).group(1))
    assert EVERY + 1 <= stopped < STAGE1_STEPS and "stopped by USR1" in log and "requeueing" in log
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'global_step{stopped}'}" in log, log[-4000:]
    _same_end(records, _records(curriculum_jobs["runs"] / "stage1_jepa"))


def test_a_killed_rank_fails_the_job_which_requeues_and_resumes_to_the_same_end(cluster, curriculum,
                                                                                 curriculum_jobs, tmp_path):
    def kill_second_node(ranks, job):
        os.kill(ranks[1], signal.SIGKILL)
        os.kill(ranks[0], signal.SIGCONT)

    records, log, info = _interrupted_stage1(cluster, curriculum, tmp_path, kill_second_node)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log[-4000:]}"
    assert "failed with exit code" in log and "requeueing" in log, log[-4000:]
    resumed = re.search(rf"resumed from {re.escape(str(tmp_path / 'run' / 'checkpoints'))}/global_step(\d+)", log)
    assert resumed and int(resumed.group(1)) % EVERY == 0, log[-4000:]  # the last periodic checkpoint
    _same_end(records, _records(curriculum_jobs["runs"] / "stage1_jepa"))
