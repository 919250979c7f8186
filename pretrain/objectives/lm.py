"""Next-token prediction on packed token shards (seed stage 2, and the backbone's pretraining)."""

from __future__ import annotations

import torch

from data.loader import TokenBatches
from data.shards import Location
from data.masks import document_positions_and_mask
from data.tokenizer import EOS_ID, IGNORE
from pretrain.config import Config, ConfigError
from pretrain.objectives import Collated, Objective


class LanguageModeling(Objective):
    components = ("lm",)
    weights = (1.0,)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def batches(self, split: str, dp_rank: int, dp_size: int):
        d = self.cfg.data
        shards = d.shards if split == "train" else d.valid_shards
        if shards is None:
            raise ConfigError("validation.every_steps > 0 needs held-out shards: set data.valid_shards")
        lm, micro = self.cfg.training.lm, self.cfg.training.micro_batch_size
        location = Location(shards, d.cache_dir, d.remote_retries, d.remote_backoff_s,
                            None if d.cache_limit_gb is None else int(d.cache_limit_gb * 1e9))
        loader = TokenBatches(
            location, weights=d.mixture if split == "train" else None, vocab_size=lm.vocab_size,
            # Validation steps one micro batch at a time; training steps the global batch.
            global_batch=self.cfg.training.batch_size if split == "train" else micro * dp_size,
            micro_batch_size=micro, dp_rank=dp_rank, dp_size=dp_size, seed=d.seed,
            num_workers=d.num_workers if split == "train" else 0, shuffle_window=d.shuffle_window,
            on_error=d.on_error,
        )
        if loader.context_length != lm.context_length:
            raise ConfigError(f"{shards}: shards hold sequences of context length {loader.context_length} but "
                              f"training.lm.context_length is {lm.context_length}")
        if loader.manifest.vocab_size > lm.vocab_size:
            raise ConfigError(f"{shards}: tokenizer vocab {loader.manifest.vocab_size} exceeds "
                              f"training.lm.vocab_size {lm.vocab_size}")
        return Collated(loader, self.collate)

    def collate(self, batch):
        input_ids, labels = batch
        if not self.cfg.data.document_mask:
            return input_ids, labels
        position_ids, mask = document_positions_and_mask(input_ids, EOS_ID)
        return (input_ids, position_ids, mask), labels

    def counts(self, batch) -> torch.Tensor:
        return torch.tensor([(batch[1] != IGNORE).sum().item()], dtype=torch.float64)

    def input_ids(self, batch) -> torch.Tensor:
        return batch[0][0] if isinstance(batch[0], tuple) else batch[0]

    def pipeline_batch(self, batch) -> tuple:
        return batch

    def stage_sums(self, head, hidden, labels) -> torch.Tensor:
        return head.lm_loss(hidden, labels, reduction="sum")[None]
