"""tools/wheelhouse.py without the network: which wheels a node gets from a resolution, the platform tags,
and the install's refusals. (`make offline-check` builds and installs a real wheelhouse: see the README.)"""

import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from conftest import REPO
from cromwell.tools import wheelhouse

ENV_312 = wheelhouse.target_environment("3.12", "x86_64")


def resolution(**packages):
    """name -> (version, requirements) as pip's report gives them."""
    return {name: (version, [Requirement(r) for r in requires]) for name, (version, requires) in packages.items()}


RESOLVED = resolution(**{
    "deepspeed": ("0.19.8", ["torch>=2.0", "pydantic>=2", "numpy", "hjson"]),
    "torch": ("2.11.0", ["sympy", "nvidia-cublas; platform_system == 'Linux'", "setuptools<82"]),
    "sympy": ("1.14", ["mpmath"]),
    "mpmath": ("1.3", []),
    "nvidia-cublas": ("13.1", []),
    "pydantic": ("2.14.4", ["pydantic-core==2.50.5", "typing-extensions>=4.14"]),
    "pydantic-core": ("2.50.5", ["typing-extensions>=4.14"]),
    "typing-extensions": ("4.16.0", []),
    "numpy": ("2.4.6", []),
    "hjson": ("3.1.0", []),
    "webdataset": ("1.0.2", ["braceexpand", "tomli; python_version < '3.11'", "exceptiongroup; python_version < '3.11'"]),
    "braceexpand": ("0.1.7", []),
    "rich": ("15.0", ["markdown-it-py", "pygments[plugins]"]),
    "markdown-it-py": ("4.3", []),
    "pygments": ("2.21", ["importlib-metadata; extra == 'plugins'"]),
    "importlib-metadata": ("8.0", []),
    "setuptools": ("81.0", []),
})
ROOTS = [Requirement(r) for r in ("deepspeed==0.19.8", "webdataset==1.0.2", "rich", "setuptools>=70.1")]


def test_torch_and_what_only_it_needs_are_left_to_the_node():
    ship, left_out = wheelhouse.closure(ROOTS, RESOLVED, ENV_312, have={})
    assert set(ship) == {"deepspeed", "pydantic", "pydantic-core", "typing-extensions", "numpy", "hjson",
                         "webdataset", "braceexpand", "rich", "markdown-it-py", "pygments", "importlib-metadata",
                         "setuptools"}
    assert set(left_out) == {"torch"}  # sympy, mpmath and the CUDA libraries come with it, unwalked
    assert ship["numpy"] == "2.4.6"


def test_markers_are_the_nodes_and_extras_follow_the_requirement():
    ship, _ = wheelhouse.closure(ROOTS, RESOLVED, ENV_312, have={})
    assert "tomli" not in ship and "exceptiongroup" not in ship  # python_version < 3.11 is false on 3.12
    assert "importlib-metadata" in ship  # pygments[plugins] asks for it
    ship, _ = wheelhouse.closure([Requirement("pygments")], RESOLVED, ENV_312, have={})
    assert set(ship) == {"pygments"}


def test_what_the_node_holds_is_left_out_unless_its_version_fails_a_requirement(capsys):
    have = {"numpy": "2.5.2", "pydantic": None, "typing-extensions": "4.12.0", "setuptools": "81.0"}
    ship, left_out = wheelhouse.closure(ROOTS, RESOLVED, ENV_312, have)
    assert "numpy" not in ship and left_out["numpy"] == "on the node (2.5.2)"
    # pydantic is there (version not given): neither it nor what only it needs is shipped
    assert "pydantic" not in ship and "pydantic-core" not in ship
    # typing-extensions 4.12 fails pydantic-core's >=4.14... but pydantic-core is the node's, unwalked
    assert "typing-extensions" not in ship
    assert ship["setuptools"] == "81.0"  # the editable install's backend ships anyway
    have["typing-extensions"] = "4.12.0"
    ship, _ = wheelhouse.closure(ROOTS + [Requirement("typing-extensions>=4.14")], RESOLVED, ENV_312, have)
    assert ship["typing-extensions"] == "4.16.0" and "does not satisfy" in capsys.readouterr().out


def test_a_requirement_missing_from_the_resolution_is_named():
    with pytest.raises(SystemExit, match="gguf \\(required by requirements.txt\\) is not in pip's resolution"):
        wheelhouse.closure([Requirement("gguf==0.19.0")], RESOLVED, ENV_312, have={})


def test_platform_tags_cover_every_older_glibc():
    tags = wheelhouse.platforms("2.28", "x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert len([t for t in tags if t.startswith("manylinux_2_")]) == 12  # 2.17 ... 2.28
    with pytest.raises(SystemExit, match="glibc 2.17 or newer"):
        wheelhouse.platforms("2.12", "x86_64")


def test_have_files_drop_local_versions_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "have.txt"
    good.write_text("# a node\ntorch==2.11.0+cu130\nPyYAML==6.0.2\nsetuptools\n")
    assert wheelhouse.read_have(good) == {"torch": "2.11.0", "pyyaml": "6.0.2", "setuptools": None}
    bad = tmp_path / "bad.txt"
    bad.write_text("numpy==not-a-version\n")
    with pytest.raises(SystemExit, match="bad.txt:1: expected NAME or NAME==VERSION"):
        wheelhouse.read_have(bad)
    with pytest.raises(SystemExit, match="nope.txt: file not found"):
        wheelhouse.read_have(tmp_path / "nope.txt")


def _install(*args):
    return subprocess.run([sys.executable, "tools/wheelhouse.py", "install", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_install_refuses_a_folder_that_is_no_wheelhouse_and_a_python_without_torch(tmp_path):
    proc = _install("--wheelhouse", str(tmp_path), "--venv", str(tmp_path / "venv"))
    assert proc.returncode == 1 and "no requirements.txt" in proc.stderr
    (tmp_path / "requirements.txt").write_text("hjson\n")
    no_torch = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(no_torch)], check=True)
    proc = _install("--wheelhouse", str(tmp_path), "--python", str(no_torch / "bin" / "python"),
                    "--venv", str(tmp_path / "venv"))
    assert proc.returncode == 1 and "has no torch" in proc.stderr
    assert not (tmp_path / "venv").exists()
