"""Where parallelism is applied to a plain model, from outside it: the DeepSpeed JSON (ZeRO stage,
precision, batch sizes), the model built whole (under ZeRO-3's partitioning when asked, tensor-parallel
through megatron-core's layers) or as this rank's pipeline stage (pretrain/pipeline.py), activation
checkpointing, and the DeepSpeed engine. Nothing in model/ knows about DeepSpeed; nothing here knows the
maths of an objective: the engine's forward is the objective's `forward` (pretrain/objectives/).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
from pathlib import Path

import deepspeed
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from cromwell.data.tokenizer import NUM_PREDICTOR_TOKENS, predictor_token
from cromwell.model import hf
from cromwell.model.build import build
from cromwell.model.gpt import init_weights, megatron_config
from cromwell.pretrain import checkpoint
from cromwell.pretrain.config import Config, ConfigError, check_deepspeed_keys
from cromwell.pretrain.distributed import device_type
from cromwell.pretrain.objectives import Objective
from cromwell.pretrain.optim import build_optimizer, build_scheduler
from cromwell.pretrain.pipeline import attach_targets, build_pipeline

def precision(cfg: Config, device: str) -> str:
    if cfg.training.precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if cfg.training.precision == "bf16" and device != "cuda":
        raise ConfigError("training.precision=bf16 needs a GPU; use fp32 or auto on CPU")
    return cfg.training.precision


# ZeRO's communication settings by device, where the DeepSpeed JSON leaves them unset. GPUs: DeepSpeed's
# own defaults, gradients reduced on a side stream while the backward goes on (overlap_comm, which
# double-buffers the bucket) in 5e8-element buckets, large enough for NCCL to reach its bandwidth. CPU
# (gloo): no stream to overlap with, and a bucket is a real allocation on a small machine, so one
# 5e7-element bucket.
ZERO_BY_DEVICE = {
    "cuda": {"overlap_comm": True, "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000},
    "cpu": {"overlap_comm": False, "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
}


def _deepspeed_json(cfg: Config):
    """parallel.ds_config, or the shipped JSON for the run's ZeRO stage or pipeline (package data of
    cromwell.ds_configs, found from any directory and in an installed copy alike). A relative
    ds_configs/NAME that is not a file from here names the shipped one."""
    shipped = importlib.resources.files("cromwell.ds_configs")
    name = cfg.parallel.ds_config
    if name is None:
        return shipped / ("pipeline.json" if cfg.parallel.pipeline > 1 else f"zero{cfg.parallel.zero_stage}.json")
    path = Path(name)
    if path.is_file():
        return path
    if not path.is_absolute() and path.parts[:1] == ("ds_configs",) and (shipped / path.name).is_file():
        return shipped / path.name
    raise ConfigError(f"parallel.ds_config: file not found: {name}")


def deepspeed_config(cfg: Config, world_size: int, device: str) -> dict:
    """The DeepSpeed JSON: ds_configs/ (or parallel.ds_config) plus the fields the run config owns, and
    ZeRO's communication settings for `device` where the file leaves them unset. A file may repeat an
    owned field only with the same value."""
    ds_path = _deepspeed_json(cfg)
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
        "gradient_clipping": (cfg.training.optimizer.grad_clip, "training.optimizer.grad_clip"),
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
                "come from the run config (training.optimizer, training.scheduler, training.precision)"
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
    forward is the objective's loss (ZeRO-3 gathers parameters only inside module calls). It returns
    the Loss's fields as a tuple: DeepSpeed hooks the tensors of tuples, not of other types."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch) -> tuple:
        loss = self.objective.forward(self.model, batch)
        return loss.sums, loss.predicted, loss.target


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
    try:
        cfg.model.padded_vocab_size(cfg.parallel.tensor)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mp = megatron_config(cfg.parallel.tensor)
    if cfg.parallel.pipeline > 1:
        return build_pipeline(cfg, objective, mp)
    building, materialize = _zero3_partitioned(cfg, ds_config)
    with building:
        model = build(cfg.model, mp, checkpoint_activations=cfg.parallel.activation_checkpointing,
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
    """Once the engine's weights are final (initialised, or loaded from run.init_from). A pipeline
    stage's layers then run their EMA copies beside themselves, if the objective keeps any."""
    objective.setup(model_of(engine), whole_parameters(engine), engine.device)
    if isinstance(engine, deepspeed.PipelineEngine):
        attach_targets(engine.module, objective.ema_target())


def whole_parameters(engine):
    """params -> a context in which they are whole: gathered, read-only, under ZeRO-3."""
    if engine.zero_optimization_stage() == 3:
        return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return lambda params: contextlib.nullcontext()


