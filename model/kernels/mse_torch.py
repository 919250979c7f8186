"""Masked per-row losses in chunked torch, for CPU tensors (same contract as mse_triton).

`forward` returns each row's loss (0 for rows outside the mask) and, for cosine, the row
statistics backward needs; `backward` turns per-row coefficients into gradients. Only the rows
that matter are touched, a bounded chunk of them at a time in fp32: the whole set of masked
rows is never gathered into one copy.
"""
import torch

COSINE_EPS = 1e-8  # F.cosine_similarity's default: norms are clamped to at least this
# Few, large chunks: each torch op is a parallel region, and their count, not the bytes, is
# what costs most when the cores are shared.
CHUNK_ELEMENTS = 1 << 20


def _chunks(selected: torch.Tensor, dim: int):
    return torch.nonzero(selected).squeeze(1).split(max(1, CHUNK_ELEMENTS // dim))


def forward(pred, target, mask, kind):
    n_rows, dim = pred.shape
    row_loss = torch.zeros(n_rows, dtype=torch.float32, device=pred.device)
    stats = torch.zeros(3, n_rows, dtype=torch.float32, device=pred.device) if kind == "cosine" else None
    for rows in _chunks(mask, dim):
        p, t = pred.index_select(0, rows).float(), target.index_select(0, rows).float()
        if kind == "cosine":
            dot, norm_p, norm_t = torch.linalg.vecdot(p, t), p.norm(dim=1), t.norm(dim=1)
            stats[:, rows] = torch.stack([dot, norm_p, norm_t])
            loss = 1.0 - dot / (norm_p.clamp(min=COSINE_EPS) * norm_t.clamp(min=COSINE_EPS))
        else:
            diff = p.sub_(t)
            if kind == "mse":
                loss = torch.linalg.vecdot(diff, diff) / dim
            else:
                abs_diff = diff.abs()
                loss = torch.where(abs_diff < 1.0, 0.5 * diff * diff, abs_diff - 0.5).mean(1)
        row_loss[rows] = loss
    return row_loss, stats


def backward(pred, target, coef, stats, kind, need_pred, need_target):
    """Gradients of sum_i coef_i * loss_i; rows with coef 0 get exactly 0 and are not read."""
    dim = pred.shape[1]
    grad_pred = torch.zeros_like(pred) if need_pred else None
    grad_target = torch.zeros_like(target) if need_target else None
    for rows in _chunks(coef != 0, dim):
        p, t = pred.index_select(0, rows).float(), target.index_select(0, rows).float()
        c = coef[rows][:, None]
        if kind == "cosine":
            dot, norm_p, norm_t = (s[rows][:, None] for s in stats)
            clamped_p, clamped_t = norm_p.clamp(min=COSINE_EPS), norm_t.clamp(min=COSINE_EPS)
            inv = 1.0 / (clamped_p * clamped_t)
            # A norm below eps is clamped to a constant and so passes no gradient through.
            self_p = torch.where(norm_p > COSINE_EPS, dot * inv / (clamped_p * clamped_p), 0.0)
            self_t = torch.where(norm_t > COSINE_EPS, dot * inv / (clamped_t * clamped_t), 0.0)
            if need_pred:
                grad_pred.index_copy_(0, rows, (-c * (t * inv - p * self_p)).to(pred.dtype))
            if need_target:
                grad_target.index_copy_(0, rows, (-c * (p * inv - t * self_t)).to(target.dtype))
            continue
        diff = p.sub_(t)
        grad = diff.mul_(2.0 * c / dim) if kind == "mse" else diff.clamp_(-1.0, 1.0).mul_(c / dim)
        if need_pred:
            grad_pred.index_copy_(0, rows, grad.to(pred.dtype))
        if need_target:
            grad_target.index_copy_(0, rows, grad.neg_().to(target.dtype))
    return grad_pred, grad_target
