"""Installing on a node with no network and a site PyTorch: a folder of wheels built where there is
package access, installed there with no index, around the node's own torch.

  # on a machine with package access (any OS with pip; no torch needed)
  python tools/wheelhouse.py build --out wheelhouse --python-version 3.12 [--have node-packages.txt]
  # on the node: a .venv over the Python that holds torch, the wheels installed with no index
  python3 tools/wheelhouse.py install --wheelhouse wheelhouse --python /opt/site/bin/python3

`build` resolves requirements.txt for the node's Python and platform, beside the node's torch version
(--torch, or --have's), with pip's own resolver (a dry run that reads only the packages' metadata). It
keeps what the project needs apart from torch, triton and what only they need (CUDA libraries, sympy,
...) and downloads those wheels; a package PyPI has only as source (deepspeed) is built into a
pure-Python wheel here, with no ops compiled (the trainer needs none: torch's fused AdamW, our Triton
kernels). `--have` names what the node already holds (`python -m pip list --format=freeze` there, or
bare names): those are left out unless the node's version fails what the project asks of it, which
keeps the folder to what is missing. Optional packages (W&B) come only with --with-optional. The folder
gets `requirements.txt` (what install asks for) and `manifest.json` (what is in it, sizes, what was
left out and why).

`install` runs on the standard library alone, before anything is installed. It makes a venv that sees
everything the given Python sees (so the site's torch is used, not copied), pins torch and triton to the
versions found there so that no requirement can replace them, installs with `--no-index` from the
folder alone, then the project itself, editable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the node's PyTorch installation provides; never taken from the wheelhouse.
SITE_PROVIDED = ("torch", "triton")
SITE_PREFIXES = ("nvidia-", "cuda-")
OPTIONAL = {"wandb": "W&B logging (logging.wandb.enabled, off by default)"}
# PyPI has only a source release; built here into a wheel (environment: what the build must see).
FROM_SOURCE = {"deepspeed": {"DS_BUILD_OPS": "0"}}
# The project's editable install needs a build backend with bdist_wheel built in (70.1), which the
# setuptools of a Python 3.11 venv (65.5) lacks; shipped even where the node has one (under 1 MB).
BUILD_NEEDS = ("setuptools>=70.1",)


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _packaging():
    try:
        from packaging.markers import default_environment
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pip vendors it, so any machine that can build has it
        from pip._vendor.packaging.markers import default_environment
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version, default_environment


def platforms(glibc: str, machine: str) -> list[str]:
    """Every manylinux tag a node with this glibc runs (pip matches tags exactly, not by 'at most')."""
    major, minor = (int(x) for x in glibc.split("."))
    if major != 2 or minor < 17:
        raise SystemExit(f"--glibc {glibc}: manylinux wheels need glibc 2.17 or newer")
    tags = [f"manylinux_2_{m}_{machine}" for m in range(minor, 16, -1)]
    return tags + [f"manylinux2014_{machine}", f"manylinux2010_{machine}", f"manylinux1_{machine}"]


def target_environment(python_version: str, machine: str) -> dict:
    """Marker values of the node, for the requirements' environment markers."""
    _, _, default_environment = _packaging()
    env = default_environment()
    env.update(python_version=python_version, python_full_version=f"{python_version}.0",
               implementation_name="cpython", platform_python_implementation="CPython",
               sys_platform="linux", platform_system="Linux", os_name="posix", platform_machine=machine)
    return env


def _lines(path: Path, what: str):
    if not path.is_file():
        raise SystemExit(f"error: {what} {path}: file not found")
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            yield number, line


def read_requirements(path: Path) -> list:
    Requirement, _, _ = _packaging()
    out = []
    for number, line in _lines(path, "requirements"):
        try:
            out.append(Requirement(line))
        except ValueError as e:  # packaging's InvalidRequirement
            raise SystemExit(f"error: {path}:{number}: not a requirement: {line!r} ({e})") from None
    return out


def read_have(path: Path | None) -> dict[str, str | None]:
    """name -> version (None: only the name was given) of what the node already holds; local version
    labels (2.11.0+cu130) dropped, as an index knows only the public version."""
    if path is None:
        return {}
    _, Version, _ = _packaging()
    have = {}
    for number, line in _lines(path, "--have"):
        name, _, version = line.partition("==")
        try:
            have[canonical(name.strip())] = Version(version.strip()).public if version.strip() else None
        except ValueError:
            raise SystemExit(f"error: {path}:{number}: expected NAME or NAME==VERSION, got {line!r}") from None
    return have


def site_provided(name: str) -> bool:
    return name in SITE_PROVIDED or name.startswith(SITE_PREFIXES)


