"""Known, harmless start-up warnings of the libraries underneath, silenced by the commands (imported
first by each entry point, before DeepSpeed and megatron-core load). Every other warning stays visible.

- megatron-core, four times on import: "Transformer Engine and Apex are not installed. Falling back to
  ...". The project uses neither (apex's fused RMSNorm only when it was built on the cluster).
- megatron-core, on every tensor-parallel layer call without a group: "tp_group is None, using default
  tp group" (DeprecationWarning): the default group is the one the run made.
- DeepSpeed, on import on a machine without a GPU: "Setting accelerator to CPU. If you have GPU ...".
  The run chooses its device itself (pretrain/distributed.py); naming the CPU accelerator in
  DS_ACCELERATOR, as DeepSpeed documents, is what its message asks for.
- torch, per DeepSpeed module: "`torch.jit.script_method` is deprecated" (DeprecationWarning).
- torch, once per rank when ZeRO gathers: "`torch.distributed.all_gather_into_tensor` is deprecated"
  (FutureWarning): DeepSpeed 0.19 calls it; nothing of ours does.

The `deepspeed` launcher is a process of its own, before any of this runs: its lines (no hostfile, the
accelerator it detects) stay.
"""

import os
import warnings

import torch

KNOWN = (
    ("Transformer Engine and Apex are not installed", UserWarning),
    (".*tp_group is None", DeprecationWarning),
    ("`torch.jit.script_method` is deprecated", DeprecationWarning),
    ("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning),
)

for _message, _category in KNOWN:
    warnings.filterwarnings("ignore", message=_message, category=_category)
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"
