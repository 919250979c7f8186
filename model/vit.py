"""Vision encoder: a ViT over patch_size x patch_size patches (16 x 16 of a 256 x 256 image: 256 patches).

Patches are embedded by one linear map (a stride-p convolution written as a matmul over the flattened
patch, as data.images.patchify lays it out) plus fixed 2-D sine-cosine positions (I-JEPA's choice: no
parameter, and a position means the same whichever subset of patches the encoder sees). The blocks are
the language model's pre-norm blocks (model/gpt.py), bidirectional and without rotary positions, so
the ViT is tensor-parallel through the same megatron-core layers and initialised by the same
layout-independent `init_weights`. The patch embedding is replicated across tensor-parallel ranks
(megatron-core's own ViT does the same): it is small, and its input is the same on every rank.

The encoder can read a subset of each image's patches (`keep`, I-JEPA's context): the JEPA objective
hides the patches it predicts from the online encoder this way, which also makes the online pass
cheaper than a full one.
"""

from __future__ import annotations

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from cromwell.model.config import VisionConfig
from cromwell.model.gpt import Block, rms_norm


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] fixed 2-D sine-cosine embeddings in raster order: half the channels encode
    the row, half the column (MAE / I-JEPA)."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    row, col = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                              indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(row), encode(col)], dim=1).float()


def select(tokens: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """tokens [b, n, d] at positions index [b, k] (None: all of them)."""
    if index is None:
        return tokens
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(3 * cfg.patch_size**2, cfg.hidden_size)
        self.register_buffer("positions", sincos_positions(cfg.grid, cfg.hidden_size), persistent=False)

    def forward(self, patches: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """patches [b, n, 3*p*p] -> tokens [b, k, hidden] of the patches `keep` [b, k] (None: all)."""
        return select(self.proj(patches) + self.positions.to(patches.dtype), keep)


class VisionBlock(Block):
    def __init__(self, cfg: VisionConfig, mp: ModelParallelConfig):
        super().__init__(cfg, mp, causal=False, rope=False)


class VisionNorm(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm = rms_norm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x):
        return self.norm(x)
