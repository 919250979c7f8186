"""Step-JEPA / LLM-JEPA objective (seed 004, section 2), independent of the model.

Each example is a chat (system, user, assistant) whose assistant content is reasoning steps
joined by a separator. Loss = gamma * LM + lambda * JEPA, where LM is next-token prediction
on assistant tokens and JEPA aligns two embeddings ("views") per pair:
  view 1: the last-layer state at the last of K predictor tokens inserted after the source
          (step i; or the whole prompt in the LLM-JEPA two-view case), which sees only
          what precedes it;
  view 2: the state at the last token of the target (step i+1; or the assistant message),
          computed in isolation: the target sees only itself.

Two implementations with the same value and gradients:
  reference (seed): pass 1 = plain causal LM on the original sequence; pass 2 = the
      sequence with predictors inserted and the target isolated, one row per pair.
  single pass: per example, [original | predictors_1 | target copy_1 | predictors_2 | ...]
      with a block attention mask and the position ids the reference pass 2 would give,
      so one forward yields the LM loss and both views; the extra length is K + |target|
      per pair instead of a second full sequence.

The model is reached through a `Backbone`: `hidden(input_ids, position_ids,
attention_mask)` -> last-layer states [b, s, H] (attention_mask: bool [b, 1, s, s],
True = may attend, or None for plain causal) and `lm_loss(hidden [N, H], target [N])`.
"""
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from data.tokenizer import NUM_PREDICTOR_TOKENS, predictor_token

IGNORE = -100
LOSS_TYPES = ("cosine", "l2", "mse", "infonce")
MODES = ("step", "multistep", "two_view")


def predictor_names(k: int) -> list[str]:
    if not 1 <= k <= NUM_PREDICTOR_TOKENS:
        raise ValueError(f"--predictors must be in 1..{NUM_PREDICTOR_TOKENS}, got {k}")
    return [predictor_token(i) for i in range(1, k + 1)]


class Backbone(Protocol):
    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
               attention_mask: torch.Tensor | None) -> torch.Tensor: ...

    def lm_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int                    # tokens before the assistant content: no LM loss there
    steps: list[tuple[int, int]]     # [start, end) of each step, its trailing separator included
    content_end: int                 # end of the assistant content (the EOS after it is excluded)

    def pairs(self, mode: str) -> list[tuple[int, int]]:
        """(cut, end) per alignment pair: predictors go at `cut`, the target is [cut, end)."""
        if mode == "two_view":
            return [(self.n_prompt, self.content_end)] if self.content_end > self.n_prompt else []
        pairs = [(self.steps[i + 1][0], self.steps[i + 1][1]) for i in range(len(self.steps) - 1)]
        return pairs[:1] if mode == "step" else pairs


