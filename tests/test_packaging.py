"""The distribution installs the project under one name, cromwell: a non-editable `pip install .` into
a fresh environment imports it from site-packages (and nothing under a common name such as `data`),
finds the shipped DeepSpeed JSON as package data, and trains a step from outside the source tree."""

import json
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from conftest import REPO, tiny_overrides


def test_the_listed_packages_are_the_packages_on_disk():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"cromwell." + ".".join(p.parent.relative_to(REPO).parts)
               for folder in setuptools["package-dir"].values() for p in (REPO / folder).rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk


def test_a_non_editable_install_imports_and_trains_from_site_packages(tiny_data, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies (torch, DeepSpeed, ...) from this environment, as a plain path: the .pth files
    # there, this environment's editable install of the project among them, are not run.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # From a copy: setuptools builds in the source tree (build/), and the checkout stays as it was.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "runs", "build", "__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "--disable-pip-version-check", str(source)],
                   check=True, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": "/dev/null"})
    assert (site / "cromwell" / "ds_configs" / "zero1.json").is_file()
    assert not any((site / name).exists() for name in ("data", "model", "pretrain", "tools", "bench"))

    probe = ("import importlib.util, cromwell.pretrain.quiet, cromwell.model.build, cromwell.pretrain.trainer\n"
             "print(cromwell.model.build.__file__)\n"
             "print([n for n in ('data', 'model', 'pretrain', 'tools') if importlib.util.find_spec(n)])\n")
    out = subprocess.run([python, "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    where, shadowing = out.splitlines()
    assert Path(where).is_relative_to(site) and shadowing == "[]"

    run_dir = tmp_path / "run"
    cmd = [python, "-m", "cromwell.pretrain.train", "--config", str(REPO / "pretrain/configs/tiny.yaml"),
           *tiny_overrides(tiny_data, run_dir), "--set", "training.train_steps=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [step] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert step["step"] == 1 and 5.0 < step["loss"] < 10.0
