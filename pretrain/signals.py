"""Graceful stop. SIGTERM or SIGUSR1 (what Slurm sends before a time limit or a preemption) on any
rank makes every rank stop after the current step, write a checkpoint and exit 0; a second such
signal exits at once. A rank whose launcher dies gets SIGHUP from the kernel and stops the same way,
instead of training on as an orphan."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
# Killing the launcher's process group (or Slurm signalling every task) gives a rank the signal
# itself and then again from the DeepSpeed launcher, which forwards SIGTERM to its children.
# Only a repeat this long after the first asks for an immediate exit.
REPEAT_AFTER_S = 5.0
_PR_SET_PDEATHSIG = 1


class GracefulStop:
    def __init__(self):
        self.signum = 0
        self._first = 0.0
        self._previous = {}

    def install(self, launched: bool) -> None:
        """Handle the stop signals; `launched`: this process is a rank started by a launcher."""
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        if launched and sys.platform == "linux":
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGHUP), 0, 0, 0)
            if os.getppid() == 1:  # the launcher died before the request above
                self.signum = int(signal.SIGHUP)

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum and signum != signal.SIGHUP and now - self._first > REPEAT_AFTER_S:
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting now, without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        if not self.signum:
            self.signum, self._first = signum, now

    def agreed(self, device) -> int:
        """Collective: the stop signal any rank received (0: none), the same on every rank."""
        flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)
