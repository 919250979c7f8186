"""Language-model loss from final hidden states and the (vocab-parallel) output weight."""

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, vocab_parallel_cross_entropy

IGNORE_INDEX = -100


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, kernels: str = "fused",
            reduction: str = "mean") -> torch.Tensor:
    """Mean (or with reduction="sum", summed) next-token cross-entropy over labels != IGNORE_INDEX.

    hidden [..., H] is replicated across the TP group, weight [V/tp, H] is this rank's vocab shard.
    kernels="fused" never materialises the [tokens, vocab] logits; "reference" is plain megatron-core
    on materialised logits, kept for debugging and as the parity baseline. "sum" is for a caller that
    normalises by a token count of its own (across micro batches and data-parallel ranks).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = labels.reshape(-1)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if kernels == "fused":
        from cromwell.model.kernels import fused_linear_cross_entropy

        group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
        return fused_linear_cross_entropy(h, weight, t, ignore_index=IGNORE_INDEX, reduction=reduction,
                                          tp_group=group)
    if kernels != "reference":
        raise ValueError(f"training.kernels must be 'fused' or 'reference', got {kernels!r}")
    logits = F.linear(copy_to_tensor_model_parallel_region(h), weight).float()
    valid = t != IGNORE_INDEX
    per_token = vocab_parallel_cross_entropy(logits, torch.where(valid, t, 0))
    total = (per_token * valid).sum()
    return total / valid.sum().clamp(min=1) if reduction == "mean" else total
