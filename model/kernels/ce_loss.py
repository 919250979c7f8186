"""Fused linear cross-entropy: the LM head matmul and the loss, chunked over tokens so that
the [N, V] logits never exist, for one rank or a vocab-parallel TP group.

Gradients are computed in the forward pass, chunk by chunk, while each chunk's logits are at
hand (as Liger-Kernel does); backward only scales them by the incoming gradient. The same
chunk loop serves one rank and a TP group (where the row max and the sums are all-reduced),
and the torch and Triton backends, which differ only in the two per-chunk steps.
"""
import importlib

import torch
import torch.distributed as dist

from cromwell.model.kernels import ce_torch, reference
from cromwell.model.kernels.dispatch import resolve_impl

# Bytes of fp32 logits per chunk: large enough that the chunk matmuls stay efficient, small
# next to the [N, V] logits the chunking avoids.
CHUNK_BYTES = {"torch": 64 << 20, "triton": 256 << 20}


def _world(group):
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def chunk_rows_for(n_rows: int, v_local: int, impl: str) -> int:
    rows = CHUNK_BYTES[impl] // (4 * v_local)
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(rows, n_rows))


def chunked_linear_cross_entropy(hidden, weight, target, ignore_index, label_smoothing, z_loss,
                                 reduction, tp_group, ops, chunk_rows, need_hidden_grad,
                                 need_weight_grad):
    """Returns (loss, grad_hidden or None, grad_weight or None). grad_hidden is this rank's
    partial sum under TP; the caller all-reduces it."""
    n_rows, _ = hidden.shape
    v_local = weight.shape[0]
    world, rank = _world(tp_group)
    vocab = v_local * world
    device = hidden.device

    valid = target != ignore_index
    # Dividing by 1 is exact, so "sum" is the plain sum, not a mean scaled back up.
    norm = valid.sum().clamp(min=1) if reduction == "mean" else 1
    row_scale = valid.float() / norm
    local_target = target - rank * v_local
    in_shard = valid & (local_target >= 0) & (local_target < v_local)
    local_target = torch.where(in_shard, local_target, -1)

    row_loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=device)
                   if need_weight_grad else None)
    # bf16/fp16 logits must leave the matmul in fp32: rounded to bf16 first, logits near 100
    # would move by up to 0.25 and the loss with them. CUDA's mm writes fp32 from bf16/fp16
    # directly (out_dtype); CPU's cannot, so there the weight shard is upcast once per call (an
    # fp32 copy, twice its bf16 size; per chunk would repeat it) and every matmul runs in fp32.
    upcast = hidden.dtype != torch.float32 and not hidden.is_cuda
    w = weight.float() if upcast else weight
    low_precision = w.dtype != torch.float32
    mm_dtype = (torch.float32,) if low_precision else ()
    buffer = torch.empty(chunk_rows, v_local, dtype=torch.float32, device=device)

    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n_rows))
        h = hidden[rows].to(w.dtype)
        logits = buffer[: h.shape[0]]
        torch.mm(h, w.T, *mm_dtype, out=logits)
        row_max, sumexp, target_logit, logit_sum = ops.row_stats(logits, local_target[rows])
        global_max = row_max
        if world > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            sums = torch.stack([sumexp * torch.exp(row_max - global_max), target_logit, logit_sum])
            dist.all_reduce(sums, group=tp_group)
            sumexp, target_logit, logit_sum = sums
        lse = global_max + torch.log(sumexp)
        row_loss[rows] = (lse - (1.0 - label_smoothing) * target_logit
                          - label_smoothing / vocab * logit_sum + z_loss * lse * lse)
        if not (need_hidden_grad or need_weight_grad):
            continue
        ops.logit_grad_(logits, row_max, lse, local_target[rows], row_scale[rows],
                        label_smoothing, z_loss, vocab)
        grad_logits = logits.to(w.dtype)
        if need_hidden_grad and upcast:
            grad_hidden[rows] = grad_logits @ w
        elif need_hidden_grad:
            torch.mm(grad_logits, w, out=grad_hidden[rows])
        if need_weight_grad and low_precision:
            # The chunk product runs at input precision (fp32 inside the matmul); the sum
            # over chunks is kept in fp32.
            grad_weight += grad_logits.T @ h
        elif need_weight_grad:
            grad_weight.addmm_(grad_logits.T, h)

    loss = torch.where(valid, row_loss, 0.0).sum() / norm
    return loss, grad_hidden, grad_weight


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index, label_smoothing, z_loss, reduction,
                tp_group, impl, grad_enabled):
        ops = ce_torch if impl == "torch" else importlib.import_module("cromwell.model.kernels.ce_triton")
        chunk_rows = chunk_rows_for(hidden.shape[0], weight.shape[0], impl)
        # needs_input_grad ignores grad mode (forward always runs without it, hence the flag):
        # under no_grad a weight that requires grad would get a gradient computed for nothing.
        loss, grad_hidden, grad_weight = chunked_linear_cross_entropy(
            hidden, weight, target, ignore_index, label_smoothing, z_loss, reduction, tp_group,
            ops, chunk_rows, grad_enabled and ctx.needs_input_grad[0],
            grad_enabled and ctx.needs_input_grad[1])
        ctx.tp_group = tp_group
        ctx.weight_dtype = weight.dtype
        # Held on ctx rather than saved: backward scales them in place and drops them, so the
        # weight gradient never exists twice.
        ctx.grads = (grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy supports one backward pass per forward "
                               "(its gradients are precomputed and consumed)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
            if _world(ctx.tp_group)[0] > 1:
                dist.all_reduce(grad_hidden, group=ctx.tp_group)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(hidden, weight, target):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V_local, H={hidden.shape[1]}], got shape "
                         f"{tuple(weight.shape)}")
    if target.shape != (hidden.shape[0],):
        raise ValueError(f"target must be [N={hidden.shape[0]}], got shape {tuple(target.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 vocab ids, got {target.dtype}")
    if not (hidden.device == weight.device == target.device):
        raise ValueError(f"hidden, weight and target must share a device, got {hidden.device}, "
                         f"{weight.device}, {target.device}")


