"""Training objectives: what the one training loop (pretrain/trainer.py) optimises.

An objective owns its data (which loader, how micro batches are collated) and its loss, as a small
set of named components. Each component is a sum over items (labelled tokens, JEPA pairs) with a
count of items, so the loop normalises every component by its count over the WHOLE step — all
micro batches on all data-parallel ranks — as if the step were one batch: a micro batch holding
more labelled tokens weighs more, which a mean of per-micro-batch means gets wrong.

    total = sum_k weights[k] * S_k / N_k    (S_k, N_k: component k's sum and count over the step)

`Objective` (base.py) is the whole interface: the loop, the pipeline (pretrain/pipeline.py), the engine
(pretrain/parallelize.py) and held-out evaluation read nothing else, and an objective touches nothing
of theirs. Adding an objective is one more class (here, or anywhere: the loop takes any `Objective`)
and an entry in `build_objective`; docs/extending.md walks through one.
"""

from __future__ import annotations

from cromwell.data.tokenizer import PAD_ID, load_hf_tokenizer, load_tokenizer, predictor_token, predictor_token_id
from cromwell.pretrain.config import Config, ConfigError
from cromwell.pretrain.objectives.base import Batches, Collated, Heads, Loss, Objective, Whole, token_batches

__all__ = ["Batches", "Collated", "Heads", "Loss", "Objective", "Whole", "token_batches", "build_objective",
           "load_run_tokenizer"]


def load_run_tokenizer(cfg: Config):
    """The project's tokenizer (data.tokenizer), or a Hugging Face model's own (model.type: hf)."""
    if cfg.model.type == "hf":
        return load_hf_tokenizer(cfg.model.hf.path)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer {cfg.data.tokenizer} has {tokenizer.get_vocab_size()} tokens, more than "
                          f"model.vocab_size {cfg.model.vocab_size}: the model could not embed every id")
    return tokenizer


def build_objective(cfg: Config, tokenizer) -> Objective:
    if cfg.training.objective == "lm":
        from cromwell.pretrain.objectives.lm import LanguageModeling

        return LanguageModeling(cfg)
    if cfg.training.objective == "hybrid":
        from cromwell.pretrain.objectives.hybrid import Hybrid

        return Hybrid(cfg)
    from cromwell.data.chats import hf_chat_encoder, project_chat_encoder
    from cromwell.pretrain.objectives.step_jepa import StepJEPA

    sj = cfg.training.step_jepa
    if cfg.model.type == "hf":
        encoder = hf_chat_encoder(tokenizer, sj.separator, cfg.data.max_len)
        predictors = tokenizer.convert_tokens_to_ids([predictor_token(i) for i in range(1, sj.predictors + 1)])
        pad = tokenizer.pad_token_id
    else:
        encoder = project_chat_encoder(tokenizer, sj.separator, cfg.data.max_len)
        predictors, pad = [predictor_token_id(i) for i in range(1, sj.predictors + 1)], PAD_ID
    return StepJEPA(cfg, encoder, predictors, pad)
