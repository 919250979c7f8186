"""The one training loop and its step. Every objective (pretrain/objectives/), model (the project's GPT,
the VL-JEPA or a Hugging Face LM) and parallel layout (pretrain/parallelize.py) trains through `train`;
`train_step` is one optimizer step of it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.utils import clip_grad_norm_
from megatron.core import parallel_state

from cromwell.data.shards import ShardError
from cromwell.model import hf
from cromwell.pretrain import checkpoint, run_dir
from cromwell.pretrain.checkpoint import CheckpointError, hf_import, relayout
from cromwell.pretrain.config import Config, ConfigError
from cromwell.pretrain.distributed import device_type, init_distributed, shutdown
from cromwell.pretrain.evaluation.held_out import collapse_check, engine_losses, held_out
from cromwell.pretrain.losses import step_counts, step_means, to_device
from cromwell.pretrain.metrics import MetricsLog
from cromwell.pretrain.objectives import Loss, Objective, build_objective, load_run_tokenizer
from cromwell.pretrain.parallelize import build_engine, model_of, setup_objective, whole_parameters
from cromwell.pretrain.pipeline import micro_batch
from cromwell.pretrain.run_dir import RunDirError
from cromwell.pretrain.signals import GracefulStop
from cromwell.pretrain.throughput import Throughput, flops_per_token, peak_flops_per_device


class NonFiniteError(RuntimeError):
    pass


class CollapseError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device's generator too


MakeObjective = Callable[[Config, object], Objective]  # (config, tokenizer) -> the objective


def train(cfg: Config, resume: bool | str = False, stop_after: int | None = None, overwrite: bool = False,
          objective: MakeObjective = build_objective):
    """Train to the run's last step (or `stop_after` steps, or a stop signal, then checkpoint). Returns
    the DeepSpeed engine: `engine.module.model` is the trained model, for callers that go on in-process.
    resume "auto": resume when the run has a complete checkpoint, else start afresh over what an attempt
    that never reached one left behind (its logs). `objective`: what makes the objective; by default the
    one training.objective names, or any Objective of the caller's (docs/extending.md)."""
    stopper = GracefulStop()
    with contextlib.ExitStack() as cleanup:
        stopper.install(launched="RANK" in os.environ)
        cleanup.callback(stopper.uninstall)
        # A Llama to start from is mapped onto the model's full shapes, planned before the process groups exist.
        llama = hf_import.locate(Path(cfg.run.init_from), cfg) if cfg.run.init_from else None
        init_distributed(cfg)
        if resume == "auto":
            resume = _from_rank0(lambda: checkpoint.newest_complete(cfg.checkpoint_dir)[0] is not None)
            overwrite = overwrite or not resume
        cleanup.callback(run_dir.release, _from_rank0(lambda: _claim(cfg, resume, overwrite)))
        return _train(cfg, resume, stop_after, stopper, cleanup, objective, llama)


