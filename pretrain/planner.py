"""The cost model behind tools/plan.py: parameters, memory, communication and FLOPs of a run config
in a parallel layout (TP x PP x DP, a ZeRO stage, activation checkpointing).

Parameters are the model code's own: the model is built on the meta device (model/tensors.py), so
whatever model/ builds, the plan counts. Tensor-parallel layers (megatron-core's column, row and
vocab-parallel) are cut by TP; the rest is replicated. Pipeline stages are cut exactly as the trainer's
PipelineModule cuts them (DeepSpeed's own partitioner on the same per-layer weights).

Memory per rank follows what really gets allocated, phase by phase (measured on CPU with the torch
profiler's allocator events, tests/test_plan.py):

- Model states, by ZeRO stage, as DeepSpeed 0.19 keeps them. Stage 0: the weights, the gradients and
  AdamW's two fp32 moments (bf16 adds DeepSpeed's fp32 master copy). Stages 1-2: the weights, plus
  this rank's 1/dp of an fp32 master copy (made even for fp32 weights) and of the moments; stage 1
  keeps whole gradients until the step, stage 2 its 1/dp partition; both reduce through a bucket of
  `reduce_bucket_size` elements, allocated in full (two with overlap_comm, the GPU default). Stage 3:
  1/dp of everything, the bucket and a flat gradient partition held from the start, layers gathered
  whole while they run.
- Activations: the tensors autograd saves, counted per layer from the model's code (which tensors each
  op keeps; _activations), in the run's dtype; with activation checkpointing each block keeps its input
  and one block is recomputed at a time. A pipeline stage holds min(pp - stage, micro batches) micro
  batches in flight (DeepSpeed's 1F1B schedule).
- Transients: the fused cross-entropy's logits chunk and its precomputed gradients, the EMA target's
  pass, the optimizer step's temporaries (torch's single-tensor AdamW on CPU makes two; the fused one
  on GPU none).

The peak is the largest of three moments: the end of a forward, the start of a backward (the bucket
appears), the optimizer step. Where several micro batches are accumulated, the gradients of the earlier
ones are held during the later ones' passes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from deepspeed.runtime.utils import partition_balanced, partition_uniform
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

from cromwell.model.config import ModelConfig, swiglu_size
from cromwell.model.fusion import CrossBlock, Projector
from cromwell.model.gpt import Block, Embedding, Head
from cromwell.model.jepa import Projections, TextPredictor, VisionPredictor
from cromwell.model.kernels.ce_loss import chunk_rows_for
from cromwell.model.vit import PatchEmbed, VisionBlock, VisionNorm
from cromwell.model.vljepa import FinalNorm, OutputHead
from cromwell.pretrain.config import Config, ConfigError, ParallelConfig
from cromwell.pretrain.parallelize import deepspeed_config, precision
from cromwell.pretrain.throughput import gpu_peak_flops
from cromwell.model.tensors import meta_model

FP32 = 4
INT64 = 8
# What a VL-JEPA pipeline balances (pretrain/pipeline.py), and what activation checkpointing recomputes.
BLOCKS = (VisionBlock, Block, CrossBlock)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 1
    checkpointing: bool = False

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return (f"TP{self.tp} x PP{self.pp} x DP{self.dp}, ZeRO-{self.zero}"
                + (", activation checkpointing" if self.checkpointing else ""))


@dataclass
class Layer:
    index: int
    kind: type
    module: str  # which of the five modules (model/vljepa.MODULES)
    params: tuple[tuple[int, bool], ...]  # (whole-model size, cut by tensor parallelism) of each parameter
    trains: bool
    has_target: bool = False  # the EMA target keeps an fp32 copy of this layer

    @property
    def split(self) -> int:
        return sum(n for n, cut in self.params if cut)

    @property
    def whole(self) -> int:
        return sum(n for n, cut in self.params if not cut)

    def on_rank(self, tp: int, at_most: float = math.inf) -> int:
        """Parameters on one tensor-parallel rank (those of at most `at_most` elements there)."""
        sizes = (n // tp if cut else n for n, cut in self.params)
        return sum(n for n in sizes if n <= at_most)

    def largest(self, tp: int) -> int:
        return max((n // tp if cut else n for n, cut in self.params), default=0)


def layers_of(cfg: Config) -> list[Layer]:
    """Every layer of the config's model, in order, with its parameter counts."""
    if cfg.model.type == "hf":
        raise ConfigError("model.type=hf: its shapes come from the Hugging Face checkpoint, which the planner "
                          "does not read; plan the project's own models (gpt, vljepa)")
    model = meta_model(cfg.model)
    targets = set()
    trains = lambda module: True  # noqa: E731
    if cfg.model.type == "vljepa":
        from cromwell.pretrain.objectives.hybrid import Hybrid

        objective = Hybrid(cfg)
        trains = objective.trains
        if objective.predicts_embeddings:
            targets = {name for name, _ in meta_model(cfg.model, target=True).named_children()}
    out = []
    for name, layer in model.named_children():
        cut = {id(p) for m in layer.modules() if isinstance(m, _TP_LAYERS) for p in m.parameters(recurse=False)}
        module = model.modules_of[name] if cfg.model.type == "vljepa" else _gpt_module(layer)
        out.append(Layer(int(name), type(layer), module, tuple((p.numel(), id(p) in cut) for p in layer.parameters()),
                         trains(module), name in targets))
    return out


