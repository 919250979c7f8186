"""Decoder-only language encoder and autoregressive head, tensor-parallel through megatron-core.

Architecture (Llama-style): token embedding, `num_layers` pre-norm blocks of RMSNorm -> causal
self-attention with rotary position embeddings -> residual, RMSNorm -> SwiGLU MLP -> residual, then
a final RMSNorm and an untied output projection. SwiGLU because it trains better than GELU at equal
parameter count (Shazeer 2020) and is what Llama-family checkpoints use.

Tensor parallelism is a number in the megatron config: the QKV and gate/up projections are
column-parallel, the attention output and down projections row-parallel, the embedding and output
projection vocab-parallel. Fused projections interleave their parts per head (QKV) and per unit
(gate/up), so each rank's row shard holds whole heads and whole units, and the full weight has the
same layout at every TP size: that is what makes `init_weights` and checkpoint conversion
layout-independent.

The model is a flat list of layers (embedding, blocks, head) so that a pipeline can cut it
anywhere; `GPT` runs all of them in one process. Layers are indexed "0", "1", ... exactly as
DeepSpeed's PipelineModule names them, so parameter names match across PP sizes.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn
from torch.utils.checkpoint import checkpoint

from cromwell.model.config import ModelConfig
from cromwell.model.loss import lm_loss


def megatron_config(tp: int, dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    # init_weights fills every weight (layout-independent), so megatron's init_method is a no-op;
    # its initialisation pass still runs because it is what tags parameters with their partition
    # dim. CPU creation avoids megatron's CUDA RNG tracker, which has no CPU path.
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=dtype,
        gradient_accumulation_fusion=False,
    )


def _no_init(_weight):
    pass


def padded_vocab(cfg: ModelConfig, mp: ModelParallelConfig) -> int:
    """The embedding's and output projection's rows (model.vocab_size padded), checked against the
    tensor-parallel size they are cut by."""
    return cfg.padded_vocab_size(mp.tensor_model_parallel_size)


def rms_norm(dim: int, eps: float) -> nn.Module:
    try:  # apex's fused kernel when it was built on a GPU cluster; never installed from PyPI
        from apex.normalization import FusedRMSNorm

        if torch.cuda.is_available():
            return FusedRMSNorm(dim, eps=eps)
    except ImportError:
        pass
    return nn.RMSNorm(dim, eps=eps)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [b, s, 1, head_dim/2] for integer positions [b, s]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float()[..., None] * inv_freq
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        self.word = VocabParallelEmbedding(padded_vocab(cfg, mp), cfg.hidden_size, init_method=_no_init, config=mp)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word(input_ids)


def local_heads(heads: int, mp: ModelParallelConfig) -> int:
    tp = mp.tensor_model_parallel_size
    if heads % tp:
        raise ValueError(f"a layer's {heads} attention heads are not divisible by parallel.tensor ({tp})")
    return heads // tp


class Attention(nn.Module):
    """Self-attention; causal with rotary positions for text, bidirectional without (positions are
    added to the input) for image patches and the JEPA predictor."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, causal: bool = True, rope: bool = True):
        super().__init__()
        self.local_heads = local_heads(cfg.num_heads, mp)
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.causal = causal
        self.rope_theta = cfg.rope_theta if rope else None
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, 3 * cfg.hidden_size, config=mp, init_method=_no_init, bias=False, gather_output=False
        )
        self.out = RowParallelLinear(
            cfg.hidden_size, cfg.hidden_size, config=mp, init_method=_no_init, bias=False,
            input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x, position_ids, attention_mask, cache=None):
        """cache (generation): this layer's keys and values so far; `cache.update(k, v)` appends the new
        tokens' and returns all of them. With a cache, attention_mask says which keys each query sees."""
        b, s, _ = x.shape
        qkv, _ = self.qkv(x)
        q, k, v = qkv.view(b, s, self.local_heads, 3, self.head_dim).unbind(dim=3)
        if self.rope_theta is not None:
            if position_ids is None:
                position_ids = torch.arange(s, device=x.device).expand(b, -1)
            cos, sin = rope_tables(position_ids, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, head_dim]
        if cache is not None:
            k, v = cache.update(k, v)
        if attention_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        y, _ = self.out(y.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))
        return y


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        if cfg.ffn_size % tp:
            raise ValueError(f"a layer's ffn_hidden_size ({cfg.ffn_size}) is not divisible by parallel.tensor ({tp})")
        self.local_units = cfg.ffn_size // tp
        self.gate_up = ColumnParallelLinear(
            cfg.hidden_size, 2 * cfg.ffn_size, config=mp, init_method=_no_init, bias=False, gather_output=False
        )
        self.down = RowParallelLinear(
            cfg.ffn_size, cfg.hidden_size, config=mp, init_method=_no_init, bias=False,
            input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x):
        h, _ = self.gate_up(x)
        gate, up = h.view(*h.shape[:-1], self.local_units, 2).unbind(dim=-1)
        y, _ = self.down(F.silu(gate) * up)
        return y


