"""A Hugging Face Llama as the start of a run: its weights into the GPT, or into the VL-JEPA's language
encoder and autoregressive head, at any tensor x pipeline layout (`run.init_from`, and
`tools/convert_ckpt.py --to-deepspeed`). The rest of a VL-JEPA (ViT, fusion, JEPA head) keeps the run's
own initialisation, and so do the vocabulary's padding rows (model.make_vocab_size_divisible_by): they
start at zero, so that no padding logit can win.

A Llama's tensors are the export's language-path tensors under Hugging Face's names (formats.hf_name, the
inverse of the `hf` export), which model/tensors.join fuses into the trainer's parameters (QKV per head,
gate/up). Its config.json and tokenizer are checked against the run's: a difference, or a feature the
model does not have (grouped-query attention, biases, rope scaling, another activation), is an error that
names each field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from cromwell.model.tensors import Param, join, plan
from cromwell.pretrain.checkpoint import CheckpointError
from cromwell.pretrain.checkpoint.formats import hf_name

# Llama's config field -> (the model config's value it must equal, that value's field).
SAME = {"hidden_size": ("hidden_size", "hidden_size"), "intermediate_size": ("ffn_size", "ffn_hidden_size"),
        "num_hidden_layers": ("num_layers", "num_layers"), "num_attention_heads": ("num_heads", "num_heads"),
        "rms_norm_eps": ("norm_eps", "norm_eps"), "rope_theta": ("rope_theta", "rope_theta"),
        "vocab_size": ("vocab_size", "vocab_size")}


def is_llama(path: Path) -> bool:
    """Whether `path` is a Hugging Face folder of a Llama-architecture causal LM."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    info = json.loads(config.read_text())
    return info.get("model_type") == "llama" or "LlamaForCausalLM" in (info.get("architectures") or [])


@dataclass
class Llama:
    """A Llama folder and the run's parameters (full shapes, exported pieces), planned before the
    tensor-parallel groups exist (model/tensors.py builds at TP=1)."""

    path: Path
    params: dict[str, Param]


def locate(path: Path, cfg) -> Llama | None:
    """The Llama at `path`, if it is one, for the run config `cfg` (whose model must be gpt or vljepa)."""
    path = Path(path)
    if not is_llama(path):
        return None
    if cfg.model.type not in ("gpt", "vljepa"):
        raise CheckpointError(f"{path}: a Hugging Face Llama starts a model.type gpt or vljepa run "
                              f"(model.type {cfg.model.type} loads it with model.hf.path)")
    return Llama(path, {q.source: q for q in plan(cfg.model)})


def check(path: Path, cfg) -> None:
    """The Llama's config and tokenizer against the run's, every difference named."""
    info = json.loads((path / "config.json").read_text())
    rope = info.get("rope_parameters") or {}  # transformers 5 keeps rope_theta and the scaling type here
    info.setdefault("rope_theta", rope.get("rope_theta"))
    model = cfg.model
    problems = []
    for theirs, (ours, field) in SAME.items():
        value = getattr(model, ours)
        if info.get(theirs) is not None and info[theirs] != value:
            problems.append(f"{theirs} {info[theirs]} != model.{field} {value}")
    heads, hidden = info.get("num_attention_heads", 1), info.get("hidden_size", 0)
    unsupported = {  # field: (the Llama's value, the one the model supports, what the model has)
        "num_key_value_heads": (info.get("num_key_value_heads", heads), heads,
                                "one key/value head per query head (no grouped-query attention)"),
        "head_dim": (info.get("head_dim", hidden // heads), hidden // heads, "heads of hidden_size / num_heads"),
        "attention_bias": (info.get("attention_bias", False), False, "no biases"),
        "mlp_bias": (info.get("mlp_bias", False), False, "no biases"),
        "hidden_act": (info.get("hidden_act", "silu"), "silu", "SwiGLU with silu"),
        "rope_scaling": (info.get("rope_scaling") or rope.get("rope_type", "default"), "default", "plain RoPE (no scaling)"),
    }
    for field, (value, supported, what) in unsupported.items():
        if value != supported:
            problems.append(f"{field} {value!r}: the model has {what}")
    tokenizer = path / "tokenizer.json"
    if not tokenizer.is_file():
        problems.append("no tokenizer.json beside the weights (the run's vocabulary cannot be checked)")
    else:
        problems += _vocabulary_differences(tokenizer, Path(cfg.data.tokenizer))
    if problems:
        raise CheckpointError(f"{path}: this Llama does not fit the run's model:\n  " + "\n  ".join(problems))


def _vocabulary_differences(theirs: Path, ours: Path) -> list[str]:
    from tokenizers import Tokenizer

    a, b = (Tokenizer.from_file(str(p)).get_vocab(with_added_tokens=True) for p in (theirs, ours))
    if a == b:
        return []
    differ = sorted(t for t in a.keys() | b.keys() if a.get(t) != b.get(t))
    shown = ", ".join(f"{t!r}: {a.get(t)} vs {b.get(t)}" for t in differ[:5])
    return [f"tokenizer: {len(differ)} tokens have other ids than in data.tokenizer {ours} ({shown}{', ...' if len(differ) > 5 else ''})"]


class Weights:
    """The Llama's tensors by Hugging Face name, from model.safetensors or a sharded index."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{path}: no model.safetensors (nor a sharded index); save the model with "
                                  "save_pretrained(safe_serialization=True)")
        self.path = path
        self.files = [safe_open(path / f, framework="pt") for f in files]
        self.where = {name: f for f in self.files for name in f.keys()}
        self.tied = json.loads((path / "config.json").read_text()).get("tie_word_embeddings", False)

    def get(self, name: str) -> torch.Tensor:
        if name == "lm_head.weight" and name not in self.where and self.tied:
            name = "model.embed_tokens.weight"  # tie_word_embeddings: the output projection is the embedding
        if name not in self.where:
            raise CheckpointError(f"{self.path}: lacks {name}")
        return self.where[name].get_tensor(name).float()

    def full(self, param: Param) -> torch.Tensor | None:
        """A trainer parameter whole, or None when it is not on the language path (it keeps its own init)."""
        names = {piece.name: hf_name(piece.name) for piece in param.pieces if not piece.name.endswith(".vocab_padding")}
        if not names or any(n is None for n in names.values()):
            return None
        tensors = {piece: self.get(name) for piece, name in names.items()}
        for piece in param.pieces:
            if piece.name.endswith(".vocab_padding"):
                tensors[piece.name] = torch.zeros(piece.shape)
        for piece in param.pieces:
            if tuple(tensors[piece.name].shape) != tuple(piece.shape):
                raise CheckpointError(f"{self.path}: {names.get(piece.name, piece.name)} has shape "
                                      f"{list(tensors[piece.name].shape)}, the model's {piece.name} {list(piece.shape)}")
        return join(param, tensors)


def load(engine, model, llama: Llama) -> None:
    """The Llama's weights into this rank's part of the model (engine weights and the optimizer's fp32
    copies); the other parameters keep their values."""
    from megatron.core import parallel_state

    from cromwell.model.tensors import tp_shard
    from cromwell.pretrain.checkpoint.relayout import set_parameters

    weights = Weights(llama.path)
    rank = parallel_state.get_tensor_model_parallel_rank()

    def value(name: str, param, local: tuple) -> torch.Tensor | None:
        full = weights.full(llama.params[name])
        return None if full is None else tp_shard(full, torch.Size(local), rank).contiguous()

    set_parameters(engine, model, value)
