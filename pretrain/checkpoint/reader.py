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
That is the reconstruction DeepSpeed's own zero_to_fp32.py does. AdamW's moments lie beside the fp32
values in the same order (`state=` of `read`): ZeRO-1/2 in `base_optimizer_state`, ZeRO-3 in
`optimizer_state_dict`, one flat tensor per group like the values; ZeRO-0 keeps torch's per-parameter
state, known only by position, which the trainer names in its client state (`optimizer_params`). Unlike it, this reads one parameter
at a time from memory-mapped files, copying a few MB at a time into the full tensor and unmapping
the pages it copied, so memory stays near the largest tensor rather than the model; and every file
is loaded with weights_only=True (pretrain.checkpoint.safe_load), so no pickled code ever runs.

Tensor-parallel shards are then joined along the dimension where a rank's shape differs from the
full shape (which comes from the model code: model/tensors.py).

Most exported tensors are, byte for byte, a few contiguous stretches of the checkpoint's files: every
tensor of a layout without a row-parallel join (whose rows interleave two ranks' columns), and the
fused QKV / gate-up parts, which are runs of rows. `runs()` names those stretches, so a writer can
have the kernel copy them file to file (sendfile) without them passing through this process's
memory: on the machines measured (bench/convert.py), writing from user memory ran at a fifth of the
speed of a kernel copy.
"""

from __future__ import annotations

import bisect
import ctypes
import json
import math
import mmap
import os
import re
import sys
from pathlib import Path

import torch

from cromwell.pretrain import checkpoint
from cromwell.pretrain.checkpoint import CheckpointError, safe_load
from cromwell.pretrain.config import Config
from cromwell.model.tensors import Param, Piece, split_dim


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
    """Files loaded memory-mapped, once: tensors are read from them only where touched."""

    def __init__(self):
        self.files = {}
        self.mappings: list[tuple[int, int, Path]] = []  # (address, bytes, file) of each file's mapping, sorted

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
            base = _mapping_base(path, self.files[path])
            if base is not None:
                bisect.insort(self.mappings, (base, path.stat().st_size, path))
        return self.files[path]

    def locate(self, view: torch.Tensor) -> tuple[Path, int] | None:
        """(file, byte offset) of a contiguous float32 view's bytes, when they are a file's own bytes."""
        if view.dtype != torch.float32 or not view.is_contiguous() or sys.byteorder != "little":
            return None
        i = bisect.bisect_right(self.mappings, (view.data_ptr(), math.inf)) - 1
        if i < 0:
            return None
        base, size, path = self.mappings[i]
        offset = view.data_ptr() - base
        return (path, offset) if offset + 4 * view.numel() <= size else None


def _mapping_base(path: Path, state) -> int | None:
    """The address torch.load(mmap=True) mapped `path` at: it maps the whole file once and gives each
    storage the slice at its zip record's offset. Found from the lowest storage and checked against
    every other; None when they disagree (the file is then read through memory only)."""
    reader = torch._C.PyTorchFileReader(str(path))
    offsets = {reader.get_record_offset(n) for n in reader.get_all_records() if n.startswith("data/")}
    addresses = {t.untyped_storage().data_ptr() for t in checkpoint.all_tensors(state) if t.untyped_storage().nbytes()}
    if not addresses or not offsets:
        return None
    base = min(addresses) - min(offsets)
    return base if all(a - base in offsets for a in addresses) else None


class DeepSpeedCheckpoint:
    def __init__(self, tag_dir: Path):
        self.dir = tag_dir
        marker = checkpoint.read_marker(tag_dir)
        self.config = Config.model_validate(marker["config"])
        self.layout = marker["layout"]
        self.tp, self.pp, self.dp = self.layout["tp"], self.layout["pp"], self.layout["dp"]
        self.zero = self.config.parallel.zero_stage
        self.files = _Mapped()
        self._fds: dict[Path, int] = {}  # files opened for send()
        self._where: dict[str, list] = {}  # parameter name -> [(tp rank, shape, how to read its shard)]
        self._position: dict[tuple[Path, str], int] = {}  # ZeRO-0: (model file, name) -> index in torch's state
        self._targets: dict[str, list] = {}  # the same for the EMA target's copy, when there is one
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                self._index(pp_rank, tp_rank)
                self._index_targets(pp_rank, tp_rank)
        if self.zero in (1, 2):
            for pp_rank in range(self.pp):
                for tp_rank in range(self.tp):
                    self._index_frozen(pp_rank, tp_rank)

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
                order = [n for group in states.get("optimizer_params") or [] for n in group]
                self._position.update({(self._model_file(mp), n): i for i, n in enumerate(order)})
            return
        optim = self.files.get(self._optim_file(0, mp))["optimizer_state_dict"]
        if self.zero == 3:
            self._index_zero3(states, optim, mp, tp_rank, prefix)
        else:
            self._index_zero12(states, optim, mp, tp_rank, prefix)
        for name, shape in (states.get("frozen_param_shapes") or {}).items():
            self._add(name[len(prefix):], tp_rank, shape, ("frozen", mp, name, torch.Size(shape).numel()))

    def _index_frozen(self, pp_rank: int, tp_rank: int) -> None:
        """A frozen parameter (a curriculum stage's, e.g. stage 1's output projection) is in no optimizer
        partition: ZeRO-1/2 keep it whole in the module's weights (a pipeline's in its layer files)."""
        mp = pp_rank * self.tp + tp_rank
        module = self.files.get(self._model_file(mp))["module"]
        if module is None:
            self._index_layers(tp_rank, missing_only=True)
            return
        for name, t in _tensors(module):
            if name.startswith("model."):
                self._add(name.removeprefix("model."), tp_rank, t.shape, ("module", self._model_file(mp), name), True)

    def _index_layers(self, tp_rank: int, missing_only: bool = False) -> None:
        for path in sorted(self.dir.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt")):
            layer = int(path.name.split("-")[0].removeprefix("layer_"))
            for name, t in _tensors(self.files.get(path)):
                self._add(f"{layer}.{name}", tp_rank, t.shape, ("layer", path, name), missing_only)

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

    def _add(self, name: str, tp_rank: int, shape, how: tuple, missing_only: bool = False) -> None:
        """Where tensor-parallel rank tp_rank's shard of `name` is; with missing_only, unless already known."""
        where = self._where.setdefault(name, [])
        if not (missing_only and any(w[0] == tp_rank for w in where)):
            where.append((tp_rank, tuple(shape), how))

    def names(self, target: bool = False) -> set[str]:
        return set(self._targets if target else self._where)

    # -- reading ----------------------------------------------------------------------------------

    def _flat(self, mp: int, dp: int, key: str, state: str | None = None) -> list[torch.Tensor]:
        """Data-parallel rank dp's flat fp32 groups (key), or the optimizer state `state` beside them."""
        optim = self.files.get(self._optim_file(dp, mp))["optimizer_state_dict"]
        if state is None:
            return optim[key]
        torch_state = optim["base_optimizer_state" if self.zero in (1, 2) else "optimizer_state_dict"]["state"]
        return [self._moment(torch_state, i, state) for i in range(len(optim[key]))]

    def _moment(self, torch_state: dict, index: int, state: str) -> torch.Tensor:
        if index not in torch_state or state not in torch_state[index]:
            raise CheckpointError(f"{self.dir}: the optimizer holds no {state} for its entry {index} (it has taken no "
                                  "step yet?)")
        return torch_state[index][state]

    def adam_step(self) -> int:
        """How many steps AdamW has taken (its bias correction's t): 0 before the first."""
        if self.zero == 0:
            torch_state = self.files.get(self._model_file(0))["optimizer"]["state"]
        else:
            optim = self.files.get(self._optim_file(0, 0))["optimizer_state_dict"]
            torch_state = optim["base_optimizer_state" if self.zero in (1, 2) else "optimizer_state_dict"]["state"]
        steps = {int(entry["step"]) for entry in torch_state.values() if "step" in entry}
        if len(steps) > 1:
            raise CheckpointError(f"{self.dir}: the optimizer's parameters have taken different numbers of steps: "
                                  f"{sorted(steps)}")
        return steps.pop() if steps else 0

    def _pieces(self, how: tuple, state: str | None = None) -> list[torch.Tensor]:
        """One TP shard's elements in order, as flat views into the mapped files: the fp32 values, or
        the optimizer state `state` (exp_avg, exp_avg_sq) of them."""
        kind = how[0]
        if state is not None and kind not in ("module", "zero12", "zero3"):
            raise CheckpointError(f"{self.dir}: {how[2]} has no optimizer state ({kind}: frozen, or an EMA target)")
        if kind == "module" and state is not None:
            position = self._position.get((how[1], how[2]))
            if position is None:
                raise CheckpointError(f"{how[1]}: does not say which of its optimizer states is {how[2]}'s (written "
                                      "before checkpoints named them: resume it on its own layout)")
            return [self._moment(self.files.get(how[1])["optimizer"]["state"], position, state).view(-1)]
        if kind in ("module", "layer", "target"):
            state_dict = self.files.get(how[1])
            return [(state_dict["module"] if kind == "module" else state_dict.get("ema_target", state_dict))[how[2]].view(-1)]
        if kind == "frozen":
            _, mp, name, numel = how
            files = [self._model_file(mp)] if self.zero != 3 else [self._zero3_model_file(dp, mp) for dp in range(self.dp)]
            flat = [self.files.get(f)["frozen_param_fragments"][name].view(-1) for f in files]
            return _range(flat, 0, numel)
        if kind == "zero12":
            _, mp, group, offset, numel = how
            return _range([self._flat(mp, dp, "single_partition_of_fp32_groups", state)[group] for dp in range(self.dp)],
                          offset, numel)
        _, mp, offset, piece, numel = how  # zero3: each rank's piece of it, the last one padded
        pieces = [p for dp in range(self.dp) for p in _range(self._flat(mp, dp, "fp32_flat_groups", state), offset, piece)]
        return _range(pieces, 0, numel)

    def _zero3_model_file(self, dp: int, mp: int) -> Path:
        return self.dir / f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt"

    def local_shape(self, name: str, target: bool = False) -> tuple:
        """The shape of one tensor-parallel rank's shard of parameter `name` as it was saved."""
        where = (self._targets if target else self._where).get(name)
        if not where:
            raise CheckpointError(f"{self.dir}: has no parameter {name}" + (" in its EMA target" if target else ""))
        return where[0][1]

    def _shards(self, param: Param, target: bool) -> tuple[list, int | None]:
        """The parameter's TP shards in rank order and the dimension they join along, checked."""
        where = sorted((self._targets if target else self._where).get(param.source, []), key=lambda w: w[0])
        if [w[0] for w in where] != list(range(self.tp)):
            raise CheckpointError(f"{self.dir}: parameter {param.source} is on tensor-parallel ranks "
                                  f"{[w[0] for w in where]}, expected {list(range(self.tp))}")
        shapes = {w[1] for w in where}
        if len(shapes) > 1:
            raise CheckpointError(f"{self.dir}: parameter {param.source} has different shapes on the tensor-parallel "
                                  f"ranks: {[w[1] for w in where]}")
        local = where[0][1]
        split = split_dim(local, param.shape)
        expected = list(param.shape)
        if split is not None:
            expected[split] = local[split]
        if list(local) != expected or (split is not None and local[split] * self.tp != param.shape[split]):
            raise CheckpointError(f"{self.dir}: parameter {param.source} has shape {list(local)} on each of "
                                  f"{self.tp} tensor-parallel ranks; the model's is {list(param.shape)}")
        return where, split

    @torch.no_grad()
    def read(self, param: Param, target: bool = False, state: str | None = None) -> torch.Tensor:
        """The full fp32 value of one parameter (or of its EMA target), or its optimizer state `state`
        (exp_avg, exp_avg_sq): its TP shards joined."""
        where, split = self._shards(param, target)
        out = torch.empty(param.shape)
        for tp_rank, shape, how in where if split is not None else where[:1]:
            dst = out if split is None else out.narrow(split, tp_rank * shape[split], shape[split])
            _copy_released(dst, self._pieces(how, state))
        return out

    def runs(self, param: Param, piece: Piece, target: bool = False) -> list[tuple[Path, int, int]] | None:
        """The (file, byte offset, bytes) stretches that hold `cut(read(param), piece)`, in order; None
        when its bytes are not the files' own (a row-parallel join, a non-float32 source)."""
        where, split = self._shards(param, target)
        if split not in (None, 0):
            return None
        stretches = []  # of the full parameter, in element order: (file, byte offset, elements)
        for _, _, how in where if split == 0 else where[:1]:
            for view in self._pieces(how):
                at = self.files.locate(view)
                if at is None:
                    return None
                stretches.append((*at, view.numel()))
        width = math.prod(param.shape[1:])
        return _select(stretches, [(row * width, rows * width) for row, rows in _piece_rows(piece, param.shape[0])])

    def send(self, runs: list[tuple[Path, int, int]], fd: int) -> None:
        """Append the stretches' bytes to the file open at `fd`, copied by the kernel."""
        for path, offset, nbytes in runs:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            while nbytes:
                sent = os.sendfile(fd, self._fds[path], offset, nbytes)
                if sent == 0:
                    raise CheckpointError(f"{path}: ends before byte {offset + nbytes} (truncated?)")
                offset, nbytes = offset + sent, nbytes - sent

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def training_state(self) -> dict:
        """What the trainer saved beside the weights (step, tokens seen, loader position, config...)."""
        states = self.files.get(self._model_file(0))
        skip = {"module", "optimizer", "lr_scheduler", "param_shapes", "frozen_param_shapes", "frozen_param_fragments",
                "buffer_names", "shared_params", "csr_tensor_module_names", "data_sampler", "random_ltd",
                "sparse_tensor_module_names", "skipped_steps", "global_samples", "dp_world_size", "mp_world_size",
                "ds_config", "ds_version", "global_steps", "checkpoint_parallel_dimensions", "optimizer_params"}
        return {k: v for k, v in states.items() if k not in skip}

    def engine_state(self) -> dict:
        """DeepSpeed's own counters and the LR schedule's state, as the engine saved them."""
        states = self.files.get(self._model_file(0))
        return {k: states.get(k) for k in ("global_steps", "global_samples", "skipped_steps", "lr_scheduler")}


