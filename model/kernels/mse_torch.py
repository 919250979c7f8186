"""Masked per-row losses in chunked torch, for CPU tensors (same contract as mse_triton).

`forward` returns each row's loss (0 for rows outside the mask) and, for cosine, the row
statistics backward needs; `backward` turns per-row coefficients into gradients. Work is done
a chunk of rows at a time in fp32, so temporaries stay bounded and no gathered copy of the
masked rows is made.
"""
import torch

COSINE_EPS = 1e-8  # F.cosine_similarity's default: norms are clamped to at least this
CHUNK_ELEMENTS = 1 << 18


def _chunks(n_rows: int, dim: int):
    step = max(1, CHUNK_ELEMENTS // dim)
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def forward(pred, target, mask, kind):
    n_rows, dim = pred.shape
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=pred.device)
    stats = torch.empty(3, n_rows, dtype=torch.float32, device=pred.device) if kind == "cosine" else None
    for rows in _chunks(n_rows, dim):
        p, t = pred[rows].float(), target[rows].float()
        if kind == "cosine":
            dot, norm_p, norm_t = (p * t).sum(1), p.norm(dim=1), t.norm(dim=1)
            stats[:, rows] = torch.stack([dot, norm_p, norm_t])
            loss = 1.0 - dot / (norm_p.clamp(min=COSINE_EPS) * norm_t.clamp(min=COSINE_EPS))
        else:
            diff = p - t
            if kind == "mse":
                loss = diff.square().mean(1)
            else:
                abs_diff = diff.abs()
                loss = torch.where(abs_diff < 1.0, 0.5 * diff * diff, abs_diff - 0.5).mean(1)
        row_loss[rows] = torch.where(mask[rows], loss, 0.0)
    return row_loss, stats


def backward(pred, target, coef, stats, kind, need_pred, need_target):
    """Gradients of sum_i coef_i * loss_i; rows with coef 0 get exactly 0."""
    n_rows, dim = pred.shape
    grad_pred = torch.empty_like(pred) if need_pred else None
    grad_target = torch.empty_like(target) if need_target else None
    for rows in _chunks(n_rows, dim):
        p, t = pred[rows].float(), target[rows].float()
        c = coef[rows][:, None]
        live = c != 0
        if kind == "cosine":
            dot, norm_p, norm_t = (s[rows][:, None] for s in stats)
            clamped_p, clamped_t = norm_p.clamp(min=COSINE_EPS), norm_t.clamp(min=COSINE_EPS)
            inv = 1.0 / (clamped_p * clamped_t)
            # A norm below eps is clamped to a constant and so passes no gradient through.
            self_p = torch.where(norm_p > COSINE_EPS, dot * inv / (clamped_p * clamped_p), 0.0)
            self_t = torch.where(norm_t > COSINE_EPS, dot * inv / (clamped_t * clamped_t), 0.0)
            if need_pred:
                grad_pred[rows] = torch.where(live, -c * (t * inv - p * self_p), 0.0)
            if need_target:
                grad_target[rows] = torch.where(live, -c * (p * inv - t * self_t), 0.0)
            continue
        diff = p - t
        step = 2.0 * diff if kind == "mse" else diff.clamp(-1.0, 1.0)
        grad = torch.where(live, step * (c / dim), 0.0)
        if need_pred:
            grad_pred[rows] = grad
        if need_target:
            grad_target[rows] = -grad
    return grad_pred, grad_target
