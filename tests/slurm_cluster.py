"""A real Slurm cluster of two compute nodes on this machine, for tests/test_slurm.py (root only).

Debian's slurm-wlm and munge (installed with apt-get when missing). Every daemon runs in a network
namespace of its own, on a private bridge the cluster makes, with its own address and hostname
(ip netns + unshare --uts):

    controller  cw-ctl  10.a.b.1   slurmctld
    node        cw-n1   10.a.b.11  slurmd       jobs' tasks run here, in this namespace
    node        cw-n2   10.a.b.12  slurmd
    this host           10.a.b.254 (the bridge: sbatch, squeue, scontrol reach the controller)

so a two-node job really starts one task per node, each seeing its own hostname and address, and its
ranks rendezvous across the bridge. The daemons' ports are inside their own namespaces, so nothing
binds a port on the host. The file system is shared, as on a cluster with a shared home.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

NODES = ("cw-n1", "cw-n2")
CONTROLLER = "cw-ctl"


class Unavailable(Exception):
    """This machine cannot host the cluster (why is the message)."""


def _sh(*cmd: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def install() -> None:
    """slurm-wlm and munge from Debian's packages, when not installed."""
    if os.geteuid() != 0:
        raise Unavailable("not root: a Slurm cluster with network namespaces needs root")
    missing = [p for p in ("ip", "unshare", "runuser") if not shutil.which(p)]
    if missing:
        raise Unavailable(f"{', '.join(missing)} not found (iproute2, util-linux)")
    if all(shutil.which(p) for p in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if not shutil.which("apt-get"):
        raise Unavailable("slurm-wlm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode:
            raise Unavailable(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")


def _free_subnet() -> str:
    used = _sh("ip", "-o", "addr").stdout + _sh("ip", "-o", "route").stdout
    for b in range(200, 255):
        prefix = f"10.{b}.{os.getpid() % 250}"
        if f" {prefix}." not in used:
            return prefix
    raise Unavailable("no free 10.x.y.0/24 subnet for the cluster's bridge")


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        tag = os.getpid() % 100000
        self.bridge = f"cwb{tag}"
        self.netns = {name: f"cw{tag}{name.removeprefix('cw-')}" for name in (CONTROLLER, *NODES)}
        self.net = _free_subnet()
        self.addr = {CONTROLLER: f"{self.net}.1", NODES[0]: f"{self.net}.11", NODES[1]: f"{self.net}.12"}
        self.conf = root / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []
        self.munged = None
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- up and down ------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._munge()
            self._network()
            self._configure()
            self._daemon(CONTROLLER, ["slurmctld", "-D", "-c", "-f", str(self.conf)])
            for node in NODES:
                self._daemon(node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.daemons:
            self.slurm("scancel", "--partition=test", check=False)
        for ns in self.netns.values():  # the daemons and whatever jobs left behind
            pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
        for proc in self.daemons:
            proc.wait(timeout=30)
        self.daemons.clear()
        for ns in self.netns.values():
            _sh("ip", "netns", "del", ns, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
        if self.munged:
            self.munged.terminate()
            self.munged.wait(timeout=30)

    def _munge(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # a munged is running already
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _sh("mungekey", "--create", "--keyfile", str(key))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        self.munged = subprocess.Popen(["runuser", "-u", "munge", "--", "munged", "--foreground"],
                                       stdout=subprocess.DEVNULL, stderr=open(self.root / "munged.log", "w"))
        for _ in range(100):
            if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        raise Unavailable(f"munged did not start: {(self.root / 'munged.log').read_text()[-500:]}")

    def _network(self) -> None:
        try:
            _sh("ip", "link", "add", self.bridge, "type", "bridge")
        except RuntimeError as e:  # e.g. a container without CAP_NET_ADMIN
            raise Unavailable(f"cannot make a network bridge here: {e}") from None
        _sh("ip", "addr", "add", f"{self.net}.254/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i, (name, ns) in enumerate(self.netns.items()):
            host_end, ns_end = f"{self.bridge}h{i}", f"{self.bridge}n{i}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _sh("ip", "link", "set", ns_end, "netns", ns)
            _sh("ip", "link", "set", host_end, "master", self.bridge, "up")
            inside = ("ip", "netns", "exec", ns, "ip")
            _sh(*inside, "link", "set", ns_end, "name", "eth0")
            _sh(*inside, "addr", "add", f"{self.addr[name]}/24", "dev", "eth0")
            _sh(*inside, "link", "set", "eth0", "up")
            _sh(*inside, "link", "set", "lo", "up")

    def _configure(self) -> None:
        cpus = os.cpu_count()
        for d in ("state", *(f"spool-{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # slurmd initialises a cgroup plugin even when nothing uses it; its autodetection fails on a
        # hybrid (v1 + v2) hierarchy such as this machine's, so name the version.
        v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        (self.root / "cgroup.conf").write_text(f"CgroupPlugin=cgroup/{'v2' if v2 else 'v1'}\n"
                                               "CgroupMountpoint=/sys/fs/cgroup\n")
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.addr[n]} CPUs={cpus} RealMemory=1000 State=UNKNOWN"
                          for n in NODES)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=cromwelltest
MailProg=/bin/true
SlurmctldHost={CONTROLLER}({self.addr[CONTROLLER]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdTimeout=120
InactiveLimit=0
MinJobAge=3600
KillWait=5
JobRequeue=1
{nodes}
PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.out", "w")
        # Its own hostname (a UTS namespace) inside its network namespace; exec keeps the pid.
        self.daemons.append(subprocess.Popen(
            ["ip", "netns", "exec", self.netns[name], "unshare", "--uts", "sh", "-c",
             f'hostname {name} && exec "$@"', "sh", *cmd], stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _wait_idle(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            for proc in self.daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited ({' '.join(proc.args[10:])}): {self.logs()}")
            states = self.scontrol_nodes()
            if states and all(s.lower() == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the nodes did not come up: {states}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    # -- using it ---------------------------------------------------------------------------------

    def slurm(self, *cmd: str, check: bool = True, cwd: Path | None = None, env: dict | None = None):
        """A Slurm command against this cluster, in environment `env` (default: this process's)."""
        proc = subprocess.run(cmd, env={**(os.environ if env is None else env), "SLURM_CONF": str(self.conf)},
                              cwd=cwd, capture_output=True, text=True, timeout=120)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stdout[-1000:]} {proc.stderr[-2000:]}")
        return proc

    def scontrol_nodes(self) -> dict[str, str]:
        proc = self.slurm("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return dict(line.split() for line in proc.stdout.splitlines() if line.strip()) if proc.returncode == 0 else {}

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol show job's fields."""
        return dict(re.findall(r"(\w+)=(\S*)", self.slurm("scontrol", "show", "job", "-o", job_id).stdout))
