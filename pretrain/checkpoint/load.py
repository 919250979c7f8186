"""A trained model for inference from whatever holds it: a trainer checkpoint of any layout (TP x PP x DP,
ZeRO 0-3), a safetensors export of tools/convert_ckpt.py, or a Hugging Face model directory.

`locate` reads what a path holds and the model's full shapes (built at TP=1, so before any tensor-parallel
group of size > 1 exists); `load` then builds the model for this process's tensor-parallel rank and gives
each parameter its shard of the full tensor: the checkpoint's layout and the evaluation's need not match.
A VL-JEPA's EMA target comes along when the checkpoint holds one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from torch import nn

from cromwell.data.tokenizer import EOS_ID, PAD_ID, load_hf_tokenizer, load_tokenizer
from cromwell.model.build import build
from cromwell.model.gpt import megatron_config
from cromwell.model.tensors import join, plan, tp_shard
from cromwell.pretrain import checkpoint
from cromwell.pretrain.checkpoint import CheckpointError
from cromwell.pretrain.checkpoint.reader import DeepSpeedCheckpoint, find_tag
from cromwell.pretrain.config import Config


@dataclass
class Loaded:
    source: Path
    kind: str  # "checkpoint", "export" or "hf"
    cfg: Config | None  # the run config (None for a Hugging Face model)
    model: nn.Module  # GPT, VLJEPA or model.hf.HFCausalLM, in eval mode
    tokenizer: object  # a tokenizers.Tokenizer, or a Hugging Face tokenizer
    target: nn.Module | None = None  # the VL-JEPA's EMA target encoder
    step: int | None = None

    @property
    def vocab(self) -> int:
        """Rows of the vocabulary the tokenizer knows (the model's are padded beyond)."""
        if self.kind == "hf":
            return len(self.tokenizer)
        return self.tokenizer.get_vocab_size()

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id if self.kind == "hf" else EOS_ID

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.kind == "hf" else PAD_ID

    def encode(self, text: str) -> list[int]:
        if self.kind == "hf":
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class Source:
    """What is at a path, read before any tensor-parallel group exists (the plan of full shapes is built at
    TP=1): `locate`, then `load` once the groups are made."""

    path: Path
    kind: str
    cfg: Config | None = None
    params: dict | None = None  # parameter name -> model/tensors.Param (full shapes, exported pieces)


def locate(path: Path, tag: str | None = None) -> Source:
    """A run's checkpoints folder (its newest complete checkpoint, or `tag`), one global_stepN folder, a run
    directory, a safetensors export, or a Hugging Face model directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path}: no such file or directory")
    if (path / "adapter_config.json").is_file():  # a LoRA adapter saved by pretrain/step_jepa.py
        return Source(path, "hf")
    config = path / "config.json"
    if config.is_file():  # an export of ours says so in its config.json; anything else is a Hugging Face model
        info = json.loads(config.read_text())
        if "run_config" not in info:
            return Source(path, "hf")
        cfg = Config.model_validate(info["run_config"])
        return Source(path, "export", cfg, _params(cfg))
    if (path / "checkpoints").is_dir() and not (path / checkpoint.MARKER).is_file():
        path = path / "checkpoints"  # a run's output directory
    tag_dir = find_tag(path, tag)
    cfg = Config.model_validate(checkpoint.read_marker(tag_dir)["config"])
    return Source(tag_dir, "checkpoint", cfg, _params(cfg))


def load(source: Source) -> Loaded:
    """The model of `source`, built for this process's tensor-parallel rank."""
    return {"checkpoint": _from_checkpoint, "export": _from_export, "hf": _from_hf}[source.kind](source)


def _build(cfg: Config, target: bool = False) -> nn.Module:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return build(cfg.model, megatron_config(tp), kernels=cfg.training.kernels, target=target)


def _fill(module: nn.Module, full) -> None:
    """Each parameter of `module` (this rank's shard) from full(name), the whole fp32 tensor."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(tp_shard(full(name), p.shape, rank))


def _params(cfg: Config) -> dict:
    if cfg.model.type == "hf":
        raise CheckpointError("a model.type=hf run saves a Hugging Face folder at its end: load that folder")
    return {q.source: q for q in plan(cfg.model)}


def _from_checkpoint(source: Source) -> Loaded:
    tag_dir, cfg, params = source.path, source.cfg, source.params
    checkpoint.verify_checksums(tag_dir)
    ckpt = DeepSpeedCheckpoint(tag_dir)
    try:
        model = _build(cfg)
        _fill(model, lambda name: ckpt.read(params[name]))
        target = None
        if ckpt.names(target=True):
            target = _build(cfg, target=True)
            _fill(target, lambda name: ckpt.read(params[name], target=True))
    finally:
        ckpt.close()
    tokenizer = load_tokenizer(tag_dir / "tokenizer.json")
    return Loaded(tag_dir, "checkpoint", cfg, model.eval(), tokenizer, target and target.eval(), checkpoint.step_of(tag_dir))


def _from_export(source: Source) -> Loaded:
    from safetensors import safe_open

    export, cfg, params = source.path, source.cfg, source.params
    with safe_open(export / "model.safetensors", framework="pt") as f:
        names = set(f.keys())

        def full(name: str, prefix: str = "") -> torch.Tensor:
            q = params[name]
            missing = [prefix + piece.name for piece in q.pieces if prefix + piece.name not in names]
            if missing:
                raise CheckpointError(f"{export / 'model.safetensors'} lacks {', '.join(missing)}")
            return join(q, {piece.name: f.get_tensor(prefix + piece.name) for piece in q.pieces})

        model = _build(cfg)
        _fill(model, full)
        target = None
        if any(n.startswith("target.") for n in names):
            target = _build(cfg, target=True)
            _fill(target, lambda name: full(name, "target."))
    step = json.loads((export / "training_state.json").read_text()).get("step")
    return Loaded(export, "export", cfg, model.eval(), load_tokenizer(export / "tokenizer.json"), target and target.eval(),
                  step)


def _from_hf(source: Source) -> Loaded:
    from cromwell.model import hf

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        raise CheckpointError(f"{source.path}: a Hugging Face model loads whole on one process (--tp 1)")
    tokenizer = load_hf_tokenizer(source.path)
    return Loaded(source.path, "hf", None, hf.load_model(str(source.path), len(tokenizer)).eval(), tokenizer)