@dataclass
class ChatEncoder:
    """Tokenizes chats so step boundaries are exact: each step is encoded alone and the
    separator's own token ids are placed between steps. Encoding the whole text instead
    lets BPE merge the separator into neighbours (Llama-3 has a '.\\n\\n' token) and the
    separator could no longer be found in the ids."""
    encode: Callable[[str], list[int]]
    render_prompt: Callable[[list[dict]], str]   # system + user messages -> text before the answer
    eos_id: int
    separator: str = "\n\n"
    max_len: int = 1024

    def __call__(self, messages: list[dict]) -> Example:
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"last message must have role 'assistant', got {messages[-1:] or 'no messages'}")
        ids = list(self.encode(self.render_prompt(messages[:-1])))
        n_prompt = len(ids)
        sep_ids = list(self.encode(self.separator))
        parts = messages[-1]["content"].split(self.separator)
        steps = []
        for i, part in enumerate(parts):
            start = len(ids)
            ids += self.encode(part) + (sep_ids if i < len(parts) - 1 else [])
            steps.append((start, len(ids)))
        content_end = len(ids)
        ids.append(self.eos_id)
        if len(ids) > self.max_len:
            ids = ids[:self.max_len]
            steps = [s for s in steps if s[1] <= self.max_len]
            content_end = min(content_end, self.max_len)
        return Example(ids, n_prompt, [s for s in steps if s[1] > s[0]], content_end)


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
    """The seed's second pass: one row per pair, predictors inserted at the cut, the target
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


def jepa_loss(v1: torch.Tensor, v2: torch.Tensor, kind: str, temperature: float = 0.1) -> torch.Tensor:
    v1, v2 = v1.float(), v2.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(v1, v2, dim=-1)).mean()
    if kind == "l2":
        return (v1 - v2).norm(dim=-1).mean()
    if kind == "mse":
        return F.mse_loss(v1, v2)
    if kind == "infonce":
        # other pairs in the batch are the negatives
        logits = F.normalize(v1, dim=-1) @ F.normalize(v2, dim=-1).T / temperature
        return F.cross_entropy(logits, torch.arange(len(v1), device=v1.device))
    raise ValueError(f"jepa loss type must be one of {LOSS_TYPES}, got {kind!r}")


def lm_loss(backbone: Backbone, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss on labelled positions only: the head runs on N rows, not b * s."""
    target = labels[:, 1:]
    keep = target != IGNORE
    return backbone.lm_loss(hidden[:, :-1][keep], target[keep])


def _gather(hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return hidden[idx[:, 0], idx[:, 1]]


@dataclass
class StepJEPA:
    predictor_ids: list[int]
    pad_id: int
    mode: str = "step"
    loss_type: str = "cosine"
    gamma: float = 1.0
    lbd: float = 0.1
    single_pass: bool = True
    temperature: float = 0.1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"jepa loss type must be one of {LOSS_TYPES}, got {self.loss_type!r}")

    def __call__(self, backbone: Backbone, examples: list[Example], device="cpu") -> dict:
        """{'loss', 'lm', 'jepa', 'pairs'}; with lbd == 0 this is plain LM (one causal pass)."""
        has_pairs = self.lbd != 0 and any(e.pairs(self.mode) for e in examples)
        if has_pairs and self.single_pass:
            b = self.packed(examples).to(device)
            h = backbone.hidden(b.input_ids, b.position_ids, b.attention_mask)
            return self.packed_loss(backbone, h, b.labels, b.view1, b.view2)
        b = lm_batch(examples, self.pad_id).to(device)
        lm = lm_loss(backbone, backbone.hidden(b.input_ids, b.position_ids, None), b.labels)
        if not has_pairs:
            return self._total(lm, None, None)
        r = reference_view_batch(examples, self.mode, self.predictor_ids, self.pad_id).to(device)
        h = backbone.hidden(r.input_ids, r.position_ids, r.attention_mask)
        return self._total(lm, _gather(h, r.view1), _gather(h, r.view2))

    def packed(self, examples: list[Example]) -> Batch:
        return packed_batch(examples, self.mode, self.predictor_ids, self.pad_id)

    def packed_loss(self, backbone: Backbone, hidden: torch.Tensor, labels: torch.Tensor, view1: torch.Tensor,
                    view2: torch.Tensor) -> dict:
        """The loss from the last-layer states of a `packed` batch alone (a pipeline's last stage
        has nothing else)."""
        lm = lm_loss(backbone, hidden, labels)
        if self.lbd == 0 or not len(view1):
            return self._total(lm, None, None)
        return self._total(lm, _gather(hidden, view1), _gather(hidden, view2))

    def _total(self, lm: torch.Tensor, v1: torch.Tensor | None, v2: torch.Tensor | None) -> dict:
        jepa = lm.new_zeros(()) if v1 is None else jepa_loss(v1, v2, self.loss_type, self.temperature)
        return {"loss": self.gamma * lm + self.lbd * jepa, "lm": lm, "jepa": jepa,
                "pairs": 0 if v1 is None else len(v1)}
