"""Fused linear cross-entropy (chunked torch and Triton-interpreted) against F.cross_entropy on
materialised logits: loss and both gradients, fp32 and bf16/fp16, mean and sum; no gradient work
when grad mode is off."""
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cromwell.model.kernels import ce_loss, fused_linear_cross_entropy
from cromwell.model.kernels.dispatch import interpreter_problem
from cromwell.model.loss import lm_loss

IMPLS = ["torch", "triton"]


def reference(hidden, weight, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
              reduction="mean"):
    logits = hidden.float() @ weight.float().T
    keep = target != ignore_index
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)
    lse = torch.logsumexp(logits[keep], dim=1)
    z = (lse * lse).sum() if reduction == "sum" else (lse * lse).mean()
    return loss + z_loss * z


def loss_and_grads(fn, hidden, weight, target, **kw):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    loss = fn(hidden, weight, target, **kw)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), grad_hidden, grad_weight


def assert_matches(impl, hidden, weight, target, rtol=1e-5, atol=1e-6, **kw):
    got = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, impl=impl, **kw)
    want = loss_and_grads(reference, hidden, weight, target, **kw)
    for name, g, w in zip(("loss", "grad_hidden", "grad_weight"), got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def make(n, h, v, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen) * scale
    weight = torch.randn(v, h, generator=gen) / h**0.5
    target = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, target


@pytest.fixture
def small_chunks(monkeypatch):
    """8-row chunks, so a 37-row batch has four full chunks and a ragged one."""
    for impl in IMPLS:
        monkeypatch.setitem(ce_loss.CHUNK_BYTES, impl, 4 * 8 * 300)


@pytest.mark.parametrize("impl", IMPLS)
def test_ragged_chunks_with_ignored_targets(impl, small_chunks):
    hidden, weight, target = make(37, 16, 300)
    target[[0, 9, 36]] = -100
    assert_matches(impl, hidden, weight, target)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
def test_label_smoothing_and_z_loss(impl, small_chunks, label_smoothing, z_loss):
    hidden, weight, target = make(37, 16, 300, seed=1)
    target[5] = 7
    target[6] = -1
    assert_matches(impl, hidden, weight, target, ignore_index=-1,
                   label_smoothing=label_smoothing, z_loss=z_loss)


@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_spanning_several_kernel_blocks(impl):
    hidden, weight, target = make(5, 8, 8200, seed=2)
    target[0] = 8199
    assert_matches(impl, hidden, weight, target, label_smoothing=0.1, z_loss=1e-4)


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-3)])
def test_sum_reduction(impl, small_chunks, label_smoothing, z_loss):
    hidden, weight, target = make(37, 16, 300, seed=9)
    target[[0, 9, 20, 36]] = -100
    assert_matches(impl, hidden, weight, target, reduction="sum", rtol=1e-5, atol=1e-5,
                   label_smoothing=label_smoothing, z_loss=z_loss)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_targets_ignored_gives_zero_and_zero_grads(impl, reduction):
    hidden, weight, target = make(10, 8, 50)
    target[:] = -100
    loss, grad_hidden, grad_weight = loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, target, impl=impl, z_loss=1e-3,
        label_smoothing=0.1, reduction=reduction)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad_hidden) == 0 and torch.count_nonzero(grad_weight) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_single_target(impl):
    hidden, weight, target = make(1, 8, 50, seed=3)
    assert_matches(impl, hidden, weight, target, label_smoothing=0.1, z_loss=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_logits_near_1e4_stay_finite_and_exact(impl, small_chunks):
    hidden, weight, target = make(37, 16, 300, seed=4)
    # Rescale so that every row's largest logit magnitude is 1e4.
    hidden = hidden * (1e4 / (hidden @ weight.T).abs().amax(1, keepdim=True))
    got = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, impl=impl,
                         z_loss=1e-6)
    assert all(torch.isfinite(t).all() for t in got)
    assert got[0] > 1e3
    assert_matches(impl, hidden, weight, target, rtol=1e-5, atol=1e-4, z_loss=1e-6)


def rounded_logits_reference(hidden, weight, target):
    return F.cross_entropy((hidden @ weight.T).float(), target)


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_reduced_in_fp32(impl, dtype, small_chunks):
    # Logits of magnitude 50-200, where rounding them to bf16 (fp16) moves each by up to 0.5
    # (0.06).
    hidden, weight, target = make(37, 16, 300, seed=8, scale=50.0)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    got = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, impl=impl)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    # The product of two bf16/fp16 values is exact in fp32: these are the true logits.
    want = loss_and_grads(reference, hidden, weight, target)
    rounded = loss_and_grads(rounded_logits_reference, hidden, weight, target)
    # Loss to fp32 accuracy; gradients, returned at input precision, to one bf16 unit in the last
    # place.
    tolerances = [dict(rtol=1e-6, atol=2e-4), dict(rtol=2**-8, atol=1e-6),
                  dict(rtol=2**-8, atol=1e-6)]
    for name, g, w, r, tol in zip(("loss", "grad_hidden", "grad_weight"), got, want, rounded,
                                  tolerances):
        torch.testing.assert_close(g.float(), w.float(), **tol, msg=lambda m: f"{name}: {m}")
        assert not torch.allclose(r.float(), w.float(), **tol), f"{name}: rounding goes unseen"


