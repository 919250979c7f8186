"""Convert a training checkpoint into formats other programs load, or an export back into a checkpoint.

    python tools/convert_ckpt.py --checkpoint runs/x/checkpoints [--tag latest|global_stepN] \\
        --out export/ --format cpp|safetensors|hf|gguf|all
    python tools/convert_ckpt.py --to-deepspeed --checkpoint runs/x/checkpoints --out runs/y \\
        --tp 2 --pp 1 [--zero 1] [--dp 1]
    python tools/convert_ckpt.py --to-deepspeed --checkpoint /models/llama --config my_run.yaml --out runs/y --tp 2

Any layout reads (tensor x pipeline x data parallel, ZeRO 0-3) into full fp32 tensors named by the
design's five modules; with `all`, each format goes to its own folder under --out. The output appears
only when complete. How: pretrain/checkpoint/export.py.

--to-deepspeed turns a trainer checkpoint (optimizer state included), a `safetensors` export (weights only:
AdamW's moments restart from zero) or a Hugging Face Llama (step 0 of --config's run, the Llama's weights in
its language encoder and head) into a checkpoint of the trainer for another layout
(pretrain/checkpoint/reshard.py, run on CPU processes); `pretrain/train.py --resume` continues from it.
"""

from __future__ import annotations

import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import sys
from pathlib import Path

from cromwell.pretrain.checkpoint import CheckpointError
from cromwell.pretrain.checkpoint.export import convert
from cromwell.pretrain.checkpoint.formats import FORMATS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a run's checkpoints folder or one global_stepN folder (--to-deepspeed: that, a safetensors export or a "
                        "Hugging Face Llama folder)")
    p.add_argument("--tag", help="which checkpoint of the folder: latest (the newest complete one, default) or global_stepN")
    p.add_argument("--out", required=True, type=Path, help="the folder to create")
    p.add_argument("--format", choices=[*FORMATS, "all"], default="safetensors")
    p.add_argument("--gguf-type", choices=["f32", "f16"], default="f32", help="GGUF matrices' type (norms stay f32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    p.add_argument("--through-memory", action="store_true",
                   help="read every tensor into memory and write it from there, instead of having the kernel copy "
                        "the stretches of the checkpoint's files that already are a tensor's bytes")
    p.add_argument("--to-deepspeed", action="store_true", help="make a trainer checkpoint for another layout from a checkpoint or a safetensors export")
    p.add_argument("--tp", type=int, default=1, help="--to-deepspeed: tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="--to-deepspeed: pipeline-parallel size")
    p.add_argument("--dp", type=int, default=1, help="--to-deepspeed: data-parallel size")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="--to-deepspeed: ZeRO stage (default: the input's)")
    p.add_argument("--config", help="--to-deepspeed from a Hugging Face Llama: the run config whose model it starts")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.out.exists() and not args.overwrite:
        sys.exit(f"error: --out {args.out} exists; remove it or pass --overwrite")
    try:
        if args.to_deepspeed:
            from cromwell.pretrain.checkpoint.reshard import reshard  # imports torch.distributed and DeepSpeed

            out = reshard(args)
        else:
            out = convert(args)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
