"""Process groups: joining the launcher's group (or making a group of one), megatron-core's tensor,
pipeline and data-parallel groups over it, the per-device communication environment, and leaving.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from cromwell.pretrain.config import Config


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _skip_shm_comm_op() -> None:
    """DeepSpeed's first init_distributed JIT-compiles a shared-memory all-reduce that only its CPU
    *inference* path calls. The compile takes minutes on a fresh machine, and a process killed
    during it leaves torch's build lock behind, after which every later run on that machine waits
    on the lock forever (a CI run hung this way). Marked incompatible, DeepSpeed builds nothing and
    reduces through gloo, which is what training uses anyway."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


STALE_BUILD_LOCK_S = 600


def _warn_about_stale_build_locks(extensions: Path) -> None:
    """torch's extension builds take a lock file that a killed build leaves behind; the next run to
    load that op then waits on it forever, silently. Say so before that can happen."""
    for lock in extensions.glob("*/*/lock") if extensions.is_dir() else []:
        age = time.time() - lock.stat().st_mtime
        if age > STALE_BUILD_LOCK_S:
            print(f"warning: {lock} is {age / 60:.0f} minutes old: a build of that op was probably killed, and "
                  "loading the op would wait on this lock forever; delete it if no build is running", flush=True)


def nccl_environment(env: dict, tensor_parallel: int) -> dict:
    """The NCCL and CUDA settings a GPU run gets where the environment leaves them unset.

    - TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a hung collective raises (and a Slurm job requeues) instead
      of waiting forever. NCCL_DEBUG=WARN: NCCL's own reason when it fails.
    - CUDA_DEVICE_MAX_CONNECTIONS=1 under tensor parallelism: megatron-core issues a layer's gradient
      all-reduce before the weight-gradient matmul and relies on one hardware queue to run them in that
      order; without TP it would only serialise DeepSpeed's reduction stream behind the compute.
    - One node (every rank local: LOCAL_WORLD_SIZE from torchrun, LOCAL_SIZE from the deepspeed
      launcher): NCCL's bootstrap on the loopback. Its transports on one node are NVLink, PCIe and
      shared memory; left to itself it binds the first network interface it finds, which on an
      air-gapped node may be down or absent. A multi-node job names the interface (slurm/node.sh).
    """
    out = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN"}
    if tensor_parallel > 1:
        out["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    world = env.get("WORLD_SIZE", "1")
    if env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)) == world:
        out["NCCL_SOCKET_IFNAME"] = "lo"
    return {k: v for k, v in out.items() if k not in env}


def join_process_group(tensor_parallel: int = 1) -> None:
    """Join the launcher's process group, or, run as a plain script, make a group of one."""
    if "RANK" not in os.environ:  # one process without a launcher (benchmarks, notebooks)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type() == "cuda":
        # Read when the CUDA context is made, which set_device does.
        os.environ.update(nccl_environment(os.environ, tensor_parallel))
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # Ops DeepSpeed still compiles (CPU Adam for offload) go into this environment, not the user-wide
    # ~/.cache, where two environments would rebuild them in turn.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    _warn_about_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
    if not dist.is_initialized():
        if device_type() == "cpu":  # on CUDA DeepSpeed has no such op to build (nor to probe for)
            _skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend="nccl" if device_type() == "cuda" else "gloo")


def init_distributed(cfg: Config) -> int:
    """Join the process group and build megatron's TP/PP/DP groups for the run.

    megatron-core orders ranks tp fastest, then dp, then pp, which is exactly DeepSpeed's
    PipeModelDataParallelTopology (axes pipe, data, model): both libraries agree on every group.
    """
    join_process_group(cfg.parallel.tensor)
    world = dist.get_world_size()
    cfg.batch_sizes(world)  # fail before building anything if the numbers disagree
    _log_hosts()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tensor,
            pipeline_model_parallel_size=cfg.parallel.pipeline,
        )
    return world


def _log_hosts() -> None:
    """Which host each rank runs on, one line from rank 0: in a multi-node job's log, the proof that
    the ranks are where the allocation put them."""
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    if dist.get_rank() == 0 and len(hosts) > 1:
        ranks: dict[str, list[int]] = {}
        for rank, host in enumerate(hosts):
            ranks.setdefault(host, []).append(rank)
        print(f"{len(hosts)} ranks on {len(ranks)} hosts: "
              + "; ".join(f"{host}: ranks {_spans(r)}" for host, r in ranks.items()), flush=True)


def _spans(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}-{a}" if a > start else f"{a}")
            start = b
    return ",".join(out)


def shutdown() -> None:
    """Leave the process group before the interpreter exits: a gloo group torn down by process exit
    can abort in its threads' destructors ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


