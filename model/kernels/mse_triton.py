"""Masked per-row losses as Triton kernels (same contract as mse_torch).

Each program owns BLOCK_M rows and streams them across D. Rows outside the mask (forward) or
with a zero coefficient (backward) are never read: their loads are masked off, so the kernel
moves only the bytes of the rows that matter. Imported lazily, like ce_triton.
"""
import torch
import triton
import triton.language as tl

from cromwell.model.kernels.mse_torch import COSINE_EPS

KINDS = {"mse": 0, "cosine": 1, "smooth_l1": 2}


@triton.jit
def _forward_kernel(p_ptr, t_ptr, mask_ptr, loss_ptr, stats_ptr, N, D, stride_p, stride_t,
                    KIND: tl.constexpr, EPS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = rows < N
    selected = (tl.load(mask_ptr + rows, mask=in_range, other=0) != 0) & in_range
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    sq_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    sq_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        live = selected[:, None] & (cols < D)[None, :]
        p = tl.load(p_ptr + rows64[:, None] * stride_p + cols[None, :], mask=live, other=0.0)
        t = tl.load(t_ptr + rows64[:, None] * stride_t + cols[None, :], mask=live, other=0.0)
        p = p.to(tl.float32)
        t = t.to(tl.float32)
        if KIND == 1:
            acc += tl.sum(p * t, axis=1)
            sq_p += tl.sum(p * p, axis=1)
            sq_t += tl.sum(t * t, axis=1)
        else:
            diff = p - t
            if KIND == 0:
                acc += tl.sum(diff * diff, axis=1)
            else:
                abs_diff = tl.abs(diff)
                acc += tl.sum(tl.where(abs_diff < 1.0, 0.5 * diff * diff, abs_diff - 0.5), axis=1)
    if KIND == 1:
        norm_p = tl.sqrt(sq_p)
        norm_t = tl.sqrt(sq_t)
        loss = 1.0 - acc / (tl.maximum(norm_p, EPS) * tl.maximum(norm_t, EPS))
        tl.store(stats_ptr + rows, acc, mask=in_range)
        tl.store(stats_ptr + N + rows, norm_p, mask=in_range)
        tl.store(stats_ptr + 2 * N + rows, norm_t, mask=in_range)
    else:
        loss = acc / D
    tl.store(loss_ptr + rows, tl.where(selected, loss, 0.0), mask=in_range)


@triton.jit
def _backward_kernel(p_ptr, t_ptr, coef_ptr, stats_ptr, gp_ptr, gt_ptr, N, D, stride_p,
                     stride_t, KIND: tl.constexpr, EPS: tl.constexpr, NEED_P: tl.constexpr,
                     NEED_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = rows < N
    coef = tl.load(coef_ptr + rows, mask=in_range, other=0.0)
    selected = (coef != 0.0) & in_range
    rows64 = rows.to(tl.int64)
    if KIND == 1:
        dot = tl.load(stats_ptr + rows, mask=selected, other=0.0)
        norm_p = tl.load(stats_ptr + N + rows, mask=selected, other=0.0)
        norm_t = tl.load(stats_ptr + 2 * N + rows, mask=selected, other=0.0)
        clamped_p = tl.maximum(norm_p, EPS)
        clamped_t = tl.maximum(norm_t, EPS)
        inv = 1.0 / (clamped_p * clamped_t)
        # A norm below eps is clamped to a constant and so passes no gradient through.
        self_p = tl.where(norm_p > EPS, dot * inv / (clamped_p * clamped_p), 0.0)
        self_t = tl.where(norm_t > EPS, dot * inv / (clamped_t * clamped_t), 0.0)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        inside = in_range[:, None] & (cols < D)[None, :]
        live = selected[:, None] & (cols < D)[None, :]
        p = tl.load(p_ptr + rows64[:, None] * stride_p + cols[None, :], mask=live, other=0.0)
        t = tl.load(t_ptr + rows64[:, None] * stride_t + cols[None, :], mask=live, other=0.0)
        p = p.to(tl.float32)
        t = t.to(tl.float32)
        c = coef[:, None]
        if KIND == 1:
            grad_p = -c * (t * inv[:, None] - p * self_p[:, None])
            grad_t = -c * (p * inv[:, None] - t * self_t[:, None])
        else:
            diff = p - t
            if KIND == 0:
                step = 2.0 * diff
            else:
                step = tl.minimum(tl.maximum(diff, -1.0), 1.0)
            grad_p = step * (c / D)
            grad_t = -grad_p
        if NEED_P:
            tl.store(gp_ptr + rows64[:, None] * D + cols[None, :],
                     grad_p.to(gp_ptr.dtype.element_ty), mask=inside)
        if NEED_T:
            tl.store(gt_ptr + rows64[:, None] * D + cols[None, :],
                     grad_t.to(gt_ptr.dtype.element_ty), mask=inside)


def _blocks(dim: int):
    block_d = min(triton.next_power_of_2(dim), 1024)
    return max(1, 4096 // block_d), block_d


def forward(pred, target, mask, kind):
    n_rows, dim = pred.shape
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=pred.device)
    stats = torch.empty(3, n_rows, dtype=torch.float32, device=pred.device)
    block_m, block_d = _blocks(dim)
    _forward_kernel[(triton.cdiv(n_rows, block_m),)](
        pred, target, mask.view(torch.uint8), row_loss, stats, n_rows, dim, pred.stride(0),
        target.stride(0), KIND=KINDS[kind], EPS=COSINE_EPS, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=4)
    return row_loss, stats if kind == "cosine" else None


def backward(pred, target, coef, stats, kind, need_pred, need_target):
    n_rows, dim = pred.shape
    grad_pred = torch.empty(n_rows, dim, dtype=pred.dtype, device=pred.device) if need_pred else None
    grad_target = (torch.empty(n_rows, dim, dtype=target.dtype, device=target.device)
                   if need_target else None)
    block_m, block_d = _blocks(dim)
    # Unused pointers still need a tensor; the constexpr flags keep them untouched.
    _backward_kernel[(triton.cdiv(n_rows, block_m),)](
        pred, target, coef.contiguous(), coef if stats is None else stats,
        grad_pred if need_pred else coef, grad_target if need_target else coef, n_rows, dim,
        pred.stride(0), target.stride(0), KIND=KINDS[kind], EPS=COSINE_EPS, NEED_P=need_pred,
        NEED_T=need_target, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return grad_pred, grad_target
