"""A step's loss components over all its micro batches and data-parallel ranks, for the training step
(pretrain/trainer.py) and held-out evaluation (pretrain/evaluation/held_out.py) alike: each component is its
summed loss over its summed item count (pretrain/objectives/: why a mean of per-micro-batch means is
wrong), and the weighted total the objective defines.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from cromwell.pretrain.objectives import Loss, Objective


def to_device(batch, device):
    if batch is None or torch.is_tensor(batch) or hasattr(batch, "to"):
        return None if batch is None else batch.to(device)
    return type(batch)(to_device(b, device) for b in batch)


def loss_groups() -> list:
    """The groups a loss is summed over: data-parallel ranks, and under a pipeline the stages (only the
    last computes losses; the others contribute zeros)."""
    groups = [parallel_state.get_data_parallel_group()]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        groups.append(parallel_state.get_pipeline_model_parallel_group())
    return groups


def step_counts(objective: Objective, micro_batches: list, device) -> torch.Tensor:
    """Each component's item count over the whole step: all micro batches, all data-parallel ranks."""
    counts = sum(objective.counts(b) for b in micro_batches).to(device)
    dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    return counts


def step_means(objective: Objective, losses: list[Loss], counts: torch.Tensor) -> dict:
    """{"loss": the weighted total, component: its mean} over the step, from this rank's micro batches'
    losses (none on a pipeline stage that computes no loss). Collective over `loss_groups`."""
    sums = torch.zeros_like(counts)
    for loss in losses:
        sums += loss.sums.detach().to(sums)
    for group in loss_groups():
        dist.all_reduce(sums, group=group)
    means = sums / counts.clamp(min=1)
    total = float(objective.total(sums, counts))
    return {"loss": total, **{name: float(m) for name, m in zip(objective.components, means)}}
