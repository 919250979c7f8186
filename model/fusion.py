"""Cross-modal fusion: how the vision tokens reach the language model.

A projector (norm, then a two-layer GELU MLP, as LLaVA-1.5) maps the ViT's tokens into the language
width, and gated cross-attention blocks (Flamingo, Alayrac et al. 2022), one after every
`model.fusion.every` language blocks, let the text attend to them.

Why cross-attention rather than prepending the image's tokens to the text:
- The text sequence keeps its length. 256 image tokens before a 256-4096-token context would cost
  up to twice the attention and activations on every image sample. Worse, a batch that mixes samples
  with and without an image would need a different layout per row.
- Most of the corpus has no image (75% by the stage-1 mixture's weights). A row without one skips every fusion
  block, so a text-only sample computes exactly the language model (a test checks it). The tanh gates
  start at 0, so at initialisation even a row with an image sees the language model unchanged:
  fusing cannot disturb a language model trained before it.
- Causality needs no special case. Every text position may see the whole image, and the JEPA
  predictor's no-leakage argument (model/jepa.py) is about text positions, not image positions.

Tensor parallelism uses the same megatron-core layers as the language blocks: query and key/value
projections are column-parallel (whole heads per rank, keys and values interleaved per head so the
full weight is the same at every TP size), the output projection and the MLP's second layer are
row-parallel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from cromwell.model.config import ModelConfig
from cromwell.model.gpt import SwiGLU, local_heads, rms_norm


def _no_init(_weight):
    pass  # model.gpt.init_weights fills every weight, the same for every layout


class Projector(nn.Module):
    """ViT tokens [bi, k, vision hidden] -> language-width tokens [bi, k, hidden]."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        self.norm = rms_norm(cfg.vision.hidden_size, cfg.norm_eps)
        self.up = ColumnParallelLinear(cfg.vision.hidden_size, cfg.hidden_size, config=mp, init_method=_no_init,
                                       bias=False, gather_output=False)
        self.down = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, config=mp, init_method=_no_init, bias=False,
                                      input_is_parallel=True, skip_bias_add=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        h, _ = self.up(self.norm(v))
        y, _ = self.down(F.gelu(h))
        return y


class CrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        self.local_heads = local_heads(cfg.num_heads, mp)
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q = ColumnParallelLinear(cfg.hidden_size, cfg.hidden_size, config=mp, init_method=_no_init, bias=False,
                                      gather_output=False)
        self.kv = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.hidden_size, config=mp, init_method=_no_init,
                                       bias=False, gather_output=False)
        self.out = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, config=mp, init_method=_no_init, bias=False,
                                     input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, cache=None) -> torch.Tensor:
        """cache (generation): `cache.fixed` holds the image tokens' keys and values once computed, so
        that later tokens do not recompute them (context may then be None)."""
        b, s, _ = x.shape
        q, _ = self.q(x)
        if cache is not None and cache.fixed is not None:
            k, v = cache.fixed
        else:
            kv, _ = self.kv(context)
            k, v = (t.transpose(1, 2) for t in kv.view(b, context.shape[1], self.local_heads, 2, self.head_dim).unbind(3))
            if cache is not None:
                cache.fixed = (k, v)
        q = q.view(b, s, self.local_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        y, _ = self.out(y.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))
        return y


class CrossBlock(nn.Module):
    """Gated cross-attention then a gated MLP, applied to the rows that have an image only."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        self.attn_norm = rms_norm(cfg.hidden_size, cfg.norm_eps)
        self.attn = CrossAttention(cfg, mp)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_norm = rms_norm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, mp)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, vision: torch.Tensor | None, image_rows: torch.Tensor, cache=None) -> torch.Tensor:
        """x [b, s, hidden]; vision [bi, k, hidden], the projected tokens of the images of rows
        image_rows [bi] (bi may be 0: the blocks still run, on no row, so that every parameter gets a
        gradient, zero, as data-parallel and ZeRO reductions expect). cache: see CrossAttention."""
        xi = x.index_select(0, image_rows)
        xi = xi + torch.tanh(self.attn_gate) * self.attn(self.attn_norm(xi), vision, cache)
        xi = xi + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(xi))
        return x.index_copy(0, image_rows, xi)
