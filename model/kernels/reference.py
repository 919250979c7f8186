"""Plain materialised torch versions of both losses: the ground truth for tests and the
implementation that impl="reference" forces for debugging."""
import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherRows(torch.autograd.Function):
    """All-gathers row shards; every rank then computes the identical full loss, so the
    gradient of the gathered tensor is already complete and each rank keeps its own rows."""

    @staticmethod
    def forward(ctx, shard, group):
        ctx.group = group
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(world)[rank], None


def linear_cross_entropy(hidden, weight, target, ignore_index, label_smoothing, z_loss, tp_group,
                         reduction="mean"):
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        weight = _GatherRows.apply(weight, tp_group)
    # Upcast before the matmul, as the fused versions do, so that bf16 logits are not rounded.
    logits = hidden.float() @ weight.float().T
    valid = target != ignore_index
    norm = valid.sum().clamp(min=1) if reduction == "mean" else 1
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction="sum") / norm
    if z_loss:
        lse = torch.logsumexp(logits, dim=1)
        loss = loss + z_loss * torch.where(valid, lse * lse, 0.0).sum() / norm
    return loss


def masked_loss(pred, target, mask, weights, kind):
    p, t = pred[mask].float(), target[mask].float()
    if kind == "mse":
        rows = F.mse_loss(p, t, reduction="none").mean(1)
    elif kind == "smooth_l1":
        rows = F.smooth_l1_loss(p, t, reduction="none", beta=1.0).mean(1)
    else:
        rows = 1.0 - F.cosine_similarity(p, t, dim=1)
    if weights is not None:
        rows = rows * weights[mask].float()
    return rows.sum() / mask.sum().clamp(min=1)
