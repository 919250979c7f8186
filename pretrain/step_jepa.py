"""Step-JEPA / LLM-JEPA fine-tuning under DeepSpeed, with the design's command line (docs/design.md, Step-JEPA
fine-tuning).

  deepspeed --num_gpus 2 pretrain/step_jepa.py --train_file steps.jsonl --model_name /models/Llama-3.2-1B-Instruct \\
      --output_dir runs/step_jepa --lora --lora_rank 16 --lbd 0.1 --gamma 1.0 --jepa_loss_type cosine

  deepspeed --num_gpus 2 pretrain/step_jepa.py --config pretrain/configs/tiny.yaml --tokenizer runs/tiny/tokenizer.json \\
      --train_file nlrx/train.jsonl --output_dir runs/nlrx_jepa --mode two_view --lbd 1.0

A thin front end: the arguments become a run config (pretrain/configs/step_jepa.yaml for a Hugging
Face model, or --config for the project's GPT with its TP/PP/ZeRO layout) with
training.objective=step_jepa, trained by the same loop as pretrain/train.py: DeepSpeed configs,
clipping from the config, periodic checkpoints, --resume, and the same logs (metrics.jsonl,
TensorBoard). --train_file holds chat records ({"messages": [system, user, assistant]}), e.g. the
output of tools/prepare_step_data.py or NL-RX-SYNTH. --lbd 0 is the plain fine-tuning baseline.
A Hugging Face model is also saved to --output_dir at the end (adapters only with --lora).
"""
import cromwell.pretrain.quiet  # noqa: F401  (first: it silences known start-up warnings before the libraries load)

import argparse
import os

from cromwell.data.chats import read_chats
from cromwell.model.config import DEFAULT_LORA_TARGETS
from cromwell.pretrain.config import load_config
from cromwell.pretrain.trainer import run

