"""The tasks tools/evaluate.py scores a loaded model on (pretrain/checkpoint/load.py: any checkpoint, export
or Hugging Face directory), each `task(loaded, options) -> dict` of scores; `options` carries the
command's settings (limits, batch size, data paths). TASK names them.

- perplexity and jepa_mse: held-out shards through the objective of the run, as the trainer's validation
  computes them (held_out.py); jepa_mse with the run's masks and the EMA target (the online encoders
  when the checkpoint keeps no target).
- humaneval: greedy pass@1 and sampled pass@k, every completion run in the sandbox (humaneval.py).
- image_to_code: held-out generated pairs, scored per kind (image_to_code.py).
- gsm8k, nlrx: greedy answers scored by reasoning.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cromwell.data.chats import hf_chat_encoder, project_chat_encoder
from cromwell.data.images import patchify, preprocess
from cromwell.model.generate import Sampling
from cromwell.pretrain.checkpoint.load import Loaded
from cromwell.pretrain.config import ConfigError
from cromwell.pretrain.distributed import device_type
from cromwell.pretrain.evaluation import humaneval as he
from cromwell.pretrain.evaluation.generation import answers, prompt_ids
from cromwell.pretrain.evaluation.held_out import held_out
from cromwell.pretrain.evaluation.reasoning import gsm8k_correct, read_tasks, regex_match
from cromwell.pretrain.losses import to_device
from cromwell.pretrain.objectives import build_objective


def device() -> torch.device:
    """This process's device (its GPU under the launcher)."""
    return torch.device("cuda", torch.cuda.currentdevice()) if device_type() == "cuda" else torch.device("cpu")


# -- held-out losses --------------------------------------------------------------------------------------------


def perplexity(loaded: Loaded, args) -> dict:
    return _held_out(loaded, args, jepa=False)


def jepa_mse(loaded: Loaded, args) -> dict:
    if loaded.cfg is None or loaded.cfg.model.type != "vljepa":
        return {"skipped": "the model predicts no embeddings (not a VL-JEPA)"}
    return _held_out(loaded, args, jepa=True)


def _held_out(loaded: Loaded, args, jepa: bool) -> dict:
    if loaded.kind == "hf":
        return {"skipped": "held-out shards are in the project's tokenizer, not this model's"}
    cfg = loaded.cfg.model_copy(deep=True)
    # The evaluation's layout, not the training run's: this process's tensor-parallel size, no pipeline.
    cfg.parallel = cfg.parallel.model_copy(update={"tensor": args.tp, "pipeline": 1})
    cfg.data.valid_shards = args.valid_shards or cfg.data.valid_shards
    if not cfg.data.valid_shards:
        raise ConfigError("perplexity and jepa_mse need held-out shards: --valid-shards, or data.valid_shards in the run")
    cfg.data.num_workers = 0
    if cfg.model.type == "vljepa":
        # JEPA scores need masks and a target pass even for a stage that trained no JEPA (its head is there);
        # perplexity needs neither. The loss weights do not enter the components reported.
        # Every token counts, also after instruction tuning (which trained on answers only).
        weights = {"alpha": 1.0} if jepa else {"alpha": 0.0, "beta": 1.0}
        cfg.training.hybrid = cfg.training.hybrid.model_copy(update={**weights, "instruction": False})
    objective = build_objective(cfg, loaded.tokenizer)
    if jepa:
        objective.setup(loaded.model, lambda params: torch.no_grad(), device())  # the target starts as the online model
        if loaded.target is not None:
            objective.load_state_dict({"ema_target": loaded.target.state_dict()})
    valid = objective.batches("valid", 0, 1)
    try:
        samples = sum(m.num_samples for m in valid.loader.plan.manifests)
        count = samples // cfg.training.micro_batch_size
        if args.max_batches:
            count = min(count, args.max_batches)
        if count == 0:
            raise ConfigError(f"{cfg.data.valid_shards}: {samples} held-out samples, fewer than one micro batch "
                              f"({cfg.training.micro_batch_size})")
        batches = [next(valid) for _ in range(count)]
    finally:
        valid.close()
    model = loaded.model
    metrics = held_out(objective, batches, device(),
                       lambda counts: [objective.forward(model, to_device(b, device())) for b in batches])
    samples = {"samples": count * cfg.training.micro_batch_size}
    if jepa:
        keys = ("val_jepa_mse", "val_jepa_cosine", "val_jepa_rank", "val_jepa_text", "val_jepa_vision")
        return {**samples, **{k.removeprefix("val_"): metrics[k] for k in keys if k in metrics}}
    tokens = int(sum(objective.counts(b)[0] for b in batches))  # the LM term's labelled tokens
    if tokens == 0:
        raise ConfigError(f"{cfg.data.valid_shards}: no token to score in {count} held-out micro batches")
    return {**samples, "tokens": tokens, "ppl": metrics["val_ppl"], "lm": metrics["val_lm"]}


