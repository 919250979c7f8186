"""Throughput numbers comparable with Megatron-LM's and torchtitan's logs: step time, tokens/s,
TFLOP/s per device, MFU and peak memory."""

from __future__ import annotations

import functools
import math
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from cromwell.model.config import ModelConfig


def flops_per_token(model_cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Model FLOPs of one forward + backward per trained token of the project's GPT.

    The PaLM / Megatron-LM / torchtitan convention: 6 x the matmul parameters (2 FLOPs per
    multiply-add forward, twice that backward; every weight but the embedding lookup) plus
    6 x 2 x num_layers x seq_len x hidden for attention's QK^T and AV. Attention is counted
    full, not halved for the causal mask, as those trainers do. Model FLOPs, not hardware
    FLOPs: activation-checkpointing recompute is not counted, so MFU does not reward it.
    `vocab_size` is the padded vocabulary the model is built with.
    """
    h, ffn, layers = model_cfg.hidden_size, model_cfg.ffn_size, model_cfg.num_layers
    # Per block: fused QKV [3h x h], attention out [h x h], gate/up [2 ffn x h], down [h x ffn].
    matmul_params = layers * (4 * h * h + 3 * h * ffn) + vocab_size * h
    return 6.0 * matmul_params + 6.0 * 2 * layers * seq_len * h


# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets, per GPU: half of the "with
# sparsity" figures they headline; and the datasheet's memory bandwidth, TB/s. Keys match whole words
# of torch.cuda.get_device_name() (with '-' read as a space); a name matches the first row that fits,
# so variants precede their base.
_COLUMNS = ("bf16", "fp16", "tf32", "fp32")
_GPUS = [
    # key, source, bf16, fp16, tf32, fp32, memory TB/s
    ("A100 SXM4 80GB", "A100 datasheet, SXM 80GB", 312, 312, 156, 19.5, 2.039),
    ("A100 80GB PCIE", "A100 datasheet, PCIe 80GB", 312, 312, 156, 19.5, 1.935),
    ("A100", "A100 datasheet, 40GB", 312, 312, 156, 19.5, 1.555),
    ("H100 NVL", "H100 datasheet, NVL", 835.5, 835.5, 417.5, 60, 3.9),
    ("H100 PCIE", "H100 datasheet, PCIe", 756.5, 756.5, 378, 51, 2.0),
    ("H100", "H100 datasheet, SXM", 989.5, 989.5, 494.5, 67, 3.35),
    ("H200 NVL", "H200 datasheet, NVL", 835.5, 835.5, 417.5, 60, 4.8),
    ("H200", "H200 datasheet, SXM", 989.5, 989.5, 494.5, 67, 4.8),
    ("GH200", "GH200 datasheet (96GB HBM3)", 989.5, 989.5, 494.5, 67, 4.0),
    ("B200", "HGX B200 datasheet (1000 W)", 2250, 2250, 1100, 75, 7.7),
    ("GB200", "GB200 NVL72 datasheet (1200 W)", 2500, 2500, 1250, 80, 8.0),
    ("L40S", "L40S datasheet", 362.05, 362.05, 183, 91.6, 0.864),
    ("L4", "L4 datasheet", 121, 121, 60, 30.3, 0.3),
    # NVIDIA publishes no A10G datasheet; AWS and cloud vendors quote the A10's.
    ("A10G", "A10 datasheet (A10G: none published)", 125, 125, 62.5, 31.2, 0.6),
    ("A10", "A10 datasheet", 125, 125, 62.5, 31.2, 0.6),
    # Volta: fp16 tensor cores only. No bf16; no TF32, so fp32 matmuls stay on the CUDA cores.
    ("V100S", "V100S datasheet (PCIe)", math.nan, 130, 16.4, 16.4, 1.134),
    ("V100 PCIE", "V100 datasheet, PCIe", math.nan, 112, 14, 14, 0.9),
    ("V100", "V100 datasheet, SXM2", math.nan, 125, 15.7, 15.7, 0.9),
    # GeForce tensor rates with fp32 accumulation (what PyTorch uses), from the architecture whitepapers.
    ("RTX 4090", "Ada AD102 whitepaper", 165.2, 165.2, 82.6, 82.6, 1.008),
    ("RTX 3090", "Ampere GA102 whitepaper", 71, 71, 35.6, 35.6, 0.936),
]


def _dtype_column(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        # TF32 tensor cores run fp32 matmuls only when allowed (set_float32_matmul_precision
        # "high", allow_tf32 or fp32_precision="tf32"; this attribute reflects all three).
        return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _gpu_row(name: str):
    words = re.sub(r"[-_\s]+", " ", name.upper())
    return next((row for row in _GPUS if re.search(rf"(?<![A-Z0-9]){row[0]}(?![A-Z0-9])", words)), None)


def gpu_peak_flops(name: str, dtype: torch.dtype) -> tuple[float, str]:
    """(dense peak FLOP/s, source) of the GPU called `name` for matmuls in `dtype`; nan for a GPU
    not in the table, so that MFU reads nan rather than a guess."""
    column = _dtype_column(dtype)
    row = _gpu_row(name)
    if row is None:
        return math.nan, f"unknown GPU {name}"
    return dict(zip(_COLUMNS, row[2:6]))[column] * 1e12, f"{row[1]}, dense {column}"


def gpu_memory_bandwidth(name: str) -> tuple[float, str]:
    """(datasheet memory bandwidth in bytes/s, source) of the GPU called `name`; nan when unknown."""
    row = _gpu_row(name)
    return (math.nan, f"unknown GPU {name}") if row is None else (row[6] * 1e12, row[1])


@functools.cache
def _measured_matmul_flops(dtype: torch.dtype, threads: int) -> float:
    # Grow a square matmul until one takes 10 ms: smaller ones measure call overhead and cache
    # effects, not the sustained rate. The first call at each size warms up packing and threads.
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        start = time.perf_counter()
        a @ b
        if time.perf_counter() - start >= 0.01 or n >= 4096:
            break
        n *= 2
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def peak_flops_per_device(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device for matmuls in `dtype`, where the number comes from).

    CUDA: the datasheet table above. CPU: no published figure fits a shared, throttled machine, so
    it is measured once per process (per dtype and torch thread count): the median rate of a
    square matmul, a fraction of a second. Ranks sharing a machine measure at the same time and
    so each see its share, which is what each gets while training too.
    """
    if torch.device(device).type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(torch.device(device)), dtype)
    threads = torch.get_num_threads()
    return _measured_matmul_flops(dtype, threads), f"measured {dtype} matmul, {threads} threads"


@dataclass
class Throughput:
    flops_per_token: float
    peak_flops: float  # per device
    world_size: int
    device: str

    def update(self, tokens: int, seconds: float) -> dict:
        """Metrics of one optimizer step of `tokens` tokens (all ranks together) taking `seconds`."""
        tflops = self.flops_per_token * tokens / seconds / self.world_size / 1e12
        return {
            "step_time_s": seconds,
            "tokens_per_s": tokens / seconds,
            "tflops_per_device": tflops,
            "mfu": tflops * 1e12 / self.peak_flops,
            "peak_mem_gb": self._peak_memory_bytes() / 2**30,  # GiB, as torchtitan reports it
        }

    def _peak_memory_bytes(self) -> int:
        if torch.device(self.device).type == "cuda":
            return torch.cuda.max_memory_allocated(torch.device(self.device))
        # The process's high-water RSS: unlike the CUDA figure it includes the Python runtime,
        # torch's libraries and the data loader's buffers, not only tensors.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
