"""Step-JEPA / LLM-JEPA batch layouts (docs/design.md, Step-JEPA fine-tuning): chat examples -> tensors for one forward.

Loss = gamma * LM + lambda * JEPA, where LM is next-token prediction on assistant tokens and JEPA
aligns two embeddings ("views") per pair:
  view 1: the last-layer state at the last of K predictor tokens inserted after the source
          (step i; or the whole prompt in the LLM-JEPA two-view case), which sees only
          what precedes it;
  view 2: the state at the last token of the target (step i+1; or the assistant message),
          computed in isolation: the target sees only itself.

Two layouts give the same value and gradients:
  reference (the design's original two passes): pass 1 = plain causal LM on the original sequence
      (`lm_batch`); pass 2 = the sequence with predictors inserted and the target isolated, one row per
      pair (`reference_view_batch`).
  single pass (`packed_batch`): per example, [original | predictors_1 | target copy_1 | ...] with a
      block attention mask and the position ids the reference pass 2 would give, so one forward
      yields the LM loss and both views; the extra length is K + |target| per pair instead of a
      second full sequence.
Attention masks are bool [b, 1, s, s], True = may attend; None means plain causal.
"""
from dataclasses import dataclass

import torch

from cromwell.data.chats import Example
from cromwell.data.tokenizer import IGNORE



@dataclass
class Batch:
    input_ids: torch.Tensor          # [b, s]
    labels: torch.Tensor             # [b, s], IGNORE outside assistant tokens
    position_ids: torch.Tensor       # [b, s]
    attention_mask: torch.Tensor | None  # bool [b, 1, s, s] or None for plain causal
    view1: torch.Tensor              # [P, 2] (row, position) of the last predictor token
    view2: torch.Tensor              # [P, 2] (row, position) of the target's last token

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)
        return Batch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def _labels(ex: Example, length: int) -> torch.Tensor:
    labels = torch.full((length,), IGNORE, dtype=torch.long)
    labels[ex.n_prompt:len(ex.input_ids)] = torch.tensor(ex.input_ids[ex.n_prompt:])
    return labels


def _stack(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, int]:
    s = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (s - len(r)) for r in rows], dtype=torch.long), s


def lm_batch(examples: list[Example], pad_id: int) -> Batch:
    """Plain causal batch, right-padded: causal attention already keeps real tokens away
    from the padding after them, so no mask is needed."""
    ids, s = _stack([e.input_ids for e in examples], pad_id)
    labels = torch.stack([_labels(e, s) for e in examples])
    pos = torch.arange(s).expand(len(examples), s)
    none = torch.zeros(0, 2, dtype=torch.long)
    return Batch(ids, labels, pos, None, none, none)


def reference_view_batch(examples: list[Example], mode: str, predictor_ids: list[int], pad_id: int) -> Batch:
    """The reference layout's second pass: one row per pair, predictors inserted at the cut, the target
    sees only itself, everything else causal."""
    k = len(predictor_ids)
    rows, cuts = [], []
    for e in examples:
        for cut, end in e.pairs(mode):
            rows.append(e.input_ids[:cut] + predictor_ids + e.input_ids[cut:])
            cuts.append((cut, end))
    ids, s = _stack(rows, pad_id)
    mask = torch.ones(s, s, dtype=torch.bool).tril().repeat(len(rows), 1, 1, 1)
    for r, (cut, end) in enumerate(cuts):
        mask[r, 0, cut + k:end + k, :cut + k] = False
    v1 = torch.tensor([[r, cut + k - 1] for r, (cut, _) in enumerate(cuts)], dtype=torch.long)
    v2 = torch.tensor([[r, end + k - 1] for r, (_, end) in enumerate(cuts)], dtype=torch.long)
    return Batch(ids, torch.full_like(ids, IGNORE), torch.arange(s).expand(len(rows), s), mask, v1, v2)


def packed_batch(examples: list[Example], mode: str, predictor_ids: list[int], pad_id: int) -> Batch:
    """Single-pass layout [original | predictors | target copy | ...] with a block mask."""
    k = len(predictor_ids)
    rows, positions, blocks = [], [], []
    for e in examples:
        n = len(e.input_ids)
        row, pos, blk = list(e.input_ids), list(range(n)), []
        for cut, end in e.pairs(mode):
            p0 = len(row)
            row += predictor_ids + e.input_ids[cut:end]
            pos += list(range(cut, end + k))
            blk.append((cut, p0, p0 + k, p0 + k + end - cut))
        rows.append(row)
        positions.append(pos)
        blocks.append((n, blk))
    ids, s = _stack(rows, pad_id)
    pos_t, _ = _stack(positions, 0)
    b = len(rows)
    tril = torch.ones(s, s, dtype=torch.bool).tril()
    mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
    v1, v2 = [], []
    for r, (n, blk) in enumerate(blocks):
        m = mask[r, 0]
        m[:n, :n] = tril[:n, :n]
        for cut, p0, t0, t1 in blk:
            m[p0:t0, :cut] = True                       # predictors see what precedes the cut
            m[p0:t0, p0:t0] = tril[:k, :k]              # ... and earlier predictors
            m[t0:t1, t0:t1] = tril[:t1 - t0, :t1 - t0]  # the target copy sees only itself
            v1.append([r, t0 - 1])
            v2.append([r, t1 - 1])
        m.diagonal()[len(rows[r]):] = True  # padding rows attend to themselves: no all-masked softmax
    labels = torch.stack([_labels(e, s) for e in examples])
    as_idx = lambda v: torch.tensor(v, dtype=torch.long).reshape(-1, 2)
    return Batch(ids, labels, pos_t, mask, as_idx(v1), as_idx(v2))
