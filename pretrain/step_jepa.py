"""Step-JEPA / LLM-JEPA fine-tuning under DeepSpeed (seed 004).

  deepspeed --num_gpus 2 pretrain/step_jepa.py --train_file steps.jsonl --model_name /models/Llama-3.2-1B-Instruct \\
      --output_dir runs/step_jepa --lora --lora_rank 16 --lbd 0.1 --gamma 1.0 --jepa_loss_type cosine

  deepspeed --num_gpus 2 pretrain/step_jepa.py --config pretrain/configs/tiny.yaml --tokenizer runs/tiny/tokenizer.json \
      --train_file nlrx/train.jsonl --output_dir runs/nlrx_jepa --mode two_view --lbd 1.0

--train_file holds chat records ({"messages": [system, user, assistant]}), e.g. the output of
tools/prepare_step_data.py or NL-RX-SYNTH. --lbd 0 is the plain fine-tuning baseline.
Two model families: a local Hugging Face causal LM (--model_name, optional LoRA, data parallel
with ZeRO 0-2), or the project's GPT (--config: its architecture, tensor parallelism and ZeRO
stage come from the run config; the optimisation numbers from the arguments here). With
parallel.pipeline > 1 the packed batch's positions and mask travel through the stages and the
last stage computes the whole objective (single pass only).
On CPU the ranks talk over gloo; run as a plain script it is a single-process group.
"""
import argparse
import json
import os
import random
import time
from types import SimpleNamespace

import deepspeed
import torch

from data.tokenizer import ASSISTANT, BOS, EOS_ID, END, PAD_ID, SYSTEM, USER, load_tokenizer
from model import hf
from model.loss import lm_loss
from model.step_jepa import LOSS_TYPES, MODES, ChatEncoder, StepJEPA, predictor_names
from pretrain.parallel import MegatronMPU, build_model, init_distributed, join_process_group


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train_file", required=True)
    model = ap.add_mutually_exclusive_group(required=True)
    model.add_argument("--model_name", help="local Hugging Face model directory")
    model.add_argument("--config", help="project run config (YAML): train the project's GPT")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override in --config")
    ap.add_argument("--tokenizer", help="project tokenizer.json (default: data.tokenizer of --config)")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--lora_rank", type=int, default=16)
    ap.add_argument("--lora_alpha", type=int, default=None, help="default 2 * rank")
    ap.add_argument("--lora_targets", default=",".join(hf.DEFAULT_LORA_TARGETS))
    ap.add_argument("--lbd", type=float, default=0.1, help="JEPA weight lambda (0: plain fine-tuning)")
    ap.add_argument("--gamma", type=float, default=1.0, help="LM weight")
    ap.add_argument("--jepa_loss_type", choices=LOSS_TYPES, default="cosine")
    ap.add_argument("--mode", choices=MODES, default="step",
                    help="step: step1->step2; multistep: step i->i+1; two_view: user->assistant (LLM-JEPA)")
    ap.add_argument("--predictors", type=int, default=1, help="K predictor tokens after the source")
    ap.add_argument("--single_pass", action=argparse.BooleanOptionalAction, default=True,
                    help="one packed forward (default) or the seed's two passes")
    ap.add_argument("--separator", default="\n\n")
    ap.add_argument("--max_len", type=int, default=1024)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--grad_accum", type=int, default=1)
    ap.add_argument("--num_epochs", type=float, default=1.0)
    ap.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: epochs decide)")
    ap.add_argument("--learning_rate", type=float, default=2e-5)
    ap.add_argument("--warmup_ratio", type=float, default=0.03)
    ap.add_argument("--zero_stage", type=int, choices=[0, 1, 2], default=1, help="HF models (GPT: from --config)")
    ap.add_argument("--attn_implementation", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--log_every", type=int, default=10)
    ap.add_argument("--debug", type=int, choices=[0, 1], default=0, help="1: show the first example's steps, log every step")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = ap.parse_args(argv)
    args.separator = args.separator.encode().decode("unicode_escape")
    predictor_names(args.predictors)  # validates the count before any model is loaded
    return args


class GPTBackbone:
    """The project's GPT as a Step-JEPA backbone; the LM loss is the vocab-parallel fused one."""

    def __init__(self, gpt, kernels: str = "fused"):
        self.gpt, self.kernels = gpt, kernels

    def hidden(self, input_ids, position_ids, attention_mask):
        return self.gpt(input_ids, position_ids, attention_mask)

    def lm_loss(self, hidden, target):
        return lm_loss(hidden, self.gpt.output_weight, target, self.kernels)


LOGGED = ("loss", "lm", "jepa")


class PipelineLoss:
    """The last pipeline stage's loss_fn: the objective on a packed batch's last-layer states.

    The engine returns only the loss, so the LM and JEPA terms are kept here for the log.
    """

    def __init__(self, objective: StepJEPA, kernels: str):
        self.objective, self.kernels = objective, kernels
        self.sums = torch.zeros(len(LOGGED))

    def __call__(self, outputs, labels):
        hidden, weight = outputs
        head = SimpleNamespace(lm_loss=lambda h, target: lm_loss(h, weight, target, self.kernels))
        out = self.objective.packed_loss(head, hidden, *labels)
        self.sums = self.sums.to(hidden.device) + torch.stack([out[k].detach().float() for k in LOGGED])
        return out["loss"]

    def take(self) -> torch.Tensor:
        sums, self.sums = self.sums, torch.zeros_like(self.sums)
        return sums


def make_objective(args, predictor_ids: list[int], pad_id: int) -> StepJEPA:
    return StepJEPA(predictor_ids, pad_id, mode=args.mode, loss_type=args.jepa_loss_type, gamma=args.gamma,
                    lbd=args.lbd, single_pass=args.single_pass)


def project_chat_encoder(tokenizer, separator: str = "\n\n", max_len: int = 1024) -> ChatEncoder:
    """Chats in the project's role tokens: <|system|>..<|end|><|user|>..<|end|><|assistant|>."""
    tags = {"system": SYSTEM, "user": USER}

    def render(messages):
        bad = [m.get("role") for m in messages if m.get("role") not in tags]
        if bad:
            raise ValueError(f"prompt roles must be system/user, got {bad}")
        return BOS + "".join(f"{tags[m['role']]}{m['content']}{END}" for m in messages) + ASSISTANT

    return ChatEncoder(lambda t: tokenizer.encode(t).ids, render, EOS_ID, separator, max_len)


def read_chats(path: str) -> list[list[dict]]:
    chats = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            msgs = json.loads(line).get("messages")
            if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
                raise ValueError(f"{path}:{lineno}: field 'messages' must be a list ending with an assistant message")
            chats.append(msgs)
    if not chats:
        raise ValueError(f"{path}: no records")
    return chats


def ds_config(args, zero_stage: int, device: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": device == "cuda"},
        "steps_per_print": 10**9,  # our own log line carries rate and ETA
    }


def linear_schedule(optimizer, total: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(warmup, 1), max(0.0, (total - s) / max(total - warmup, 1))))