HF_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "step_jepa.yaml")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train_file", required=True)
    model = ap.add_mutually_exclusive_group(required=True)
    model.add_argument("--model_name", help="local Hugging Face model directory")
    model.add_argument("--config", help="project run config (YAML): train the project's GPT")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--tokenizer", help="project tokenizer.json (default: data.tokenizer of --config)")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--lora_rank", type=int, default=16)
    ap.add_argument("--lora_alpha", type=int, default=None, help="default 2 * rank")
    ap.add_argument("--lora_targets", default=",".join(DEFAULT_LORA_TARGETS))
    ap.add_argument("--lbd", type=float, default=0.1, help="JEPA weight lambda (0: plain fine-tuning)")
    ap.add_argument("--gamma", type=float, default=1.0, help="LM weight")
    ap.add_argument("--jepa_loss_type", choices=("cosine", "l2", "mse", "infonce"), default="cosine")
    ap.add_argument("--mode", choices=("step", "multistep", "two_view"), default="step",
                    help="step: step1->step2; multistep: step i->i+1; two_view: user->assistant (LLM-JEPA)")
    ap.add_argument("--predictors", type=int, default=1, help="K predictor tokens after the source")
    ap.add_argument("--single_pass", action=argparse.BooleanOptionalAction, default=True,
                    help="one packed forward (default) or the reference two passes")
    ap.add_argument("--separator", default="\n\n")
    ap.add_argument("--max_len", type=int, default=1024)
    ap.add_argument("--batch_size", type=int, default=4, help="micro batch per data-parallel rank")
    ap.add_argument("--grad_accum", type=int, default=1)
    ap.add_argument("--num_epochs", type=float, default=1.0)
    ap.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: epochs decide)")
    ap.add_argument("--learning_rate", type=float, default=2e-5)
    ap.add_argument("--warmup_ratio", type=float, default=0.03)
    ap.add_argument("--zero_stage", type=int, choices=[0, 1, 2, 3], help="default: the config's (1 for --model_name)")
    ap.add_argument("--attn_implementation", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--log_every", type=int, default=10)
    ap.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --output_dir")
    ap.add_argument("--overwrite", action="store_true", help="start over in an --output_dir that holds a run")
    ap.add_argument("--debug", type=int, choices=[0, 1], default=0, help="1: show the first example's steps, log every step")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = ap.parse_args(argv)
    args.separator = args.separator.encode().decode("unicode_escape")
    return args


def run_config(args, world_size: int):
    """The run config these arguments describe, for `world_size` processes."""
    sets = []
    if args.model_name:
        sets += [f"model.hf.path={args.model_name}", f"model.hf.lora={args.lora}",
                 f"model.hf.lora_rank={args.lora_rank}", f"model.hf.lora_targets=[{args.lora_targets}]",
                 f"model.hf.attn_implementation={args.attn_implementation}"]
        if args.lora_alpha is not None:
            sets.append(f"model.hf.lora_alpha={args.lora_alpha}")
    if args.tokenizer:
        sets.append(f"data.tokenizer={args.tokenizer}")
    if args.zero_stage is not None:
        sets.append(f"parallel.zero_stage={args.zero_stage}")
    sets += [
        "training.objective=step_jepa", f"data.chats={args.train_file}", f"data.max_len={args.max_len}",
        f"run.output_dir={args.output_dir}", f"run.seed={args.seed}", f"data.seed={args.seed}",
        f"training.step_jepa.mode={args.mode}", f"training.step_jepa.loss_type={args.jepa_loss_type}",
        f"training.step_jepa.jepa_weight={args.lbd}", f"training.step_jepa.lm_weight={args.gamma}",
        f"training.step_jepa.predictors={args.predictors}", f"training.step_jepa.single_pass={args.single_pass}",
        f"training.micro_batch_size={args.batch_size}", f"training.gradient_accumulation_steps={args.grad_accum}",
        f"training.optimizer.lr={args.learning_rate}", "training.scheduler.min_lr=0.0", f"logging.log_every={1 if args.debug else args.log_every}",
    ] + args.set  # last, so that an explicit --set wins
    cfg = load_config(HF_CONFIG if args.model_name else args.config, sets)
    cfg.training.step_jepa.separator = args.separator  # a YAML round trip would mangle whitespace
    dp = world_size // (cfg.parallel.tensor * cfg.parallel.pipeline)
    cfg.training.batch_size = args.batch_size * args.grad_accum * dp
    micro_per_epoch = len(read_chats(args.train_file)) // dp // args.batch_size
    if micro_per_epoch < args.grad_accum:
        raise SystemExit(f"error: {args.train_file} over {dp} data-parallel ranks does not fill one step of "
                         f"batch_size {args.batch_size} x grad_accum {args.grad_accum}")
    total = max(1, int(args.num_epochs * micro_per_epoch) // args.grad_accum)
    cfg.training.train_steps = min(total, args.max_steps) if args.max_steps else total
    s = cfg.training.scheduler
    s.type, s.warmup_steps = "linear", int(args.warmup_ratio * cfg.training.train_steps)
    cfg.checkpoint.every_steps = args.save_every or cfg.training.train_steps
    return cfg


def show_first_example(cfg) -> None:
    from cromwell.pretrain.objectives import build_objective, load_run_tokenizer

    tokenizer = load_run_tokenizer(cfg)
    objective = build_objective(cfg, tokenizer)
    e = objective.encoder(read_chats(cfg.data.chats)[0])
    print("prompt:", repr(tokenizer.decode(e.input_ids[:e.n_prompt])))
    for i, (a, b) in enumerate(e.steps):
        print(f"step {i + 1} [{a}, {b}):", repr(tokenizer.decode(e.input_ids[a:b])))


def main(argv=None):
    args = parse_args(argv)
    cfg = run_config(args, int(os.environ.get("WORLD_SIZE", "1")))
    if args.debug and os.environ.get("RANK", "0") == "0":
        show_first_example(cfg)
    run(cfg, args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
