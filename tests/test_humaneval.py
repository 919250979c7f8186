"""pretrain/evaluation/humaneval.py on pretrain/evaluation/sandbox.py: the dataset's canonical solutions all pass; deliberately bad
completions (hang, memory hogs, early exits, fork bombs, detached processes, sockets, file deletion) all fail,
and leave the machine and the harness as they were, both as root (namespaces, nobody) and on the unprivileged
path (forced when the tests run as root); pass@k, truncation and loading give hand-checked results."""

import gzip
import os
import socket
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, SHARED_DATA
from cromwell.pretrain.evaluation import humaneval as he
from cromwell.pretrain.evaluation import sandbox

ADD = {"task_id": "test/add", "prompt": 'def add(a, b):\n    """The sum of a and b."""\n',
       "canonical_solution": "    return a + b\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}
MARKER = "1234.5678"  # how long the detached processes sleep: finds them wherever they went
BAD_TIMEOUT_S = 10  # ample for the memory hogs to hit their limit on a busy machine

# name: (body of add(a, b), what its failure says, whether it needs the privileged sandbox: without it ctypes
# gets through, and as root (the unprivileged path forced) nothing bounds a fork bomb).
# {port}: a socket the test listens on; {victims}: files and a directory the test made outside the work dir.
BAD = {
    "hang": ("while True:\n    pass", "timeout", False),
    "memory hog": ("x = bytearray(16 * 2**30)\nreturn a + b", "memory limit", False),
    "growing memory hog": ("x = []\nwhile True:\n    x.append(bytearray(2**26))", "memory limit", False),
    "os._exit(0)": ("import os\nos._exit(0)", "exited before", False),
    "sys.exit(0)": ("import sys\nsys.exit(0)", "exited before", False),
    "os.fork bomb": ("import os\nwhile True:\n    os.fork()", "os.fork is disabled", False),
    # Every process forks until RLIMIT_NPROC refuses, then sleeps (the machine is busy enough).
    "ctypes fork bomb": ("import ctypes\nlibc = ctypes.CDLL(None)\nwhile libc.fork() != -1:\n    pass\nlibc.pause()",
                         "timeout", True),
    # The class the guard wraps (_posixsubprocess.fork_exec underneath), each child in a session of its own.
    "detached processes": (f"""import subprocess
Popen = subprocess.Popen.__mro__[1]
for _ in range(100):
    try:
        Popen(["sleep", "{MARKER}"], start_new_session=True)
    except OSError:  # RLIMIT_NPROC
        break
return None""", "AssertionError", False),
    "socket": ("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)\nreturn a + b",
               "socket.socket is disabled", False),
    "ctypes socket": ("""import ctypes, struct
libc = ctypes.CDLL(None)
fd = libc.socket(2, 1, 0)  # AF_INET, SOCK_STREAM
address = struct.pack("=H", 2) + struct.pack("!H", {port}) + bytes([127, 0, 0, 1]) + bytes(8)
libc.connect(fd, address, len(address))
return None""", "AssertionError", True),
    "os.remove": ("import os\nos.remove({victims[remove]!r})\nreturn a + b", "os.remove is disabled", False),
    "pathlib unlink": ("import pathlib\npathlib.Path({victims[pathlib]!r}).unlink()\nreturn a + b",
                       "os.unlink is disabled", False),
    "shutil.rmtree": ("import shutil\nshutil.rmtree({victims[dir]!r})\nreturn a + b", "shutil.rmtree is disabled",
                      False),
    "ctypes unlink": ("import ctypes\nlibc = ctypes.CDLL(None)\nlibc.unlink({victims[ctypes]!r}.encode())\n"
                      "libc.rmdir({victims[dir]!r}.encode())\nreturn None", "AssertionError", True),
}


def problem(task_id: str) -> dict:
    return {**ADD, "task_id": task_id}


def stray_processes(work_root: Path) -> list[dict]:
    """Living processes that are this test's descendants, run in one of its sandboxes (their HOME is the
    work dir: other sandboxes on the machine do not count) or are the detached sleeps."""
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    stray = []
    for p in psutil.process_iter(["pid", "ppid", "uids", "cmdline", "status", "environ"]):
        info = p.info
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if info["pid"] in mine or (info["environ"] or {}).get("HOME", "").startswith(f"{work_root}/") or \
                MARKER in " ".join(info["cmdline"] or []):
            stray.append({key: info[key] for key in ("pid", "ppid", "uids", "cmdline", "status")})
    return stray


@pytest.fixture(scope="module", params=["privileged", "unprivileged"])
def bad_runs(request):
    """Every bad completion that the mode's boundary covers, evaluated at once; then what they left behind and
    how a correct completion scores afterwards."""
    privileged = request.param == "privileged"
    if privileged and os.geteuid() != 0:
        pytest.skip("the privileged sandbox (namespaces, nobody) needs root")
    (REPO / "runs").mkdir(exist_ok=True)
    # Victims where the sandbox sees them (its /tmp is private when privileged), made by the test's user.
    with tempfile.TemporaryDirectory(dir=REPO / "runs", prefix="sandbox-test-") as scratch, \
            socket.socket() as listener, pytest.MonkeyPatch.context() as mp:
        os.chmod(scratch, 0o755)
        work_root = Path(scratch, "work")
        work_root.mkdir()
        mp.setattr(tempfile, "tempdir", str(work_root))  # the sandboxes' work dirs, to find their processes
        if not privileged:
            mp.setattr(sandbox, "_privileged", lambda: False)
        victim_dir = Path(scratch, "victims")
        victim_dir.mkdir()
        victims = {"dir": str(victim_dir)}
        for name in ("remove", "pathlib", "ctypes"):
            victims[name] = str(victim_dir / f"{name}.txt")
            Path(victims[name]).write_text("keep me")
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]

        cases = {name: (body.format(port=port, victims=victims), says) for name, (body, says, boundary) in BAD.items()
                 if privileged or not boundary}
        problems = [problem(f"bad/{name}") for name in cases]
        completions = {f"bad/{name}": [textwrap.indent(body, "    ") + "\n"] for name, (body, _) in cases.items()}
        scores = he.evaluate(problems, completions, timeout_s=BAD_TIMEOUT_S, workers=2)
        try:
            connection, _ = listener.accept()
            connection.close()
            connected = True
        except BlockingIOError:
            connected = False
        # Returned, not yielded: the forced unprivileged path must end here, not leak into later tests.
        stray = stray_processes(work_root)
        after = he.evaluate([ADD], {ADD["task_id"]: [ADD["canonical_solution"]]})
        return {"cases": cases, "scores": scores, "connected": connected, "stray": stray, "after": after,
                "victims": sorted(victims.values()), "victims_left": sorted(p for p in victims.values() if Path(p).exists())}


