"""JEPA pieces: the jepa_head (projections into the embedding space, the predictors), the EMA target
update and its momentum schedule, representation-collapse statistics, and the pairwise losses that
Step-JEPA uses.

The embedding space (model.predictor.embedding_dim) is the output of the `Projections`: a linear map
of the ViT's tokens and one of the language model's final hidden states. Targets come from the
target encoder, an exponential moving average of the online encoders and their projections, run
without gradient (BYOL's online projector and EMA target projector; I-JEPA's EMA target encoder).
Targets are layer-normalised as in I-JEPA, so a prediction cannot lower its loss by shrinking.

What is predicted, and why nothing leaks:
- Vision (I-JEPA): the online ViT reads only the context patches. The `VisionPredictor` reads the
  projected context tokens plus one mask token per target patch (a learned vector plus the patch's
  fixed position) and predicts each target patch's embedding. With multi-block masks it runs once
  per target block, as I-JEPA does. The masked patches never enter the online path.
- Text (causal): a masked unit is a maximal run of masked tokens [a, b): one token for random
  masking, a span for span masking. The context of unit u is the online hidden state at position
  a_u - 1. By causality it has read tokens < a_u only. Prediction step k (1..prediction_steps) from
  that context predicts the k-th next unit, u + k - 1: the mean of its target embeddings. Every
  predicted unit starts at or after a_u, so the context never read any of it. The loss weights
  step k by step_weights[k-1]. Because the one causal pass that computes the LM loss also supplies
  the contexts, the text JEPA costs one forward of the target encoder plus a small MLP, not a
  second online pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from cromwell.model.config import ModelConfig, swiglu_size
from cromwell.model.gpt import Block, SwiGLU, rms_norm
from cromwell.model.vit import select, sincos_positions

LOSS_TYPES = ("cosine", "l2", "mse", "infonce")


@dataclass(frozen=True)
class PredictorShape:
    """A transformer block's dimensions at the embedding width (what model.gpt.Block reads)."""

    hidden_size: int
    num_heads: int
    norm_eps: float

    @property
    def ffn_size(self) -> int:
        return swiglu_size(self.hidden_size)


class Projections(nn.Module):
    """Online and (by EMA) target maps into the embedding space. Replicated across tensor-parallel
    ranks: they are small and their inputs are whole on every rank."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        embedding_dim = cfg.predictor.embedding_dim
        self.vision = nn.Linear(cfg.vision.hidden_size, embedding_dim, bias=False)
        self.text = nn.Linear(cfg.hidden_size, embedding_dim, bias=False)

    def forward(self, vision: torch.Tensor | None, text: torch.Tensor | None):
        return (None if vision is None else self.vision(vision)), (None if text is None else self.text(text))


class VisionPredictor(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        embedding_dim = cfg.predictor.embedding_dim
        shape = PredictorShape(embedding_dim, cfg.predictor.num_heads, cfg.norm_eps)
        self.mask_token = nn.Parameter(torch.zeros(embedding_dim))
        self.register_buffer("positions", sincos_positions(cfg.vision.grid, embedding_dim), persistent=False)
        self.blocks = nn.ModuleList(Block(shape, mp, causal=False, rope=False) for _ in range(cfg.predictor.num_layers))
        self.norm = rms_norm(embedding_dim, cfg.norm_eps)

    def forward(self, context: torch.Tensor, context_index: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
        """context [bi, k, E] (embedded context patches at context_index [bi, k]) and target patch indices
        [bi, t, n] (t target blocks of n patches) -> predicted embeddings [bi, t, n, E]."""
        bi, t, n = target_index.shape
        positions = self.positions.to(context.dtype).expand(bi, -1, -1)
        x = context + select(positions, context_index)
        x = x.repeat_interleave(t, dim=0)  # one predictor run per target block
        queries = self.mask_token + select(positions.repeat_interleave(t, dim=0), target_index.reshape(bi * t, n))
        x = torch.cat([x, queries], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, x.shape[1] - n:]).view(bi, t, n, x.shape[-1])


class TextPredictor(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        embedding_dim = cfg.predictor.embedding_dim
        self.step = nn.Parameter(torch.zeros(cfg.predictor.prediction_steps, embedding_dim))
        self.norm = rms_norm(embedding_dim, cfg.norm_eps)
        self.mlp = SwiGLU(PredictorShape(embedding_dim, 1, cfg.norm_eps), mp)

    def forward(self, context: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """context [p, E] embedded context states, step [p] (0-based) -> predictions [p, E]."""
        x = context + self.step[step]
        return x + self.mlp(self.norm(x))


def target_embeddings(embedded: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(embedded.float(), embedded.shape[-1:])


def span_means(embedded: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Mean of embedded [b, s, E] over positions [start, end) of each row: [p, E]."""
    sums = F.pad(embedded.float().cumsum(1), (0, 0, 1, 0))
    return (sums[rows, ends] - sums[rows, starts]) / (ends - starts)[:, None]


