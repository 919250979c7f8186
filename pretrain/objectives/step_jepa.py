"""Step-JEPA / LLM-JEPA fine-tuning of a causal LM (docs/design.md): gamma * LM on assistant tokens +
lambda * JEPA between two views of each chat; see data/chat_views.py for the views and the batch layouts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cromwell.data.chats import ChatBatches, ChatEncoder, read_chats
from cromwell.data.chat_views import IGNORE, Batch, lm_batch, packed_batch, reference_view_batch
from cromwell.model.jepa import jepa_loss
from cromwell.pretrain.config import Config, ConfigError
from cromwell.pretrain.objectives.base import Collated, Loss, Objective


def _gather(hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return hidden[idx[:, 0], idx[:, 1]]


def _lm_sum(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss summed over labelled positions only: the head runs on N rows, not b * s."""
    target = labels[:, 1:]
    keep = target != IGNORE
    return head.lm_loss(hidden[:, :-1][keep], target[keep], reduction="sum")


@dataclass
class TwoPass:
    """The reference layout: a plain causal pass for the LM loss and a second pass for the views."""

    lm: Batch
    views: Batch

    def to(self, device) -> "TwoPass":
        return TwoPass(self.lm.to(device), self.views.to(device))


class StepJEPA(Objective):
    components = ("lm", "jepa")
    dynamic_shape = True

    def __init__(self, cfg: Config, encoder: ChatEncoder, predictor_ids: list[int], pad_id: int):
        self.cfg, self.encoder, self.predictor_ids, self.pad_id = cfg, encoder, predictor_ids, pad_id
        self.sj = cfg.training.step_jepa
        self.weights = (self.sj.lm_weight, self.sj.jepa_weight)
        if cfg.parallel.pipeline > 1 and not self.sj.single_pass:
            raise ConfigError(f"parallel.pipeline={cfg.parallel.pipeline} needs training.step_jepa.single_pass: the "
                              "two-pass reference runs two forwards per micro batch; use parallel.pipeline=1 for it")

    def batches(self, split: str, dp_rank: int, dp_size: int):
        path = self.cfg.data.chats if split == "train" else self.cfg.data.valid_chats
        if path is None:
            raise ConfigError("validation.every_steps > 0 needs held-out chats: set data.valid_chats")
        examples = [self.encoder(c) for c in read_chats(path)]
        loader = ChatBatches(examples, micro_batch_size=self.cfg.training.micro_batch_size, dp_rank=dp_rank,
                             dp_size=dp_size, seed=self.cfg.data.seed, source=path)
        return Collated(loader, self.collate)

    def collate(self, examples: list) -> Batch | TwoPass:
        """A packed single-pass Batch, the reference layout's TwoPass, or a plain LM Batch (lambda 0
        or no pair in the micro batch: one causal pass, no view)."""
        if self.sj.jepa_weight == 0 or not any(e.pairs(self.sj.mode) for e in examples):
            return lm_batch(examples, self.pad_id)
        if self.sj.single_pass:
            return packed_batch(examples, self.sj.mode, self.predictor_ids, self.pad_id)
        return TwoPass(lm_batch(examples, self.pad_id),
                       reference_view_batch(examples, self.sj.mode, self.predictor_ids, self.pad_id))

    def counts(self, batch: Batch | TwoPass) -> torch.Tensor:
        lm, views = (batch.lm, batch.views) if isinstance(batch, TwoPass) else (batch, batch)
        return torch.tensor([(lm.labels[:, 1:] != IGNORE).sum().item(), len(views.view1)], dtype=torch.float64)

    def input_ids(self, batch: Batch | TwoPass) -> torch.Tensor:
        return (batch.lm if isinstance(batch, TwoPass) else batch).input_ids

    def forward(self, model, batch: Batch | TwoPass) -> Loss:
        if not isinstance(batch, TwoPass):
            return super().forward(model, batch)
        lm_sum = _lm_sum(model, model(batch.lm.input_ids, batch.lm.position_ids), batch.lm.labels)
        views = batch.views
        h = model(views.input_ids, views.position_ids, views.attention_mask)
        return Loss(torch.stack([lm_sum, self._jepa_sum(_gather(h, views.view1), _gather(h, views.view2))]))

    def inputs(self, batch: Batch) -> tuple[tuple, tuple]:
        targets = (batch.labels, batch.view1, batch.view2)
        if batch.attention_mask is None:  # plain causal: the positions are the default ones
            return (batch.input_ids,), targets
        return (batch.input_ids, batch.position_ids, batch.attention_mask), targets

    def loss(self, heads, hidden, targets) -> Loss:
        labels, view1, view2 = targets
        lm_sum = _lm_sum(heads, hidden, labels)
        if not len(view1):
            return Loss(torch.stack([lm_sum, lm_sum.new_zeros(())]))
        return Loss(torch.stack([lm_sum, self._jepa_sum(_gather(hidden, view1), _gather(hidden, view2))]))

    def _jepa_sum(self, v1, v2):
        return jepa_loss(v1, v2, self.sj.loss_type, self.sj.temperature, reduction="sum")