def _train(cfg: Config, resume: bool, stop_after: int | None, stopper: GracefulStop, cleanup: contextlib.ExitStack,
           make_objective: MakeObjective, llama: hf_import.Llama | None):
    seed_everything(cfg.run.seed)
    tokenizer = load_run_tokenizer(cfg)
    objective = make_objective(cfg, tokenizer)
    world = dist.get_world_size()
    _, _, accum, dp_size = cfg.batch_sizes(world)
    tag_dir, changes = _from_rank0(lambda: _resume_point(cfg, dp_size)) if resume else (None, [])
    engine = build_engine(cfg, objective, tokenizer)
    # A new stage starts from another run's weights; a resumed one from its own checkpoint, below.
    init = None
    if cfg.run.init_from and not tag_dir and llama:
        init = _from_rank0(lambda: hf_import.check(llama.path, cfg) or llama.path)
        hf_import.load(engine, model_of(engine), llama)
    elif cfg.run.init_from and not tag_dir:
        init = _from_rank0(lambda: checkpoint.init_source(Path(cfg.run.init_from), cfg))
        relayout.load_weights(engine, model_of(engine), init)
    setup_objective(engine, objective)
    dp_rank = parallel_state.get_data_parallel_rank()
    data = objective.batches("train", dp_rank, dp_size)
    cleanup.callback(data.close)
    state = {"step": 0, "tokens_seen": 0, "nonfinite_steps": 0, "train_loss": float("nan"), "eval_metrics": {},
             "data_skipped_samples": 0}
    resharded = None
    if tag_dir:
        started = time.perf_counter()
        saved, resharded = relayout.resume(engine, model_of(engine), objective, tag_dir, _layout(cfg, dp_size))
        loaded_in = time.perf_counter() - started
        data.load_state_dict(saved["data"])
        state.update({k: saved.get(k, state[k]) for k in state})
        _schedule_from_config(engine, cfg)
    total = cfg.train_steps()
    stop_at = min(total, stop_after or total)
    log = MetricsLog(cfg, total, state["step"]) if dist.get_rank() == 0 else None
    if log and init:
        log.note(f"started from the weights of {init} (a fresh optimizer, schedule and data order)")
    if log and tag_dir:
        log.note(f"resumed from {tag_dir} (step {state['step']}) in {loaded_in:.1f} s" + (f"; {resharded}" if resharded else "")
                 + ("; changed: " + "; ".join(changes) if changes else "; config unchanged"))
    peak, peak_source = peak_flops_per_device(device_type(), torch.bfloat16 if engine.bfloat16_enabled() else torch.float32)
    speed = Throughput(_flops_per_token(cfg, engine, tokenizer), peak, world, device_type())
    if log:
        log.note(f"MFU against a peak of {peak / 1e12:.3g} TFLOP/s per device ({peak_source})")
    in_a_row = signum = 0
    skipped_before = state["data_skipped_samples"]
    while state["step"] < stop_at and not signum:
        start = time.perf_counter()
        micro_batches = [next(data) for _ in range(accum)]
        result = train_step(engine, objective, micro_batches)
        tokens, fingerprint, skipped = _consumed(objective, micro_batches, data.skipped_samples)
        state["step"] += 1
        state["tokens_seen"] += tokens
        state["train_loss"] = result.losses["loss"]
        state["data_skipped_samples"] = skipped_before + skipped
        record = {**result.losses, "lr": engine.get_lr()[0], "grad_norm": result.grad_norm,
                  "tokens_seen": state["tokens_seen"], "data_fingerprint": fingerprint,
                  "data_skipped_samples": state["data_skipped_samples"],
                  **speed.update(tokens, time.perf_counter() - start)}
        in_a_row = in_a_row + 1 if result.skipped or not math.isfinite(result.losses["loss"]) else 0
        state["nonfinite_steps"] += in_a_row > 0
        record["nonfinite_steps"] = state["nonfinite_steps"]
        every = cfg.validation.every_steps
        if every and (state["step"] % every == 0 or state["step"] == total):
            state["eval_metrics"] = validate(cfg, engine, objective, dp_rank, dp_size)
            record.update(state["eval_metrics"])
        collapsed = _check_health(cfg, result.last, state["step"], record)
        if log:
            log.step(state["step"], record)
        if collapsed or in_a_row >= cfg.training.max_nonfinite_steps:
            checkpoint.wait(engine)  # the error names the last complete checkpoint
        if collapsed:
            raise CollapseError(f"representation collapse at step {state['step']} (training.jepa.collapse.stop is "
                                f"true); the last checkpoint is {checkpoint.latest(cfg.checkpoint_dir) or 'none'}")
        if in_a_row >= cfg.training.max_nonfinite_steps:
            raise NonFiniteError(
                f"{in_a_row} steps in a row (the last: step {state['step']}) had a non-finite loss or gradient and "
                f"were skipped (training.max_nonfinite_steps = {cfg.training.max_nonfinite_steps}); the last good "
                f"checkpoint is {checkpoint.latest(cfg.checkpoint_dir) or 'none (no checkpoint was written)'}")
        signum = stopper.agreed(engine.device)
        ends = state["step"] == stop_at and cfg.checkpoint.at_end
        if state["step"] % cfg.checkpoint.every_steps == 0 or ends or signum:
            _save(cfg, engine, tokenizer, state, data, dp_size, objective)
    checkpoint.wait(engine)  # a background write ends before the run does
    if log:
        last = cfg.checkpoint_dir / f"global_step{state['step']}"
        if signum:
            log.note(f"\n{signal.Signals(signum).name}: stopped after step {state['step']} of {total}; checkpoint "
                     f"{last} is complete; continue with --resume")
        log.close(last if last.is_dir() else checkpoint.latest(cfg.checkpoint_dir))
    if cfg.model.type == "hf" and state["step"] == total and dist.get_rank() == 0:
        hf.save(engine.module.model, tokenizer, cfg.run.output_dir)
    return engine


