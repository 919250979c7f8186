"""An export back into a checkpoint of the trainer, for any tensor x pipeline x data-parallel layout and
ZeRO stage: a run continues, or is fine-tuned, on another number of GPUs.

`tools/convert_ckpt.py --to-deepspeed` calls `reshard`, which validates the export, writes the run
config for the new layout (--out/run_config.yaml) and launches this file's `worker` on tp x pp x dp CPU processes under the
deepspeed launcher. Each process builds its part of the model exactly as training does (so DeepSpeed
itself writes files it can read back), puts its shard of every exported tensor into it, the EMA
target's too, and saves a checkpoint with the export's step, tokens seen and data position. Then:

    deepspeed --num_gpus N pretrain/train.py --config OUT/run_config.yaml --resume

continues the run: the same weights, schedule position and next samples. The optimizer's moments
are not in an export; Adam starts them again from zero.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from cromwell.pretrain.checkpoint import CheckpointError, publish

REPO = Path(__file__).resolve().parents[2]


def _export_files(export: Path) -> dict:
    needed = ("model.safetensors", "config.json", "tokenizer.json", "training_state.json")
    missing = [n for n in needed if not (export / n).is_file()]
    if missing:
        raise CheckpointError(f"--checkpoint {export}: not a safetensors export of tools/convert_ckpt.py "
                              f"(missing {', '.join(missing)})")
    return {n: export / n for n in needed}


def reshard(args) -> Path:
    """Parent side: check, write the new run config, launch the workers, rename into place."""
    from cromwell.pretrain.config import Config

    files = _export_files(args.checkpoint)
    config = json.loads(files["config.json"].read_text())
    tree = config["run_config"]
    par = tree["parallel"]
    par.update(tensor=args.tp, pipeline=args.pp, zero_stage=par["zero_stage"] if args.zero is None else args.zero)
    work = args.out.parent / f".{args.out.name}.partial-{os.getpid()}"
    tree["run"]["output_dir"] = str(args.out.resolve())
    tree["checkpoint"]["dir"] = None  # the checkpoints go into --out
    try:
        cfg = Config.model_validate(tree)
        cfg.batch_sizes(args.tp * args.pp * args.dp)
    except ValueError as e:
        raise CheckpointError(f"the export's run config does not fit --tp {args.tp} --pp {args.pp} --dp {args.dp}: {e}") from None
    work.mkdir(parents=True)
    try:
        (work / "run_config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = str(Path(sys.executable).parent / "deepspeed")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        cmd = [launcher, "--num_gpus", str(args.tp * args.pp * args.dp), "--master_port", str(port),
               str(Path(__file__).resolve()), "--export", str(args.checkpoint), "--config", str(work / "run_config.yaml"),
               "--out", str(work)]
        proc = subprocess.run(cmd, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise CheckpointError(f"resharding into tp={args.tp} pp={args.pp} dp={args.dp} failed (exit {proc.returncode})")
        publish(work, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"continue with: deepspeed --num_gpus {args.tp * args.pp * args.dp} pretrain/train.py "
          f"--config {args.out / 'run_config.yaml'} --resume")
    return args.out


# -- worker side (one process per rank) -------------------------------------------------------------------


def _set(engine, param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """A parameter's value everywhere DeepSpeed keeps one: the module's (low-precision) weight and, under
    ZeRO or bf16, the optimizer's fp32 copy."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    if not hasattr(param, "ds_id"):
        param.data.copy_(value)
        safe_set_full_fp32_param(param, value)
        return
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):  # ZeRO-3: partitioned
        param.data.copy_(value)
    if param.requires_grad:
        # DeepSpeed's safe_set_full_fp32_param cuts this rank's piece without the padding a last
        # rank's piece may have (it fails for a parameter with fewer elements than ranks): its cut, padded.
        optimizer = engine.optimizer
        piece, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
        start = piece.numel() * optimizer._get_param_partition_rank(param)
        flat = torch.nn.functional.pad(value.flatten().float(), (0, max(0, start + piece.numel() - value.numel())))
        piece.data.copy_(flat.narrow(0, start, piece.numel()))


def worker(argv=None) -> None:
    from megatron.core import parallel_state
    from safetensors import safe_open

    from cromwell.pretrain import checkpoint
    from cromwell.pretrain.config import load_config
    from cromwell.pretrain.objectives import build_objective, load_run_tokenizer
    from cromwell.pretrain.distributed import init_distributed, shutdown
    from cromwell.pretrain.parallelize import build_engine, model_of, setup_objective
    from cromwell.model.tensors import join, plan, tp_shard

    p = argparse.ArgumentParser()
    p.add_argument("--export", type=Path, required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    # Before the tensor-parallel groups exist: the plan holds the full (TP=1) shapes.
    params = {q.source: q for q in plan(cfg.model)}
    init_distributed(cfg)
    tokenizer = load_run_tokenizer(cfg)
    objective = build_objective(cfg, tokenizer)
    engine = build_engine(cfg, objective, tokenizer)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with safe_open(args.export / "model.safetensors", framework="pt") as f:
        def full(name: str, prefix: str = "") -> torch.Tensor:
            q = params[name]
            return join(q, {piece.name: f.get_tensor(prefix + piece.name) for piece in q.pieces})

        model = model_of(engine)
        for name, param in model.named_parameters():
            name = name.removeprefix("model.")
            _set(engine, param, tp_shard(full(name), _local_shape(param), tp_rank).to(param.dtype))
        setup_objective(engine, objective)
        target = getattr(objective, "target", None)
        if target is not None:
            with torch.no_grad():
                for name, t in target.named_parameters():
                    t.copy_(tp_shard(full(name, "target."), t.shape, tp_rank))
    state = json.loads((args.export / "training_state.json").read_text())
    step = state["step"]
    global_batch = cfg.batch_sizes(torch.distributed.get_world_size())[0]
    engine.global_steps, engine.global_samples = step, step * global_batch
    engine.lr_scheduler.last_epoch = step
    training_state = {k: state[k] for k in ("tokens_seen", "nonfinite_steps", "train_loss", "eval_metrics",
                                           "data_skipped_samples", "epoch", "data")}
    training_state.update(config=cfg.model_dump(), tokenizer=(args.export / "tokenizer.json").read_text())
    layout = {"world_size": torch.distributed.get_world_size(), "tp": cfg.parallel.tensor, "pp": cfg.parallel.pipeline,
              "dp": parallel_state.get_data_parallel_world_size()}
    checkpoint.save(engine, args.out / "checkpoints", step, training_state,
                    lambda tag_dir: shutil.copy(args.export / "tokenizer.json", tag_dir / "tokenizer.json"),
                    layout, objective_state=objective.state_dict())
    shutdown()


def _local_shape(param: torch.nn.Parameter) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


if __name__ == "__main__":
    worker()
