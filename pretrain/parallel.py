"""Where parallelism is applied: process groups, the DeepSpeed JSON, the model as one module (built
under ZeRO-3's partitioning when asked) or pipeline stages, the engine, and one optimizer step.
Nothing in model/ knows about DeepSpeed; nothing here knows the maths of an objective.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.utils import clip_grad_norm_
from megatron.core import parallel_state
from torch import nn

from data.tokenizer import NUM_PREDICTOR_TOKENS, predictor_token
from model import hf
from model.gpt import GPT, init_weights, megatron_config
from model.vljepa import VLJEPA
from pretrain import checkpoint
from pretrain.config import Config, ConfigError, check_deepspeed_keys
from pretrain.objectives import Objective, vocab_size
from pretrain.pipeline import build_pipeline
from pretrain.optim import build_optimizer, build_scheduler

REPO_ROOT = Path(__file__).resolve().parents[1]


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def precision(cfg: Config, device: str) -> str:
    if cfg.training.precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if cfg.training.precision == "bf16" and device != "cuda":
        raise ConfigError("training.precision=bf16 needs a GPU; use fp32 or auto on CPU")
    return cfg.training.precision


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


# ZeRO's communication settings by device, where the DeepSpeed JSON leaves them unset. GPUs: DeepSpeed's
# own defaults, gradients reduced on a side stream while the backward goes on (overlap_comm, which
# double-buffers the bucket) in 5e8-element buckets, large enough for NCCL to reach its bandwidth. CPU
# (gloo): no stream to overlap with, and a bucket is a real allocation on a small machine, so one
# 5e7-element bucket.
ZERO_BY_DEVICE = {
    "cuda": {"overlap_comm": True, "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000},
    "cpu": {"overlap_comm": False, "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
}


def deepspeed_config(cfg: Config, world_size: int, device: str) -> dict:
    """The DeepSpeed JSON: ds_configs/ (or parallel.ds_config) plus the fields the run config owns, and
    ZeRO's communication settings for `device` where the file leaves them unset. A file may repeat an
    owned field only with the same value."""
    name = cfg.parallel.ds_config
    if name is None:
        name = "ds_configs/pipeline.json" if cfg.parallel.pipeline > 1 else f"ds_configs/zero{cfg.parallel.zero_stage}.json"
    ds_path = Path(name)
    if not ds_path.is_absolute() and not ds_path.exists():
        ds_path = REPO_ROOT / ds_path
    if not ds_path.is_file():
        raise ConfigError(f"parallel.ds_config: file not found: {name}")
    try:
        ds = json.loads(ds_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{ds_path}: not valid JSON: {e}") from None
    check_deepspeed_keys(ds, str(ds_path))

    global_batch, micro, accum, _ = cfg.batch_sizes(world_size)
    owned = {  # DeepSpeed field: (value, the run-config field it comes from)
        "train_batch_size": (global_batch, "training.batch_size"),
        "train_micro_batch_size_per_gpu": (micro, "training.micro_batch_size"),
        "gradient_accumulation_steps": (accum, "training.gradient_accumulation_steps"),
        "gradient_clipping": (cfg.training.optimizers.grad_clip, "training.optimizers.grad_clip"),
        "zero_optimization.stage": (cfg.parallel.zero_stage, "parallel.zero_stage"),
        "bf16.enabled": (precision(cfg, device) == "bf16", "training.precision"),
    }
    for dotted, (value, source) in owned.items():
        *parents, leaf = dotted.split(".")
        node = ds
        for p in parents:
            node = node.setdefault(p, {})
        if leaf in node and node[leaf] != value:
            raise ConfigError(
                f"{ds_path}: {dotted} = {node[leaf]!r} disagrees with {source} in the run config "
                f"(which gives {value!r}); remove it from the JSON, the run config is the source of truth"
            )
        node[leaf] = value
    if cfg.model.type == "vljepa" and cfg.parallel.pipeline > 1:
        # Several tensors with gradients travel between the VL-JEPA's stages (pretrain/pipeline.py);
        # DeepSpeed's split of activations over the tensor-parallel ranks handles one only.
        pipe = ds.setdefault("pipeline", {})
        for key in ("pipe_partitioned", "grad_partitioned"):
            if pipe.get(key, False):
                raise ConfigError(f"{ds_path}: pipeline.{key} must be false for model.type=vljepa with a pipeline")
            pipe[key] = False
    for key in ("optimizer", "scheduler", "fp16"):
        if key in ds and (key != "fp16" or ds[key].get("enabled")):
            raise ConfigError(
                f"{ds_path}: '{key}' is set in the DeepSpeed JSON; the optimizer, LR schedule and precision "
                "come from the run config (training.optimizers, training.scheduler, training.precision)"
            )
    if cfg.parallel.zero_stage > 0:
        zero = ds.setdefault("zero_optimization", {})
        for key, value in ZERO_BY_DEVICE[device].items():
            zero.setdefault(key, value)
    ds.setdefault("steps_per_print", 10**9)  # our own logger reports; DeepSpeed's would duplicate it
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class MegatronMPU:
    """The group accessors DeepSpeed asks of an `mpu`, answered from megatron-core's groups.

    Without a pipeline, DeepSpeed's "model parallel" is megatron's tensor parallel.
    """

    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)


class TrainModule(nn.Module):
    """The engine's module without a pipeline: the model and its objective, so that the engine's
    forward is the objective's loss sums (ZeRO-3 gathers parameters only inside module calls)."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch):
        return self.objective.forward(self.model, batch)


