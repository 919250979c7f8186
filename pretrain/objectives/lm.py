"""Next-token prediction on packed token shards (seed stage 2, and the backbone's pretraining)."""

from __future__ import annotations

import torch

from data.masks import document_positions_and_mask
from data.tokenizer import EOS_ID, IGNORE
from pretrain.config import Config
from pretrain.objectives import Collated, Objective, token_batches


class LanguageModeling(Objective):
    components = ("lm",)
    weights = (1.0,)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def batches(self, split: str, dp_rank: int, dp_size: int):
        return Collated(token_batches(self.cfg, split, dp_rank, dp_size), self.collate)

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
