"""Reading the trainer's DeepSpeed checkpoints, one full fp32 parameter at a time, whatever their layout.

Where a parameter's fp32 value lives depends on the layout (DeepSpeed 0.19):
- ZeRO-0 without bf16: in the module weights, `mp_rank_<tp>_model_states.pt` (one per TP rank) or,
  under a pipeline, `layer_<index>-model_<tp>-model_states.pt` (one per layer and TP rank).
- ZeRO-1/2 (and bf16): the fp32 master copy is partitioned over the data-parallel ranks:
  `zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt` holds rank dp's slice of each parameter
  group's flat vector (`single_partition_of_fp32_groups`), the parameters laid end to end in the
  order of `param_shapes` (in the model states file), each followed by its alignment padding.
- ZeRO-3: each parameter is cut into dp equal (padded) pieces; rank dp's pieces lie end to end in
  `fp32_flat_groups` of its optim file.
That is the reconstruction DeepSpeed's own zero_to_fp32.py does. Unlike it, this reads only the
slices of one parameter at a time from memory-mapped files and lets the mappings go every
`budget` bytes, so memory stays near the largest tensor rather than the model; and every file is
loaded with weights_only=True (pretrain.checkpoint.safe_load), so no pickled code ever runs.

Tensor-parallel shards are then joined along the dimension where a rank's shape differs from the
full shape (which comes from the model code: tools/export_tensors.py).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from pretrain import checkpoint
from pretrain.checkpoint import CheckpointError, safe_load
from pretrain.config import Config
from tools.export_tensors import Param


def find_tag(directory: Path, tag: str | None) -> Path:
    """The checkpoint folder: `directory` itself when it is one, else its `tag` (a global_stepN, or
    latest: the newest complete one)."""
    if not directory.is_dir():
        raise CheckpointError(f"--checkpoint {directory}: no such folder")
    if (directory / checkpoint.MARKER).is_file() or re.fullmatch(r"global_step\d+", directory.name):
        tag_dir = directory
    else:
        tags = checkpoint._tag_dirs(directory)
        if not tags:
            raise CheckpointError(f"--checkpoint {directory}: no global_step<N> folder in it")
        if tag in (None, "latest"):
            tag_dir, skipped = checkpoint.newest_complete(directory)
            for path, why in skipped:
                print(f"skipping {path}: {why}")
            if tag_dir is None:
                raise CheckpointError(f"--checkpoint {directory}: no complete checkpoint ({skipped[0][1]} in the newest)")
        else:
            tag_dir = directory / tag
            if not tag_dir.is_dir():
                raise CheckpointError(f"--tag {tag}: not in {directory} (it has {', '.join(t.name for t in tags)})")
    why = checkpoint.problem(tag_dir)
    if why:
        raise CheckpointError(f"{tag_dir} is not a complete checkpoint: {why}")
    return tag_dir


class _Mapped:
    """Files loaded memory-mapped on first use and let go once `budget` bytes were read from them:
    pages read through a mapping count in the process's memory until it is unmapped."""

    def __init__(self, budget: int):
        self.budget, self.read, self.files = budget, 0, {}

    def get(self, path: Path) -> dict:
        if path not in self.files:
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (the checkpoint's layout needs it)")
            try:
                self.files[path] = safe_load(path, map_location="cpu", mmap=True)
            except CheckpointError:
                raise
            except (RuntimeError, OSError, EOFError, ValueError) as e:
                raise CheckpointError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
        return self.files[path]

    def count(self, nbytes: int) -> None:
        self.read += nbytes
        if self.read >= self.budget:
            self.files.clear()
            self.read = 0


class DeepSpeedCheckpoint:
    def __init__(self, tag_dir: Path, budget: int = 256 << 20):
        self.dir = tag_dir
        marker = checkpoint.read_marker(tag_dir)
        self.config = Config.model_validate(marker["config"])
        self.layout = marker["layout"]
        self.tp, self.pp, self.dp = self.layout["tp"], self.layout["pp"], self.layout["dp"]
        self.zero = self.config.parallel.zero_stage
        self.files = _Mapped(budget)
        self._where: dict[str, list] = {}  # parameter name -> [(tp rank, shape, how to read its shard)]
        self._targets: dict[str, list] = {}  # the same for the EMA target's copy, when there is one
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                self._index(pp_rank, tp_rank)
                self._index_targets(pp_rank, tp_rank)

    # -- what is where ---------------------------------------------------------------------------

    def _model_file(self, mp: int) -> Path:
        name = f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt" if self.zero == 3 else f"mp_rank_{mp:02d}_model_states.pt"
        return self.dir / name

    def _optim_file(self, dp: int, mp: int) -> Path:
        prefix = "bf16_" if self.config.training.precision == "bf16" and self.zero == 0 else ""
        return self.dir / f"{prefix}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"

    def _index(self, pp_rank: int, tp_rank: int) -> None:
        # DeepSpeed numbers a pipeline's model-parallel ranks stage-major: stage * tp + tensor rank.
        mp = pp_rank * self.tp + tp_rank
        states = self.files.get(self._model_file(mp))
        prefix = "" if self.pp > 1 else "model."  # the trainer's TrainModule holds the model as .model
        if self.zero == 0:
            if self.pp > 1:
                self._index_layers(tp_rank)
            else:
                for name, t in _tensors(states["module"]):
                    if name.startswith(prefix):
                        self._add(name[len(prefix):], tp_rank, t.shape, ("module", self._model_file(mp), name))
            return
        optim = self.files.get(self._optim_file(0, mp))["optimizer_state_dict"]
        if self.zero == 3:
            self._index_zero3(states, optim, mp, tp_rank, prefix)
        else:
            self._index_zero12(states, optim, mp, tp_rank, prefix)
        for name, shape in (states.get("frozen_param_shapes") or {}).items():
            self._add(name[len(prefix):], tp_rank, shape, ("frozen", mp, name, torch.Size(shape).numel()))

    def _index_layers(self, tp_rank: int) -> None:
        for path in sorted(self.dir.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt")):
            layer = int(path.name.split("-")[0].removeprefix("layer_"))
            for name, t in _tensors(self.files.get(path)):
                self._add(f"{layer}.{name}", tp_rank, t.shape, ("layer", path, name))

    def _index_zero12(self, states, optim, mp, tp_rank, prefix) -> None:
        paddings = optim.get("param_alignment_paddings")
        for group, shapes in enumerate(states["param_shapes"]):
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = torch.Size(shape).numel()
                self._add(name[len(prefix):], tp_rank, shape, ("zero12", mp, group, offset, numel))
                offset += numel + (paddings[group][i] if paddings else 0)

    def _index_zero3(self, states, optim, mp, tp_rank, prefix) -> None:
        offset = 0
        for shapes in states["param_shapes"]:
            for name, shape in shapes.items():
                numel = torch.Size(shape).numel()
                piece = math.ceil(numel / self.dp)
                self._add(name[len(prefix):], tp_rank, shape, ("zero3", mp, offset, piece, numel))
                offset += piece

    def _index_targets(self, pp_rank: int, tp_rank: int) -> None:
        path = self.dir / f"objective_state_tp{tp_rank:02d}_pp{pp_rank:02d}.pt"
        if path.is_file():
            for name, t in _tensors(self.files.get(path).get("ema_target", {})):
                self._targets.setdefault(name, []).append((tp_rank, tuple(t.shape), ("target", path, name)))

    def _add(self, name: str, tp_rank: int, shape, how: tuple) -> None:
        self._where.setdefault(name, []).append((tp_rank, tuple(shape), how))

    def names(self, target: bool = False) -> set[str]:
        return set(self._targets if target else self._where)

    # -- reading ----------------------------------------------------------------------------------

    def _flat(self, mp: int, dp: int, key: str) -> list[torch.Tensor]:
        return self.files.get(self._optim_file(dp, mp))["optimizer_state_dict"][key]

    def _shard(self, how: tuple) -> torch.Tensor:
        kind = how[0]
        if kind == "module":
            return self.files.get(how[1])["module"][how[2]].float()
        if kind == "layer":
            return self.files.get(how[1])[how[2]].float()
        if kind == "target":
            return self.files.get(how[1])["ema_target"][how[2]].float()
        if kind == "frozen":
            _, mp, name, numel = how
            if self.zero != 3:
                return self.files.get(self._model_file(mp))["frozen_param_fragments"][name].float().flatten()
            pieces = [self.files.get(self._zero3_model_file(dp, mp))["frozen_param_fragments"][name].flatten()
                      for dp in range(self.dp)]
            return torch.cat(pieces)[:numel].float()
        if kind == "zero12":
            _, mp, group, offset, numel = how
            parts = [self._flat(mp, dp, "single_partition_of_fp32_groups")[group] for dp in range(self.dp)]
            return _slice_across(parts, offset, numel)
        _, mp, offset, piece, numel = how  # zero3
        chunks = []
        for dp in range(self.dp):
            groups = self._flat(mp, dp, "fp32_flat_groups")
            chunks.append(_slice_across(groups, offset, piece))
        return torch.cat(chunks)[:numel]

    def _zero3_model_file(self, dp: int, mp: int) -> Path:
        return self.dir / f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt"

    def read(self, param: Param, target: bool = False) -> torch.Tensor:
        """The full fp32 value of one parameter (or of its EMA target): its TP shards joined."""
        where = sorted((self._targets if target else self._where).get(param.source, []), key=lambda w: w[0])
        if [w[0] for w in where] != list(range(self.tp)):
            raise CheckpointError(f"{self.dir}: parameter {param.source} is on tensor-parallel ranks "
                                  f"{[w[0] for w in where]}, expected {list(range(self.tp))}")
        shapes = {w[1] for w in where}
        if len(shapes) > 1:
            raise CheckpointError(f"{self.dir}: parameter {param.source} has different shapes on the tensor-parallel "
                                  f"ranks: {[w[1] for w in where]}")
        local = where[0][1]
        split = [d for d, (a, b) in enumerate(zip(local, param.shape)) if a != b]
        if len(local) != len(param.shape) or len(split) > 1 or (split and local[split[0]] * self.tp != param.shape[split[0]]):
            raise CheckpointError(f"{self.dir}: parameter {param.source} has shape {list(local)} on each of "
                                  f"{self.tp} tensor-parallel ranks; the model's is {list(param.shape)}")
        shards = []
        for _, shape, how in (where if split else where[:1]):
            t = self._shard(how).detach().reshape(shape)
            self.files.count(t.numel() * 4)
            shards.append(t)
        return torch.cat(shards, dim=split[0]) if split else shards[0].clone()

    def training_state(self) -> dict:
        """What the trainer saved beside the weights (step, tokens seen, loader position, config...)."""
        states = self.files.get(self._model_file(0))
        skip = {"module", "optimizer", "lr_scheduler", "param_shapes", "frozen_param_shapes", "frozen_param_fragments",
                "buffer_names", "shared_params", "csr_tensor_module_names", "data_sampler", "random_ltd",
                "sparse_tensor_module_names", "skipped_steps", "global_samples", "dp_world_size", "mp_world_size",
                "ds_config", "ds_version", "global_steps", "checkpoint_parallel_dimensions"}
        return {k: v for k, v in states.items() if k not in skip}


def _tensors(state_dict: dict):
    # megatron-core's layers save an `_extra_state` entry, None, beside their weights.
    return [(k, v) for k, v in state_dict.items() if v is not None and not k.endswith("._extra_state")]


def _slice_across(parts: list[torch.Tensor], offset: int, numel: int) -> torch.Tensor:
    """Elements [offset, offset + numel) of the concatenation of flat tensors `parts`."""
    out, start = [], 0
    for part in parts:
        end = start + part.numel()
        lo, hi = max(offset, start), min(offset + numel, end)
        if lo < hi:
            out.append(part[lo - start:hi - start])
        start = end
    if sum(t.numel() for t in out) != numel:
        raise CheckpointError(f"a ZeRO partition holds {start} elements, too few for [{offset}, {offset + numel})")
    return torch.cat(out).float() if len(out) > 1 else out[0].float().clone()


def json_safe(value):
    """Tensors and numbers of a training state as JSON values."""
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def dumps(value) -> str:
    return json.dumps(json_safe(value), indent=1)