def run(cfg, resume: bool | str = False, stop_after: int | None = None, overwrite: bool = False,
        objective: MakeObjective = build_objective) -> None:
    """train() for a command line: bad input (config, data, checkpoint, run directory) is one error
    line and a non-zero exit, and the process group is left cleanly."""
    try:
        train(cfg, resume, stop_after, overwrite, objective)
    except (ConfigError, CheckpointError, RunDirError, ShardError, NonFiniteError, CollapseError, FileNotFoundError,
            ValueError) as e:
        sys.exit(f"error: {e}")
    shutdown()


@dataclass
class StepResult:
    losses: dict  # "loss" (the weighted total) and each component, averaged over the step's items
    grad_norm: float  # before clipping; inf or nan when the step was skipped
    skipped: bool  # the optimizer left the weights as they were (a non-finite gradient somewhere)
    last: Loss | None  # this rank's last micro batch's Loss (None on a pipeline stage that computes none)


def train_step(engine, objective: Objective, micro_batches: list) -> StepResult:
    """One optimizer step over the gradient_accumulation_steps micro batches of this rank.

    Each micro batch's loss is the objective's total over the STEP's item counts, times
    accumulation x data-parallel size, which undoes DeepSpeed's averaging over micro batches and
    ranks: the gradient is that of the step's token-weighted loss.
    """
    counts = step_counts(objective, micro_batches, engine.device)
    scale = len(micro_batches) * parallel_state.get_data_parallel_world_size()
    skipped_before = engine.skipped_steps
    if isinstance(engine, deepspeed.PipelineEngine):
        engine.train_batch(data_iter=iter([micro_batch(objective, to_device(b, engine.device), counts, scale)
                                           for b in micro_batches]))
        losses = engine.module.loss_fn.take()
        grad_norm = engine.get_global_grad_norm()
    else:
        losses, grad_norm = [], None
        for i, batch in enumerate(micro_batches):
            loss = Loss(*engine(to_device(batch, engine.device)))
            engine.backward(objective.total(loss.sums, counts) * scale)
            if i == len(micro_batches) - 1 and engine.zero_optimization_stage() == 0:
                # Without ZeRO, DeepSpeed clips fp32 gradients but discards their norm; an infinite
                # max_norm measures it the same way (TP-aware) and leaves the gradients as they are.
                grad_norm = clip_grad_norm_(engine.module.parameters(), max_norm=float("inf"), mpu=engine.mpu)
            engine.step()
            losses.append(loss.detached())
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
    skipped = engine.skipped_steps > skipped_before
    if not skipped:
        objective.after_step(model_of(engine), whole_parameters(engine), engine.global_steps)
    return StepResult(step_means(objective, losses, counts), float("nan") if grad_norm is None else float(grad_norm),
                      skipped, losses[-1] if losses else None)


def validate(cfg: Config, engine, objective, dp_rank: int, dp_size: int) -> dict:
    """Held-out losses, perplexity and JEPA scores (pretrain/evaluation/held_out.py) on the same micro batches every time."""
    valid = objective.batches("valid", dp_rank, dp_size)
    micro_batches = [next(valid) for _ in range(cfg.validation.micro_batches)]
    return held_out(objective, micro_batches, engine.device,
                    lambda counts: engine_losses(engine, objective, micro_batches, counts))