def momentum(step: int, total: int, start: float, end: float) -> float:
    """The EMA momentum after `step` of `total` optimizer steps: linear from start to end (I-JEPA:
    0.996 -> 1.0), so the targets move less and less as training settles."""
    return start + (end - start) * min(step, total) / max(total, 1)


@torch.no_grad()
def ema_update(target: list[torch.Tensor], online: list[torch.Tensor], m: float) -> None:
    """target <- m * target + (1 - m) * online, in the target's dtype (fp32 even when the online
    weights are bf16), with exactly that arithmetic so a test can recompute it bit for bit."""
    scaled = torch._foreach_mul([o.to(t.dtype) for t, o in zip(target, online)], 1.0 - m)
    torch._foreach_mul_(target, m)
    torch._foreach_add_(target, scaled)


@torch.no_grad()
def collapse_stats(embeddings: torch.Tensor) -> tuple[float, float]:
    """(mean over dimensions of the per-dimension standard deviation, effective rank) of a set of
    embeddings [n, E]. Effective rank (Roy & Vetterli 2007): exp of the entropy of the normalised
    singular values of the centred set; it is 1 when every embedding lies on one line and E when the
    set spreads equally over every direction. Both fall when a JEPA collapses."""
    x = embeddings.float()
    if len(x) < 2:
        return float("nan"), float("nan")
    std = x.std(dim=0).mean()
    s = torch.linalg.svdvals(x - x.mean(dim=0))
    p = s / s.sum().clamp(min=1e-12)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
    return float(std), float(math.exp(entropy))


def jepa_loss(v1: torch.Tensor, v2: torch.Tensor, kind: str, temperature: float = 0.1,
              reduction: str = "mean") -> torch.Tensor:
    """Loss per pair of rows of v1 [P, H] and v2 [P, H], averaged or summed over the P pairs.

    cosine: 1 - cos; l2: Euclidean distance; mse: mean squared difference over H; infonce: the
    other pairs of the batch are the negatives (so its per-pair terms depend on the whole batch).
    """
    v1, v2 = v1.float(), v2.float()
    if kind == "cosine":
        per_pair = 1 - F.cosine_similarity(v1, v2, dim=-1)
    elif kind == "l2":
        per_pair = (v1 - v2).norm(dim=-1)
    elif kind == "mse":
        per_pair = (v1 - v2).pow(2).mean(dim=-1)
    elif kind == "infonce":
        logits = F.normalize(v1, dim=-1) @ F.normalize(v2, dim=-1).T / temperature
        per_pair = F.cross_entropy(logits, torch.arange(len(v1), device=v1.device), reduction="none")
    else:
        raise ValueError(f"jepa loss type must be one of {LOSS_TYPES}, got {kind!r}")
    if reduction == "sum":
        return per_pair.sum()
    if reduction == "mean":
        return per_pair.mean()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
