"""Held-out evaluation, the same for the trainer (every validation.every_steps) and tools/evaluate.py: each
loss component of the objective token-weighted over every rank's held-out micro batches, the perplexity of
the LM term, and for a JEPA the mean squared error, cosine similarity and effective rank of its predictions
against their targets.
"""

from __future__ import annotations

import math
from typing import Callable

import deepspeed
import torch
import torch.distributed as dist

from cromwell.model.jepa import collapse_stats
from cromwell.pretrain.losses import loss_groups, step_counts, step_means, to_device
from cromwell.pretrain.objectives import Loss, Objective
from cromwell.pretrain.pipeline import micro_batch


def perplexity(mean_nll: float) -> float:
    """exp of the mean next-token loss (capped where exp overflows a float)."""
    return math.exp(min(mean_nll, 700.0))


@torch.no_grad()
def engine_losses(engine, objective: Objective, micro_batches: list, counts: torch.Tensor) -> list[Loss]:
    """This rank's Loss of each held-out micro batch through the training engine (none on a pipeline
    stage that computes no loss); `counts`: the step's item counts (step_counts)."""
    engine.eval()
    try:
        if not isinstance(engine, deepspeed.PipelineEngine):
            return [Loss(*engine(to_device(b, engine.device))) for b in micro_batches]
        engine.eval_batch(iter([micro_batch(objective, to_device(b, engine.device), counts, 1.0)
                                for b in micro_batches]), num_micro_batches=len(micro_batches))
        return engine.module.loss_fn.take()
    finally:
        engine.train()


@torch.no_grad()
def held_out(objective: Objective, micro_batches: list, device,
             losses_of: Callable[[torch.Tensor], list[Loss]]) -> dict:
    """val_<component> for each of the objective's components, val_loss, val_ppl (with an LM term) and
    val_jepa_mse / val_jepa_cosine / val_jepa_rank (an objective that predicts embeddings), over every
    rank's held-out micro batches. losses_of(the step's counts) -> this rank's Loss of each micro batch:
    `engine_losses` through the engine, or the objective's forward on a plain model."""
    counts = step_counts(objective, micro_batches, device)
    losses = losses_of(counts)
    metrics = {f"val_{k}": v for k, v in step_means(objective, losses, counts).items()}
    if "lm" in objective.components:
        metrics["val_ppl"] = perplexity(metrics["val_lm"])
    if objective.predicts_embeddings:
        metrics.update(jepa_metrics([loss for loss in losses if loss.predicted is not None]))
    return metrics


def collapse_check(loss: Loss | None, min_std: float, min_rank: float) -> tuple[dict, list[str]]:
    """(per-dimension std and effective rank of a Loss's predicted and target embeddings, which of them
    are below the thresholds); nothing for a Loss without predictions."""
    stats, problems = {}, []
    if loss is None or loss.predicted is None:
        return stats, problems
    for name, embeddings in (("predicted", loss.predicted), ("target", loss.target)):
        std, rank = collapse_stats(embeddings)
        stats[f"jepa_{name}_std"], stats[f"jepa_{name}_rank"] = std, rank
        if std < min_std:
            problems.append(f"{name} embeddings' per-dimension std {std:.3g} < {min_std}")
        if rank < min_rank:
            problems.append(f"{name} embeddings' effective rank {rank:.3g} < {min_rank}")
    return stats, problems


def jepa_metrics(losses: list[Loss]) -> dict:
    """Over every rank's predictions: the mean over rows of the mean squared difference, the mean cosine
    similarity, and the effective rank of the predictions (model/jepa.collapse_stats; of each rank's own
    set, averaged over the ranks that have one: under a pipeline only the last stage predicts).
    Collective over the data-parallel and pipeline groups."""
    predicted = torch.cat([c.predicted.float() for c in losses]) if losses else torch.zeros(0, 1)
    target = torch.cat([c.target.float() for c in losses]) if losses else torch.zeros(0, 1)
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
