"""Training objectives: what the one training loop (pretrain/trainer.py) optimises.

An objective owns its data (which loader, how micro batches are collated) and its loss, as a small
set of named components. Each component is a sum over items (labelled tokens, JEPA pairs) with a
count of items, so the loop normalises every component by its count over the WHOLE step — all
micro batches on all data-parallel ranks — as if the step were one batch: a micro batch holding
more labelled tokens weighs more, which a mean of per-micro-batch means gets wrong.

    total = sum_k weights[k] * S_k / N_k    (S_k, N_k: component k's sum and count over the step)

Adding an objective is one more module here and one entry in `build_objective`, not another loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.loader import TokenBatches
from data.shards import Location
from data.tokenizer import PAD_ID, load_hf_tokenizer, load_tokenizer, predictor_token, predictor_token_id
from model.loss import lm_loss
from pretrain.config import Config, ConfigError


class Objective:
    components: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    dynamic_shape = False  # micro batches differ in shape: a pipeline must send shapes with each one
    predicts_embeddings = False  # a JEPA: held-out evaluation scores its predictions (pretrain/evaluation.py)
    # While held-out evaluation runs: each micro batch's {"predicted", "target"} embeddings are appended
    collected: list | None = None

    def batches(self, split: str, dp_rank: int, dp_size: int):
        """An endless, resumable (state_dict / load_state_dict) iterator of this rank's micro batches
        of `split` ("train" or "valid")."""
        raise NotImplementedError

    def counts(self, batch) -> torch.Tensor:
        """float64 [K]: the items each component sums over in this micro batch."""
        raise NotImplementedError

    def input_ids(self, batch) -> torch.Tensor:
        """The token ids the model reads (the loop counts them and fingerprints what each step read)."""
        raise NotImplementedError

    def forward(self, model, batch) -> torch.Tensor:
        """[K] loss sums of one micro batch; the model gives final hidden states and lm_loss."""
        inputs, targets = self.pipeline_batch(batch)
        hidden = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        return self.stage_sums(model, hidden, targets)

    def pipeline_batch(self, batch) -> tuple:
        """(inputs, targets): inputs enter the first pipeline stage (a tensor or a tuple of tensors
        the model takes), targets go to the last stage's `stage_sums`."""
        raise NotImplementedError

    def stage_sums(self, head, hidden: torch.Tensor, targets) -> torch.Tensor:
        """[K] loss sums from the final hidden states; head.lm_loss(hidden, labels, reduction)."""
        raise NotImplementedError

    def pipeline_sums(self, outputs, targets, stage) -> torch.Tensor:
        """[K] loss sums on the last pipeline stage from its last layer's outputs; `stage` has the
        stage's `layers` and `kernels`. GPT's last layer gives (hidden states, output weight)."""
        hidden, weight = outputs
        return self.stage_sums(OutputWeight(weight, stage.kernels), hidden, targets)

    def total(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        weights = torch.tensor(self.weights, dtype=sums.dtype, device=sums.device)
        return (weights * sums / counts.to(sums).clamp(min=1)).sum()

    # Objectives with state of their own beside the model (the VL-JEPA's EMA target) override these.
    def trains(self, module: str) -> bool:
        """Whether the model's seed module `module` (model/vljepa.MODULES) gets an optimizer."""
        return True

    def setup(self, model, whole, device) -> None:
        """Once the engine exists. whole(params): a context in which ZeRO-3-partitioned params are whole."""

    def after_step(self, model, whole, step: int) -> None:
        """After each optimizer step that changed the weights (`step`: steps done)."""

    def health(self) -> tuple[dict, list[str]]:
        """(metrics of this rank's last micro batch, what is wrong with them), for the trainer to log."""
        return {}, []

    def state_dict(self) -> dict:
        """Tensors that a checkpoint keeps per model-parallel rank."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class OutputWeight:
    """The last pipeline stage's output projection: its weight arrives as a layer output (no ZeRO-3
    with a pipeline, so it is whole)."""

    weight: torch.Tensor
    kernels: str

    def lm_loss(self, hidden, labels, reduction="mean"):
        return lm_loss(hidden, self.weight, labels, self.kernels, reduction)


class Collated:
    """A resumable loader whose batches pass through `collate`; the position is the loader's."""

    def __init__(self, loader, collate):
        self.loader, self.collate = loader, collate

    def __iter__(self):
        return self

    def __next__(self):
        return self.collate(next(self.loader))

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()

    @property
    def skipped_samples(self) -> int:
        """Samples this rank's loader left out as unreadable (data.on_error: skip)."""
        return self.loader.skipped_samples


