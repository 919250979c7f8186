"""Models as DeepSpeed pipeline stages: the layers of GPT or the VL-JEPA as a PipelineModule, and the
last stage's loss function.

A pipeline layer gets only the previous layer's output, so everything a later layer needs travels
through every stage as a tuple of tensors. DeepSpeed sends a gradient back for every floating-point
tensor of that tuple, so:
- GPT: (x, position_ids, attention_mask); x is the only float.
- VL-JEPA: the fixed slots of `SLOTS`. The online text states, vision tokens and projected vision
  tokens are floats (with gradients). The EMA target's activations travel beside them bit-cast to
  integers: data that carries no gradient, which DeepSpeed would otherwise expect for any float. A
  slot not filled yet, or no longer needed, holds a one-byte placeholder, never a float without a
  gradient. Each layer with an EMA target runs its own copy (`twin` below: the layer of the same name
  in the objective's `ema_target`, attached by `attach_targets`) on the target slots, so each stage
  owns and updates the targets of its layers. The heads (output projection, JEPA projections and
  predictors) are pass-through layers on the last stage, where the loss function calls them with the
  labels and JEPA indices.
The last stage's loss function hands the objective the same (heads, outputs) a whole model gives it.
Subclasses, not wrappers, keep the parameter names of the one-process models' layers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig

from cromwell.model.fusion import CrossBlock, Projector
from cromwell.model.gpt import Block, Embedding, Head, init_weights, layer_specs
from cromwell.model.loss import lm_loss
from cromwell.model.jepa import Projections, TextPredictor, VisionPredictor
from cromwell.model.vit import PatchEmbed, VisionBlock, VisionNorm
from cromwell.model import vljepa
from cromwell.model.vljepa import FinalNorm, OutputHead
from cromwell.pretrain.config import Config, ConfigError
from cromwell.pretrain.objectives import Loss, Objective


def micro_batch(objective: Objective, batch, counts: torch.Tensor, scale: float) -> tuple:
    """What the engine's data iterator yields for one micro batch: the first stage's inputs, and as
    the last stage's labels the objective's targets followed by the step's item counts and the factor
    the loss is scaled by for the backward (PipelineLoss unpacks them)."""
    inputs, targets = objective.inputs(batch)
    return inputs[0] if len(inputs) == 1 else inputs, (*targets, counts, torch.tensor(scale))


class PipelineLoss:
    """The last pipeline stage's loss_fn: the objective's Loss from the last layer's outputs, its total
    over the step's counts, scaled for the backward. The engine returns only that scalar, so each micro
    batch's Loss is kept until `take`."""

    def __init__(self, objective: Objective, heads):
        self.objective = objective
        self.heads = heads  # the last layer's outputs -> (heads, outputs) as a whole model gives them
        self.losses: list[Loss] = []

    def __call__(self, outputs, labels):
        *targets, counts, scale = labels
        heads, outputs = self.heads(outputs)
        loss = self.objective.loss(heads, outputs, tuple(targets))
        self.losses.append(loss.detached())
        return self.objective.total(loss.sums, counts) * scale.to(loss.sums.dtype)

    def take(self) -> list[Loss]:
        """The Losses since the last take; none on stages that compute no loss."""
        losses, self.losses = self.losses, []
        return losses


@dataclass
class OutputWeight:
    """GPT's last stage: the output projection's weight arrives as a layer output (no ZeRO-3 with a
    pipeline, so it is whole)."""

    weight: torch.Tensor
    kernels: str

    def lm_loss(self, hidden, labels, reduction="mean"):
        return lm_loss(hidden, self.weight, labels, self.kernels, reduction)


# -- GPT -------------------------------------------------------------------------------------------------


class _PipeEmbedding(Embedding):
    def forward(self, inputs):
        if torch.is_tensor(inputs):
            return super().forward(inputs)
        input_ids, position_ids, attention_mask = inputs
        return super().forward(input_ids), position_ids, attention_mask


class _PipeBlock(Block):
    def forward(self, inputs):
        if torch.is_tensor(inputs):
            return super().forward(inputs)
        x, position_ids, attention_mask = inputs
        return super().forward(x, position_ids, attention_mask), position_ids, attention_mask


