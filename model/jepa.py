"""JEPA losses between predicted and target embeddings."""

import torch
import torch.nn.functional as F

LOSS_TYPES = ("cosine", "l2", "mse", "infonce")


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