# -- generation tasks ------------------------------------------------------------------------------------------


def humaneval(loaded: Loaded, args) -> dict:
    problems = he.load_problems(args.humaneval)[: args.limit or None]
    prompts = [loaded.encode(p["prompt"]) for p in problems]
    greedy = Sampling(args.max_new_tokens, stop=tuple(he.STOP_SEQUENCES))
    completions = {p["task_id"]: [he.truncate(g.text)] for p, g in zip(problems, answers(loaded, prompts, greedy, False, args.batch_size, device()))}
    result = {"greedy": _humaneval_scores(problems, completions, (1,), args)}
    if args.samples > 1:
        sampled = {p["task_id"]: [] for p in problems}
        for s in range(args.samples):
            sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, tuple(he.STOP_SEQUENCES), seed=s)
            for p, g in zip(problems, answers(loaded, prompts, sampling, False, args.batch_size, device())):
                sampled[p["task_id"]].append(he.truncate(g.text))
        ks = tuple(k for k in (1, 10, 100) if k <= args.samples)
        result["sampled"] = _humaneval_scores(problems, sampled, ks, args)
    return result


def _humaneval_scores(problems, completions, ks, args) -> dict:
    if dist.get_rank() != 0:  # every rank generated the same completions; one runs them
        return {}
    scores = he.evaluate(problems, completions, ks=ks, workers=args.workers)
    return {k: v for k, v in scores.items() if k.startswith("pass@") or k in ("n", "problems")}


def image_to_code(loaded: Loaded, args) -> dict:
    from cromwell.pretrain.evaluation import image_to_code as i2c
    from cromwell.data.corpus.instructions import QUESTIONS

    if loaded.cfg is None or loaded.cfg.model.type != "vljepa":
        return {"skipped": "the model reads no images (not a VL-JEPA)"}
    if args.pairs is None:
        raise ConfigError("image_to_code needs --pairs (held-out pairs of tools/make_vision_pairs.py)")
    samples = i2c.read_pairs(args.pairs)[: args.limit or None]
    v = loaded.cfg.model.vision
    images = [patchify(torch.from_numpy(preprocess(s["png"], f"{args.pairs} pair {i}", v.image_size))[None],
                       v.patch_size)[0] for i, s in enumerate(samples)]
    prompts = [prompt_ids(loaded, QUESTIONS[s["kind"]], chat=True) for s in samples]
    generated = answers(loaded, prompts, Sampling(args.max_new_tokens), True, args.batch_size, device(), images)
    if dist.get_rank() != 0:
        return {}
    results = i2c.score_many(samples, [g.text for g in generated], workers=args.workers)
    return {**i2c.summarize(results), "examples": [{**r, "generated": g.text[:500]} for r, g in
                                                   list(zip(results, generated))[:10]]}


def reasoning(task: str):
    def run(loaded: Loaded, args) -> dict:
        path = args.gsm8k if task == "gsm8k" else args.nlrx
        if not path.is_file():
            return {"skipped": f"{path} not found"}
        items = read_tasks(task, str(path), args.limit)
        encoder = (hf_chat_encoder if loaded.kind == "hf" else project_chat_encoder)(loaded.tokenizer)
        prompts = [encoder.encode(encoder.render_prompt(it["messages"][:-1])) for it in items]
        generated = answers(loaded, prompts, Sampling(args.max_new_tokens), True, args.batch_size, device())
        score = gsm8k_correct if task == "gsm8k" else regex_match
        correct = [score(g.text, it["gold"]) for g, it in zip(generated, items)]
        return {"accuracy" if task == "gsm8k" else "exact_match": sum(correct) / len(items), "n": len(items)}
    return run


TASK = {"perplexity": perplexity, "jepa_mse": jepa_mse, "humaneval": humaneval, "image_to_code": image_to_code,
        "gsm8k": reasoning("gsm8k"), "nlrx": reasoning("nlrx")}