def token_batches(cfg: Config, split: str, dp_rank: int, dp_size: int, sample_fn=None):
    """The run's token-shard loader for `split` ("train": data.shards in data.mixture, stepping the
    global batch; "valid": data.valid_shards one micro batch at a time), checked against the config."""
    d, lm, micro = cfg.data, cfg.training.lm, cfg.training.micro_batch_size
    shards = d.shards if split == "train" else d.valid_shards
    if shards is None:
        raise ConfigError("validation.every_steps > 0 needs held-out shards: set data.valid_shards")
    location = Location(shards, d.cache_dir, d.remote_retries, d.remote_backoff_s,
                        None if d.cache_limit_gb is None else int(d.cache_limit_gb * 1e9))
    loader = TokenBatches(
        location, weights=d.mixture if split == "train" else None, vocab_size=lm.vocab_size,
        global_batch=cfg.training.batch_size if split == "train" else micro * dp_size,
        micro_batch_size=micro, dp_rank=dp_rank, dp_size=dp_size, seed=d.seed,
        num_workers=d.num_workers if split == "train" else 0, shuffle_window=d.shuffle_window,
        on_error=d.on_error, sample_fn=sample_fn)
    if loader.context_length != lm.context_length:
        raise ConfigError(f"{shards}: shards hold sequences of context length {loader.context_length} but "
                          f"training.lm.context_length is {lm.context_length}")
    if loader.manifest.vocab_size > lm.vocab_size:
        raise ConfigError(f"{shards}: tokenizer vocab {loader.manifest.vocab_size} exceeds "
                          f"training.lm.vocab_size {lm.vocab_size}")
    return loader


def load_run_tokenizer(cfg: Config):
    """The project's tokenizer (data.tokenizer), or a Hugging Face model's own (model.type: hf)."""
    if cfg.model.type == "hf":
        return load_hf_tokenizer(cfg.model.hf.path)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if tokenizer.get_vocab_size() > cfg.training.lm.vocab_size:
        raise ConfigError(f"data.tokenizer {cfg.data.tokenizer} has {tokenizer.get_vocab_size()} tokens, more than "
                          f"training.lm.vocab_size {cfg.training.lm.vocab_size}: the model could not embed every id")
    return tokenizer


def vocab_size(cfg: Config, tokenizer) -> int:
    """Rows of the model's embedding before padding."""
    return len(tokenizer) if cfg.model.type == "hf" else cfg.training.lm.vocab_size


def build_objective(cfg: Config, tokenizer) -> Objective:
    if cfg.training.objective == "lm":
        from pretrain.objectives.lm import LanguageModeling

        return LanguageModeling(cfg)
    if cfg.training.objective == "hybrid":
        from pretrain.objectives.hybrid import HybridJEPA

        return HybridJEPA(cfg)
    from data.chats import hf_chat_encoder, project_chat_encoder
    from pretrain.objectives.step_jepa import StepJEPA

    sj = cfg.training.step_jepa
    if cfg.model.type == "hf":
        encoder = hf_chat_encoder(tokenizer, sj.separator, cfg.data.max_len)
        predictors = tokenizer.convert_tokens_to_ids([predictor_token(i) for i in range(1, sj.predictors + 1)])
        pad = tokenizer.pad_token_id
    else:
        encoder = project_chat_encoder(tokenizer, sj.separator, cfg.data.max_len)
        predictors, pad = [predictor_token_id(i) for i in range(1, sj.predictors + 1)], PAD_ID
    return StepJEPA(cfg, encoder, predictors, pad)
