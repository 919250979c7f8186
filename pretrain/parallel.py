"""Where parallelism is applied: process groups, the model as one module or pipeline stages, and the
DeepSpeed engine around it. Nothing in model/ knows about DeepSpeed; nothing here knows the maths.
"""

from __future__ import annotations

import functools
import os
import socket

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from deepspeed.runtime.utils import clip_grad_norm_
from megatron.core import parallel_state
from torch import nn

from model.gpt import GPT, Block, Embedding, Head, init_weights, layer_specs, megatron_config, padded_vocab_size
from model.loss import lm_loss
from pretrain.config import Config, deepspeed_config, precision
from pretrain.optim import build_optimizer, build_scheduler


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def join_process_group() -> None:
    """Join the launcher's process group, or, run as a plain script, make a group of one."""
    if "RANK" not in os.environ:  # one process without a launcher (benchmarks, notebooks)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type() == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device_type() == "cuda" else "gloo")


def init_distributed(cfg: Config) -> int:
    """Join the process group and build megatron's TP/PP/DP groups for the run.

    megatron-core orders ranks tp fastest, then dp, then pp, which is exactly DeepSpeed's
    PipeModelDataParallelTopology (axes pipe, data, model): both libraries agree on every group.
    """
    join_process_group()
    world = dist.get_world_size()
    cfg.batch_sizes(world)  # fail before building anything if the numbers disagree
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tensor,
            pipeline_model_parallel_size=cfg.parallel.pipeline,
        )
    return world


class MegatronMPU:
    """The group accessors DeepSpeed asks of an `mpu`, answered from megatron-core's groups.

    Without a pipeline, DeepSpeed's "model parallel" is megatron's tensor parallel.
    """

    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)


class LanguageModelLoss(nn.Module):
    """The trainable module of the LM stage: GPT plus its loss, so the engine's forward is the loss."""

    def __init__(self, gpt: GPT, kernels: str):
        super().__init__()
        self.gpt = gpt
        self.kernels = kernels

    def forward(self, input_ids, labels):
        return lm_loss(self.gpt(input_ids), self.gpt.output_weight, labels, self.kernels)


def _pipeline_loss(outputs, labels, kernels):
    hidden, weight = outputs
    return lm_loss(hidden, weight, labels, kernels)


# A pipeline layer gets only the previous layer's output, so a batch with its own positions and mask travels as
# (x, position_ids, attention_mask) through every stage; the engine sends gradients back only for
# the floating-point member. Subclasses, not wrappers, keep the parameter names of GPT's layers.
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
    def forward(self, inputs):
        return super().forward(inputs if torch.is_tensor(inputs) else inputs[0])


_PIPE_LAYERS = {Embedding: _PipeEmbedding, Block: _PipeBlock, Head: _PipeHead}


def build_model(cfg: Config, loss_fn=None, dynamic_shape: bool = False) -> nn.Module:
    """The model for this rank: the whole GPT, or this rank's pipeline stage, initialised identically.

    Pipeline only: `loss_fn(outputs, labels)` on the last stage (default: the LM loss), and
    `dynamic_shape` for micro batches whose shapes differ (the engine then sends shapes every time).
    """
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    vocab = padded_vocab_size(cfg.training.lm.vocab_size, tp)
    mp = megatron_config(tp)
    if pp == 1:
        gpt = GPT(cfg.model, vocab, mp)
        for i, layer in enumerate(gpt.children()):
            init_weights(layer, i, cfg.model, cfg.run.seed)
        return LanguageModelLoss(gpt, cfg.training.kernels)
    dp = dist.get_world_size() // (tp * pp)
    pipe = PipelineModule(
        layers=[LayerSpec(_PIPE_LAYERS[cls], *args) for cls, args in layer_specs(cfg.model, vocab, mp)],
        loss_fn=loss_fn or functools.partial(_pipeline_loss, kernels=cfg.training.kernels),
        topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp),
        partition_method=cfg.parallel.partition_method,
        activation_checkpoint_interval=1 if cfg.parallel.activation_checkpointing else 0,
        dynamic_shape=dynamic_shape,
    )
    # The two libraries build their own groups; they must be the same sets of ranks.
    for axis, group in (("data", parallel_state.get_data_parallel_group()),
                        ("model", parallel_state.get_tensor_model_parallel_group())):
        mine = dist.get_process_group_ranks(group)
        if mine not in pipe._topo.get_axis_comm_lists(axis):
            raise RuntimeError(f"DeepSpeed's {axis} groups {pipe._topo.get_axis_comm_lists(axis)} do not contain "
                               f"megatron-core's group {mine}")
    for offset, layer in enumerate(pipe.forward_funcs):
        init_weights(layer, pipe._local_start + offset, cfg.model, cfg.run.seed)
    return pipe


def build_engine(cfg: Config):
    """(engine, global step count) for the run; DeepSpeed owns ZeRO, the pipeline schedule and checkpoints."""
    world = dist.get_world_size()
    model = build_model(cfg)
    ds_config = deepspeed_config(cfg, world, device_type())
    optimizer = build_optimizer(model, cfg, fused=device_type() == "cuda")
    scheduler = build_scheduler(optimizer, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        mpu=None if cfg.parallel.pipeline > 1 else MegatronMPU(),
    )
    return engine


def train_step(engine, batches) -> tuple[float, float]:
    """One optimizer step over gradient_accumulation_steps micro batches. Returns the loss averaged
    over micro batches and data-parallel ranks (the same number on every rank) and the global
    gradient norm before clipping."""
    if isinstance(engine, deepspeed.PipelineEngine):
        loss = engine.train_batch(data_iter=batches).item()
        return loss, float(engine.get_global_grad_norm())
    total, accum = 0.0, engine.gradient_accumulation_steps()
    grad_norm = None
    for micro in range(accum):
        input_ids, labels = next(batches)
        loss = engine(input_ids.to(engine.device), labels.to(engine.device))
        engine.backward(loss)
        if micro == accum - 1 and engine.zero_optimization_stage() == 0:
            # Without ZeRO, DeepSpeed clips fp32 gradients but discards their norm; an infinite
            # max_norm measures it the same way (TP-aware) and leaves the gradients as they are.
            grad_norm = float(clip_grad_norm_(engine.module.parameters(), max_norm=float("inf"), mpu=engine.mpu))
        engine.step()
        total += loss.detach().float()
    total = total / accum
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if grad_norm is None:
        grad_norm = float(engine.get_global_grad_norm())
    return (total / parallel_state.get_data_parallel_world_size()).item(), grad_norm
