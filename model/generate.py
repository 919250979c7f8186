"""Batched decoding with a KV cache: greedy or sampled (temperature, top-p), stop strings, a token budget;
for the project's GPT, the VL-JEPA (text with or without an image) and Hugging Face causal LMs.

Prompts of different lengths are left-padded to one width, so every row's next token is in the same
column; each row's positions count its own tokens only, and attention skips the padding. The cache keeps
every self-attention layer's keys and values (preallocated for the prompt plus the budget) and each fusion
block's keys and values of the image, computed once: a decoding step runs the new token alone. Without the
cache (`use_cache=False`) every step runs the whole sequence again: the reference the cache is tested
against (token for token, logits to 1e-5).

Under tensor parallelism the ranks decode together: each runs its shard, the vocab-parallel logits are
gathered, and every rank draws the same token (same logits, same seeded generator).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from cromwell.model.vljepa import VLJEPA


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # sample from the smallest set of tokens whose probabilities reach top_p
    stop: tuple[str, ...] = ()  # a row ends at the first of these in its text (which is cut there)
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    tokens: list[int]  # the new tokens, without the end-of-sequence token
    text: str | None  # decoded (when a decode function was given), cut at a stop string
    finish: str  # "eos", "stop" or "length"
    logits: list[torch.Tensor] = field(default_factory=list)  # with keep_logits: each step's [vocab] logits


class LayerCache:
    """One attention layer's keys and values [b, heads, positions, head_dim] so far (self-attention), or
    the fixed ones of the image tokens (cross-attention)."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.k = self.v = None
        self.fixed = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:  # allocated at the first write, when the shape and dtype are known
            b, heads, _, dim = k.shape
            self.k = k.new_empty(b, heads, self.capacity, dim)
            self.v = v.new_empty(b, heads, self.capacity, dim)
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions; writing up to {end}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.layers: dict[str, LayerCache] = {}

    def layer(self, name: str) -> LayerCache:
        if name not in self.layers:
            self.layers[name] = LayerCache(self.capacity)
        return self.layers[name]

    def has_image(self) -> bool:
        return any(layer.fixed is not None for layer in self.layers.values())


def attention_mask(keys: torch.Tensor, queries: int) -> torch.Tensor:
    """bool [b, 1, queries, kv]: the last `queries` columns of `keys` [b, kv] (True: a real token) each see
    the real tokens up to their own column. A padding column sees itself only, so that its (unused) state
    stays finite: a row that sees nothing would be NaN, and NaN keys spoil every row through 0 x NaN."""
    kv = keys.shape[1]
    columns = torch.arange(kv, device=keys.device)
    mine = columns[kv - queries:, None]
    return ((keys[:, None, :] & (columns <= mine)) | (columns == mine))[:, None]


class ModelDecoder:
    """The project's GPT or VL-JEPA: logits of the last hidden states through the (vocab-parallel) output
    weight, gathered over the tensor-parallel ranks. `vocab`: the tokenizer's rows; the padding rows of
    the output weight are never drawn. A VL-JEPA's prompts may come with images: `images` (patches
    [bi, n, 3*p*p], the rows [bi] they belong to)."""

    def __init__(self, model, vocab: int, images: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.model, self.vocab, self.images = model, vocab, images
        self.vl = isinstance(model, VLJEPA)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(capacity)

    def logits(self, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, cache) -> torch.Tensor:
        mask = attention_mask(keys, ids.shape[1])
        if self.vl:
            patches, rows = self.images or (None, None)
            hidden = self.model(ids, patches, rows, None, positions, mask, cache)[1]
        else:
            hidden = self.model(ids, positions, mask, cache)
        weight = self.model.output_weight
        logits = F.linear(hidden, weight).float()
        if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
            # megatron-core's gather allocates on CUDA only; this one runs on gloo too
            parts = [torch.empty_like(logits) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            logits = torch.cat(parts, dim=-1)
        return logits[..., :self.vocab]


class HFDecoder:
    """A Hugging Face causal LM (model/hf.HFCausalLM) with its own KV cache (transformers' DynamicCache)."""

    def __init__(self, model, vocab: int):
        self.model, self.vocab = model, vocab

    def new_cache(self, capacity: int):
        from transformers import DynamicCache

        return DynamicCache()

    def logits(self, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, cache) -> torch.Tensor:
        out = self.model.lm(input_ids=ids, position_ids=positions, attention_mask=keys.long(), past_key_values=cache,
                            use_cache=cache is not None)
        return out.logits.float()[..., :self.vocab]


@torch.inference_mode()
def generate(decoder, prompts: list[list[int]], sampling: Sampling, eos_id: int | set[int], pad_id: int, decode=None,
             use_cache: bool = True, keep_logits: bool = False) -> list[Generation]:
    """Continue each prompt (token ids) until an end token (`eos_id`: one or a set), a stop string (needs
    `decode`: ids -> text) or max_new_tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    ends = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    device = next(decoder.model.parameters()).device
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    keys = torch.zeros(b, width, dtype=torch.bool, device=device)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, device=device)
        keys[r, width - len(p):] = True
    positions = (keys.long().cumsum(1) - 1).clamp(min=0)
    cache = decoder.new_cache(width + sampling.max_new_tokens) if use_cache else None
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    out = [Generation([], None, "length") for _ in prompts]
    running = torch.ones(b, dtype=torch.bool, device=device)
    step_ids, step_positions = ids, positions
    for _ in range(sampling.max_new_tokens):
        logits = decoder.logits(step_ids, step_positions, keys, cache)[:, -1]
        token = _choose(logits, sampling, generator)
        for r in running.nonzero().flatten().tolist():
            _append(out[r], int(token[r]), logits[r] if keep_logits else None, ends, sampling.stop, decode)
            running[r] = out[r].finish == "length"
        if not running.any():
            break
        token = torch.where(running, token, pad_id)[:, None]
        keys = torch.cat([keys, running[:, None]], 1)
        step_positions = step_positions[:, -1:] + 1
        if use_cache:  # the cache holds the past: run the new token alone
            step_ids = token
        else:
            step_ids, positions = torch.cat([step_ids, token], 1), torch.cat([positions, step_positions], 1)
            step_positions = positions
    if decode:
        for g in out:
            if g.text is None:
                g.text = decode(g.tokens)
    return out


def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep each token whose preceding mass is below top_p: the smallest set that reaches it
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _append(g: Generation, token: int, logits, ends: set[int], stop: tuple[str, ...], decode) -> None:
    if logits is not None:
        g.logits.append(logits.clone())
    if token in ends:
        g.finish = "eos"
        return
    g.tokens.append(token)
    if stop and decode:
        text = decode(g.tokens)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            g.text, g.finish = text[:cut], "stop"
