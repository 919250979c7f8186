"""Per-chunk cross-entropy steps in plain torch, for CPU tensors.

Both steps work in place on the chunk's fp32 logits so that a chunk needs no second
[rows, V] buffer. The contract is shared with ce_triton: `row_stats` returns the local row
max, sum of exp(x - max), target logit (0 where the target is not in this shard) and sum of
logits, and may overwrite the buffer with whatever its own `logit_grad_` reads.
"""
import torch


def row_stats(logits: torch.Tensor, local_target: torch.Tensor):
    has_target = local_target >= 0
    target_logit = logits.gather(1, local_target.clamp(min=0)[:, None]).squeeze(1)
    target_logit = torch.where(has_target, target_logit, 0.0)
    logit_sum = logits.sum(1)
    row_max = logits.amax(1)
    # Leaves exp(x - row_max) in the buffer: logit_grad_ turns it into the softmax by a row scale.
    logits.sub_(row_max[:, None]).exp_()
    return row_max, logits.sum(1), target_logit, logit_sum


def logit_grad_(logits, row_max, lse, local_target, row_scale, smoothing, z_loss, vocab):
    """Overwrites the buffer with d(loss)/d(logits); rows with row_scale 0 become 0."""
    # exp(row_max - lse) <= 1 even when this shard's max is far below the global one.
    logits.mul_((torch.exp(row_max - lse) * (1.0 + 2.0 * z_loss * lse) * row_scale)[:, None])
    if smoothing:
        logits.sub_((smoothing / vocab * row_scale)[:, None])
    target_step = torch.where(local_target >= 0, -(1.0 - smoothing) * row_scale, 0.0)
    logits.scatter_add_(1, local_target.clamp(min=0)[:, None], target_step[:, None])
