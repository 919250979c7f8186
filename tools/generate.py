"""Generate text from a trained model: a trainer checkpoint of any layout, a safetensors export, or a
Hugging Face model directory (pretrain/checkpoint/load.py), with the KV cache (model/generate.py).

    python tools/generate.py --checkpoint runs/x/checkpoints --prompt "def fibonacci(n):" --max-new-tokens 64
    python tools/generate.py --checkpoint export/safetensors --image chart.png --chat "Write the matplotlib code that draws this chart."
    deepspeed --num_gpus 2 tools/generate.py --tp 2 --checkpoint runs/x/checkpoints --prompt-file prompts.txt

--prompt may be given several times (one batch); --prompt-file reads one prompt per line (\\n escapes
allowed). --chat wraps each prompt as a user turn of the project's chat format (what stage 4 trains on).
With --image (a VL-JEPA), every prompt reads the image. Under the launcher the tensor-parallel ranks
decode together; rank 0 prints.
"""

from __future__ import annotations

import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from cromwell.data.images import ImageError
from cromwell.model.generate import Sampling, generate
from cromwell.pretrain.checkpoint import CheckpointError
from cromwell.pretrain.checkpoint.load import load, locate
from cromwell.pretrain.distributed import device_type
from cromwell.pretrain.evaluation.generation import decoder_for, end_ids, image_patches, prompt_ids, setup


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--tag", help="global_stepN of a checkpoints folder (default: the newest complete one)")
    p.add_argument("--prompt", action="append", default=[])
    p.add_argument("--prompt-file", type=Path)
    p.add_argument("--chat", action="store_true", help="each prompt is a user turn; the answer is generated")
    p.add_argument("--image", type=Path, help="an image every prompt reads (a VL-JEPA)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (several allowed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (the launcher's world size)")
    p.add_argument("--no-cache", action="store_true", help="run the whole sequence at every step (a reference)")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    texts = list(args.prompt)
    if args.prompt_file:
        texts += [line.encode().decode("unicode_escape") for line in args.prompt_file.read_text().splitlines() if line]
    if not texts:
        sys.exit("error: give --prompt or --prompt-file")
    try:
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, tuple(args.stop), args.seed)
        source = locate(args.checkpoint, args.tag)
        setup(args.tp)
        loaded = load(source)
        device = torch.device(device_type(), torch.cuda.current_device()) if device_type() == "cuda" else torch.device("cpu")
        loaded.model.to(device)
        images = image_patches(loaded, args.image, len(texts)) if args.image else None
        images = images and tuple(t.to(device) for t in images)
        prompts = [prompt_ids(loaded, t, args.chat) for t in texts]
    except (CheckpointError, ValueError, FileNotFoundError, ImageError) as e:
        sys.exit(f"error: {e}")
    start = time.perf_counter()
    out = generate(decoder_for(loaded, images), prompts, sampling, end_ids(loaded, args.chat), loaded.pad_id,
                   decode=loaded.decode, use_cache=not args.no_cache)
    seconds = time.perf_counter() - start
    if dist.get_rank() == 0:
        for text, g in zip(texts, out):
            print(f"### prompt\n{text}\n### generated ({len(g.tokens)} tokens, {g.finish})\n{g.text}\n")
        tokens = sum(len(g.tokens) for g in out)
        print(f"{tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s), "
              f"{'no cache' if args.no_cache else 'KV cache'}, {loaded.kind} {loaded.source}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