class _PipeHead(Head):
    """Returns the normalised states with this rank's output weight shard (whole: no ZeRO-3 with a
    pipeline), for the objective's loss."""

    def forward(self, inputs):
        return super().forward(inputs if torch.is_tensor(inputs) else inputs[0])


_GPT_LAYERS = {Embedding: _PipeEmbedding, Block: _PipeBlock, Head: _PipeHead}


# -- VL-JEPA -----------------------------------------------------------------------------------------------

SLOTS = ("x", "v", "ctx", "t_x", "t_v", "t_ctx", "patches", "input_ids", "image_rows", "keep")
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
_FLOATS = {v: k for k, v in _BITS.items()}


def placeholder(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int8, device=like.device)


def absent(t: torch.Tensor) -> bool:
    return t.dtype == torch.int8


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.dtype])


def unbits(t: torch.Tensor) -> torch.Tensor | None:
    return None if absent(t) else t.view(_FLOATS[t.dtype])


def first_slots(patches, input_ids, image_rows, keep) -> tuple:
    """The slots from the objective's first-stage inputs: the batch, every activation a placeholder."""
    s = dict.fromkeys(SLOTS[:6], placeholder(input_ids))
    s.update(patches=patches, input_ids=input_ids, image_rows=image_rows, keep=keep)
    return tuple(s[k] for k in SLOTS)


class _Stage:
    """Mixin of every VL-JEPA pipeline layer: forward(slots) -> slots through `step(s)` on a dict."""

    twin: list  # [the layer's EMA copy] once attach_targets ran; [] without one

    def forward(self, inputs):
        s = dict(zip(SLOTS, inputs))
        self.step(s)
        for name in ("x", "v", "ctx"):
            # An activation computed from frozen layers only: a leaf that needs no gradient, which the
            # engine's backward through this stage's outputs would refuse.
            if s[name].is_floating_point() and not s[name].requires_grad:
                s[name].requires_grad_()
        return tuple(s[k] for k in SLOTS)

    def on_target(self, fn, like: torch.Tensor):
        """fn(the target copy) bit-cast for the trip, or a placeholder without a target."""
        if not getattr(self, "twin", None):
            return placeholder(like)
        with torch.no_grad(), torch.autocast(like.device.type, torch.bfloat16, enabled=like.dtype == torch.bfloat16):
            return bits(fn(self.twin[0]))


class _VLPatchEmbed(_Stage, PatchEmbed):
    def forward(self, inputs):
        return super().forward(first_slots(*inputs))

    def step(self, s):
        online = s["patches"].to(self.proj.weight.dtype)
        s["t_v"] = self.on_target(lambda t: PatchEmbed.forward(t, s["patches"].float()), online)
        s["v"] = PatchEmbed.forward(self, online, s["keep"])
        s["patches"] = placeholder(s["input_ids"])


class _VLVisionBlock(_Stage, VisionBlock):
    def step(self, s):
        s["t_v"] = self.on_target(lambda t: VisionBlock.forward(t, unbits(s["t_v"])), s["v"])
        s["v"] = VisionBlock.forward(self, s["v"])


class _VLVisionNorm(_Stage, VisionNorm):
    def step(self, s):
        s["t_v"] = self.on_target(lambda t: VisionNorm.forward(t, unbits(s["t_v"])), s["v"])
        s["v"] = VisionNorm.forward(self, s["v"])


class _VLProjector(_Stage, Projector):
    keep_vision = True  # False: nothing after this layer reads the ViT's tokens (no JEPA)
    fusion_follows = True

    def step(self, s):
        s["t_ctx"] = self.on_target(lambda t: Projector.forward(t, unbits(s["t_v"])), s["v"])
        s["ctx"] = Projector.forward(self, s["v"])
        if not self.keep_vision:
            s["v"] = s["t_v"] = placeholder(s["input_ids"])
        if not self.fusion_follows:
            s["ctx"] = s["t_ctx"] = placeholder(s["input_ids"])


