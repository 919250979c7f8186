"""pretrain/train.py with a NaN planted in the loss of some steps (env NAN_STEPS, 1-based), on rank 0
only: the other ranks' losses stay finite, so skipping the step needs every rank to agree."""

import os

import torch.distributed as dist

from cromwell.pretrain.objectives import Loss
from cromwell.pretrain.objectives.lm import LanguageModeling
from cromwell.pretrain.train import main

BAD = {int(s) for s in os.environ["NAN_STEPS"].split(",")}
ACCUM = int(os.environ["ACCUM"])
finite_loss = LanguageModeling.loss
calls = 0


def loss(self, heads, hidden, targets):
    global calls
    out = finite_loss(self, heads, hidden, targets)
    step, calls = calls // ACCUM + 1, calls + 1
    return Loss(out.sums * float("nan")) if step in BAD and dist.get_rank() == 0 else out


LanguageModeling.loss = loss
main()
