"""A training checkpoint of any layout -> whole tensors in the formats other programs load: read through
reader.py (tensor x pipeline x data parallel, ZeRO 0-3), named and cut by model/tensors.py, one tensor
at a time, written by formats.py. Beside the tensors every format gets config.json (the model, and the
run's config), tokenizer.json and training_state.json (step, tokens seen, stage, the data loader's
position).

The output appears only when complete: it is written into a hidden folder beside the destination and
renamed at the end (`publish`), so a failed or interrupted conversion leaves nothing that looks like an
export. A tensor whose bytes already lie in the checkpoint's files (most of them; not GGUF's, which are
permuted or converted, nor a row-parallel join's) is copied file to file by the kernel and never enters
this process's memory: measured 2.7x faster than reading and writing it (bench/convert.py).
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cromwell.model.tensors import cut, plan
from cromwell.pretrain.checkpoint import CheckpointError, publish
from cromwell.pretrain.checkpoint.formats import FORMATS, CppWriter, GGUFWriter, HFWriter, WholeModelWriter, gguf_name, hf_name
from cromwell.pretrain.checkpoint.reader import DeepSpeedCheckpoint, dumps, find_tag

TARGET = "target."  # prefix of the EMA target encoder's tensors


def export_config(cfg, ckpt: DeepSpeedCheckpoint) -> dict:
    """What a reader of the export needs to rebuild the model (and the run's whole config)."""
    m = cfg.model
    return {
        "model_type": m.type,
        "language": {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads,
                     "ffn_size": m.ffn_size, "norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
                     "vocab_size": m.vocab_size, "context_length": cfg.training.lm.context_length},
        "padded_vocab_size": m.padded_vocab_size(),
        # cross_modal_fusion.layers.<j> follows language_encoder.layers.<every * (j + 1) - 1>
        "fusion_every": m.fusion.every if m.type == "vljepa" else None,
        "source": {"checkpoint": str(ckpt.dir.resolve()), "layout": ckpt.layout, "zero_stage": ckpt.zero},
        "run_config": cfg.model_dump(mode="json"),
    }


def training_summary(cfg, state: dict) -> dict:
    keys = ("step", "tokens_seen", "epoch", "train_loss", "eval_metrics", "nonfinite_steps", "data_skipped_samples", "data")
    return {"stage": cfg.run.name, "objective": cfg.training.objective, **{k: state.get(k) for k in keys}}


def _writers(fmt: str, out: Path, entries: list, config: dict, tokenizer: str, gguf_type: str) -> list:
    """[(writer, export name -> the writer's name or None)] for the requested formats."""
    single = fmt != "all"

    def folder(name):
        return out if single else out / name

    def only(rename):
        return [(rename(n), s) for n, s in entries if rename(n)]

    def keep(name):
        return name

    chosen = FORMATS if fmt == "all" else (fmt,)
    writers = []
    if "cpp" in chosen:
        writers.append((CppWriter(folder("cpp"), entries), keep))
    if "safetensors" in chosen:
        writers.append((WholeModelWriter(folder("safetensors"), entries), keep))
    if "hf" in chosen:
        writers.append((HFWriter(folder("hf"), only(hf_name)), hf_name))
    if "gguf" in chosen:
        writers.append((GGUFWriter(folder("gguf"), only(gguf_name), config, tokenizer, gguf_type), gguf_name))
    return writers


def _unmap_freed_tensors() -> None:
    """Every block of 1 MB or more in a mapping of its own, returned to the system when freed. glibc
    raises that threshold (to 32 MB) as blocks are freed, after which tensors come from the heap, which
    keeps what it grew by: measured 100-200 MB more peak memory, varying from run to run."""
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except AttributeError:  # not glibc
        pass


def convert(args) -> Path:
    start = time.perf_counter()
    _unmap_freed_tensors()
    tag_dir = find_tag(args.checkpoint, args.tag)
    ckpt = DeepSpeedCheckpoint(tag_dir)
    cfg = ckpt.config
    try:
        params = plan(cfg.model)
    except ValueError as e:
        raise CheckpointError(f"{tag_dir}: {e}") from None
    expected, found = {p.source for p in params}, ckpt.names()
    if expected != found:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise CheckpointError(f"{tag_dir} does not hold the model its config describes: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}")
    targets = [p for p in params if p.has_target and p.source in ckpt.names(target=True)]
    tokenizer = (tag_dir / "tokenizer.json").read_text()
    state = ckpt.training_state()
    config = export_config(cfg, ckpt)
    extra = {"tokenizer.json": tokenizer, "training_state.json": dumps(training_summary(cfg, state))}

    entries = [(piece.name, piece.shape) for p in params for piece in p.pieces]
    entries += [(TARGET + piece.name, piece.shape) for p in targets for piece in p.pieces]
    work = args.out.parent / f".{args.out.name}.partial-{os.getpid()}"
    try:
        writers = _writers(args.format, work, entries, config, tokenizer, args.gguf_type)
        total = sum(4 * torch.Size(shape).numel() for _, shape in entries)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"converting {tag_dir.name}", file=sys.stdout,
                  mininterval=2) as bar:
            for param, prefix in [(p, "") for p in params] + [(p, TARGET) for p in targets]:
                full = None
                for piece in param.pieces:
                    runs = None if args.through_memory else ckpt.runs(param, piece, target=bool(prefix))
                    t = None
                    for writer, rename in writers:
                        name = rename(prefix + piece.name)
                        if not name:
                            continue
                        if runs is not None and hasattr(writer, "send"):
                            writer.send(name, piece.shape, lambda fd: ckpt.send(runs, fd))
                            continue
                        if t is None:  # GGUF (which converts), or bytes that are not the files' own
                            full = ckpt.read(param, target=bool(prefix)) if full is None else full
                            t = cut(full, piece).contiguous()
                        writer.write(name, t)
                    bar.update(4 * math.prod(piece.shape))
                del full
        for writer, _ in writers:
            writer.close(config, extra)
        publish(work, args.out)
    finally:
        ckpt.close()
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    print(f"converted {total / 1e6:.1f} MB of tensors in {seconds:.2f} s ({total / 1e6 / seconds:.1f} MB/s)")
    return args.out