def _walk(roots: list, resolved: dict, env: dict, stop) -> dict[str, list]:
    """name -> [(requirement, required by)] of every package reached from the roots through the
    resolution, not walking past a package for which stop(name) is true (whose own needs the node meets)."""
    wanted: dict[str, list] = {}
    expanded = set()
    todo = [(r, "requirements.txt") for r in roots]
    while todo:
        req, by = todo.pop()
        name = canonical(req.name)
        wanted.setdefault(name, []).append((req, by))
        if stop(name):
            continue
        if name not in resolved:
            raise SystemExit(f"{name} (required by {by}) is not in pip's resolution for the target; "
                             "is it available for this Python version and platform?")
        for extra in {"", *req.extras}:
            if (name, extra) in expanded:
                continue
            expanded.add((name, extra))
            todo += [(r, name) for r in resolved[name][1]
                     if r.marker is None or r.marker.evaluate({**env, "extra": extra})]
    return wanted


def closure(roots: list, resolved: dict, env: dict, have: dict) -> tuple[dict, dict]:
    """(wheels to ship: name -> version, left out: name -> why). Torch's needs and those of a package the
    node holds are the node's already; a package the node holds is shipped anyway when its version there
    fails what any package here asks of it."""
    Requirement, Version, _ = _packaging()
    roots = [r for r in roots if r.marker is None or r.marker.evaluate({**env, "extra": ""})]
    everything = _walk(roots, resolved, env, site_provided)

    def fits(name):
        return name in have and name not in {canonical(Requirement(b).name) for b in BUILD_NEEDS} and (have[name] is None or all(
            r.specifier.contains(Version(have[name]), prereleases=True) for r, _ in everything.get(name, [])))

    reached = _walk(roots, resolved, env, lambda name: site_provided(name) or fits(name))
    ship, left_out = {}, {}
    for name, requirers in sorted(reached.items()):
        if site_provided(name):
            left_out[name] = "the node's PyTorch installation"
        elif fits(name):
            left_out[name] = f"on the node ({have[name] or 'version not given'})"
        else:
            ship[name] = resolved[name][0]
            if name in have:
                print(f"note: the node's {name}=={have[name]} does not satisfy "
                      + ", ".join(f"{r} (from {by})" for r, by in requirers) + f"; shipping {ship[name]}")
    return ship, left_out