def _zero3_partitioned(cfg: Config, ds_config: dict):
    """Under ZeRO-3 every parameter is partitioned over the data-parallel group as soon as its layer
    is built, so no rank ever holds the whole model; (context for building, context in which one
    parameter is whole for its initialisation)."""
    if cfg.parallel.zero_stage != 3:
        return contextlib.nullcontext(), None
    # No dtype argument: DeepSpeed 0.19 ignores it on accelerators without fp16 (it picks bf16 for a
    # CPU); from the config it takes bf16 or fp32 as the engine will.
    building = deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=MegatronMPU(), remote_device=None,
                                   pin_memory=False)
    return building, lambda p: deepspeed.zero.GatheredParameters([p], modifier_rank=0)


def build_model(cfg: Config, objective: Objective, tokenizer, ds_config: dict) -> nn.Module:
    """The module the engine trains on this rank: the model with its objective, or this rank's
    pipeline stage ending in the objective's loss; initialised identically for every layout."""
    if cfg.model.type == "hf":
        predictors = tokenizer.convert_tokens_to_ids([predictor_token(i) for i in range(1, NUM_PREDICTOR_TOKENS + 1)])
        model = hf.load_model(cfg.model.hf.path, len(tokenizer), cfg.model.hf, predictors,
                              checkpoint_activations=cfg.parallel.activation_checkpointing)
        return TrainModule(model, objective)
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    try:
        vocab = cfg.model.padded_vocab_size(vocab_size(cfg, tokenizer), tp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mp = megatron_config(tp)
    if pp > 1:
        return build_pipeline(cfg, objective, vocab, mp)
    building, materialize = _zero3_partitioned(cfg, ds_config)
    with building:
        if cfg.model.type == "vljepa":
            jepa = cfg.training.jepa
            model = VLJEPA(cfg.model, vocab, mp, jepa.embedding_dim, jepa.prediction_steps,
                           checkpoint_activations=cfg.parallel.activation_checkpointing, kernels=cfg.training.kernels)
        else:
            model = GPT(cfg.model, vocab, mp, checkpoint_activations=cfg.parallel.activation_checkpointing,
                        kernels=cfg.training.kernels)
    for name, layer in model.named_children():
        init_weights(layer, int(name), cfg.model, cfg.run.seed, materialize)
        if cfg.model.type == "vljepa":
            layer.requires_grad_(objective.trains(model.modules_of[name]))
    return TrainModule(model, objective)


def build_engine(cfg: Config, objective: Objective, tokenizer):
    """The DeepSpeed engine for the run; DeepSpeed owns ZeRO, the pipeline schedule and checkpoints."""
    world = dist.get_world_size()
    ds_config = deepspeed_config(cfg, world, device_type())
    model = build_model(cfg, objective, tokenizer, ds_config)
    optimizer = build_optimizer(model, cfg, fused=device_type() == "cuda",
                                skip_nonfinite=cfg.parallel.zero_stage == 0 and not ds_config["bf16"]["enabled"])
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=build_scheduler(optimizer, cfg),
        config=ds_config,
        mpu=None if cfg.parallel.pipeline > 1 else MegatronMPU(),
    )
    checkpoint.make_safe(engine)
    return engine


def model_of(engine) -> nn.Module:
    """The model the objective sees: the whole one, or this rank's pipeline stage."""
    return engine.module if isinstance(engine, deepspeed.PipelineEngine) else engine.module.model


def setup_objective(engine, objective: Objective) -> None:
    """Once the engine's weights are final (initialised, or loaded from run.init_from)."""
    objective.setup(model_of(engine), whole_parameters(engine), engine.device)


def whole_parameters(engine):
    """params -> a context in which they are whole: gathered, read-only, under ZeRO-3."""
    if engine.zero_optimization_stage() == 3:
        return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return lambda params: contextlib.nullcontext()


