"""The objective interface (`Objective`) and what it is made of: the `Loss` it returns, the `Batches`
it reads, the `Heads` it may call; and `Collated` / `token_batches`, the loader pieces objectives on token
shards share. See pretrain/objectives/__init__.py for what an objective is."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, ContextManager, Iterator, Protocol

import torch
from torch import nn

from cromwell.data.loader import TokenBatches
from cromwell.data.shards import Location
from cromwell.pretrain.config import Config, ConfigError


@dataclass
class Loss:
    """One micro batch's loss, as an objective returns it."""

    sums: torch.Tensor  # [K]: each component's loss summed over its items, in `components` order
    # An objective that predicts embeddings (`predicts_embeddings`): this micro batch's predictions and
    # their targets, [rows, E] each, detached. Held-out evaluation scores them; the loop checks them for
    # representation collapse.
    predicted: torch.Tensor | None = None
    target: torch.Tensor | None = None

    def detached(self) -> "Loss":
        return replace(self, sums=self.sums.detach())


class Batches(Protocol):
    """What `Objective.batches` returns: an endless iterator of micro batches whose position a
    checkpoint keeps."""

    def __iter__(self) -> Iterator: ...
    def __next__(self): ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def close(self) -> None: ...
    @property
    def skipped_samples(self) -> int: ...


class Heads(Protocol):
    """What `Objective.loss` may call on `heads`: the whole model, or the last pipeline stage's heads.
    Every model has the output projection's loss; the VL-JEPA's heads also have its JEPA head's
    modules (pretrain/objectives/hybrid.py)."""

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor: ...


Whole = Callable[[list], ContextManager]  # params -> a context in which they are whole (gathered under ZeRO-3)


class Objective:
    """The interface. Data: `batches`, `counts`, `input_ids`. Loss: `inputs` and `loss` (which a
    pipeline calls on its last stage), `forward` (one process; by default the two chained), `total`.
    Optional state beside the model: `trains`, `setup`, `after_step`, `ema_target`, `state_dict`."""

    components: tuple[str, ...] = ()  # the names of the loss's components, in order
    weights: tuple[float, ...] = ()  # each component's weight in `total`
    dynamic_shape = False  # micro batches differ in shape: a pipeline must send shapes with each one
    predicts_embeddings = False  # its Loss carries predicted and target embeddings

    # -- data ------------------------------------------------------------------------------------------

    def batches(self, split: str, dp_rank: int, dp_size: int) -> Batches:
        """This rank's micro batches of `split` ("train" or "valid")."""
        raise NotImplementedError

    def counts(self, batch) -> torch.Tensor:
        """float64 [K]: the items each component sums over in this micro batch."""
        raise NotImplementedError

    def input_ids(self, batch) -> torch.Tensor:
        """The token ids the model reads (the loop counts them and fingerprints what each step read)."""
        raise NotImplementedError

    # -- loss ------------------------------------------------------------------------------------------

    def inputs(self, batch) -> tuple[tuple, tuple]:
        """(model inputs, loss targets), each a tuple of tensors: the model (or a pipeline's first
        stage) reads model(*inputs); `loss` (on the last stage) gets the targets."""
        raise NotImplementedError

    def loss(self, heads: Heads, outputs, targets: tuple) -> Loss:
        """The micro batch's Loss from the model's outputs (GPT and Hugging Face models: the final
        hidden states; the VL-JEPA: see hybrid.py) and `inputs`' targets."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch) -> Loss:
        """One micro batch through a whole model (no pipeline)."""
        inputs, targets = self.inputs(batch)
        return self.loss(model, model(*inputs), targets)

    def total(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The weighted total from the components' sums and counts."""
        weights = torch.tensor(self.weights, dtype=sums.dtype, device=sums.device)
        return (weights * sums / counts.to(sums).clamp(min=1)).sum()

    # -- state beside the model (the VL-JEPA's EMA target) ---------------------------------------------

    def trains(self, module: str) -> bool:
        """Whether the model's module `module` (model/vljepa.MODULES) gets an optimizer."""
        return True

    def setup(self, model: nn.Module, whole: Whole, device) -> None:
        """Once the engine's weights are final; `model`: the whole model or this rank's pipeline stage
        (its layers keep the whole model's names)."""

    def after_step(self, model: nn.Module, whole: Whole, step: int) -> None:
        """After each optimizer step that changed the weights (`step`: steps done)."""

    def ema_target(self) -> nn.Module | None:
        """A copy of the model's layers under the same names that a pipeline stage runs beside its own
        (pretrain/pipeline.py), or None."""
        return None

    def state_dict(self) -> dict:
        """Tensors that a checkpoint keeps per model-parallel rank."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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
        location, weights=d.mixture if split == "train" else None, vocab_size=cfg.model.vocab_size,
        global_batch=cfg.training.batch_size if split == "train" else micro * dp_size,
        micro_batch_size=micro, dp_rank=dp_rank, dp_size=dp_size, seed=d.seed,
        num_workers=d.num_workers if split == "train" else 0, shuffle_window=d.shuffle_window,
        on_error=d.on_error, sample_fn=sample_fn)
    if loader.context_length != lm.context_length:
        raise ConfigError(f"{shards}: shards hold sequences of context length {loader.context_length} but "
                          f"training.lm.context_length is {lm.context_length}")
    if loader.manifest.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"{shards}: tokenizer vocab {loader.manifest.vocab_size} exceeds "
                          f"model.vocab_size {cfg.model.vocab_size}")
    return loader
