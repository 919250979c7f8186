"""How the trainer's parameters map onto exported tensors, both ways.

The trainer names a parameter by its layer's position in the flat layer list ("12.attn.qkv.weight")
and stores fused projections (QKV interleaved per head, key/value per head, gate/up per unit; see
model/gpt.py) padded to a vocabulary multiple. An export names it by the design's five modules
(docs/design.md, The model: five modules) and keeps every matrix a reader expects:

    vision_encoder.layers.0.attn.q.weight       <- 1.attn.qkv.weight, rows of part 0 of each head
    language_encoder.embedding.weight           <- word.weight without its padding rows
    autoregressive_head.weight                  <- the output projection, likewise
    cross_modal_fusion.layers.0.attn.k.weight   <- the cross-attention's kv, part 0 of each head

The rows the vocabulary was padded with are kept aside as `<name>.vocab_padding` in the whole-model
formats: they take part in the softmax the model trained with, so a conversion back to DeepSpeed
(pretrain/checkpoint/reshard.py) must restore them for the model to give the same loss. The JEPA's EMA target
encoder, when the checkpoint has one, is exported under `target.` + the online names.

The parameter names and full shapes come from the model itself, built on the meta device at TP=1
(no memory, no process group): whatever the model code builds, the plan follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from torch import nn

from cromwell.model.config import ModelConfig
from cromwell.model.fusion import CrossAttention, CrossBlock, Projector
from cromwell.model.build import build
from cromwell.model.gpt import Attention, Block, Embedding, Head, megatron_config
from cromwell.model.jepa import Projections, TextPredictor, VisionPredictor
from cromwell.model.vit import PatchEmbed, VisionBlock, VisionNorm
from cromwell.model.vljepa import FinalNorm, OutputHead

# (which of the five modules, prefix inside it) of each layer class; blocks add their index among their kind.
_PLACE = {
    PatchEmbed: ("vision_encoder", "patch_embed."), VisionBlock: ("vision_encoder", "layers.{j}."),
    VisionNorm: ("vision_encoder", ""), Projector: ("cross_modal_fusion", "projector."),
    CrossBlock: ("cross_modal_fusion", "layers.{j}."), Embedding: ("language_encoder", ""),
    Block: ("language_encoder", "layers.{j}."), FinalNorm: ("language_encoder", ""),
    OutputHead: ("autoregressive_head", ""), Projections: ("jepa_head", "projections."),
    VisionPredictor: ("jepa_head", "vision_predictor."), TextPredictor: ("jepa_head", "text_predictor."),
}
# Renamed leaves: the embedding and the output projection are one matrix each in their module.
_RENAME = {(Embedding, "word.weight"): "embedding.weight", (OutputHead, "proj.weight"): "weight"}
_VOCAB = {"embedding.weight", "weight"}  # after renaming, in language_encoder / autoregressive_head
# Fused leaves: (parts, the unit they interleave by: "head" or one row).
_FUSED = {"qkv.weight": ("q", "k", "v"), "kv.weight": ("k", "v"), "gate_up.weight": ("gate", "up")}


@dataclass
class Piece:
    """One exported tensor cut from a parameter: rows of part `part` of `parts` interleaved every
    `unit` rows (the whole parameter when parts == 1), the first `rows` of them (vocabulary padding
    removed) or the rows from `rows` on (the padding)."""

    name: str
    shape: tuple
    part: int = 0
    parts: int = 1
    unit: int = 1
    rows: slice = field(default_factory=lambda: slice(None))


@dataclass
class Param:
    """A parameter of the trainer's model ("<layer>.<leaf>") and the tensors exported from it."""

    source: str
    shape: tuple  # full (TP=1), padded
    pieces: list[Piece]
    seed_module: str
    has_target: bool


def _meta_mp():
    mp = megatron_config(1)
    mp.perform_initialization = False  # nothing to fill on the meta device
    return mp


def meta_model(cfg: ModelConfig, target: bool = False) -> nn.Module:
    """The whole model (TP=1 shapes) on the meta device: its parameters' names and shapes, no memory."""
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        # megatron-core's layers would take the group's size and build shards, not full tensors.
        raise RuntimeError("the export plan is built before tensor-parallel groups of size > 1 exist")
    if cfg.type not in ("gpt", "vljepa"):
        raise ValueError(f"model.type {cfg.type!r} has no export: a model.type=hf run already saves a Hugging Face "
                         "folder")
    with torch.device("meta"):
        return build(cfg, _meta_mp(), target=target)


