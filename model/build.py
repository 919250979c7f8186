"""The one place the project's models are constructed: the trainer, the EMA target, conversion, loading,
generation and the benchmarks all call `build`. Every shape comes from the model config (model/config.py);
the tensor-parallel size from megatron-core's config. A Hugging Face model (model.type hf) is not built
but loaded with its pretrained weights (model/hf.py).

The weights are left for `init_weights` (model/gpt.py) to fill, layer by layer, so that a ZeRO-3 build
can initialise each partitioned parameter in turn; on the meta device nothing is allocated at all.
"""

from __future__ import annotations

from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from cromwell.model.config import ModelConfig
from cromwell.model.gpt import GPT
from cromwell.model.vljepa import VLJEPA


def build(cfg: ModelConfig, mp: ModelParallelConfig, *, checkpoint_activations: bool = False, kernels: str = "fused",
          target: bool = False, only: set[str] | None = None) -> nn.Module:
    """This rank's tensor-parallel shard of the model cfg.type names, as a flat list of layers "0", "1", ...
    target: the VL-JEPA's EMA target encoder (the layers that have one); only: the names of the layers
    to build (a pipeline stage's)."""
    if cfg.type == "vljepa":
        return VLJEPA(cfg, mp, checkpoint_activations=checkpoint_activations, kernels=kernels, target=target,
                      only=only)
    if cfg.type != "gpt":
        raise ValueError(f"model.type {cfg.type!r} is loaded, not built: model/hf.py reads a Hugging Face model")
    if target or only is not None:
        raise ValueError("only a model.type=vljepa has an EMA target, and only it is built in parts")
    return GPT(cfg, mp, checkpoint_activations=checkpoint_activations, kernels=kernels)