_TP_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)


def _gpt_module(layer) -> str:
    return {Embedding: "language_encoder", Block: "language_encoder", Head: "autoregressive_head"}[type(layer)]


def stages(cfg: Config, layers: list[Layer], layout: Layout) -> list[list[Layer]]:
    """The layers of each pipeline stage, cut as DeepSpeed's PipelineModule cuts them for the trainer."""
    pp = layout.pp
    if pp == 1:
        return [layers]
    if len(layers) < pp:
        raise ConfigError(f"parallel.pipeline={pp} exceeds the model's {len(layers)} layers")
    method = cfg.parallel.partition_method.lower()
    if method == "parameters" and cfg.model.type == "vljepa":
        weights = [int(issubclass(layer.kind, BLOCKS)) for layer in layers]
    elif method == "parameters":
        weights = [layer.on_rank(layout.tp) for layer in layers]
    elif method == "uniform":
        weights = None
    elif method.startswith("type:"):
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        weights = [int(bool(pattern.search(layer.kind.__name__))) for layer in layers]
    else:
        raise ConfigError(f"parallel.partition_method {cfg.parallel.partition_method!r}: the planner knows "
                          "'parameters', 'uniform' and 'type:REGEX'")
    parts = (partition_uniform(len(layers), pp) if weights is None
             else partition_balanced(weights=weights, num_parts=pp))
    return [layers[parts[s]:parts[s + 1]] for s in range(pp)]


# -- what one micro batch puts through the model --------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    """Sizes of one micro batch (upper bounds where masks vary: a plan must hold for every batch)."""

    batch: int  # rows
    seq: int
    images: float = 0  # rows holding an image
    patches: int = 0  # per image
    context: int = 0  # patches the online ViT reads, per image
    target_blocks: int = 0
    target_patches: int = 0  # per target block
    pairs: int = 0  # text predictions of the micro batch
    jepa: bool = False

    @property
    def text(self) -> int:
        return self.batch * self.seq


def micro_batch_tokens(cfg: Config, expected: bool = False) -> Tokens:
    """The largest micro batch (every row with an image when the mixture reads an image source: what
    memory must hold), or with `expected` the average one (images in proportion to the mixture's
    weights: what compute takes over a run)."""
    t = cfg.training
    b = t.micro_batch_size
    seq = cfg.data.max_len if t.objective == "step_jepa" else t.lm.context_length
    if cfg.model.type != "vljepa":
        return Tokens(b, seq)
    v, jepa = cfg.model.vision, t.jepa
    n = v.grid**2
    share = _image_share(cfg)
    images = b * share if expected else b * (share > 0)
    if t.hybrid.alpha == 0:
        return Tokens(b, seq, images, n, n)
    if jepa.masking.vision == "block":
        hidden = int(n * jepa.mask_ratio)
        context, blocks, per_block = n - hidden, 1, hidden
    else:  # I-JEPA multi-block: the largest target blocks and context the sampler may draw
        mb = jepa.multiblock
        blocks, per_block, context = mb.num_targets, math.ceil(mb.scale[1] * n), math.ceil(mb.context_scale[1] * n)
    # Text units: random masking masks ratio x seq single tokens, span masking spans of span_length.
    random_units = math.ceil(jepa.mask_ratio * seq)
    span_units = max(1, int(seq * jepa.mask_ratio / jepa.span_length))
    units = max(random_units if jepa.masking.language == "random" else span_units,
                random_units if jepa.masking.joint == "random" else span_units)
    pairs = b * sum(max(units - k, 0) for k in range(cfg.model.predictor.prediction_steps))
    return Tokens(b, seq, images, n, context, blocks, per_block, pairs, True)


IMAGE_SOURCES = ("vision_text",)


def _image_share(cfg: Config) -> float:
    """The share of samples with an image; without a mixture the corpus decides, so assume every one."""
    mixture = cfg.data.mixture
    if mixture is None:
        return 1.0
    return sum(mixture.get(s, 0) for s in IMAGE_SOURCES) / max(sum(mixture.values()), 1e-30)


# -- activations --------------------------------------------------------------------------------------------