def build_hf(args):
    """(model, encoder, objective, decode, backbone for the engine's module, save, dp rank/size, log groups)."""
    model, tokenizer = hf.load_causal_lm(args.model_name, lora=args.lora, lora_rank=args.lora_rank,
                                         lora_alpha=args.lora_alpha, lora_targets=args.lora_targets.split(","),
                                         attn_implementation=args.attn_implementation)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def save(engine):
        if rank == 0:
            hf.save(engine.module, tokenizer, args.output_dir)

    objective = make_objective(args, tokenizer.convert_tokens_to_ids(predictor_names(args.predictors)),
                               tokenizer.pad_token_id)
    return dict(model=model, encoder=hf.chat_encoder(tokenizer, args.separator, args.max_len), objective=objective,
                decode=tokenizer.decode, backbone=hf.HFBackbone, pipeline_loss=None, save=save,
                dp_rank=rank, dp_size=world, log_groups=[None], zero_stage=args.zero_stage, mpu=None)


def build_gpt(args):
    from megatron.core import parallel_state

    from pretrain.config import load_config

    cfg = load_config(args.config, args.set)
    pipelined = cfg.parallel.pipeline > 1
    if pipelined and not args.single_pass:
        raise ValueError(f"{args.config}: parallel.pipeline={cfg.parallel.pipeline} needs --single_pass: the "
                         "two-pass reference runs two forwards per micro batch, use parallel.pipeline=1 for it")
    init_distributed(cfg)
    tokenizer = load_tokenizer(args.tokenizer or cfg.data.tokenizer)
    objective = make_objective(args, [tokenizer.token_to_id(n) for n in predictor_names(args.predictors)], PAD_ID)
    if pipelined:
        pipeline_loss = PipelineLoss(objective, cfg.training.kernels)
        # packed micro batches differ in length
        model = build_model(cfg, loss_fn=pipeline_loss, dynamic_shape=True)
        # only the last stage has the loss terms; the other stages add zeros
        log_groups = [parallel_state.get_pipeline_model_parallel_group(), parallel_state.get_data_parallel_group()]
    else:
        pipeline_loss, model = None, build_model(cfg).gpt
        log_groups = [parallel_state.get_data_parallel_group()]

    def save(engine):
        engine.save_checkpoint(args.output_dir)

    return dict(model=model, encoder=project_chat_encoder(tokenizer, args.separator, args.max_len),
                objective=objective, decode=tokenizer.decode, backbone=lambda m: GPTBackbone(m, cfg.training.kernels),
                pipeline_loss=pipeline_loss, save=save, dp_rank=parallel_state.get_data_parallel_rank(),
                dp_size=parallel_state.get_data_parallel_world_size(), log_groups=log_groups,
                zero_stage=cfg.parallel.zero_stage, mpu=None if pipelined else MegatronMPU())


