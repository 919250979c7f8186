"""A checkpoint continued on another layout: `--resume` and a curriculum stage's `run.init_from` at any
tensor x pipeline x data-parallel size and ZeRO stage, whatever the writer's.

The checkpoint is read with the converter's reader (reader.DeepSpeedCheckpoint), which knows every layout
the trainer writes: each parameter's full fp32 value, and for a resume both AdamW moments and Adam's step
count, one tensor at a time from memory-mapped files. Each rank then puts its own part of each into the
engine it built for the new layout: the module's weight, the optimizer's fp32 master copy (its ZeRO
partition), the moments beside it. A resume also takes DeepSpeed's counters and the LR schedule's
position, the training state (loader position, tokens seen, non-finite counters, metrics), the objective's
EMA target, and each rank's RNG (read_rng's rule). docs/training.md says why this and not DeepSpeed's
universal checkpoint or torch.distributed.checkpoint.

A resume on the writer's own layout goes through DeepSpeed's own loader (checkpoint.load), bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import deepspeed
import torch
from megatron.core import parallel_state
from torch import nn

from cromwell.model.tensors import Param, tp_shard
from cromwell.pretrain import checkpoint
from cromwell.pretrain.checkpoint import CheckpointError
from cromwell.pretrain.checkpoint.reader import DeepSpeedCheckpoint

MOMENTS = ("exp_avg", "exp_avg_sq")


def layout(cfg, world_size: int, dp: int) -> dict:
    """What the marker records of the layout that wrote a checkpoint."""
    return {"world_size": world_size, "tp": cfg.parallel.tensor, "pp": cfg.parallel.pipeline, "dp": dp,
            "zero": cfg.parallel.zero_stage}


def saved_layout(tag_dir: Path) -> dict:
    marker = checkpoint.read_marker(tag_dir)
    saved = dict(marker["layout"])
    saved.setdefault("zero", marker["config"]["parallel"]["zero_stage"])  # markers written before it was recorded
    return saved


def describe(lay: dict) -> str:
    return f"TP{lay['tp']} x PP{lay['pp']} x DP{lay['dp']} ZeRO-{lay['zero']}"


def resume(engine, model: nn.Module, objective, tag_dir: Path, current: dict) -> tuple[dict, str | None]:
    """Restore checkpoint `tag_dir` into the engine (whose module's model is `model`), the objective and
    this rank's RNG. Returns (the training state saved with it, "resharded from A to B" or None when the
    layout is the writer's)."""
    saved = saved_layout(tag_dir)
    keys = ("tp", "pp", "dp", "zero")
    if all(saved[k] == current[k] for k in keys):
        state = checkpoint.load(engine, tag_dir)
        if objective.state_dict():
            objective.load_state_dict(checkpoint.load_objective_state(tag_dir))
        return state, None
    checkpoint.verify_checksums(tag_dir)
    rng = checkpoint.read_rng(tag_dir)
    source = _open(tag_dir)
    _check_objective(objective, tag_dir)
    step = source.adam_step()
    _restore(engine, model, source, step)
    _restore_target(objective, source)
    counters = source.engine_state()
    engine.global_steps, engine.skipped_steps = counters["global_steps"], counters["skipped_steps"]
    engine.global_samples = counters["global_samples"]
    engine.lr_scheduler.load_state_dict(counters["lr_scheduler"])
    state = source.training_state()
    source.close()
    checkpoint.set_rng_state(rng)
    return state, f"resharded from {describe(saved)} to {describe(current)}"


def load_weights(engine, model: nn.Module, tag_dir: Path) -> None:
    """The model weights of checkpoint `tag_dir` (from checkpoint.init_source), from any layout into this
    one, nothing else: the optimizer, schedule, step count and RNG stay the new run's own."""
    checkpoint.verify_checksums(tag_dir)
    source = _open(tag_dir)
    _restore(engine, model, source, None)
    source.close()


def _open(tag_dir: Path) -> DeepSpeedCheckpoint:
    try:
        return DeepSpeedCheckpoint(tag_dir)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"checkpoint {tag_dir}: its files do not hold what its layout says ({e!r})") from None


def _check_objective(objective, tag_dir: Path) -> None:
    extra = sorted(set(objective.state_dict()) - {"ema_target"})
    if extra:
        raise CheckpointError(f"checkpoint {tag_dir}: the objective keeps {', '.join(extra)}, which has no form "
                              "independent of the layout; resume it on the layout that wrote it")


def _full_shape(name: str, param: torch.Tensor, local: tuple, source: DeepSpeedCheckpoint, target: bool = False) -> tuple:
    """The whole parameter's shape: megatron-core marks the dimension a tensor-parallel layer cuts
    (partition_dim); the checkpoint's shard along it times the writer's TP size, checked against this
    rank's shard times this run's."""
    saved = list(source.local_shape(name, target))
    split = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    if split is not None:
        saved[split] *= source.tp
    expected = list(local)
    if split is not None:
        expected[split] *= parallel_state.get_tensor_model_parallel_world_size()
    if saved != expected:
        raise CheckpointError(f"{source.dir}: parameter {name} is {saved} whole in the checkpoint, {expected} in this "
                              "run's model")
    return tuple(saved)