def _pip(pip: list[str], *args: str, env: dict | None = None, offline: bool = False) -> None:
    cmd = [*pip, *args, "--disable-pip-version-check", "-q"]
    environ = {**os.environ, **(env or {})}
    if offline:
        # Nothing of this machine's pip configuration (indexes, find-links, constraints) may apply:
        # PIP_CONFIG_FILE=os.devnull makes pip read no configuration file at all.
        environ = {k: v for k, v in environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    result = subprocess.run(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode:
        sys.exit(f"error: {' '.join(cmd[:6])} ... failed:\n{result.stdout[-4000:]}")


def build(args) -> None:
    Requirement, Version, _ = _packaging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = args.machine
    tags = [f"--platform={t}" for t in platforms(args.glibc, machine)]
    target = ["--only-binary=:all:", f"--python-version={args.python_version}", "--implementation=cp", *tags]
    env = target_environment(args.python_version, machine)
    have = read_have(Path(args.have) if args.have else None)
    roots = [r for r in read_requirements(Path(args.requirements)) + [Requirement(b) for b in BUILD_NEEDS]
             if not site_provided(canonical(r.name)) and (args.with_optional or canonical(r.name) not in OPTIONAL)]

    for old in out.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        for name, build_env in FROM_SOURCE.items():
            pinned = next((str(r) for r in roots if canonical(r.name) == name), None)
            if pinned:
                print(f"building {pinned} (no compiled ops) ...", flush=True)
                _pip([sys.executable, "-m", "pip"], "wheel", "--no-deps", "--no-cache-dir", "--no-binary", name, "-w", str(out),
                     pinned, env=build_env)
        report = Path(tmp) / "report.json"
        print(f"resolving {len(roots)} requirements for CPython {args.python_version} on {machine} "
              f"(glibc >= {args.glibc}) ...", flush=True)
        # Resolved beside the node's torch, whose own requirements (setuptools<82 for 2.11) bind the rest.
        node_torch = Version(args.torch).public if args.torch else have.get("torch")
        beside = [f"torch=={node_torch}"] if node_torch else []
        _pip([sys.executable, "-m", "pip"], "install", "--dry-run", "--ignore-installed", "--report", str(report),
             "--target", str(Path(tmp) / "target"), "--find-links", str(out), *target, *map(str, roots), *beside)
        resolved = {}
        for item in json.loads(report.read_text())["install"]:
            meta = item["metadata"]
            resolved[canonical(meta["name"])] = (meta["version"], [Requirement(r) for r in meta.get("requires_dist", [])])
    ship, left_out = closure(roots, resolved, env, have)
    fetch = [f"{name}=={version}" for name, version in sorted(ship.items()) if name not in FROM_SOURCE]
    print(f"downloading {len(fetch)} wheels ...", flush=True)
    _pip([sys.executable, "-m", "pip"], "download", "--no-deps", "-d", str(out), *target, *fetch)
    wheels = sorted(out.glob("*.whl"))
    (out / "requirements.txt").write_text("".join(f"{r}\n" for r in roots))
    total = sum(w.stat().st_size for w in wheels)
    (out / "manifest.json").write_text(json.dumps({
        "python_version": args.python_version, "machine": machine, "glibc": args.glibc,
        "packages": ship, "left_out": left_out,
        "optional_left_out": {} if args.with_optional else OPTIONAL,
        "wheels": {w.name: w.stat().st_size for w in wheels}, "bytes": total,
    }, indent=1) + "\n")
    for w in wheels:
        print(f"  {w.stat().st_size / 1e6:7.2f} MB  {w.name}")
    on_node = sorted(n for n in left_out if not site_provided(n))
    print(f"{len(wheels)} wheels, {total / 1e6:.1f} MB in {out}; torch and what only it needs come from the node"
          + (f"; already there: {', '.join(on_node)}" if on_node else ""))


def _version(python: str, module: str) -> str | None:
    code = f"import importlib.metadata as m\ntry: print(m.version({module!r}))\nexcept m.PackageNotFoundError: pass"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or None


def _site_dirs(python: str) -> list[str]:
    code = "import json, sys; print(json.dumps([p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))]))"
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


def make_venv(site_python: str, venv: Path) -> list[str]:
    """A venv that sees everything `site_python` sees, below its own packages: the site's folders go into
    a .pth file rather than --system-site-packages, which would show the base interpreter's folders
    instead of a site venv's (the GPU machines' torch lives in one). Returns how to run pip in it."""
    python = venv / "bin" / "python"
    if not python.exists():
        made = subprocess.run([site_python, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode:  # a Python without ensurepip (Debian's python3 without python3-venv)
            subprocess.run([site_python, "-m", "venv", "--without-pip", str(venv)], check=True)
    inside = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    Path(inside, "site-python.pth").write_text("".join(f"{d}\n" for d in _site_dirs(site_python)))
    has_pip = subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True).returncode == 0
    return [str(python), "-m", "pip"] if has_pip else [site_python, "-m", "pip", "--python", str(python)]


def install(args) -> None:
    wheelhouse = Path(args.wheelhouse).resolve()
    wanted = wheelhouse / "requirements.txt"
    if not wanted.is_file():
        sys.exit(f"error: {wheelhouse}: no requirements.txt; is this a folder `tools/wheelhouse.py build` wrote?")
    torch_version = _version(args.python, "torch")
    if torch_version is None:
        sys.exit(f"error: {args.python} has no torch; this install is for a Python that already holds PyTorch "
                 "(use `make setup` where there is package access)")
    venv = Path(args.venv)
    pip = make_venv(args.python, venv)
    python = str(venv / "bin" / "python")
    if _version(python, "torch") != torch_version:
        sys.exit(f"error: {venv} does not see {args.python}'s torch {torch_version}; remove {venv} and rerun")
    pins = [f"torch=={torch_version}"] + [f"{name}=={v}" for name in SITE_PROVIDED[1:]
                                          if (v := _version(args.python, name))]
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write("\n".join(pins) + "\n")
        constraints.flush()
        print(f"installing from {wheelhouse} with no index into {venv} (over {args.python}: "
              + ", ".join(pins) + ")", flush=True)
        _pip(pip, "install", "--no-index", "--find-links", str(wheelhouse), "-c", constraints.name,
             "-r", str(wanted), offline=True)
    _pip(pip, "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(ROOT), offline=True)
    after = _version(python, "torch")
    if after != torch_version:
        sys.exit(f"error: torch changed from {torch_version} to {after} during the install")
    print(f"installed into {venv}; torch {torch_version} of {args.python} untouched")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download/build the wheels (needs package access)")
    b.add_argument("--out", required=True)
    b.add_argument("--python-version", default=f"{sys.version_info[0]}.{sys.version_info[1]}",
                   help="the node's Python, e.g. 3.12 (default: this one)")
    b.add_argument("--glibc", default="2.28", help="the node's glibc (wheels for it and older)")
    b.add_argument("--machine", default="x86_64")
    b.add_argument("--have", help="what the node holds: `pip list --format=freeze` output, or bare names")
    b.add_argument("--torch", help="the node's torch version, when --have does not give it (e.g. 2.11.0)")
    b.add_argument("--requirements", default=str(ROOT / "requirements.txt"))
    b.add_argument("--with-optional", action="store_true", help="also " + ", ".join(OPTIONAL))
    i = sub.add_parser("install", help="install a wheelhouse with no index (standard library only)")
    i.add_argument("--wheelhouse", required=True)
    i.add_argument("--python", default="python3", help="the Python that holds the node's torch")
    i.add_argument("--venv", default=str(ROOT / ".venv"))
    args = ap.parse_args(argv)
    build(args) if args.command == "build" else install(args)


if __name__ == "__main__":
    main()
