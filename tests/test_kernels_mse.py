"""Masked MSE / cosine / smooth-L1 (chunked torch and Triton-interpreted) against torch's
losses on the gathered masked rows: loss and the gradients of pred and target."""
import pytest
import torch
import torch.nn.functional as F

from cromwell.model.kernels import masked_mse, mse_torch

IMPLS = ["torch", "triton"]
KINDS = ["mse", "cosine", "smooth_l1"]


def reference(pred, target, mask, weights=None, kind="mse"):
    p, t = pred[mask].float(), target[mask].float()
    if kind == "mse":
        rows = F.mse_loss(p, t, reduction="none").mean(1)
    elif kind == "smooth_l1":
        rows = F.smooth_l1_loss(p, t, reduction="none", beta=1.0).mean(1)
    else:
        rows = 1.0 - F.cosine_similarity(p, t, dim=1)
    if weights is not None:
        rows = rows * weights[mask]
    return rows.sum() / max(1, int(mask.sum()))


def loss_and_grads(fn, pred, target, mask, **kw):
    pred = pred.detach().clone().requires_grad_(True)
    target = target.detach().clone().requires_grad_(True)
    loss = fn(pred, target, mask, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (pred, target)))


def make(n, d, seed=0, density=0.5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(n, d, generator=gen).to(dtype)
    # Differences straddle smooth-L1's |x| = 1 kink so both branches are exercised.
    target = (pred.float() + 1.5 * torch.randn(n, d, generator=gen)).to(dtype)
    mask = torch.rand(n, generator=gen) < density
    weights = torch.rand(n, generator=gen) + 0.5
    return pred, target, mask, weights


def assert_matches(impl, pred, target, mask, **kw):
    got = loss_and_grads(masked_mse, pred, target, mask, impl=impl, **kw)
    want = loss_and_grads(reference, pred, target, mask, **kw)
    for name, g, w in zip(("loss", "grad_pred", "grad_target"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_weighted_partial_mask_ragged_rows(impl, kind, monkeypatch):
    # 37 rows is not a multiple of any row block; 1100 columns span two Triton column blocks;
    # the torch path walks the selected rows 5 at a time, ending with a ragged chunk.
    monkeypatch.setattr(mse_torch, "CHUNK_ELEMENTS", 5 * 1100)
    pred, target, mask, weights = make(37, 1100)
    assert 0 < mask.sum() < 37
    assert_matches(impl, pred, target, mask, weights=weights, kind=kind)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_all_rows_masked(impl, kind):
    pred, target, mask, _ = make(300, 24, seed=1, density=1.1)
    assert mask.all()
    assert_matches(impl, pred, target, mask, kind=kind)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_empty_mask_gives_zero_and_zero_grads(impl, kind):
    pred, target, _, weights = make(20, 16, seed=2)
    pred[3] = float("nan")  # an unselected row must not leak into anything
    mask = torch.zeros(20, dtype=torch.bool)
    loss, grad_pred, grad_target = loss_and_grads(masked_mse, pred, target, mask,
                                                  weights=weights, kind=kind, impl=impl)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad_pred) == 0 and torch.count_nonzero(grad_target) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_unselected_rows_get_exact_zero_grads_even_when_not_finite(impl):
    pred, target, mask, _ = make(20, 16, seed=3)
    mask[:] = True
    mask[4] = False
    pred[4] = float("inf")
    loss, grad_pred, _ = loss_and_grads(masked_mse, pred, target, mask, impl=impl)
    assert torch.isfinite(loss)
    assert torch.count_nonzero(grad_pred[4]) == 0 and torch.isfinite(grad_pred).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_cosine_with_a_zero_row(impl):
    pred, target, mask, _ = make(10, 16, seed=4, density=1.1)
    pred[2] = 0.0
    assert_matches(impl, pred, target, mask, kind="cosine")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_compute_in_fp32(impl, kind):
    pred, target, mask, weights = make(37, 64, seed=5, dtype=torch.bfloat16)
    loss, grad_pred, grad_target = loss_and_grads(masked_mse, pred, target, mask,
                                                  weights=weights, kind=kind, impl=impl)
    assert grad_pred.dtype == torch.bfloat16 and grad_target.dtype == torch.bfloat16
    want = loss_and_grads(reference, pred.float(), target.float(), mask, weights=weights,
                          kind=kind)
    torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_pred.float(), want[1], rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(grad_target.float(), want[2], rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_detached_target_gets_no_grad_and_incoming_grad_scales(impl):
    pred, target, mask, weights = make(37, 48, seed=6)
    pred.requires_grad_(True)
    (2.5 * masked_mse(pred, target, mask, weights=weights, impl=impl)).backward()
    pred_ref = pred.detach().clone().requires_grad_(True)
    (2.5 * reference(pred_ref, target, mask, weights)).backward()
    torch.testing.assert_close(pred.grad, pred_ref.grad)
    assert target.grad is None


@pytest.mark.parametrize("change,error,match", [
    (lambda p, t, m, w: (p, t[:, :2], m, w), ValueError, "target shape"),
    (lambda p, t, m, w: (p, t.double(), m, w), TypeError, "target dtype"),
    (lambda p, t, m, w: (p.half(), t.half(), m, w), TypeError, "pred must be float32"),
    (lambda p, t, m, w: (p, t, m.float(), w), ValueError, "mask must be"),
    (lambda p, t, m, w: (p, t, m, w[:3]), ValueError, "weights must be"),
    (lambda p, t, m, w: (p, t, m, w.requires_grad_(True)), ValueError, "must not require grad"),
])
def test_bad_input_is_named(change, error, match):
    pred, target, mask, weights = change(*make(8, 4))
    with pytest.raises(error, match=match):
        masked_mse(pred, target, mask, weights=weights)


def test_unknown_kind_is_named():
    pred, target, mask, _ = make(8, 4)
    with pytest.raises(ValueError, match="kind must be one of"):
        masked_mse(pred, target, mask, kind="l2")