class Block(nn.Module):
    """Pre-norm transformer block. `cfg` is any config with hidden_size, num_heads, ffn_size and
    norm_eps (and rope_theta when rope): the language model's, the ViT's or the JEPA predictor's."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, causal: bool = True, rope: bool = True):
        super().__init__()
        self.attn_norm = rms_norm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, mp, causal, rope)
        self.mlp_norm = rms_norm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, mp)

    def forward(self, x, position_ids=None, attention_mask=None, cache=None):
        x = x + self.attn(self.attn_norm(x), position_ids, attention_mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class OutputLoss(ColumnParallelLinear):
    """The vocab-parallel output projection fused with its cross-entropy: forward(hidden, labels)
    is the loss, and the [tokens, vocab] logits never exist.

    The loss is this module's forward, not a function of its weight called from outside, so that
    ZeRO-3's hooks gather the (partitioned) weight for it like for any other layer.
    """

    def forward(self, hidden, labels, kernels: str = "fused", reduction: str = "mean"):
        return lm_loss(hidden, self.weight, labels, kernels, reduction)


class Head(nn.Module):
    """Final norm and the vocab-parallel output projection.

    As a pipeline's last layer it returns the normalised hidden states with this rank's output
    weight shard, for the last stage's loss function (no ZeRO-3 with a pipeline).
    """

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        self.norm = rms_norm(cfg.hidden_size, cfg.norm_eps)
        self.proj = OutputLoss(
            cfg.hidden_size, padded_vocab(cfg, mp), config=mp, init_method=_no_init, bias=False, gather_output=False
        )

    def forward(self, x):
        return self.norm(x), self.proj.weight


def layer_specs(cfg: ModelConfig, mp: ModelParallelConfig) -> list[tuple[type, tuple]]:
    """(class, args) of every layer in order; GPT and the pipeline both build from this list."""
    return [(Embedding, (cfg, mp))] + [(Block, (cfg, mp))] * cfg.num_layers + [(Head, (cfg, mp))]


class GPT(nn.Module):
    """All layers in one process (any TP size, no pipeline).

    checkpoint_activations: each block keeps only its input for backward and recomputes the rest
    (a pipeline does the same per layer through DeepSpeed's PipelineModule).
    """

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, checkpoint_activations: bool = False,
                 kernels: str = "fused"):
        super().__init__()
        for i, (cls, args) in enumerate(layer_specs(cfg, mp)):
            self.add_module(str(i), cls(*args))
        self.checkpoint_activations = checkpoint_activations
        self.kernels = kernels

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None) -> torch.Tensor:
        """The final, normalised hidden states [b, s, hidden]. cache (generation): `cache.layer(name)`
        is block `name`'s keys and values so far (model/generate.py)."""
        *layers, head = self.named_children()
        x = layers[0][1](input_ids)
        for name, block in layers[1:]:
            if self.checkpoint_activations and torch.is_grad_enabled():
                # Non-reentrant: works with inputs that need no grad and with ZeRO-3's parameter hooks.
                x = checkpoint(block, x, position_ids, attention_mask, use_reentrant=False)
            else:
                x = block(x, position_ids, attention_mask, None if cache is None else cache.layer(name))
        return head[1].norm(x)

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the output projection of `hidden` [..., H] against `labels` [...]."""
        return self.head.proj(hidden, labels, self.kernels, reduction)

    @property
    def head(self) -> Head:
        return self.get_submodule(str(len(self._modules) - 1))

    @property
    def output_weight(self) -> torch.Tensor:
        return self.head.proj.weight


def init_weights(layer: nn.Module, index: int, cfg: ModelConfig, seed: int, materialize=None) -> None:
    """Deterministic init keyed by (seed, layer index, parameter name), independent of TP, PP and
    ZeRO partitioning.

    Each rank draws the FULL tensor from a generator seeded by the parameter's name and keeps its
    own shard, so a TP=2 or PP=2 model starts from exactly the weights of the TP=1 model.
    `materialize(p)` is a context in which a parameter whose storage is partitioned (ZeRO-3) has
    its whole (TP-local) value, one parameter at a time, and whose exit keeps what was written.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    # GPT-2/Megatron: projections that write into the residual stream are scaled by depth.
    residual_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    for name, p in layer.named_parameters():
        with (materialize or _as_is)(p), torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            if name.endswith(("bias", "gate")):  # fusion's gates start closed: text-only behaviour at init
                p.zero_()
                continue
            full_shape = list(p.shape)
            split = getattr(p, "tensor_model_parallel", False)
            if split:
                full_shape[p.partition_dim] *= tp
            gen = torch.Generator().manual_seed(_name_seed(seed, f"{index}.{name}"))
            std = residual_std if name.endswith(("out.weight", "down.weight")) else cfg.init_std
            full = torch.empty(full_shape).normal_(0.0, std, generator=gen)
            if split:
                full = full.chunk(tp, dim=p.partition_dim)[tp_rank]
            p.copy_(full)


def _as_is(_param):
    return contextlib.nullcontext()


def _name_seed(seed: int, name: str) -> int:
    # A stable hash (Python's hash() is salted per process).
    h = seed & 0xFFFFFFFF
    for ch in name.encode():
        h = (h * 1000003 + ch) & 0xFFFFFFFFFFFF
    return h
