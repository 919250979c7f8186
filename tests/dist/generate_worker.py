"""Generates from a freshly initialised model (the same weights at any TP size: init_weights is
layout-independent) on the ranks the launcher gives, with and without the KV cache, and writes rank 0's
tokens and logits as JSON. With --image the VL-JEPA's first and last prompts read an image."""

import argparse
import json

import torch
import torch.distributed as dist

from cromwell.model.generate import ModelDecoder, Sampling, generate
from cromwell.model.build import build
from cromwell.model.gpt import init_weights, megatron_config
from cromwell.pretrain.config import load_config
from cromwell.pretrain.distributed import init_distributed, shutdown

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22, 23]]
VOCAB = 300


def initialised(cfg, tp: int):
    model = build(cfg.model, megatron_config(tp))
    for name, layer in model.named_children():
        init_weights(layer, int(name), cfg.model, 0)
    for name, p in model.named_parameters():
        if name.endswith("gate"):  # opened, so that the text really reads the image
            p.data.fill_(0.5)
    return model.eval()


def images(cfg):
    v = cfg.model.vision
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, v.grid**2, 3 * v.patch_size**2, generator=g), torch.tensor([0, len(PROMPTS) - 1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--image", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    cfg = load_config(args.config, args.set)
    init_distributed(cfg)
    model = initialised(cfg, cfg.parallel.tensor)
    decoder = ModelDecoder(model, cfg.model.vocab_size, images(cfg) if args.image else None)
    sampling = Sampling(max_new_tokens=24, temperature=args.temperature, top_p=0.9, seed=5)
    runs = {name: generate(decoder, PROMPTS, sampling, eos_id=2, pad_id=0, use_cache=cache, keep_logits=True)
            for name, cache in (("cache", True), ("no_cache", False))}
    if dist.get_rank() == 0:
        out = {name: [{"tokens": g.tokens, "logits": torch.stack(g.logits).tolist()} for g in gens]
               for name, gens in runs.items()}
        with open(args.out, "w") as f:
            json.dump(out, f)
    shutdown()


if __name__ == "__main__":
    main()