def fused_linear_cross_entropy(hidden, weight, target, *, ignore_index=-100, label_smoothing=0.0,
                               z_loss=0.0, reduction="mean", tp_group=None, impl="auto"):
    """Mean (or with reduction="sum", summed) cross-entropy of `hidden @ weight.T` against
    `target` over non-ignored tokens.

    hidden [N, H] is replicated on every TP rank; weight [V_local, H] is this rank's
    contiguous row shard of the output weight; target [N] holds global vocab ids. The result
    is identical on every rank, 0 (with zero gradients) when every target is ignored. Under
    TP the returned hidden gradient is already the full one. z_loss adds z_loss * logsumexp^2
    per non-ignored token to what is reduced. bf16/fp16 inputs are reduced in fp32, logits
    included. No gradient is computed where grad mode is off.
    """
    _check_inputs(hidden, weight, target)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    impl = resolve_impl(impl, hidden)
    if not hidden.is_cuda:
        # Out-of-range ids would otherwise silently score a zero logit; on CUDA the check would
        # cost a host sync every step.
        vocab = weight.shape[0] * _world(tp_group)[0]
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if bad.any():
            raise ValueError(f"target holds ids outside [0, {vocab}) that are not "
                             f"ignore_index={ignore_index}: {target[bad][:5].tolist()}")
    if impl == "reference":
        return reference.linear_cross_entropy(hidden, weight, target, ignore_index,
                                              label_smoothing, z_loss, tp_group, reduction)
    return _FusedLinearCrossEntropy.apply(hidden, weight, target, ignore_index, label_smoothing,
                                          z_loss, reduction, tp_group, impl,
                                          torch.is_grad_enabled())