def test_bad_completions_all_fail_for_their_reason(bad_runs):
    results = bad_runs["scores"]["results"]
    assert bad_runs["scores"]["pass@1"] == 0.0
    for name, (_, says) in bad_runs["cases"].items():
        result = results[f"bad/{name}"]
        assert result["passed"] == 0 and says in result["failure"], (name, result)


def test_bad_completions_leave_the_machine_untouched(bad_runs):
    assert not bad_runs["connected"], "a sandboxed program reached a socket on 127.0.0.1"
    assert bad_runs["victims_left"] == bad_runs["victims"]
    assert bad_runs["stray"] == []


def test_the_harness_still_passes_a_correct_completion(bad_runs):
    after = bad_runs["after"]
    assert after["pass@1"] == 1.0 and after["results"][ADD["task_id"]] == {"passed": 1, "failure": None}


@pytest.mark.skipif(os.geteuid() != 0, reason="the privileged sandbox (namespaces, nobody) needs root")
def test_as_root_the_program_runs_as_nobody_in_its_own_namespaces():
    name = f"left-behind-{os.getpid()}"
    code = f"""import os
import socket
print(os.getuid(), os.getgid(), os.getgroups(), os.getpid())
print(socket.if_nameindex())
open('/tmp/{name}', 'w').write('x')
"""
    result = sandbox.run_python(code)
    assert result.ok, result
    assert result.stdout.splitlines() == ["65534 65534 [] 1", "[(1, 'lo')]"]  # PID 1, no network
    assert not Path("/tmp", name).exists()  # its /tmp was a private tmpfs


def test_files_in_outputs_back_and_the_work_dir_deleted():
    code = """import os
open('out.bin', 'wb').write(open('in.bin', 'rb').read()[::-1])
os.symlink('/etc/hostname', 'link')
os.mkfifo('fifo')
print(os.getcwd())
"""
    result = sandbox.run_python(code, files={"in.bin": b"abc"}, outputs=("out.bin", "link", "fifo", "absent"))
    assert result.ok, result
    assert result.outputs == {"out.bin": b"cba"}  # no link followed, no FIFO opened
    assert not Path(result.stdout.strip()).exists()
    with pytest.raises(ValueError, match="'../x'"):
        sandbox.run_python("", files={"../x": b""})