def test_incoming_gradient_scales_both_grads_and_second_backward_is_refused():
    hidden, weight, target = make(12, 8, 40, seed=6)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    loss = fused_linear_cross_entropy(hidden, weight, target, impl="torch")
    (3.0 * loss).backward(retain_graph=True)
    _, want_hidden, want_weight = loss_and_grads(reference, hidden, weight, target)
    torch.testing.assert_close(hidden.grad, 3.0 * want_hidden)
    torch.testing.assert_close(weight.grad, 3.0 * want_weight)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


class RecordOps(TorchDispatchMode):
    """Counts matmuls and records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.matmuls, self.shapes = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.matmuls += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm_)
        if isinstance(out, torch.Tensor):
            self.shapes.add(tuple(out.shape))
        return out


@pytest.mark.parametrize("mode,grads", [
    (torch.no_grad, ()), (torch.inference_mode, ()), (torch.enable_grad, ()),
    (torch.enable_grad, ("hidden",)), (torch.enable_grad, ("weight",)),
    (torch.enable_grad, ("hidden", "weight")),
])
def test_gradient_work_only_for_inputs_that_get_a_gradient(small_chunks, mode, grads):
    hidden, weight, target = make(37, 16, 300, seed=10)
    # An eval step: inputs that require grad, called with grad mode off.
    hidden.requires_grad_(mode is not torch.enable_grad or "hidden" in grads)
    weight.requires_grad_(mode is not torch.enable_grad or "weight" in grads)
    record = RecordOps()
    with mode(), record:
        loss = fused_linear_cross_entropy(hidden, weight, target, impl="torch")
    # Five chunks: one logits matmul each, and one more per gradient wanted.
    assert record.matmuls == 5 * (1 + len(grads))
    # Gradient buffers are the only tensors shaped like the hidden states or the weight.
    assert ((37, 16) in record.shapes) == ("hidden" in grads)
    assert ((300, 16) in record.shapes) == ("weight" in grads)
    torch.testing.assert_close(loss.detach(), reference(hidden.detach(), weight.detach(), target))


def test_only_hidden_needs_grad_and_no_grad_mode():
    hidden, weight, target = make(12, 8, 40, seed=7)
    want = reference(hidden, weight, target)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, target), want)
    hidden.requires_grad_(True)
    (grad_hidden,) = torch.autograd.grad(fused_linear_cross_entropy(hidden, weight, target),
                                         (hidden,))
    torch.testing.assert_close(grad_hidden, torch.autograd.grad(reference(hidden, weight, target),
                                                                (hidden,))[0])


def test_the_environment_overrides_every_calls_impl(monkeypatch):
    hidden, weight, target = make(12, 8, 40)
    hidden.requires_grad_(True)
    assert "FusedLinearCrossEntropy" in type(
        fused_linear_cross_entropy(hidden, weight, target).grad_fn).__name__
    monkeypatch.setenv("CROMWELL_KERNEL_IMPL", "reference")
    loss = fused_linear_cross_entropy(hidden, weight, target, impl="torch")
    assert "FusedLinearCrossEntropy" not in type(loss.grad_fn).__name__
    torch.testing.assert_close(loss, reference(hidden, weight, target))


@pytest.mark.parametrize("change,error,match", [
    (lambda h, w, t: (h, w[:, :4], t), ValueError, "weight must be"),
    (lambda h, w, t: (h[None], w, t), ValueError, "hidden must be"),
    (lambda h, w, t: (h, w, t[:3]), ValueError, "target must be"),
    (lambda h, w, t: (h, w, t.int()), TypeError, "target must be int64"),
    (lambda h, w, t: (h, w.double(), t), TypeError, "weight dtype"),
    (lambda h, w, t: (h, w, t + 40), ValueError, "outside"),
])
def test_bad_input_is_named(change, error, match):
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(*change(*make(12, 8, 40)))


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
def test_unknown_reduction_is_named(impl):
    with pytest.raises(ValueError, match="'none'"):
        fused_linear_cross_entropy(*make(4, 8, 40), impl=impl, reduction="none")


@pytest.mark.parametrize("kernels", ["fused", "reference"])
def test_unknown_reduction_is_named_by_lm_loss(kernels):
    with pytest.raises(ValueError, match="'avg'"):
        lm_loss(*make(4, 8, 40), kernels, reduction="avg")


def test_unknown_impl_and_triton_without_gpu_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_linear_cross_entropy(*make(4, 8, 40), impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fused_linear_cross_entropy(*make(4, 8, 40), impl="triton")


def test_triton_missing_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` sees where it is not installed
    with pytest.raises(ValueError, match="needs Triton, which is not installed"):
        fused_linear_cross_entropy(*make(4, 8, 40), impl="triton")


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.9.0", "2.5.2", False),
])
def test_an_interpreter_that_cannot_run_with_this_numpy_is_named(triton_version, numpy_version, refused):
    problem = interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == refused
    if refused:
        assert f"Triton {triton_version}" in problem and f"NumPy {numpy_version}" in problem