def _tensors(state_dict: dict):
    # megatron-core's layers save an `_extra_state` entry, None, beside their weights.
    return [(k, v) for k, v in state_dict.items() if v is not None and not k.endswith("._extra_state")]


def _range(parts: list[torch.Tensor], offset: int, numel: int) -> list[torch.Tensor]:
    """Elements [offset, offset + numel) of the concatenation of flat tensors `parts`, as views."""
    out, start = [], 0
    for part in parts:
        end = start + part.numel()
        lo, hi = max(offset, start), min(offset + numel, end)
        if lo < hi:
            out.append(part[lo - start:hi - start])
        start = end
    if sum(t.numel() for t in out) != numel:
        raise CheckpointError(f"a ZeRO partition holds {start} elements, too few for [{offset}, {offset + numel})")
    return out


def _piece_rows(piece: Piece, rows: int) -> list[tuple[int, int]]:
    """(first row, rows) of the full parameter that make up the piece, in order (as model/tensors.cut)."""
    lo, hi, _ = piece.rows.indices(rows // piece.parts)
    if piece.parts == 1:
        return [(lo, hi - lo)]
    unit, group = piece.unit, piece.parts * piece.unit
    out = []
    for g in range(lo // unit, -(-hi // unit)):
        a, b = max(lo, g * unit), min(hi, (g + 1) * unit)
        out.append((g * group + piece.part * unit + a - g * unit, b - a))
    return out


def _select(stretches: list[tuple[Path, int, int]], ranges: list[tuple[int, int]]) -> list[tuple[Path, int, int]]:
    """The (file, byte offset, bytes) runs of element ranges [(start, count)] of the concatenation of
    stretches [(file, byte offset, elements)], adjacent runs merged."""
    starts, total = [], 0
    for _, _, n in stretches:
        starts.append(total)
        total += n
    out = []
    for start, count in ranges:
        i = bisect.bisect_right(starts, start) - 1
        while count:
            path, offset, n = stretches[i]
            skip = start - starts[i]
            take = min(count, n - skip)
            byte = offset + 4 * skip
            if out and out[-1][0] == path and out[-1][1] + out[-1][2] == byte:
                out[-1] = (path, out[-1][1], out[-1][2] + 4 * take)
            else:
                out.append((path, byte, 4 * take))
            start, count, i = start + take, count - take, i + 1
    return out


_CHUNK = 16 << 20  # bytes copied between releases of the source pages


def _copy_released(dst: torch.Tensor, pieces: list[torch.Tensor]) -> None:
    """Fill dst (any strides) from flat views into mapped files, in row blocks of a few MB, letting each
    block's pages go once copied: a page read through a mapping stays in the process's memory until it
    is unmapped, so without this reading a tensor would cost its size twice."""
    if dst.dim() == 1:
        rows = dst.view(1, -1)
    elif dst.is_contiguous():
        rows = dst.view(dst.shape[0], -1)
    elif dst.dim() == 2:  # a row-parallel shard: columns of the full matrix
        rows = dst
    else:
        raise ValueError(f"cannot fill a {dst.dim()}-dimensional tensor split along a later dimension")
    width = rows.shape[1]
    step = max(1, _CHUNK // (4 * width))
    flat = iter(pieces)
    current, used = next(flat), 0
    for r in range(0, rows.shape[0], step):
        need, parts = min(step, rows.shape[0] - r) * width, []
        while need:
            if used == current.numel():
                current, used = next(flat), 0
            take = min(need, current.numel() - used)
            parts.append(current[used:used + take])
            used, need = used + take, need - take
        block = rows[r:r + step]
        block.copy_((parts[0] if len(parts) == 1 else torch.cat(parts)).view(block.shape))
        for part in parts:
            _release(part)


_libc = ctypes.CDLL(None, use_errno=True)
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def _release(t: torch.Tensor) -> None:
    """Unmap the whole pages under t (a view into a file mapped copy-on-write and never written: they
    are read again from the file if touched again)."""
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    lo, hi = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if hi > lo:
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


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
