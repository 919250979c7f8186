"""Next-token prediction on packed token shards (the curriculum's language stage, and the backbone's
pretraining)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from cromwell.data.masks import document_positions_and_mask
from cromwell.data.tokenizer import EOS_ID, IGNORE
from cromwell.pretrain.config import Config
from cromwell.pretrain.objectives.base import Collated, Loss, Objective, token_batches


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s]
    # data.document_mask: each document's own positions and a bool [b, 1, s, s] mask; None: plain causal
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def to(self, device) -> "TokenBatch":
        return TokenBatch(*(None if t is None else t.to(device) for t in (getattr(self, f.name) for f in fields(self))))


class LanguageModeling(Objective):
    components = ("lm",)
    weights = (1.0,)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def batches(self, split: str, dp_rank: int, dp_size: int):
        return Collated(token_batches(self.cfg, split, dp_rank, dp_size), self.collate)

    def collate(self, batch) -> TokenBatch:
        input_ids, labels = batch
        if not self.cfg.data.document_mask:
            return TokenBatch(input_ids, labels)
        return TokenBatch(input_ids, labels, *document_positions_and_mask(input_ids, EOS_ID))

    def counts(self, batch: TokenBatch) -> torch.Tensor:
        return torch.tensor([(batch.labels != IGNORE).sum().item()], dtype=torch.float64)

    def input_ids(self, batch: TokenBatch) -> torch.Tensor:
        return batch.input_ids

    def inputs(self, batch: TokenBatch) -> tuple[tuple, tuple]:
        if batch.attention_mask is None:
            return (batch.input_ids,), (batch.labels,)
        return (batch.input_ids, batch.position_ids, batch.attention_mask), (batch.labels,)

    def loss(self, heads, hidden, targets) -> Loss:
        labels, = targets
        return Loss(heads.lm_loss(hidden, labels, reduction="sum")[None])