class _VLEmbedding(_Stage, Embedding):
    def step(self, s):
        s["x"] = Embedding.forward(self, s["input_ids"])
        s["t_x"] = self.on_target(lambda t: Embedding.forward(t, s["input_ids"]), s["x"])


class _VLBlock(_Stage, Block):
    def step(self, s):
        s["t_x"] = self.on_target(lambda t: Block.forward(t, unbits(s["t_x"])), s["x"])
        s["x"] = Block.forward(self, s["x"])


class _VLCrossBlock(_Stage, CrossBlock):
    last = False  # the last fusion block: nothing after it reads the projected vision tokens

    def step(self, s):
        s["t_x"] = self.on_target(lambda t: CrossBlock.forward(t, unbits(s["t_x"]), unbits(s["t_ctx"]),
                                                               s["image_rows"]), s["x"])
        s["x"] = CrossBlock.forward(self, s["x"], s["ctx"], s["image_rows"])
        if self.last:
            s["ctx"] = s["t_ctx"] = placeholder(s["input_ids"])


class _VLFinalNorm(_Stage, FinalNorm):
    def step(self, s):
        s["t_x"] = self.on_target(lambda t: FinalNorm.forward(t, unbits(s["t_x"])), s["x"])
        s["x"] = FinalNorm.forward(self, s["x"])


class _Head:
    """A head on the last stage: the slots pass through; the loss function calls the module."""

    def forward(self, inputs):
        return inputs


class _VLOutputHead(_Head, OutputHead):
    pass


class _VLProjections(_Head, Projections):
    twin: list  # its EMA copy maps the target's activations (the loss function calls it)


class _VLVisionPredictor(_Head, VisionPredictor):
    pass


class _VLTextPredictor(_Head, TextPredictor):
    def forward(self, inputs):
        """The last layer: the outputs the objective's loss reads, the target activations as floats."""
        s = dict(zip(SLOTS, inputs))
        return s["x"], None if absent(s["v"]) else s["v"], unbits(s["t_v"]), unbits(s["t_x"]), s["keep"]


_VL_LAYERS = {PatchEmbed: _VLPatchEmbed, VisionBlock: _VLVisionBlock, VisionNorm: _VLVisionNorm,
              Projector: _VLProjector, Embedding: _VLEmbedding, Block: _VLBlock, CrossBlock: _VLCrossBlock,
              FinalNorm: _VLFinalNorm, OutputHead: _VLOutputHead, Projections: _VLProjections,
              VisionPredictor: _VLVisionPredictor, TextPredictor: _VLTextPredictor}
_VL_BLOCKS = (_VLVisionBlock, _VLBlock, _VLCrossBlock)
_VL_HEADS = (_VLOutputHead, _VLProjections, _VLVisionPredictor, _VLTextPredictor)


def _vljepa_heads(layers: list, kernels: str):
    """outputs -> (model/vljepa.Heads of the last stage's head layers, outputs): the heads' maths is
    their classes' own (as pipeline layers their forward passes the slots on)."""
    def find(cls):
        return next(layer for layer in layers if isinstance(layer, cls))

    def heads(outputs):  # called on the last stage only, which holds every head
        output, projections = find(_VLOutputHead), find(_VLProjections)
        twin = getattr(projections, "twin", None)
        return vljepa.Heads(
            lambda hidden, labels, reduction="mean": output.proj(hidden, labels, kernels, reduction),
            functools.partial(Projections.forward, projections),
            functools.partial(VisionPredictor.forward, find(_VLVisionPredictor)),
            functools.partial(TextPredictor.forward, find(_VLTextPredictor)), twin[0] if twin else None), outputs
    return heads


def attach_targets(pipe: PipelineModule, target: torch.nn.Module | None) -> None:
    """Each VL-JEPA layer of this stage runs its EMA copy, the layer of the same name in `target` (the
    objective's ema_target), beside itself. In a list: an attribute would register it as a submodule,
    and the engine would train it."""
    twins = dict(target.named_children()) if target is not None else {}
    for name, layer in pipe.named_children():
        if isinstance(layer, (_Stage, _VLProjections)):
            layer.twin = [twins[name]] if name in twins else []


