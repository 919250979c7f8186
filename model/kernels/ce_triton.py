"""Per-chunk cross-entropy steps as Triton kernels (same contract as ce_torch).

One program per row streams the row's logits in blocks: an online log-sum-exp for the
statistics, then a second pass that writes the logit gradient over the logits in place.
Imported lazily: Triton fixes at decoration time whether kernels run in its interpreter.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _row_stats_kernel(x_ptr, stride, target_ptr, max_ptr, sumexp_ptr, target_logit_ptr,
                      logit_sum_ptr, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    target = tl.load(target_ptr + row)
    running_max = float("-inf")
    sumexp = 0.0
    target_logit = 0.0
    logit_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < V
        x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        sumexp = sumexp * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
        target_logit += tl.sum(tl.where(cols == target, x, 0.0), axis=0)
        logit_sum += tl.sum(tl.where(inside, x, 0.0), axis=0)
    tl.store(max_ptr + row, running_max)
    tl.store(sumexp_ptr + row, sumexp)
    tl.store(target_logit_ptr + row, target_logit)
    tl.store(logit_sum_ptr + row, logit_sum)


@triton.jit
def _logit_grad_kernel(x_ptr, stride, target_ptr, lse_ptr, scale_ptr, V, smooth_per_class,
                       keep, two_z, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    target = tl.load(target_ptr + row)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    softmax_coef = (1.0 + two_z * lse) * scale
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < V
        x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) * softmax_coef - smooth_per_class * scale
        grad = tl.where(cols == target, grad - keep * scale, grad)
        tl.store(base + cols, grad, mask=inside)


def _block(V: int) -> int:
    return min(triton.next_power_of_2(V), 8192)


def row_stats(logits: torch.Tensor, local_target: torch.Tensor):
    rows, V = logits.shape
    out = torch.empty(4, rows, dtype=torch.float32, device=logits.device)
    _row_stats_kernel[(rows,)](logits, logits.stride(0), local_target, out[0], out[1], out[2],
                               out[3], V, BLOCK_V=_block(V), num_warps=8)
    return out[0], out[1], out[2], out[3]


def logit_grad_(logits, row_max, lse, local_target, row_scale, smoothing, z_loss, vocab):
    rows, V = logits.shape
    _logit_grad_kernel[(rows,)](logits, logits.stride(0), local_target, lse.contiguous(),
                                row_scale.contiguous(), V, smoothing / vocab, 1.0 - smoothing,
                                2.0 * z_loss, BLOCK_V=_block(V), num_warps=8)
