"""Held-out evaluation, the same for the trainer (every validation.every_steps) and tools/evaluate.py: each
loss component of the objective token-weighted over every rank's held-out micro batches, the perplexity of
the LM term, and for a JEPA the mean squared error, cosine similarity and effective rank of its predictions
against their targets.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from model.jepa import collapse_stats
from pretrain.objectives import Objective
from pretrain.parallel import loss_groups


def perplexity(mean_nll: float) -> float:
    """exp of the mean next-token loss (capped where exp overflows a float)."""
    return math.exp(min(mean_nll, 700.0))


def held_out(objective: Objective, losses_of, micro_batches: list) -> dict:
    """val_<component> for each of the objective's components, val_loss, val_ppl (with an LM term) and
    val_jepa_mse / val_jepa_cosine / val_jepa_rank (an objective that predicts embeddings).
    losses_of(micro_batches) -> the objective's token-weighted losses over every rank (pretrain/parallel.py's
    eval_losses through the engine, or held_out_losses on a plain model)."""
    objective.collected = [] if objective.predicts_embeddings else None
    try:
        losses = losses_of(micro_batches)
    finally:
        collected, objective.collected = objective.collected, None
    metrics = {f"val_{k}": v for k, v in losses.items()}
    if "lm" in losses:
        metrics["val_ppl"] = perplexity(losses["lm"])
    if collected is not None:
        metrics.update(jepa_metrics(collected))
    return metrics


def jepa_metrics(collected: list[dict]) -> dict:
    """Over every rank's predictions (each {"predicted", "target"} [rows, E]): the mean over rows of the
    mean squared difference, the mean cosine similarity, and the effective rank of the predictions
    (model/jepa.collapse_stats; of each rank's own set, averaged over the ranks that have one: under a
    pipeline only the last stage predicts). Collective over the data-parallel and pipeline groups."""
    predicted = torch.cat([c["predicted"].float() for c in collected]) if collected else torch.zeros(0, 1)
    target = torch.cat([c["target"].float() for c in collected]) if collected else torch.zeros(0, 1)
    rank = collapse_stats(predicted)[1] if len(predicted) > 1 else 0.0
    sums = torch.tensor([((predicted - target) ** 2).mean(-1).sum().item(),
                         torch.nn.functional.cosine_similarity(predicted, target, dim=-1).sum().item(),
                         len(predicted), rank, float(len(predicted) > 1)], dtype=torch.float64)
    if dist.is_initialized():
        for group in loss_groups():
            dist.all_reduce(sums, group=group)
    squared, cosine, rows, ranks, ranked = sums.tolist()
    if rows == 0:
        return {}
    return {"val_jepa_mse": squared / rows, "val_jepa_cosine": cosine / rows,
            "val_jepa_rank": ranks / ranked if ranked else float("nan")}
