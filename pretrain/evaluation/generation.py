"""Generating with a loaded model (pretrain/checkpoint/load.py) for tools/generate.py and the evaluation
tasks: the process groups, prompts in the model's own format, an image's patches, the decoder (KV-cached,
model/generate.py), what ends an answer, and batched generation with progress."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from cromwell.data.images import patchify, preprocess
from cromwell.data.tokenizer import ASSISTANT, END, USER, special_id
from cromwell.model.generate import HFDecoder, ModelDecoder, Sampling, generate
from cromwell.pretrain.checkpoint.load import Loaded
from cromwell.pretrain.distributed import join_process_group


def setup(tp: int) -> None:
    """This process's group and the tensor-parallel groups (every rank one tensor-parallel group)."""
    join_process_group()
    world = dist.get_world_size()
    if world != tp:
        raise ValueError(f"--tp {tp} needs {tp} processes (the launcher started {world})")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def prompt_ids(loaded: Loaded, text: str, chat: bool) -> list[int]:
    if not chat:
        return loaded.encode(text)
    if loaded.kind == "hf":
        messages = [{"role": "user", "content": text}]
        return loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # As the shard writer encodes a chat: role markers are special tokens, the message is data.
    return [special_id(USER), *loaded.encode(text), special_id(END), special_id(ASSISTANT)]


def image_patches(loaded: Loaded, path: Path, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    if loaded.cfg is None or loaded.cfg.model.type != "vljepa":
        raise ValueError(f"--image {path}: the model at {loaded.source} reads no images (it is not a VL-JEPA)")
    v = loaded.cfg.model.vision
    pixels = preprocess(path.read_bytes(), str(path), v.image_size)
    patches = patchify(torch.from_numpy(pixels)[None], v.patch_size)
    return patches.expand(rows, -1, -1), torch.arange(rows)


def decoder_for(loaded: Loaded, images=None):
    if loaded.kind == "hf":
        return HFDecoder(loaded.model, loaded.vocab)
    return ModelDecoder(loaded.model, loaded.vocab, images)


def end_ids(loaded: Loaded, chat: bool) -> set[int]:
    """What ends an answer: the end of sequence, and in the project's chat format the turn's <|end|>."""
    return {loaded.eos_id, special_id(END)} if chat and loaded.kind != "hf" else {loaded.eos_id}


def answers(loaded: Loaded, prompts: list[list[int]], sampling: Sampling, chat: bool, batch_size: int,
            device: torch.device, images: list[torch.Tensor] | None = None) -> list:
    """Generations for every prompt, batch_size at a time, with rate and ETA on stderr (with images: one
    per prompt)."""
    out, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = slice(i, i + batch_size)
        batch_images = None
        if images is not None:
            patches = torch.stack(images[chunk]).to(device)
            batch_images = (patches, torch.arange(len(patches), device=device))
        out += generate(decoder_for(loaded, batch_images), prompts[chunk], sampling, end_ids(loaded, chat),
                        loaded.pad_id, decode=loaded.decode)
        rate = len(out) / (time.perf_counter() - start)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"   generated {len(out)}/{len(prompts)} ({rate:.2f}/s, ETA {(len(prompts) - len(out)) / rate:.0f} s)",
                  file=sys.stderr, flush=True)
    return out
