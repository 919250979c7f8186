"""Choosing which implementation of a fused loss runs.

The trainer sets a process-wide default from its config (or CROMWELL_KERNEL_IMPL in the
environment) so that a debugging run can force the plain reference everywhere without
touching call sites; a call can still name an implementation explicitly.
"""
import os

import torch

IMPLS = ("auto", "torch", "triton", "reference")


def _checked(impl: str, what: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{what} must be one of {IMPLS}, got {impl!r}")
    return impl


_default_impl = _checked(os.environ.get("CROMWELL_KERNEL_IMPL", "auto"), "CROMWELL_KERNEL_IMPL")


def set_default_impl(impl: str) -> None:
    """What impl="auto" means from now on in this process."""
    global _default_impl
    _default_impl = _checked(impl, "impl")


def get_default_impl() -> str:
    return _default_impl


def triton_interpreting() -> bool:
    # Triton decides at decoration time whether a kernel is interpreted, so this must be read
    # before the kernel modules are first imported (they are imported lazily for that reason).
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """The concrete implementation ("torch", "triton" or "reference") for a call on `tensor`."""
    impl = _checked(impl, "impl")
    if impl == "auto":
        impl = _default_impl
    if impl == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if impl == "triton" and not tensor.is_cuda and not triton_interpreting():
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the "
                         "kernels on CPU through Triton's interpreter)")
    return impl