def to_device(batch, device):
    if batch is None or torch.is_tensor(batch) or hasattr(batch, "to"):
        return None if batch is None else batch.to(device)
    return type(batch)(to_device(b, device) for b in batch)


def _reduced_counts(objective: Objective, micro_batches: list, device) -> torch.Tensor:
    """Each component's item count over the whole step: all micro batches, all data-parallel ranks."""
    counts = sum(objective.counts(b) for b in micro_batches).to(device)
    dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    return counts


@dataclass
class StepResult:
    losses: dict  # "loss" (the weighted total) and each component, averaged over the step's items
    grad_norm: float  # before clipping; inf or nan when the step was skipped
    skipped: bool  # the optimizer left the weights as they were (a non-finite gradient somewhere)


def _means(objective: Objective, sums: torch.Tensor, counts: torch.Tensor) -> dict:
    sums = sums.detach().to(torch.float64)
    for group in loss_groups():
        dist.all_reduce(sums, group=group)
    means = sums / counts.clamp(min=1)
    total = float(objective.total(sums, counts))
    return {"loss": total, **{name: float(m) for name, m in zip(objective.components, means)}}


def loss_groups():
    # Under a pipeline only the last stage computes losses; the other stages contribute zeros.
    groups = [parallel_state.get_data_parallel_group()]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        groups.append(parallel_state.get_pipeline_model_parallel_group())
    return groups


def train_step(engine, objective: Objective, micro_batches: list) -> StepResult:
    """One optimizer step over the gradient_accumulation_steps micro batches of this rank.

    Each micro batch's loss is the objective's total over the STEP's item counts, times
    accumulation x data-parallel size, which undoes DeepSpeed's averaging over micro batches and
    ranks: the gradient is that of the step's token-weighted loss.
    """
    counts = _reduced_counts(objective, micro_batches, engine.device)
    scale = len(micro_batches) * parallel_state.get_data_parallel_world_size()
    skipped_before = engine.skipped_steps
    if isinstance(engine, deepspeed.PipelineEngine):
        loss_fn = engine.module.loss_fn
        loss_fn.counts, loss_fn.scale = counts, scale
        engine.train_batch(data_iter=iter([to_device(objective.pipeline_batch(b), engine.device) for b in micro_batches]))
        sums = loss_fn.take(counts)
        grad_norm = engine.get_global_grad_norm()
    else:
        sums, grad_norm = torch.zeros_like(counts), None
        for i, batch in enumerate(micro_batches):
            micro_sums = engine(to_device(batch, engine.device))
            engine.backward(objective.total(micro_sums, counts) * scale)
            if i == len(micro_batches) - 1 and engine.zero_optimization_stage() == 0:
                # Without ZeRO, DeepSpeed clips fp32 gradients but discards their norm; an infinite
                # max_norm measures it the same way (TP-aware) and leaves the gradients as they are.
                grad_norm = clip_grad_norm_(engine.module.parameters(), max_norm=float("inf"), mpu=engine.mpu)
            engine.step()
            sums += micro_sums.detach().to(sums)
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
    skipped = engine.skipped_steps > skipped_before
    if not skipped:
        objective.after_step(model_of(engine), whole_parameters(engine), engine.global_steps)
    return StepResult(_means(objective, sums, counts), float("nan") if grad_norm is None else float(grad_norm), skipped)


@torch.no_grad()
def eval_losses(engine, objective: Objective, micro_batches: list) -> dict:
    """The objective's token-weighted losses over every data-parallel rank's held-out micro batches."""
    engine.eval()
    try:
        if not isinstance(engine, deepspeed.PipelineEngine):
            return held_out_losses(objective, engine, micro_batches, engine.device)
        counts = _reduced_counts(objective, micro_batches, engine.device)
        loss_fn = engine.module.loss_fn
        loss_fn.counts, loss_fn.scale = counts, 1.0
        engine.eval_batch(iter([to_device(objective.pipeline_batch(b), engine.device) for b in micro_batches]),
                          num_micro_batches=len(micro_batches))
        return _means(objective, loss_fn.take(counts), counts)
    finally:
        engine.train()


@torch.no_grad()
def held_out_losses(objective: Objective, forward, micro_batches: list, device) -> dict:
    """The same, through forward(batch) -> the objective's loss sums (an engine, or the objective on a plain
    model, as tools/evaluate.py runs it)."""
    counts = _reduced_counts(objective, micro_batches, device)
    sums = sum(forward(to_device(b, device)).to(counts) for b in micro_batches)
    return _means(objective, sums, counts)
