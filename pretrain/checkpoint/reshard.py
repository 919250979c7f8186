"""A checkpoint, an export or a Hugging Face Llama made into a checkpoint of the trainer for any tensor x
pipeline x data-parallel layout and ZeRO stage, offline: a run continues, or is fine-tuned, on another number
of GPUs.

`tools/convert_ckpt.py --to-deepspeed` calls `reshard`, which validates the input, writes the run config for
the new layout (--out/run_config.yaml) and launches this file's `worker` on tp x pp x dp CPU processes under
the deepspeed launcher. Each process builds its part of the model exactly as training does (so DeepSpeed
itself writes files it can read back) and saves a checkpoint with the input's step, tokens seen and data
position. Then:

    deepspeed --num_gpus N pretrain/train.py --config OUT/run_config.yaml --resume

continues the run. From a trainer checkpoint everything moves, as `--resume` on another layout moves it
(pretrain/checkpoint/relayout.py): weights, both AdamW moments, the schedule, the EMA target. An export
holds the weights (and EMA target) only: AdamW's moments start again from zero, and the first steps then
move every weight by about the learning rate — the loss jumps. A Hugging Face Llama
(pretrain/checkpoint/hf_import.py) becomes step 0 of the run config given with --config: its weights in
the language encoder and head, the rest as the run initialises it. `--resume` on another layout needs no
conversion at all; this is for preparing a checkpoint elsewhere.
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

from cromwell.pretrain.checkpoint import MARKER, CheckpointError, publish, read_marker

REPO = Path(__file__).resolve().parents[2]


def _export_files(export: Path) -> dict:
    needed = ("model.safetensors", "config.json", "tokenizer.json", "training_state.json")
    missing = [n for n in needed if not (export / n).is_file()]
    if missing:
        raise CheckpointError(f"--checkpoint {export}: not a safetensors export of tools/convert_ckpt.py "
                              f"(missing {', '.join(missing)})")
    return {n: export / n for n in needed}


def _input(args) -> tuple[str, Path, dict]:
    """(kind, where, its run config): ("checkpoint", its global_stepN folder, ...), ("export", the folder, ...)
    or ("llama", the Hugging Face folder, --config's)."""
    from cromwell.pretrain.checkpoint.hf_import import is_llama
    from cromwell.pretrain.checkpoint.reader import find_tag
    from cromwell.pretrain.config import load_config, migrate

    folder = args.checkpoint
    if is_llama(folder):
        if not args.config:
            raise CheckpointError(f"--checkpoint {folder} is a Hugging Face Llama: name the run config whose model it "
                                  "starts with --config")
        return "llama", folder, load_config(args.config).model_dump(mode="json")
    if folder.is_dir() and ((folder / MARKER).is_file() or (folder / "latest").is_file()
                            or any(folder.glob("global_step*"))):
        tag_dir = find_tag(folder, args.tag)
        return "checkpoint", tag_dir, migrate(read_marker(tag_dir)["config"], f"{tag_dir}'s run config")
    files = _export_files(folder)
    return "export", folder, json.loads(files["config.json"].read_text())["run_config"]


def reshard(args) -> Path:
    """Parent side: check, write the new run config, launch the workers, rename into place."""
    from cromwell.pretrain.config import Config

    kind, source, tree = _input(args)
    if kind == "export":
        print(f"{source} is an export: it holds the weights only, so AdamW's moments start from zero (the loss rises "
              "for the first steps); convert the run's checkpoint itself to carry them", file=sys.stderr)
    par = tree["parallel"]
    par.update(tensor=args.tp, pipeline=args.pp, zero_stage=par["zero_stage"] if args.zero is None else args.zero)
    work = args.out.parent / f".{args.out.name}.partial-{os.getpid()}"
    tree["run"]["output_dir"] = str(args.out.resolve())
    tree["checkpoint"]["dir"] = None  # the checkpoints go into --out
    try:
        cfg = Config.model_validate(tree)
        cfg.batch_sizes(args.tp * args.pp * args.dp)
    except ValueError as e:
        raise CheckpointError(f"the input's run config does not fit --tp {args.tp} --pp {args.pp} --dp {args.dp}: {e}") from None
    work.mkdir(parents=True)
    try:
        (work / "run_config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = str(Path(sys.executable).parent / "deepspeed")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        cmd = [launcher, "--num_gpus", str(args.tp * args.pp * args.dp), "--master_port", str(port),
               str(Path(__file__).resolve()), f"--{kind}", str(source), "--config", str(work / "run_config.yaml"),
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


def worker(argv=None) -> None:
    from megatron.core import parallel_state

    from cromwell.pretrain import checkpoint
    from cromwell.pretrain.checkpoint import relayout
    from cromwell.pretrain.config import load_config
    from cromwell.pretrain.objectives import build_objective, load_run_tokenizer
    from cromwell.pretrain.distributed import init_distributed, shutdown
    from cromwell.pretrain.parallelize import build_engine, model_of, setup_objective
    from cromwell.model.tensors import plan

    p = argparse.ArgumentParser()
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--export", type=Path)
    source.add_argument("--checkpoint", type=Path)
    source.add_argument("--llama", type=Path)
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
    dp = parallel_state.get_data_parallel_world_size()
    layout = relayout.layout(cfg, torch.distributed.get_world_size(), dp)
    if args.checkpoint:
        setup_objective(engine, objective)
        state, _ = relayout.resume(engine, model_of(engine), objective, args.checkpoint, layout)
        tokenizer_file = args.checkpoint / "tokenizer.json"
    elif args.llama:
        state = _from_llama(args.llama, engine, objective, params, cfg)
        tokenizer_file = Path(cfg.data.tokenizer)
    else:
        state = _from_export(args.export, engine, objective, params, cfg)
        tokenizer_file = args.export / "tokenizer.json"
    step = state["step"]
    training_state = {k: state[k] for k in ("tokens_seen", "nonfinite_steps", "train_loss", "eval_metrics",
                                           "data_skipped_samples", "epoch", "data")}
    training_state.update(config=cfg.model_dump(), tokenizer=tokenizer_file.read_text())
    checkpoint.save(engine, args.out / "checkpoints", step, training_state,
                    lambda tag_dir: shutil.copy(tokenizer_file, tag_dir / "tokenizer.json"),
                    layout, objective_state=objective.state_dict())
    shutdown()


def _from_llama(path: Path, engine, objective, params: dict, cfg) -> dict:
    """The Llama's weights into the engine at step 0; returns a fresh run's training state (the loader at
    its start)."""
    from megatron.core import parallel_state

    from cromwell.pretrain.checkpoint import hf_import
    from cromwell.pretrain.parallelize import model_of, setup_objective

    hf_import.check(path, cfg)
    hf_import.load(engine, model_of(engine), hf_import.Llama(path, params))
    setup_objective(engine, objective)
    data = objective.batches("train", parallel_state.get_data_parallel_rank(),
                             parallel_state.get_data_parallel_world_size())
    position = data.state_dict()
    data.close()
    return {"step": 0, "tokens_seen": 0, "nonfinite_steps": 0, "train_loss": float("nan"), "eval_metrics": {},
            "data_skipped_samples": 0, "epoch": position["epoch"], "data": position}


def _from_export(export: Path, engine, objective, params: dict, cfg) -> dict:
    """The export's weights (and EMA target) into the engine, with its step; returns its training state."""
    from megatron.core import parallel_state
    from safetensors import safe_open

    from cromwell.model.tensors import join, tp_shard
    from cromwell.pretrain.checkpoint import relayout
    from cromwell.pretrain.parallelize import model_of, setup_objective

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with safe_open(export / "model.safetensors", framework="pt") as f:
        def full(name: str, prefix: str = "") -> torch.Tensor:
            q = params[name]
            return join(q, {piece.name: f.get_tensor(prefix + piece.name) for piece in q.pieces})

        relayout.set_parameters(engine, model_of(engine), lambda name, param, local: tp_shard(full(name), local, tp_rank))
        setup_objective(engine, objective)
        target = objective.ema_target()
        if target is not None:
            with torch.no_grad():
                for name, t in target.named_parameters():
                    t.copy_(tp_shard(full(name, "target."), t.shape, tp_rank))
    state = json.loads((export / "training_state.json").read_text())
    step = state["step"]
    global_batch = cfg.batch_sizes(torch.distributed.get_world_size())[0]
    engine.global_steps, engine.global_samples = step, step * global_batch
    engine.lr_scheduler.last_epoch = step
    return state


if __name__ == "__main__":
    worker()