def _vljepa_specs(cfg: Config, objective: Objective, mp: ModelParallelConfig):
    """(module of the design, LayerSpec) of every VL-JEPA pipeline layer, with the flags that say which
    slots a layer is the last to read."""
    specs = vljepa.layer_specs(cfg.model, mp)
    fusion = [i for i, (_, _, cls, _) in enumerate(specs) if cls is CrossBlock]
    out = []
    for i, (module, _, cls, args) in enumerate(specs):
        spec = LayerSpec(_VL_LAYERS[cls], *args)
        flags = {}
        if cls is Projector:
            flags = {"keep_vision": objective.predicts_embeddings, "fusion_follows": bool(fusion)}
        if fusion and i == fusion[-1]:
            flags = {"last": True}
        out.append((module, spec, flags))
    return out


# -- building ------------------------------------------------------------------------------------------


def build_pipeline(cfg: Config, objective: Objective, mp: ModelParallelConfig) -> PipelineModule:
    """This rank's stage of the model as a PipelineModule ending in the objective's loss, initialised
    like the one-process model."""
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    dp = dist.get_world_size() // (tp * pp)
    partition = cfg.parallel.partition_method
    if cfg.model.type == "vljepa":
        specs = _vljepa_specs(cfg, objective, mp)
        layers, checkpointable = [spec for _, spec, _ in specs], [c.__name__ for c in _VL_BLOCKS]
        if partition == "parameters":
            # Blocks counted, not parameters: the heads, which are weights but no work, then all fall
            # on the last stage, where the loss function calls them.
            partition = "type:^(" + "|".join(checkpointable) + ")$"
    else:
        layers = [LayerSpec(_GPT_LAYERS[cls], *args) for cls, args in layer_specs(cfg.model, mp)]
        # Blocks only: the head returns its weight, which a (reentrant) checkpoint cannot pass through
        # (its backward recurses forever), and the embedding's integer input gets no gradient anyway.
        checkpointable = [_PipeBlock.__name__]
    pipe = PipelineModule(
        layers=layers, loss_fn=None, topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp),
        partition_method=partition, activation_checkpoint_interval=1 if cfg.parallel.activation_checkpointing else 0,
        checkpointable_layers=checkpointable, dynamic_shape=objective.dynamic_shape,
    )
    # The two libraries build their own groups; they must be the same sets of ranks.
    for axis, group in (("data", parallel_state.get_data_parallel_group()),
                        ("model", parallel_state.get_tensor_model_parallel_group())):
        mine = dist.get_process_group_ranks(group)
        if mine not in pipe._topo.get_axis_comm_lists(axis):
            raise RuntimeError(f"DeepSpeed's {axis} groups {pipe._topo.get_axis_comm_lists(axis)} do not contain "
                               f"megatron-core's group {mine}")
    for offset, layer in enumerate(pipe.forward_funcs):
        index = pipe._local_start + offset
        init_weights(layer, index, cfg.model, cfg.run.seed)
        if cfg.model.type == "vljepa":
            module, _, flags = specs[index]
            for name, value in flags.items():
                setattr(layer, name, value)
            layer.requires_grad_(objective.trains(module))
    if cfg.model.type == "vljepa":
        heads = [i for i, (_, spec, _) in enumerate(specs) if spec.typename in _VL_HEADS]
        if any(not pipe.parts[-2] <= i < pipe.parts[-1] for i in heads):
            raise ConfigError(f"parallel.partition_method {partition!r} puts a VL-JEPA head (layers {heads}) before "
                              f"the last pipeline stage (stage bounds {pipe.parts}); leave it at 'parameters'")
    if cfg.model.type == "vljepa":
        heads = _vljepa_heads(pipe.forward_funcs, cfg.training.kernels)
    else:
        heads = lambda outputs: (OutputWeight(outputs[1], cfg.training.kernels), outputs[0])  # noqa: E731
    pipe.loss_fn = PipelineLoss(objective, heads)
    return pipe