def _check_health(cfg: Config, last: Loss | None, step: int, record: dict) -> bool:
    """Every training.jepa.collapse.every_steps: log `collapse_check` of this rank's last micro batch,
    warn loudly about problems on any rank, and say whether the run must stop (every rank gets the same
    answer)."""
    limits = cfg.training.jepa.collapse
    if not limits.every_steps or step % limits.every_steps:
        return False
    stats, problems = collapse_check(last, limits.min_std, limits.min_rank)
    record.update(stats)
    if problems:
        print(f"WARNING (rank {dist.get_rank()}, step {step}): representation collapse? " + "; ".join(problems),
              flush=True)
    flag = torch.tensor([len(problems) > 0 and cfg.training.jepa.collapse.stop], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def _consumed(objective, micro_batches: list, skipped: int) -> tuple[int, int, int]:
    """(tokens, fingerprint, skipped samples) of the step over all data-parallel ranks. The
    fingerprint is a checksum of the step's samples, position-weighted within each sample and summed
    over samples: equal fingerprints mean the same samples were read, however they were split over
    ranks and micro batches. `skipped`: this rank's loader's count of unreadable samples."""
    tokens, fingerprint = 0, 0
    for batch in micro_batches:
        ids = objective.input_ids(batch).long()
        rows = (ids * torch.arange(1, ids.shape[-1] + 1, dtype=torch.int64)).sum(-1) % (1 << 28)
        tokens += ids.numel()
        fingerprint = (fingerprint + int((rows * rows).sum())) % (1 << 56)
    both = torch.tensor([tokens, fingerprint, skipped], dtype=torch.int64)
    dist.all_reduce(both, group=parallel_state.get_data_parallel_group())
    return int(both[0]), int(both[1]) % (1 << 56), int(both[2])


def _flops_per_token(cfg: Config, engine, tokenizer) -> float:
    seq = cfg.data.max_len if cfg.training.objective == "step_jepa" else cfg.training.lm.context_length
    if cfg.model.type != "hf":
        # For the VL-JEPA: its language path per text token. The ViT, fusion, target pass and predictors
        # depend on how many samples hold an image, which a token count does not see; MFU undercounts.
        return flops_per_token(cfg.model, cfg.model.padded_vocab_size(cfg.parallel.tensor), seq)
    # A Hugging Face model: 6 FLOPs per weight and token (forward 2, backward 4), no attention term.
    embedding = engine.module.model.lm.get_input_embeddings().weight.numel()
    return 6.0 * (sum(p.numel() for p in engine.module.parameters()) - embedding)


def _from_rank0(fn):
    """fn() run on rank 0 alone, its result (or its user-facing error) given to every rank."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (fn(), None)
        except (RunDirError, CheckpointError) as e:
            box[0] = (None, e)
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error:
        raise error
    return result


def _claim(cfg: Config, resume: bool, overwrite: bool) -> Path:
    lock = run_dir.acquire(Path(cfg.run.output_dir))
    try:
        if not resume:
            run_dir.check_fresh(Path(cfg.run.output_dir), cfg.checkpoint_dir, overwrite)
    except RunDirError:
        run_dir.release(lock)
        raise
    return lock


def _resume_point(cfg: Config, dp_size: int) -> tuple[Path, list[str]]:
    """The newest complete checkpoint and the config fields that changed since it was written."""
    tag_dir, skipped = checkpoint.newest_complete(cfg.checkpoint_dir)
    for path, why in skipped:
        print(f"warning: skipping incomplete checkpoint {path}: {why}", flush=True)
    if tag_dir is None:
        raise CheckpointError(f"--resume: no complete checkpoint in {cfg.checkpoint_dir} (a run writes one every "
                              "checkpoint.every_steps steps, at its end and when it is signalled to stop)")
    marker = checkpoint.read_marker(tag_dir)
    changes = checkpoint.config_changes(marker["config"], json.loads(json.dumps(cfg.model_dump())),
                                        marker["layout"]["dp"], dp_size)
    if cfg.model.type == "gpt" and (tag_dir / "tokenizer.json").read_bytes() != Path(cfg.data.tokenizer).read_bytes():
        raise CheckpointError(f"--resume: {cfg.data.tokenizer} is not the tokenizer the checkpoint was trained with "
                              f"({tag_dir / 'tokenizer.json'})")
    return tag_dir, changes


def _layout(cfg: Config, dp_size: int) -> dict:
    return relayout.layout(cfg, dist.get_world_size(), dp_size)


def _schedule_from_config(engine, cfg: Config) -> None:
    """LambdaLR saves its base LR, so a resumed run would scale the old peak LR by the new schedule;
    the learning rate is a function of the step and the config in force now."""
    sched = engine.lr_scheduler
    sched.base_lrs = [cfg.training.optimizer.lr] * len(sched.base_lrs)
    lrs = [base * f(sched.last_epoch) for base, f in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs


def _save(cfg: Config, engine, tokenizer, state: dict, data, dp_size: int, objective) -> Path:
    hf_tokenizer = cfg.model.type == "hf"

    def write_tokenizer(tag_dir: Path) -> None:
        if hf_tokenizer:
            tokenizer.save_pretrained(tag_dir / "tokenizer")
        else:
            shutil.copy(cfg.data.tokenizer, tag_dir / "tokenizer.json")

    training_state = {**state, "epoch": data.state_dict()["epoch"], "config": cfg.model_dump(), "data": data.state_dict(),
                      "tokenizer": (tokenizer.backend_tokenizer if hf_tokenizer else tokenizer).to_str()}
    return checkpoint.save(engine, cfg.checkpoint_dir, state["step"], training_state, write_tokenizer, _layout(cfg, dp_size),
                           cfg.checkpoint.keep, objective.state_dict(), background=cfg.checkpoint.background)
