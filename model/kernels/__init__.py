"""Fused losses for hybrid JEPA + LM training: linear cross-entropy (optionally vocab-parallel)
and masked MSE / cosine / smooth-L1. Triton kernels on CUDA tensors, exact chunked torch on
CPU; impl="reference" (training.kernels: reference) the plain materialised torch versions."""
from cromwell.model.kernels.ce_loss import fused_linear_cross_entropy
from cromwell.model.kernels.dispatch import impl_of
from cromwell.model.kernels.mse_loss import masked_mse

__all__ = ["fused_linear_cross_entropy", "masked_mse", "impl_of"]
