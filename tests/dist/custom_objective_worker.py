"""pretrain/train.py's command line training an objective defined here, outside pretrain/objectives/,
through the interface alone: next-token prediction plus a second component that predicts the token
after next from the same hidden states, through the model's own output projection."""

import torch

from cromwell.data.tokenizer import IGNORE
from cromwell.pretrain.objectives import Collated, Loss, Objective, token_batches
from cromwell.pretrain.train import main


class NextAndSkip(Objective):
    components = ("next", "skip")
    weights = (1.0, 0.5)

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg

    def batches(self, split, dp_rank, dp_size):
        return Collated(token_batches(self.cfg, split, dp_rank, dp_size), lambda batch: batch)

    def counts(self, batch):
        _, labels = batch
        return torch.tensor([(labels != IGNORE).sum().item(), (labels[:, 1:] != IGNORE).sum().item()],
                            dtype=torch.float64)

    def input_ids(self, batch):
        return batch[0]

    def inputs(self, batch):
        input_ids, labels = batch
        return (input_ids,), (labels,)

    def loss(self, heads, hidden, targets):
        labels, = targets
        return Loss(torch.stack([heads.lm_loss(hidden, labels, reduction="sum"),
                                 heads.lm_loss(hidden[:, :-1], labels[:, 1:], reduction="sum")]))


main(objective=NextAndSkip)
