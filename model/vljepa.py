"""The vision-language JEPA (docs/design.md, The model: five modules): vision encoder (model/vit.py),
cross-modal fusion (model/fusion.py), language encoder and autoregressive head (model/gpt.py's layers),
and the JEPA head (model/jepa.py).

Like GPT, the model is a flat list of layers named "0", "1", ... so that every layout names parameters
alike, and `MODULES[i]` says which of the design's five checkpoint modules layer i belongs to (what
checkpoint conversion groups by). The target encoder (`VLJEPA(..., target=True)`) is built from the
same list minus the layers that have no target (the output projection, the predictors): its
parameters carry the online model's names, which is how the EMA pairs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from cromwell.model.config import ModelConfig
from cromwell.model.fusion import CrossBlock, Projector
from cromwell.model.gpt import Block, Embedding, OutputLoss, _no_init, padded_vocab, rms_norm
from cromwell.model.jepa import Projections, TextPredictor, VisionPredictor
from cromwell.model.vit import PatchEmbed, VisionBlock, VisionNorm

MODULES = ("vision_encoder", "cross_modal_fusion", "language_encoder", "autoregressive_head", "jepa_head")


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = rms_norm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x):
        return self.norm(x)


class OutputHead(nn.Module):
    """The autoregressive head: the vocab-parallel output projection fused with its loss."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        self.proj = OutputLoss(cfg.hidden_size, padded_vocab(cfg, mp), config=mp, init_method=_no_init, bias=False,
                               gather_output=False)


def layer_specs(cfg: ModelConfig, mp: ModelParallelConfig) -> list[tuple[str, bool, type, tuple]]:
    """(which of the five modules, has an EMA target, class, args) of every layer in order."""
    v = cfg.vision
    specs = [("vision_encoder", True, PatchEmbed, (v,))]
    specs += [("vision_encoder", True, VisionBlock, (v, mp))] * v.num_layers
    specs += [("vision_encoder", True, VisionNorm, (v,)), ("cross_modal_fusion", True, Projector, (cfg, mp)),
              ("language_encoder", True, Embedding, (cfg, mp))]
    for i in range(cfg.num_layers):
        specs.append(("language_encoder", True, Block, (cfg, mp)))
        if (i + 1) % cfg.fusion.every == 0:
            specs.append(("cross_modal_fusion", True, CrossBlock, (cfg, mp)))
    return specs + [
        ("language_encoder", True, FinalNorm, (cfg,)),
        ("autoregressive_head", False, OutputHead, (cfg, mp)),
        ("jepa_head", True, Projections, (cfg,)),
        ("jepa_head", False, VisionPredictor, (cfg, mp)),
        ("jepa_head", False, TextPredictor, (cfg, mp)),
    ]


@dataclass
class Heads:
    """The VL-JEPA's heads as a loss calls them: the output projection's loss, the JEPA projections and
    predictors, and the EMA target's projections (None without a target). `VLJEPA.heads` gives the
    whole model's; a pipeline's last stage gives those of its layers (pretrain/pipeline.py)."""

    lm_loss: Callable
    projections: Callable
    vision_predictor: Callable
    text_predictor: Callable
    target_projections: Callable | None


class VLJEPA(nn.Module):
    """The online model, or with target=True the encoders and projections only (the EMA target);
    `only`: the names of the layers to build (a pipeline stage's), all by default."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, checkpoint_activations: bool = False,
                 kernels: str = "fused", target: bool = False, only: set[str] | None = None):
        super().__init__()
        self.modules_of = {}
        for i, (module, has_target, cls, args) in enumerate(layer_specs(cfg, mp)):
            if (has_target or not target) and (only is None or str(i) in only):
                self.add_module(str(i), cls(*args))
                self.modules_of[str(i)] = module
        self.checkpoint_activations = checkpoint_activations
        self.kernels = kernels

    def _of(self, cls):
        return next(layer for layer in self.children() if type(layer) is cls)

    @property
    def projections(self) -> Projections:
        return self._of(Projections)

    @property
    def vision_predictor(self) -> VisionPredictor:
        return self._of(VisionPredictor)

    @property
    def text_predictor(self) -> TextPredictor:
        return self._of(TextPredictor)

    def forward(self, input_ids: torch.Tensor, patches: torch.Tensor, image_rows: torch.Tensor,
                keep: torch.Tensor | None = None, position_ids=None, attention_mask=None, cache=None):
        """(ViT tokens [bi, k, vision hidden] of the kept patches, final hidden states [b, s, hidden]).

        input_ids [b, s]; patches [bi, n, 3*p*p] of the images of rows image_rows [bi] (bi may be 0);
        keep [bi, k]: the patches the ViT reads (None: all), which are also all the text sees.
        patches None (generation): no row has an image, and the fusion blocks are skipped (running them on
        no row changes nothing). cache (generation, model/generate.py): `cache.layer(name)` holds layer
        `name`'s keys and values; once the fusion blocks hold the image's, the vision encoder does not run
        again (and the ViT tokens returned are None).
        """
        v = ctx = x = None
        images = patches is not None
        vision = images and (cache is None or not cache.has_image())
        for name, layer in self.named_children():
            kind = type(layer)
            if kind is PatchEmbed and vision:
                v = layer(patches, keep)
            elif kind is VisionBlock and vision:
                v = self._run(layer, v)
            elif kind is VisionNorm and vision:
                v = layer(v)
            elif kind is Projector and vision:
                ctx = layer(v)
            elif kind is Embedding:
                x = layer(input_ids)
            elif kind is Block:
                x = self._run(layer, x, position_ids, attention_mask, None if cache is None else cache.layer(name))
            elif kind is CrossBlock and images:
                x = layer(x, ctx, image_rows, None if cache is None else cache.layer(name))
            elif kind is FinalNorm:
                return v, layer(x)
        raise AssertionError("a VLJEPA ends its encoders with a FinalNorm")

    def _run(self, block, *args):
        if self.checkpoint_activations and torch.is_grad_enabled():
            # Non-reentrant: works with inputs that need no grad and with ZeRO-3's parameter hooks.
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def heads(self, target_projections: Projections | None = None) -> Heads:
        return Heads(self.lm_loss, self.projections, self.vision_predictor, self.text_predictor, target_projections)

    @property
    def output_weight(self) -> torch.Tensor:
        return self._of(OutputHead).proj.weight

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return self._of(OutputHead).proj(hidden, labels, self.kernels, reduction)
