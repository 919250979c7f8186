"""Throughput metrics: the FLOPs formula against what the project's GPT runs, the MFU arithmetic,
the GPU peak table and the CPU peak measurement."""

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cromwell.model.config import ModelConfig
from cromwell.model.gpt import GPT, init_weights, megatron_config
from cromwell.pretrain.distributed import join_process_group
from cromwell.pretrain.throughput import Throughput, flops_per_token, gpu_memory_bandwidth, gpu_peak_flops, peak_flops_per_device


@pytest.fixture(scope="module")
def model_parallel():
    # Tear down only what this module set up: another module may own the group.
    owns_group = not torch.distributed.is_initialized()
    join_process_group()
    owns_mp = not parallel_state.model_parallel_is_initialized()
    if owns_mp:
        parallel_state.initialize_model_parallel(1, 1)
    yield
    if owns_mp:
        parallel_state.destroy_model_parallel()
    if owns_group:
        torch.distributed.destroy_process_group()


# The second case takes the default SwiGLU width (192) and a vocabulary that gets padded (300 -> 384).
@pytest.mark.parametrize("ffn_hidden_size, vocab, seq", [(128, 512, 32), (None, 300, 24)])
def test_formula_equals_flop_counter_on_project_gpt(model_parallel, ffn_hidden_size, vocab, seq):
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=ffn_hidden_size, vocab_size=vocab)
    padded = cfg.padded_vocab_size()
    gpt = GPT(cfg, megatron_config(1))
    for i, layer in enumerate(gpt.children()):
        init_weights(layer, i, cfg, seed=0)
    batch = 2
    ids = torch.randint(0, vocab, (batch, seq))
    # FlopCounterMode has no formula for CPU's fused SDPA kernel (it would count attention as 0),
    # and its CUDA flash/efficient formulas add backward's recompute of QK^T. The math backend
    # runs attention as bmm's over the full s x s square (the causal mask is applied to the
    # scores), whose forward + backward are exactly the formula's 2 + 4 matmuls: equality is exact.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        hidden = gpt(ids)
        logits = hidden @ gpt.output_weight.T  # materialised so the head's matmul is counted
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    assert counter.get_total_flops() == flops_per_token(cfg, padded, seq) * batch * seq


def test_update_arithmetic():
    metrics = Throughput(flops_per_token=1e9, peak_flops=1e12, world_size=4, device="cpu").update(10_000, 2.0)
    assert metrics["step_time_s"] == 2.0 and metrics["tokens_per_s"] == 5000.0
    assert metrics["tflops_per_device"] == pytest.approx(1.25)
    assert metrics["mfu"] == pytest.approx(1.25)
    assert metrics["peak_mem_gb"] > 0
    assert math.isnan(Throughput(1e9, math.nan, 4, "cpu").update(10_000, 2.0)["mfu"])


@pytest.mark.parametrize("name, dtype, tflops, source", [
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312, "A100"),
    ("NVIDIA A100 80GB PCIe", torch.float32, 19.5, "A100"),
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.5, "H100 datasheet, SXM"),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.5, "H100 datasheet, PCIe"),
    ("NVIDIA H100 NVL", torch.float16, 835.5, "H100 datasheet, NVL"),
    ("NVIDIA H200", torch.bfloat16, 989.5, "H200"),
    ("NVIDIA GH200 480GB", torch.bfloat16, 989.5, "GH200"),
    ("NVIDIA B200", torch.bfloat16, 2250, "HGX B200"),
    ("NVIDIA L4", torch.bfloat16, 121, "L4 "),
    ("NVIDIA L40S", torch.bfloat16, 362.05, "L40S"),
    ("NVIDIA A10G", torch.bfloat16, 125, "A10 "),
    ("Tesla V100-PCIE-32GB", torch.float16, 112, "V100 datasheet, PCIe"),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2, "Ada"),
])
def test_gpu_table_lookup(name, dtype, tflops, source):
    peak, where = gpu_peak_flops(name, dtype)
    assert peak == tflops * 1e12 and where.startswith(source)


@pytest.mark.parametrize("name, tb_per_s", [
    ("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H100 NVL", 3.9), ("NVIDIA H200", 4.8),
    ("NVIDIA A100-SXM4-80GB", 2.039), ("NVIDIA A100 80GB PCIe", 1.935), ("NVIDIA A100-SXM4-40GB", 1.555),
    ("NVIDIA A100-PCIE-40GB", 1.555), ("NVIDIA L4", 0.3),
])
def test_gpu_memory_bandwidth_lookup(name, tb_per_s):
    assert gpu_memory_bandwidth(name)[0] == pytest.approx(tb_per_s * 1e12)
    assert math.isnan(gpu_memory_bandwidth("Tesla T4")[0])


@pytest.mark.parametrize("name, dtype", [("NVIDIA RTX A1000", torch.bfloat16), ("Tesla T4", torch.float16),
                                         ("Tesla V100-SXM2-16GB", torch.bfloat16)])
def test_gpu_without_a_known_peak_is_nan(name, dtype):
    assert math.isnan(gpu_peak_flops(name, dtype)[0])


def test_fp32_peak_follows_tf32_setting():
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert gpu_peak_flops("NVIDIA A100-SXM4-40GB", torch.float32)[0] == 156e12
        assert gpu_peak_flops("Tesla V100-SXM2-16GB", torch.float32)[0] == 15.7e12  # no TF32 on Volta
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def test_cpu_peak_is_measured_once_per_process():
    # No speed is asserted: the machine is shared.
    peak, source = peak_flops_per_device("cpu", torch.float32)
    assert 0 < peak < math.inf and source.startswith("measured")
    assert peak_flops_per_device("cpu", torch.float32)[0] == peak
