"""Fused losses for hybrid JEPA + LM training: linear cross-entropy (optionally vocab-parallel)
and masked MSE / cosine / smooth-L1. Triton kernels on CUDA tensors, exact chunked torch on
CPU; `set_default_impl("reference")` forces the plain materialised torch versions."""
from model.kernels.ce_loss import fused_linear_cross_entropy
from model.kernels.dispatch import get_default_impl, set_default_impl
from model.kernels.mse_loss import masked_mse

__all__ = ["fused_linear_cross_entropy", "masked_mse", "set_default_impl", "get_default_impl"]