def _local(source: DeepSpeedCheckpoint, name: str, param: torch.Tensor, local: tuple, state: str | None = None,
           target: bool = False) -> torch.Tensor:
    """This rank's tensor-parallel shard of the checkpoint's parameter `name` (or of its `state`)."""
    full = _full_shape(name, param, local, source, target)
    value = source.read(Param(name, full, [], "", False), target=target, state=state)
    return tp_shard(value, torch.Size(local), parallel_state.get_tensor_model_parallel_rank()).contiguous()


def _restore(engine, model: nn.Module, source: DeepSpeedCheckpoint, step: int | None) -> None:
    set_parameters(engine, model, lambda name, param, local: _local(source, name, param, local),
                   lambda name, param, local, key: _local(source, name, param, local, key), step)


Value = Callable[[str, nn.Parameter, tuple], torch.Tensor | None]  # (name, parameter, local shape) -> its shard
Moment = Callable[[str, nn.Parameter, tuple, str], torch.Tensor]  # the same and which moment -> its shard


@torch.no_grad()
def set_parameters(engine, model: nn.Module, value: Value, moment: Moment | None = None, step: int | None = None) -> None:
    """Every parameter of this rank's model: the module's weight and the optimizer's fp32 master value;
    with `step` (a resume) both AdamW moments and Adam's step count too. `value` and `moment` give this
    rank's tensor-parallel shard of a parameter (`local` is that shard's shape); a value of None leaves
    the parameter as it is."""
    optimizer = _Optimizer(engine, step)
    for name, param in model.named_parameters():
        name = name.removeprefix("model.")
        local = tuple(getattr(param, "ds_shape", param.shape))
        shard = value(name, param, local)
        if shard is None:
            continue
        _set_weight(param, shard)
        if param.requires_grad:
            optimizer.set(param, shard, {k: moment(name, param, local, k) for k in MOMENTS} if step else {})


def _set_weight(param: nn.Parameter, value: torch.Tensor) -> None:
    """The module's own (low-precision) copy; under ZeRO-3 gathered, set, partitioned again."""
    if hasattr(param, "ds_id"):
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value)
    else:
        param.data.copy_(value)


class _Optimizer:
    """Where this rank's part of a parameter's fp32 value and AdamW moments live in the engine's optimizer.

    ZeRO-1/2: one flat fp32 partition per group (single_partition_of_fp32_groups), torch's AdamW state keyed
    by it, the parameter's fragment in it named by its _hp_mapping. ZeRO-3: flat fp32 partitions per sub
    group, each parameter's piece at its grad_position. ZeRO-0 (fp32): torch's AdamW over the parameters.
    Torch creates the state at the first step; a resume creates it here, with the saved step count."""

    def __init__(self, engine, step: int | None):
        self.stage = engine.zero_optimization_stage()
        self.optimizer = engine.optimizer
        self.step = step
        if self.stage == 0 and engine.bfloat16_enabled():
            raise CheckpointError("a checkpoint cannot be loaded on another layout into bf16 at ZeRO-0 (DeepSpeed's "
                                  "BF16_Optimizer); train at parallel.zero_stage 1-3, or resume on the writer's layout")
        flats = {1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups",
                 3: "fp32_partitioned_groups_flat"}.get(self.stage)
        if step and flats:
            for flat in getattr(self.optimizer, flats):
                self._state(self.optimizer.optimizer, flat)

    def _state(self, torch_optimizer, tensor: torch.Tensor) -> dict:
        state = torch_optimizer.state[tensor]
        if not state:
            state["step"] = torch.tensor(float(self.step), dtype=torch.float32)
            for key in MOMENTS:
                state[key] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
        return state

    def set(self, param: nn.Parameter, value: torch.Tensor, moments: dict) -> None:
        """This rank's part of a trainable parameter's fp32 value and moments (none: the value only)."""
        if self.stage == 3:
            self._set_zero3(param, value, moments)
        elif self.stage in (1, 2):
            self._set_fragment(param, value, moments)
        elif moments:  # ZeRO-0: the module's weight is the fp32 value
            state = self._state(self.optimizer, param)
            for key, moment in moments.items():
                state[key].copy_(moment)

    def _set_fragment(self, param, value, moments) -> None:
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:  # none of this parameter is in this rank's partition
            return
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        flat_value = value.reshape(-1)
        mapping.hp_fragment.copy_(flat_value.narrow(0, lp.start, lp.numel))
        if moments:
            flat = self.optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
            state = self._state(self.optimizer.optimizer, flat)
            for key, moment in moments.items():
                state[key].narrow(0, hp.start, hp.numel).copy_(moment.reshape(-1).narrow(0, lp.start, lp.numel))

    def _set_zero3(self, param, value, moments) -> None:
        # DeepSpeed's set_full_hp_param cuts this rank's piece without the padding a last rank's piece may
        # have (it fails for a parameter with fewer elements than ranks): its cut, padded.
        optimizer = self.optimizer
        for key in (None, *moments):
            piece, _ = optimizer._get_fp32_opt_state_partition(param, False, optim_state_key=key)
            start = piece.numel() * optimizer._get_param_partition_rank(param)
            source = value if key is None else moments[key]
            flat = torch.nn.functional.pad(source.reshape(-1).float(), (0, max(0, start + piece.numel() - source.numel())))
            piece.copy_(flat.narrow(0, start, piece.numel()))


@torch.no_grad()
def _restore_target(objective, source: DeepSpeedCheckpoint) -> None:
    target = objective.ema_target()
    if target is None:
        return
    for name, t in target.named_parameters():
        t.copy_(_local(source, name, t, tuple(t.shape), target=True))
