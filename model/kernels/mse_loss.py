"""Masked regression loss for the JEPA objective: the weighted mean, over the rows a mask
selects, of a per-row MSE, cosine distance or smooth-L1, computed in fp32 without gathering
the masked rows (one pass for forward, one for backward)."""
import importlib

import torch

from cromwell.model.kernels import mse_torch, reference
from cromwell.model.kernels.dispatch import resolve_impl

KINDS = ("mse", "cosine", "smooth_l1")


class _MaskedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, mask, weights, kind, impl):
        backend = mse_torch if impl == "torch" else importlib.import_module("cromwell.model.kernels.mse_triton")
        row_loss, stats = backend.forward(pred, target, mask, kind)
        row_weight = mask.float() if weights is None else torch.where(mask, weights.float(), 0.0)
        row_coef = row_weight / mask.sum().clamp(min=1)
        ctx.backend, ctx.kind = backend, kind
        ctx.save_for_backward(pred, target, row_coef, stats)
        return (row_loss * row_coef).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        pred, target, row_coef, stats = ctx.saved_tensors
        grad_pred, grad_target = ctx.backend.backward(
            pred, target, row_coef * grad_loss, stats, ctx.kind, ctx.needs_input_grad[0],
            ctx.needs_input_grad[1])
        return grad_pred, grad_target, None, None, None, None


def _check_inputs(pred, target, mask, weights, kind):
    if pred.dim() != 2:
        raise ValueError(f"pred must be [N, D], got shape {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must match pred shape "
                         f"{tuple(pred.shape)}")
    if pred.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"pred must be float32 or bfloat16, got {pred.dtype}")
    if target.dtype != pred.dtype:
        raise TypeError(f"target dtype {target.dtype} must match pred dtype {pred.dtype}")
    if mask.shape != (pred.shape[0],) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape [N={pred.shape[0]}], got "
                         f"{mask.dtype} of shape {tuple(mask.shape)}")
    if weights is not None:
        if weights.shape != (pred.shape[0],) or not weights.is_floating_point():
            raise ValueError(f"weights must be a float tensor of shape [N={pred.shape[0]}], got "
                             f"{weights.dtype} of shape {tuple(weights.shape)}")
        if weights.requires_grad:
            raise ValueError("weights must not require grad: they are treated as constants")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    devices = {t.device for t in (pred, target, mask) + (() if weights is None else (weights,))}
    if len(devices) != 1:
        raise ValueError(f"pred, target, mask and weights must share a device, got {devices}")


def masked_mse(pred, target, mask, *, weights=None, kind="mse", impl="auto"):
    """sum_i mask_i * w_i * loss_i / max(1, count(mask)) for pred/target [N, D].

    loss_i is the mean over D of the squared error ("mse") or smooth-L1 with beta 1
    ("smooth_l1"), or 1 - cosine similarity ("cosine"). An empty mask gives 0 and zero
    gradients. Gradients flow to pred and target (whichever require grad), not to weights.
    """
    _check_inputs(pred, target, mask, weights, kind)
    impl = resolve_impl(impl, pred)
    if impl == "reference":
        return reference.masked_loss(pred, target, mask, weights, kind)
    pred = pred if pred.stride(1) == 1 else pred.contiguous()
    target = target if target.stride(1) == 1 else target.contiguous()
    return _MaskedLoss.apply(pred, target, mask, weights, kind, impl)
