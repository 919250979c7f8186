"""Choosing which implementation of a fused loss runs.

One switch, the run config's `training.kernels`, reaches every fused loss: the trainer's objectives pass
`impl_of(training.kernels)` to each call (the language model's cross-entropy through model/loss.py, the
JEPA losses directly). CROMWELL_KERNEL_IMPL in the environment, when set, overrides every call's choice,
so a debugging run can force one implementation everywhere without editing a config.
"""
import os

import torch

IMPLS = ("auto", "torch", "triton", "reference")


def _checked(impl: str, what: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{what} must be one of {IMPLS}, got {impl!r}")
    return impl


KERNELS = {"fused": "auto", "reference": "reference"}  # training.kernels -> impl


def impl_of(kernels: str) -> str:
    """The implementation a config's training.kernels asks for: "fused" the Triton kernels on CUDA and
    the chunked torch ones on CPU, "reference" the plain materialised torch maths."""
    if kernels not in KERNELS:
        raise ValueError(f"training.kernels must be one of {tuple(KERNELS)}, got {kernels!r}")
    return KERNELS[kernels]


def triton_interpreting() -> bool:
    # Triton decides at decoration time whether a kernel is interpreted, so this must be read
    # before the kernel modules are first imported (they are imported lazily for that reason).
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run the kernels with these versions, or None. Triton before 3.7
    converts one-element arrays to Python ints with int(), which NumPy 2.4 refuses (triton-lang/triton
    #9171); torch 2.11 comes with Triton 3.6. Compiled kernels on a GPU are not affected."""
    def major_minor(version):
        return tuple(int(x) for x in version.split(".")[:2])

    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run with NumPy {numpy_version} (it converts "
                "one-element arrays with int(), which NumPy 2.4 refuses; fixed in Triton 3.7, triton-lang/triton"
                "#9171): use NumPy < 2.4 with this Triton, or Triton 3.7 or newer")
    return None


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """The concrete implementation ("torch", "triton" or "reference") for a call on `tensor`."""
    impl = _checked(impl, "impl")
    forced = os.environ.get("CROMWELL_KERNEL_IMPL")
    if forced:
        impl = _checked(forced, "CROMWELL_KERNEL_IMPL")
    if impl == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if impl == "triton" and not tensor.is_cuda:
        if not triton_interpreting():
            raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the "
                             "kernels on CPU through Triton's interpreter)")
        import numpy

        try:
            import triton
        except ImportError:
            raise ValueError("impl='triton' needs Triton, which is not installed (a CPU-only torch does not bring "
                             "it; `pip install triton` runs the kernels in its interpreter)") from None
        problem = interpreter_problem(triton.__version__, numpy.__version__)
        if problem:
            raise RuntimeError(problem)
    return impl