def _activations(layer: Layer, m: ModelConfig, cfg: Config, tok: Tokens, tp: int, p: int) -> float:
    """Bytes autograd keeps of `layer` for one micro batch's backward, counted from the model's code on
    this rank (p: bytes per activation element). Floats that torch keeps in fp32 whatever the dtype
    (RMSNorm's reciprocal RMS, attention's log-sum-exp, RoPE's tables) count 4 bytes.

    A pre-norm block keeps: its input, the normalised input and the norm's output (RMSNorm keeps the
    first two, the next linear the third) for each of its two norms; the fused QKV output (the value
    is a view of it), the attention output (log-sum-exp beside it); gate/up, silu(gate) and their
    product. With rotary positions the rotated query and key are new tensors, with cos and sin."""
    kind, T = layer.kind, tok.text
    rstd, lse = FP32, FP32

    def block(tokens, h, heads, ffn, rope):
        split = (4 * h + 4 * ffn + (2 * h if rope else 0)) * p + heads * lse
        whole = 6 * h * p + 2 * rstd + (h // heads * FP32 if rope else 0)
        return tokens * (whole + split / tp)

    v, E = m.vision, m.predictor.embedding_dim
    if kind is Embedding:
        return T * INT64
    if kind is Block:
        return block(T, m.hidden_size, m.num_heads, m.ffn_size, rope=True)
    if kind in (FinalNorm, Head):  # GPT's head: the final norm, then the output projection (its loss below)
        return T * (2 * m.hidden_size * p + rstd)
    if kind is PatchEmbed:  # the pixels (the linear's input), the patch tokens before the context is gathered
        return tok.images * (tok.patches * (3 * v.patch_size**2 + v.hidden_size) * p + tok.context * INT64)
    if kind is VisionBlock:
        return block(tok.images * tok.context, v.hidden_size, v.num_heads, v.ffn_size, rope=False)
    if kind is VisionNorm:
        return tok.images * tok.context * (2 * v.hidden_size * p + rstd)
    if kind is Projector:
        # the norm keeps the ViT's output and its normalised copy, up its input, gelu and down their
        # inputs; the output, which every fusion block's key/value projection reads, is counted once here
        return tok.images * tok.context * ((3 * v.hidden_size + m.hidden_size) * p + rstd
                                           + 2 * m.hidden_size * p / tp)
    if kind is CrossBlock:
        h, ffn = m.hidden_size, m.ffn_size
        rows = tok.images * tok.seq  # only rows with an image go through fusion
        # like a block, plus the two gated outputs (the gate's product keeps them), the gathered rows,
        # and the keys and values of the image tokens
        per_token = 9 * h * p + 2 * rstd + ((2 * h + 4 * ffn) * p + m.num_heads * lse) / tp
        return rows * per_token + tok.images * tok.context * 2 * h * p / tp
    if kind is Projections:
        return tok.pairs * m.hidden_size * p  # the hidden states the text predictions start from
    if kind is VisionPredictor:
        heads, ffn = cfg.model.predictor.num_heads, swiglu_size(E)
        runs = tok.images * tok.target_blocks
        tokens = runs * (tok.context + tok.target_patches)
        return (block(tokens, E, heads, ffn, rope=False) * cfg.model.predictor.num_layers
                + tokens * E * p + runs * tok.target_patches * (E * p + rstd))
    if kind is TextPredictor:
        return tok.pairs * (3 * E * p + rstd + 4 * swiglu_size(E) * p / tp + INT64)
    return 0.0  # the VL-JEPA's output projection: its loss keeps gradients instead (see _stage_memory)


def saved_activations(cfg: Config, layers: list[Layer], tok: Tokens, tp: int, p: int,
                      checkpointing: bool = False) -> tuple[float, float]:
    """(bytes autograd keeps of `layers` for one micro batch, the activations of the largest block that
    activation checkpointing rebuilds during the backward). Checkpointed blocks keep their input only."""
    acts = [(layer, _activations(layer, cfg.model, cfg, tok, tp, p)) for layer in layers]
    saved = sum(a for _, a in acts)
    if tok.jepa and any(layer.kind is TextPredictor for layer in layers):
        saved += _jepa_loss_activations(tok, cfg.model.predictor.embedding_dim)
    if not checkpointing:
        return saved, 0.0
    blocks = [(layer, a) for layer, a in acts if issubclass(layer.kind, BLOCKS)]
    saved += sum(_block_input(layer, cfg.model, tok, p) - a for layer, a in blocks)
    return saved, max((a for _, a in blocks), default=0.0)


def _jepa_loss_activations(tok: Tokens, E: int) -> float:
    """The JEPA losses' inputs in fp32 (predictions and targets) and their indices."""
    return (tok.pairs + tok.images * tok.target_blocks * tok.target_patches) * (2 * E * FP32 + INT64)


def _ce_chunk(tok: Tokens, vocab_local: int, device: str) -> float:
    """The fused cross-entropy's fp32 logits buffer (model/kernels/ce_loss.py)."""
    impl = "triton" if device == "cuda" else "torch"
    return chunk_rows_for(tok.text, vocab_local, impl) * vocab_local * FP32


@dataclass
class Memory:
    """Bytes per rank: model states (held all the time), and the peak with what makes it."""

    weights: float = 0.0
    gradients: float = 0.0  # held while micro batches accumulate (the step's peak may hold more)
    master: float = 0.0  # fp32 copy of the weights the optimizer updates (ZeRO, bf16)
    optimizer: float = 0.0  # AdamW's moments
    ema_target: float = 0.0
    buffers: float = 0.0  # DeepSpeed's reduction bucket, ZeRO-3's gathered layers
    activations: float = 0.0  # all micro batches in flight
    transient: float = 0.0  # at the peak: logits chunk, target pass, optimizer temporaries
    peak_phase: str = ""
    peak: float = 0.0
    stage: int = 0  # the pipeline stage the figures are for (the one with the highest peak)
    parameters: int = 0  # on this rank
    phases: dict = field(default_factory=dict)

    def states(self) -> float:
        return self.weights + self.master + self.optimizer + self.ema_target


@dataclass(frozen=True)
class DeepSpeedBuffers:
    """The DeepSpeed JSON's numbers that size its buffers (elements; DeepSpeed's defaults when unset)."""

    reduce_bucket: int = 500_000_000
    param_persistence: int = 100_000  # ZeRO-3: parameters at most this large stay whole on every rank
    max_live_parameters: int = 1_000_000_000  # ZeRO-3: gathered parameters kept before any is released
    prefetch_bucket: int = 50_000_000  # ZeRO-3: parameters gathered ahead of their use, in one go
    overlap_comm: bool = False  # ZeRO-1/2: a second reduction bucket, filled while the first is reduced

    @staticmethod
    def of(ds_config: dict) -> "DeepSpeedBuffers":
        zero, default = ds_config.get("zero_optimization", {}), DeepSpeedBuffers()
        return DeepSpeedBuffers(int(zero.get("reduce_bucket_size", default.reduce_bucket)),
                                int(zero.get("stage3_param_persistence_threshold", default.param_persistence)),
                                int(zero.get("stage3_max_live_parameters", default.max_live_parameters)),
                                int(zero.get("stage3_prefetch_bucket_size", default.prefetch_bucket)),
                                bool(zero.get("overlap_comm", default.overlap_comm)))


def memory(cfg: Config, layout: Layout, ds: DeepSpeedBuffers, device: str = "cuda",
           layers: list[Layer] | None = None) -> Memory:
    """The peak memory per rank of training `cfg` in `layout`, for the pipeline stage that needs most."""
    layers = layers or layers_of(cfg)
    accum = _accumulation(cfg, layout)
    saving = _keeping_activations(layers)
    return max((_stage_memory(cfg, layout, ds, device, [lay for lay in part if lay.index in saving], part, s, accum)
                for s, part in enumerate(stages(cfg, layers, layout))), key=lambda mem: mem.peak)


_VISION_PATH = (PatchEmbed, VisionBlock, VisionNorm, Projector)


def _keeping_activations(layers: list[Layer]) -> set[int]:
    """The layers autograd keeps activations of: those a gradient flows through, on its way back to a
    trained parameter. A frozen ViT, whose input needs no gradient either, keeps nothing."""
    vision = text = False
    out = set()
    for layer in layers:
        if layer.kind in _VISION_PATH:
            vision = flows = vision or layer.trains
        elif layer.kind in (Embedding, Block, CrossBlock, FinalNorm):
            text = flows = text or layer.trains or (layer.kind is CrossBlock and vision)
        else:
            flows = True  # the heads: what they keep depends on the objective (_activations, _loss_held)
        if flows:
            out.add(layer.index)
    return out


def _accumulation(cfg: Config, layout: Layout) -> int:
    t = cfg.training
    if t.batch_size % (t.micro_batch_size * layout.dp):
        raise ConfigError(f"training.batch_size ({t.batch_size}) is not divisible by training.micro_batch_size "
                          f"({t.micro_batch_size}) x data-parallel size ({layout.dp})")
    return t.batch_size // (t.micro_batch_size * layout.dp)


def _stage_memory(cfg, layout: Layout, ds: DeepSpeedBuffers, device: str, saving: list[Layer], part: list[Layer],
                  stage: int, accum: int) -> Memory:
    """One pipeline stage's memory: `part` its layers, `saving` those that keep activations."""
    tp, dp, zero = layout.tp, layout.dp, layout.zero
    bf16 = precision(cfg, device) == "bf16"
    p = 2 if bf16 else FP32
    psi = sum(layer.on_rank(tp) for layer in part)
    trained = sum(layer.on_rank(tp) for layer in part if layer.trains)
    largest = max((layer.largest(tp) for layer in part if layer.trains), default=0)
    mem = Memory(stage=stage, parameters=psi)
    mem.ema_target = sum(layer.on_rank(tp) for layer in part if layer.has_target) * FP32
    pipelined = layout.pp > 1

    # -- model states (DeepSpeed's optimizer wrappers) --
    grads_between = grads_at_step = bucket_between = bucket_in_backward = gathered = prefetch = 0.0
    fused_adam = device == "cuda"
    if zero == 0:
        mem.weights = psi * p
        mem.master = trained * FP32 if bf16 else 0.0  # FP16_Optimizer's flat fp32 copy
        mem.optimizer = 2 * trained * FP32
        grads_between = trained * p
        # bf16: every gradient is cast to fp32 and flattened (two copies) before the update
        grads_at_step = trained * p + (2 * trained * FP32 if bf16 else 0.0)
        step_temporaries = 0.0 if fused_adam else 2 * largest * FP32
    else:
        part_trained = trained / dp
        mem.master = part_trained * FP32
        mem.optimizer = 2 * part_trained * FP32
        step_temporaries = 0.0 if fused_adam else 2 * part_trained * FP32
        # ZeRO-1/2 double-buffer the bucket under overlap_comm; ZeRO-3 keeps one either way.
        bucket = ds.reduce_bucket * p * (2 if ds.overlap_comm and zero < 3 else 1)
        if zero == 3:
            persistent = sum(layer.on_rank(tp, at_most=ds.param_persistence) for layer in part)
            mem.weights = (psi - persistent) / dp * p + persistent * p
            # The flat gradient partition and the reduction bucket exist from the engine's start. Once
            # DeepSpeed has traced a step, gathered parameters stay whole until the backward is done
            # (up to stage3_max_live_parameters; its reuse distance keeps them for the backward), and
            # the next ones are gathered ahead into a flat buffer of up to stage3_prefetch_bucket_size.
            mem.gradients = part_trained * p
            mem.buffers = bucket
            gathered = min(psi, ds.max_live_parameters) * p
            prefetch = min(psi, ds.prefetch_bucket) * p
        else:
            mem.weights = psi * p
        grads_at_step = part_trained * FP32  # the fp32 gradient partition the optimizer reads
        if zero == 1:
            grads_between = trained * p
            bucket_between = bucket
        elif zero == 2:
            grads_between = part_trained * p
            bucket_in_backward = bucket

    # -- activations of one micro batch, and how many are in flight --
    tok = micro_batch_tokens(cfg)
    in_flight = min(layout.pp - stage, accum) if pipelined else 1
    saved, recompute = saved_activations(cfg, saving, tok, tp, p, layout.checkpointing)
    vocab_local = cfg.model.padded_vocab_size(tp) // tp
    ce_chunk = loss_held = target_pass = 0.0
    output = next((layer for layer in part if layer.kind in (OutputHead, Head)), None)
    if output:
        ce_chunk = _ce_chunk(tok, vocab_local, device)
        if output.trains:  # the loss's gradients, computed with the loss (model/kernels/ce_loss.py)
            loss_held = tok.text * cfg.model.hidden_size * p + vocab_local * cfg.model.hidden_size * FP32
    if pipelined:
        saved += _pipe_buffers(cfg, stage, layout.pp, tok, p)
    if tok.jepa and not pipelined and mem.ema_target:
        target_pass = _target_pass(cfg.model, tok, tp, p)
    mem.activations = saved * in_flight + loss_held

    # -- the three moments --
    states = mem.states() + mem.gradients + mem.buffers
    # Under a pipeline the first backward runs while later micro batches' activations are alive.
    between = grads_between + bucket_between if accum > 1 or pipelined else 0.0
    passes = between + gathered + mem.activations
    forward_end = target_pass + ce_chunk + prefetch
    backward_start = (recompute + vocab_local * cfg.model.hidden_size * p * (loss_held > 0)
                      + (bucket_in_backward or (bucket_between if accum == 1 and not pipelined else 0.0)))
    step = grads_at_step + step_temporaries
    if pipelined:
        # The pipeline engine reduces after its schedule into a second bucket while the gradients still
        # point into the first (DeepSpeed's reduce_gradients(pipeline_parallel=True)).
        step = max(step, grads_between + 2 * bucket_between)
    mem.phases = {"forward": states + passes + forward_end, "backward": states + passes + backward_start,
                  "step": states + step}
    mem.peak_phase, mem.peak = max(mem.phases.items(), key=lambda kv: kv[1])
    mem.transient = {"forward": forward_end, "backward": backward_start, "step": step}[mem.peak_phase]
    mem.gradients += grads_between
    mem.buffers += bucket_between + gathered
    return mem


def _block_input(layer: Layer, m: ModelConfig, tok: Tokens, p: int) -> float:
    """What a checkpointed block keeps: its input."""
    if layer.kind is VisionBlock:
        return tok.images * tok.context * m.vision.hidden_size * p
    rows = tok.images if layer.kind is CrossBlock else tok.batch
    return rows * tok.seq * m.hidden_size * p


def _target_pass(m: ModelConfig, tok: Tokens, tp: int, p: int) -> float:
    """The EMA target's forward (no gradient): its outputs, kept for the losses (the whole image and
    text), and the largest working set of one of its layers (a SwiGLU's gate/up, silu and product)."""
    outputs = (tok.images * tok.patches * m.vision.hidden_size + tok.text * m.hidden_size) * p
    working = max(tok.text * (4 * m.ffn_size / tp + 3 * m.hidden_size),
                  tok.images * tok.patches * (4 * m.vision.ffn_size / tp + 3 * m.vision.hidden_size)) * p
    return outputs + working


def _pipe_buffers(cfg: Config, stage: int, pp: int, tok: Tokens, p: int) -> float:
    """What travels between pipeline stages for one micro batch, kept by DeepSpeed's pipe buffers: the
    stage's received inputs and its outputs (the text states; a VL-JEPA's image tokens and EMA target
    activations beside them)."""
    m = cfg.model
    slot = tok.text * m.hidden_size * p
    if m.type == "vljepa":
        vision = tok.images * tok.patches * (m.vision.hidden_size + m.hidden_size) * p
        slot = (slot + vision) * (2 if tok.jepa else 1)
    return slot * ((stage > 0) + (stage < pp - 1))


# -- communication and compute --------------------------------------------------------------------------------


def communication(cfg: Config, layout: Layout, layers: list[Layer] | None = None, device: str = "cuda") -> dict:
    """Bytes one rank sends per optimizer step over each kind of link (ring collectives: an all-reduce
    of n bytes sends 2 (k-1)/k n per rank, a reduce-scatter or all-gather (k-1)/k n)."""
    layers = layers or layers_of(cfg)
    tp, dp, pp = layout.tp, layout.dp, layout.pp
    p = 2 if precision(cfg, device) == "bf16" else FP32
    accum = _accumulation(cfg, layout)
    part = max(stages(cfg, layers, layout), key=lambda s: sum(layer.on_rank(tp) for layer in s))
    psi = sum(layer.on_rank(tp) for layer in part) * p
    trained = sum(layer.on_rank(tp) for layer in part if layer.trains) * p
    share = (dp - 1) / dp
    if layout.zero == 0:
        data = 2 * share * trained
    elif layout.zero == 1:
        data = share * (trained + psi)  # reduce-scatter of the gradients, all-gather of the new weights
    elif layout.zero == 2:
        data = share * (accum * trained + psi)  # gradients reduced after every micro batch's backward
    else:
        data = share * accum * (2 * psi + trained)  # weights gathered for forward and backward, per micro batch
    tok = micro_batch_tokens(cfg)
    m = cfg.model
    all_reduce = 2 * (tp - 1) / tp
    passes = 3 if layout.checkpointing else 2  # forward, backward (and the recomputed forward)
    tensor = 0.0
    for layer in part:  # two all-reduces of the block's output each way (attention, MLP)
        if layer.kind is Block:
            tensor += 2 * passes * tok.text * m.hidden_size * p
        elif layer.kind is CrossBlock:
            tensor += 2 * passes * tok.images * tok.seq * m.hidden_size * p
        elif layer.kind is VisionBlock:
            tensor += 2 * passes * tok.images * tok.context * m.vision.hidden_size * p
        elif layer.kind in (Embedding, Head, OutputHead):
            tensor += tok.text * m.hidden_size * p
    pipe = 2 * tok.text * m.hidden_size * p * (pp > 1)  # activations forward, their gradients back
    return {"data_parallel": data, "tensor_parallel": all_reduce * tensor * accum, "pipeline": pipe * accum}


def flops_per_step(cfg: Config, layers: list[Layer] | None = None) -> float:
    """Model FLOPs of one optimizer step over the whole global batch: 6 per matmul parameter and token
    through it (forward 2, backward 4) plus attention's QK^T and AV (the PaLM / Megatron convention,
    pretrain/throughput.py), and 2 per parameter and token for the EMA target's forward."""
    layers = layers or layers_of(cfg)
    tok = micro_batch_tokens(cfg, expected=True)
    m, v = cfg.model, cfg.model.vision
    E = m.predictor.embedding_dim
    total = 0.0
    for layer in layers:
        matmul = layer.split + (layer.whole if layer.kind in (Projections, PatchEmbed) else 0)
        if layer.kind in (Block, Head, OutputHead):
            tokens, attention = tok.text, 2 * tok.text * tok.seq * m.hidden_size if layer.kind is Block else 0
        elif layer.kind is CrossBlock:
            rows = tok.images * tok.seq
            tokens, attention = rows, 2 * rows * tok.context * m.hidden_size
        elif layer.kind in (VisionBlock, PatchEmbed):
            tokens = tok.images * tok.context
            attention = 2 * tokens * tok.context * v.hidden_size if layer.kind is VisionBlock else 0
        elif layer.kind is Projector:
            tokens, attention = tok.images * tok.context, 0
        elif layer.kind is VisionPredictor:
            runs = tok.images * tok.target_blocks
            n = tok.context + tok.target_patches
            tokens, attention = runs * n, 2 * runs * n * n * E * m.predictor.num_layers
        elif layer.kind in (Projections, TextPredictor):
            tokens, attention = tok.pairs + tok.images * tok.context, 0
        else:
            continue
        online = 3 * (2 * matmul * tokens + 2 * attention)
        target = 0.0
        if layer.has_target:  # the target reads every patch
            scale = tok.patches / max(tok.context, 1) if layer.kind in (VisionBlock, PatchEmbed, Projector) else 1
            target = 2 * matmul * tokens * scale + 2 * attention * scale**2
        total += online + target
    micro_batches = cfg.training.batch_size / cfg.training.micro_batch_size
    return total * micro_batches


# -- choosing a layout and planning a run (tools/plan.py prints it) -----------------------------------------------

# Memory the driver reports per card (nvidia-smi's MiB), and the name the FLOP/s table knows it by.
GPUS = {"h100": (81559 * 2**20, "H100 SXM"), "h200": (143771 * 2**20, "H200 SXM"),
        "a100": (81920 * 2**20, "A100 SXM 80GB"), "a100-40": (40960 * 2**20, "A100 SXM 40GB")}
USABLE = 0.9
MFU = (0.41, 0.47)  # Megatron-LM's published range for GPT models on H100 (its README's scaling table)
INTER_NODE_BYTES_PER_S = 50e9  # 400 Gb/s InfiniBand per GPU
GIB = 2**30


@dataclass
class Plan:
    """One config on `gpus` x `gpu` in its own layout: what tools/plan.py prints and writes as JSON."""

    name: str
    model_type: str
    gpus: int
    gpu: str
    capacity_gib: float
    layout: str
    micro_batch: int
    global_batch: int
    context_length: int
    fits: bool
    peak_gib: float
    peak_phase: str
    usable_gib: float
    memory_gib: dict  # weights, gradients, master, optimizer, EMA target, buffers, activations, transients
    communication_gb: dict  # sent per GPU per step over each kind of link
    parameters: dict  # per module of the design
    trained_parameters: int
    fullest_gpu_parameters: int
    pipeline_stage: int | None  # the fullest GPU's stage under a pipeline
    flops_per_token: float
    tokens: int
    steps: int
    step_tokens: int
    mfu: tuple
    step_seconds: list  # per MFU
    days: list  # per MFU
    suggestion: str | None = None  # the first layout that fits, when this one does not


def plan(name: str, cfg: Config, gpus: int, gpu: str, per_node: int, mfu: tuple) -> Plan:
    """The run `cfg` on `gpus` GPUs of kind `gpu` (GPUS) in the config's layout, timed at each MFU."""
    capacity, gpu_name = GPUS[gpu]
    usable = USABLE * capacity
    layers = layers_of(cfg)
    layout = configured_layout(cfg, gpus)
    mem = layout_memory(cfg, layout, layers)
    comm = communication(cfg, layout, layers)
    peak_flops, _ = gpu_peak_flops(gpu_name, torch.bfloat16 if precision(cfg, "cuda") == "bf16" else torch.float32)
    flops = flops_per_step(cfg, layers)
    step_tokens, steps = cfg.tokens_per_step(), cfg.train_steps()
    # training.train_steps, when set, replaces the token budget
    tokens = cfg.training.train_tokens if cfg.training.train_steps is None else steps * step_tokens
    step_s = [flops / (gpus * peak_flops * u) for u in mfu]
    modules: dict[str, int] = {}
    for layer in layers:
        modules[layer.module] = modules.get(layer.module, 0) + layer.split + layer.whole
    breakdown = {"weights": mem.weights, "gradients": mem.gradients, "fp32 master": mem.master,
                 "optimizer": mem.optimizer, "EMA target": mem.ema_target, "buffers": mem.buffers,
                 "activations": mem.activations, f"{mem.peak_phase} transients": mem.transient}
    fits = mem.peak <= usable
    suggestion = None
    if not fits:
        found = smallest_fitting(cfg, gpus, per_node, usable, layers)
        suggestion = ("none up to 4096 nodes (a smaller micro batch, or a smaller model)" if found is None else
                      f"{found[0]}" + ("" if found[1] == gpus else f" on {found[1]} GPUs (nothing fits on {gpus})")
                      + f": peak {found[2].peak / GIB:.2f} GiB")
    return Plan(name, cfg.model.type, gpus, gpu, capacity / GIB, str(layout), cfg.training.micro_batch_size,
                cfg.training.batch_size, cfg.training.lm.context_length, fits, mem.peak / GIB, mem.peak_phase,
                usable / GIB, {k: v / GIB for k, v in breakdown.items()}, {k: v / 1e9 for k, v in comm.items()},
                modules, sum(layer.split + layer.whole for layer in layers if layer.trains), mem.parameters,
                mem.stage if layout.pp > 1 else None, flops / step_tokens, tokens, steps, step_tokens, tuple(mfu),
                step_s, [s * steps / 86400 for s in step_s], suggestion)


def configured_layout(cfg: Config, gpus: int) -> Layout:
    par = cfg.parallel
    if gpus % (par.tensor * par.pipeline):
        raise ConfigError(f"--gpus {gpus} is not divisible by parallel.tensor ({par.tensor}) x parallel.pipeline "
                          f"({par.pipeline})")
    layout = Layout(par.tensor, par.pipeline, gpus // (par.tensor * par.pipeline), par.zero_stage,
                    par.activation_checkpointing)
    problem = unsupported(cfg, layout)
    if problem:
        raise ConfigError(f"the config's layout on {gpus} GPUs: {problem}")
    return layout


def layout_memory(cfg: Config, layout: Layout, layers):
    """memory() with the DeepSpeed JSON the trainer would use for this layout."""
    parallel = ParallelConfig(tensor=layout.tp, pipeline=layout.pp, zero_stage=layout.zero,
                              activation_checkpointing=layout.checkpointing,
                              ds_config=cfg.parallel.ds_config, partition_method=cfg.parallel.partition_method)
    laid_out = cfg.model_copy(update={"parallel": parallel})
    ds = deepspeed_config(laid_out, layout.world, "cuda")
    return memory(laid_out, layout, DeepSpeedBuffers.of(ds), "cuda", layers)


def unsupported(cfg: Config, layout: Layout) -> str | None:
    """Why the trainer cannot run `cfg` in `layout` (None: it can)."""
    m, t = cfg.model, cfg.training
    if t.batch_size % (t.micro_batch_size * layout.dp):
        return (f"training.batch_size {t.batch_size} is not divisible by micro batch {t.micro_batch_size} x "
                f"data-parallel size {layout.dp}")
    if layout.pp > 1 and layout.zero != 1:
        return "a pipeline trains with ZeRO stage 1 only"
    widths = [("model.num_heads", m.num_heads), ("model.ffn_hidden_size", m.ffn_size)]
    if m.type == "vljepa":
        widths += [("model.vision.num_heads", m.vision.num_heads), ("model.vision.ffn_hidden_size", m.vision.ffn_size),
                   ("model.predictor.num_heads", m.predictor.num_heads),
                   ("the predictor's ffn", swiglu_size(m.predictor.embedding_dim))]
    for name, value in widths:
        if value % layout.tp:
            return f"{name} ({value}) is not divisible by tensor parallelism {layout.tp}"
    if m.padded_vocab_size() % layout.tp:
        return f"the padded vocabulary is not divisible by tensor parallelism {layout.tp}"
    return None


def candidates(cfg: Config, gpus: int, per_node: int, layers) -> list[Layout]:
    """Every layout the trainer can run `cfg` in on `gpus` GPUs, in order of preference: the least model
    parallelism (tensor parallelism within a node), then no activation checkpointing, then the lowest
    ZeRO stage (less communication), then the shorter pipeline."""
    blocks = sum(1 for layer in layers if issubclass(layer.kind, BLOCKS))
    out = []
    for tp in (t for t in (1, 2, 4, 8) if t <= min(per_node, gpus)):
        for pp in (q for q in (1, 2, 4, 8, 16, 32, 64) if q <= blocks and gpus % (tp * q) == 0):
            for zero in (0, 1, 2, 3):
                for checkpointing in (False, True):
                    layout = Layout(tp, pp, gpus // (tp * pp), zero, checkpointing)
                    if not unsupported(cfg, layout):
                        out.append(layout)
    return sorted(out, key=lambda lay: (lay.tp * lay.pp, lay.checkpointing, lay.zero, lay.pp))




def smallest_fitting(cfg: Config, gpus: int, per_node: int, usable: float, layers):
    """(layout, GPUs, memory) of the first candidate that fits on `gpus` GPUs or, failing that, on the fewest
    whole nodes beyond; None when nothing fits up to 4096 nodes."""
    for n in [gpus] + [per_node * 2**k for k in range(12) if per_node * 2**k > gpus]:
        for layout in candidates(cfg, n, per_node, layers):
            mem = layout_memory(cfg, layout, layers)
            if mem.peak <= usable:
                return layout, n, mem
    return None