def main(argv=None):
    args = parse_args(argv)
    join_process_group()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    built = build_gpt(args) if args.config else build_hf(args)
    examples = [built["encoder"](c) for c in read_chats(args.train_file)]
    objective, pipeline_loss = built["objective"], built["pipeline_loss"]
    with_pairs = sum(bool(e.pairs(args.mode)) for e in examples)
    if rank == 0:
        print(f"{len(examples)} examples from {args.train_file}, {with_pairs} with a '{args.mode}' pair; "
              f"world {world} (data parallel {built['dp_size']}), "
              f"{'single pass' if args.single_pass else 'two passes'}, lambda {args.lbd}")
        if args.debug:
            e = examples[0]
            print("prompt:", repr(built["decode"](e.input_ids[:e.n_prompt])))
            for i, (a, b) in enumerate(e.steps):
                print(f"step {i + 1} [{a}, {b}):", repr(built["decode"](e.input_ids[a:b])))

    per_rank = len(examples) // built["dp_size"]
    micro_per_epoch = per_rank // args.batch_size
    if micro_per_epoch < args.grad_accum:
        raise ValueError(f"{len(examples)} examples over {built['dp_size']} data-parallel ranks do not fill one "
                         f"step of batch_size {args.batch_size} x grad_accum {args.grad_accum}")
    total = max(1, int(args.num_epochs * micro_per_epoch) // args.grad_accum)
    if args.max_steps:
        total = min(total, args.max_steps)
    model = built["model"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=0.0)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config(args, built["zero_stage"], device), mpu=built["mpu"],
        lr_scheduler=linear_schedule(optimizer, total, int(args.warmup_ratio * total)))
    backbone = None if pipeline_loss else built["backbone"](engine.module)
    engine.train()

    log, step, t0 = [], 0, time.time()
    sums = torch.zeros(len(LOGGED), device=engine.device)
    order = list(range(len(examples)))
    epoch, dp_rank = 0, built["dp_rank"]
    while step < total:
        random.Random(args.seed + epoch).shuffle(order)
        mine = order[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        for first in range(0, micro_per_epoch // args.grad_accum * args.grad_accum, args.grad_accum):
            micro = [[examples[i] for i in mine[m * args.batch_size:(m + 1) * args.batch_size]]
                     for m in range(first, first + args.grad_accum)]
            if pipeline_loss:
                batches = [((b.input_ids, b.position_ids, b.attention_mask), (b.labels, b.view1, b.view2))
                           for b in map(objective.packed, micro)]
                engine.train_batch(data_iter=iter(batches))
                sums += pipeline_loss.take().to(sums.device)
            else:
                for batch in micro:
                    out = objective(backbone, batch, engine.device)
                    engine.backward(out["loss"])
                    engine.step()
                    sums += torch.stack([out[k].detach().float() for k in LOGGED])
            step += 1
            # the step's loss is the mean over all its micro batches on all data-parallel ranks,
            # so the log (and every rank's copy of it) does not depend on one rank's last batch
            for group in built["log_groups"]:
                torch.distributed.all_reduce(sums, group=group)
            means = (sums / (args.grad_accum * built["dp_size"])).tolist()
            sums.zero_()
            record = {"step": step, **dict(zip(LOGGED, means)), "lr": scheduler.get_last_lr()[0]}
            log.append(record)
            if rank == 0 and (args.debug or step % args.log_every == 0 or step == total):
                rate = step / (time.time() - t0)
                print(f"step {step}/{total} loss {record['loss']:.4f} lm {record['lm']:.4f} "
                      f"jepa {record['jepa']:.4f} lr {record['lr']:.2e} | {rate:.2f} steps/s, "
                      f"ETA {(total - step) / rate:.0f}s", flush=True)
            if step == total:
                break
        epoch += 1

    built["save"](engine)
    if rank == 0:
        with open(os.path.join(args.output_dir, "train_log.json"), "w") as f:
            json.dump({"args": vars(args), "world_size": world, "seconds": time.time() - t0, "log": log}, f, indent=1)
        print(f"saved to {args.output_dir}")
    torch.distributed.barrier()
    return log


if __name__ == "__main__":
    main()