def _heads(layer: nn.Module) -> dict[str, int]:
    """{prefix of an attention module inside the layer: its heads}."""
    return {f"{name}.": m.local_heads for name, m in layer.named_modules() if isinstance(m, (Attention, CrossAttention))}


def plan(cfg: ModelConfig) -> list[Param]:
    """Every parameter of the model, in the model's order, with its exported pieces (the vocabulary's
    rows cut to model.vocab_size, without the padding)."""
    model = meta_model(cfg)
    counts: dict[type, int] = {}
    out = []
    has_target = _target_layers(cfg)
    for index, layer in model.named_children():
        kind = type(layer)
        j = counts.get(kind, 0)
        counts[kind] = j + 1
        heads = _heads(layer)
        for leaf, p in layer.named_parameters():
            module, prefix = _place(kind, leaf)
            name = _RENAME.get((OutputHead if kind is Head else kind, leaf), leaf)
            out.append(Param(f"{index}.{leaf}", tuple(p.shape),
                             _pieces(f"{module}.{prefix.format(j=j)}{name}", name, leaf, tuple(p.shape), heads,
                                     cfg.vocab_size, module),
                             module, index in has_target))
    return out


def _target_layers(cfg: ModelConfig) -> set[str]:
    if cfg.type != "vljepa":
        return set()
    return {name for name, _ in meta_model(cfg, target=True).named_children()}


def _place(kind: type, leaf: str) -> tuple[str, str]:
    if kind is Head:  # GPT's last layer: the final norm (language encoder) and the output projection
        return ("language_encoder", "") if leaf.startswith("norm.") else ("autoregressive_head", "")
    return _PLACE[kind]


def _pieces(name: str, renamed: str, leaf: str, shape: tuple, heads: dict, vocab: int, module: str) -> list[Piece]:
    stem = name[: -len(renamed)]
    if renamed in _VOCAB and module in ("language_encoder", "autoregressive_head"):
        pieces = [Piece(name, (vocab, *shape[1:]), rows=slice(0, vocab))]
        if shape[0] > vocab:
            pieces.append(Piece(f"{name}.vocab_padding", (shape[0] - vocab, *shape[1:]), rows=slice(vocab, None)))
        return pieces
    for fused, parts in _FUSED.items():
        if leaf == fused or leaf.endswith("." + fused):
            owner = leaf[: -len(fused)]
            unit = shape[0] // len(parts) // heads[owner] if fused != "gate_up.weight" else 1
            return [Piece(f"{stem}{renamed[: -len(fused)]}{part}.weight", (shape[0] // len(parts), *shape[1:]),
                          k, len(parts), unit) for k, part in enumerate(parts)]
    return [Piece(name, shape)]


def split_dim(local: tuple, full: tuple) -> int | None:
    """The dimension a tensor-parallel shard of shape `local` cuts from `full` (None: replicated)."""
    split = [d for d, (a, b) in enumerate(zip(local, full)) if a != b]
    return split[0] if split else None


def tp_shard(full: torch.Tensor, local: torch.Size, tp_rank: int) -> torch.Tensor:
    """A tensor-parallel rank's part of a full parameter: split where the shapes differ."""
    d = split_dim(tuple(local), tuple(full.shape))
    return full if d is None else full.narrow(d, tp_rank * local[d], local[d])


def cut(full: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The piece's rows of a full parameter."""
    if piece.parts > 1:
        full = full.view(-1, piece.parts, piece.unit, *full.shape[1:])[:, piece.part].reshape(piece.shape)
    return full[piece.rows]


def join(param: Param, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The full parameter from its exported pieces (the inverse of `cut`)."""
    pieces = param.pieces
    if pieces[0].parts > 1:
        stacked = torch.stack([tensors[p.name].view(-1, p.unit, *p.shape[1:]) for p in pieces], dim=1)
        return stacked.reshape(param.shape)
    return torch.cat([tensors[p.name] for p in pieces]) if len(pieces) > 1 else tensors[pieces[0].name].reshape(param.shape)
