"""Commands start quietly: the known start-up warnings of DeepSpeed, megatron-core and torch are
silenced by pretrain/quiet.py (imported first by every entry point); any other warning still shows."""

import subprocess
import sys

from conftest import REPO

KNOWN = ("Transformer Engine and Apex are not installed", "Setting accelerator to CPU", "torch.jit.script_method")


def _start(first: str) -> subprocess.CompletedProcess:
    code = f"{first}\nimport warnings\nimport cromwell.pretrain.trainer\nwarnings.warn('an unknown warning', UserWarning)\n"
    return subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True, env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})


def test_known_start_up_warnings_are_silenced_and_others_are_not():
    loud = _start("")
    assert all(k in loud.stdout + loud.stderr for k in KNOWN), "the libraries no longer warn so: update quiet.py"
    quiet = _start("import cromwell.pretrain.quiet")
    assert not [k for k in KNOWN if k in quiet.stdout + quiet.stderr], quiet.stdout + quiet.stderr
    assert "an unknown warning" in quiet.stderr
