"""A run directory holds one run. A lock file names the process that trains into it (a second run is
refused, a lock left by a dead process is taken over), and a fresh run does not start over a
directory that holds another run's checkpoints unless told to."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK = "run.lock"


class RunDirError(RuntimeError):
    pass


def _start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot): a pid reused by another process differs."""
    try:
        # Field 22 of /proc/<pid>/stat; the command name before it may hold spaces, so count from its ')'.
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _holder_alive(holder: dict) -> bool | None:
    """True or False for a holder on this host; None when it is on another host (cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return holder.get("start_ticks") in (None, _start_ticks(holder["pid"]))


def acquire(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except FileNotFoundError:
                continue  # released between our open and read
            except ValueError:
                holder = {}
            alive = _holder_alive(holder) if holder else False
            if alive is False:
                print(f"warning: taking over {lock}: its holder (pid {holder.get('pid')} on {holder.get('host')}) "
                      "is gone", flush=True)
                lock.unlink(missing_ok=True)
                continue
            where = f"pid {holder['pid']} on host {holder['host']}, since {holder.get('started')}"
            raise RunDirError(
                f"{out_dir} is in use by another run ({where}); "
                + ("wait for it or use another run.output_dir" if alive else
                   f"if that run is gone, delete {lock}"))
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock


def release(lock: Path) -> None:
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


def check_fresh(out_dir: Path, checkpoint_dir: Path, overwrite: bool) -> None:
    """A fresh run (not --resume) into a directory holding a run: refuse, or with overwrite delete
    that run's checkpoints and logs."""
    leftovers = [p for p in (checkpoint_dir, out_dir / "metrics.jsonl", out_dir / "tensorboard",
                             out_dir / "loss_curve.png") if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    if not leftovers:
        return
    if not overwrite:
        raise RunDirError(
            f"{out_dir} already holds a run ({', '.join(p.name for p in leftovers)}): continue it with --resume, "
            "or start over with --overwrite (which deletes them)")
    for p in leftovers:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