def test_output_is_bounded_and_keeps_its_end():
    result = sandbox.run_python("print('a' * 10**7)\nprint('the end')")
    assert result.ok and len(result.stdout) < sandbox.MAX_CAPTURE + 100
    assert result.stdout.startswith("aaa") and result.stdout.endswith("the end\n") and "bytes left out" in result.stdout


def test_a_hang_ends_at_the_timeout():
    start = time.monotonic()
    result = sandbox.run_python("while True:\n    pass", timeout_s=2)
    assert result.timed_out and result.returncode is None and result.reason == "timeout" and not result.ok
    assert time.monotonic() - start < 60  # generous: the machine is busy


def test_run_many_keeps_the_input_order():
    programs = ["import time\ntime.sleep(1)\nprint(0)", "print(1)", "raise SystemExit(3)", "print(3)"]
    results = sandbox.run_many(programs, workers=2, progress="test")
    assert [r.stdout for r in results] == ["0\n", "1\n", "", "3\n"]
    assert [r.reason for r in results] == ["ok", "ok", "exit 3", "ok"]


def test_pass_at_k_matches_hand_computed_values():
    assert he.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert he.pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)
    assert he.pass_at_k(10, 0, 5) == 0.0
    assert he.pass_at_k(10, 8, 3) == 1.0  # n - c < k: every draw of 3 holds a correct one
    assert he.pass_at_k(200, 200, 100) == 1.0
    with pytest.raises(ValueError, match="k=6"):
        he.pass_at_k(5, 2, 6)


def test_evaluate_averages_pass_at_k_over_samples():
    wrong = ["    return a - b\n", "    return None\n", "    return (\n"]  # the last one does not parse
    scores = he.evaluate([ADD], {ADD["task_id"]: [ADD["canonical_solution"], *wrong, "    return b + a\n"]}, ks=(1, 2))
    assert scores["n"] == 5 and scores["problems"] == 1
    assert scores["pass@1"] == pytest.approx(0.4) and scores["pass@2"] == pytest.approx(1 - 3 / 10)
    assert scores["results"][ADD["task_id"]]["passed"] == 2
    assert "AssertionError" in scores["results"][ADD["task_id"]]["failure"]
    with pytest.raises(ValueError, match="1 <= k <= n = 5"):
        he.evaluate([ADD], {ADD["task_id"]: ["    return a + b\n"] * 5}, ks=(10,))
    with pytest.raises(ValueError, match="none for \\['test/add'\\]"):
        he.evaluate([ADD], {})


def test_truncate_cuts_at_the_first_stop_sequence():
    body = "    return a + b\n"
    assert he.truncate(body) == body
    assert he.truncate(body + "\n\ndef other():\n    pass\n") == body + "\n"
    assert he.truncate(body + "\nprint(add(1, 2))\n# done\n") == body
    assert he.truncate(body + "    # indented\n\nif __name__ == '__main__':\n    pass") == body + "    # indented\n"
    assert he.truncate(body + "\nclass A:\n    pass\n") == body


def test_a_missing_or_corrupt_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent.jsonl.gz")):
        he.load_problems(tmp_path / "absent.jsonl.gz")
    (tmp_path / "plain.jsonl.gz").write_text('{"task_id": "x"}\n')
    with pytest.raises(ValueError, match=f"{tmp_path / 'plain.jsonl.gz'}: not a gzipped"):
        he.load_problems(tmp_path / "plain.jsonl.gz")
    with gzip.open(tmp_path / "broken.jsonl.gz", "wt") as f:
        f.write('{"task_id": \n')
    with pytest.raises(ValueError, match="broken.jsonl.gz: not a gzipped JSON-lines"):
        he.load_problems(tmp_path / "broken.jsonl.gz")
    with gzip.open(tmp_path / "fields.jsonl.gz", "wt") as f:
        f.write('{"task_id": "x", "prompt": "def f():\\n"}\n')
    with pytest.raises(ValueError, match="fields.jsonl.gz: problem 1 has no canonical_solution, test, entry_point"):
        he.load_problems(tmp_path / "fields.jsonl.gz")


def test_canonical_solutions_all_pass():
    path = SHARED_DATA / "humaneval" / "HumanEval.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} is absent: HumanEval comes from ../shared/data")
    problems = he.load_problems(path)
    assert len(problems) == 164
    start = time.perf_counter()
    scores = he.evaluate(problems, {p["task_id"]: [p["canonical_solution"]] for p in problems}, workers=2)
    print(f"164 canonical solutions in {time.perf_counter() - start:.1f} s")
    failed = {task: r["failure"] for task, r in scores["results"].items() if r["passed"] != 1}
    assert scores["pass@1"] == 1.0 and not failed, failed
