"""What a benchmark ran on, recorded in every results JSON."""

import os
import platform
import re
from pathlib import Path

import torch


def slug(text: str) -> str:
    """A file-name-safe form of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia_h100_80gb_hbm3"."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def machine() -> dict:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            # Other work on the machine inflates times (ratios less so: the compared loops interleave).
            "load_average_at_start": os.getloadavg()}
    if torch.cuda.is_available():
        import triton

        info.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__)
    return info
