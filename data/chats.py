"""Chat records -> token ids with exact step boundaries, and a resumable loader of micro batches of them.

A record is {"messages": [system?, user, assistant]} (tools/prepare_step_data.py writes them; so
does NL-RX-SYNTH). The assistant content holds reasoning steps joined by a separator.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable, Iterator

from cromwell.data.tokenizer import ASSISTANT, BOS, END, EOS_ID, SYSTEM, USER


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int                    # tokens before the assistant content: no LM loss there
    steps: list[tuple[int, int]]     # [start, end) of each step, its trailing separator included
    content_end: int                 # end of the assistant content (the EOS after it is excluded)

    def pairs(self, mode: str) -> list[tuple[int, int]]:
        """(cut, end) per alignment pair: predictors go at `cut`, the target is [cut, end).

        step: step 1 -> step 2; multistep: every step -> the next; two_view: prompt -> answer."""
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


def project_chat_encoder(tokenizer, separator: str = "\n\n", max_len: int = 1024) -> ChatEncoder:
    """Chats in the project's role tokens: <|bos|><|system|>..<|end|><|user|>..<|end|><|assistant|>."""
    tags = {"system": SYSTEM, "user": USER}

    def render(messages):
        bad = [m.get("role") for m in messages if m.get("role") not in tags]
        if bad:
            raise ValueError(f"prompt roles must be system/user, got {bad}")
        return BOS + "".join(f"{tags[m['role']]}{m['content']}{END}" for m in messages) + ASSISTANT

    return ChatEncoder(lambda t: tokenizer.encode(t).ids, render, EOS_ID, separator, max_len)


def plain_prompt(messages: list[dict]) -> str:
    """Prompt text for Hugging Face tokenizers without a chat template (the tiny test tokenizers)."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant: "


def hf_chat_encoder(tokenizer, separator: str = "\n\n", max_len: int = 1024) -> ChatEncoder:
    """Chats in a Hugging Face tokenizer's own chat template (or plain_prompt without one)."""
    if tokenizer.chat_template:
        render = lambda msgs: tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    else:
        bos = tokenizer.bos_token or ""
        render = lambda msgs: bos + plain_prompt(msgs)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    return ChatEncoder(encode, render, tokenizer.eos_token_id, separator, max_len)


def read_chats(path: str) -> list[list[dict]]:
    chats = []
    try:
        f = open(path)
    except OSError as e:
        raise FileNotFoundError(f"chat file {path}: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                msgs = json.loads(line).get("messages")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object: {e}") from None
            if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
                raise ValueError(f"{path}:{lineno}: field 'messages' must be a list ending with an assistant message")
            chats.append(msgs)
    if not chats:
        raise ValueError(f"{path}: no records")
    return chats


class ChatBatches:
    """Endless micro batches (lists of examples) of one data-parallel rank.

    Epoch e: the examples are shuffled by random.Random(seed + e); rank r takes the r-th of dp_size
    equal slices and cuts it into micro batches; the remainder of a slice that fills no micro batch
    sits out that epoch (different examples each epoch). The position (epoch, batch_in_epoch) is
    the same on every rank, so one rank's state_dict() resumes them all.
    """

    skipped_samples = 0  # the examples are in memory and were checked when read

    def __init__(self, examples: list, *, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 source: str = "chats"):
        self.examples = examples
        self.micro_batch_size, self.dp_rank, self.dp_size, self.seed = micro_batch_size, dp_rank, dp_size, seed
        self.per_rank = len(examples) // dp_size
        self.batches_per_epoch = self.per_rank // micro_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{source}: {len(examples)} examples over {dp_size} data-parallel ranks do not fill "
                             f"one micro batch of {micro_batch_size}")
        self._position = 0
        self._order = (None, [])  # (epoch, its permutation)

    def __iter__(self) -> Iterator[list]:
        return self

    def __next__(self) -> list:
        epoch, batch = divmod(self._position, self.batches_per_epoch)
        if self._order[0] != epoch:
            order = list(range(len(self.examples)))
            random.Random(self.seed + epoch).shuffle(order)
            self._order = (epoch, order)
        first = self.dp_rank * self.per_rank + batch * self.micro_batch_size
        self._position += 1
        return [self.examples[i] for i in self._order[1][first:first + self.micro_batch_size]]

    def _layout(self) -> dict:
        return {"micro_batch_size": self.micro_batch_size, "dp_size": self.dp_size, "seed": self.seed,
                "num_examples": len(self.examples)}

    def close(self) -> None:
        """Nothing to stop: the examples are in memory."""

    def state_dict(self) -> dict:
        epoch, batch_in_epoch = divmod(self._position, self.batches_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        for name, value in self._layout().items():
            if state.get(name) != value:
                raise ValueError(
                    f"loader state has {name}={state.get(name)!r} but this loader has {value!r}: "
                    "it would not continue the same stream"
                )
        for name, limit in (("epoch", None), ("batch_in_epoch", self.batches_per_epoch)):
            value = state.get(name)
            if not isinstance(value, int) or value < 0 or (limit is not None and value >= limit):
                raise ValueError(f"loader state field {name} must be an int in 0..{limit or 'inf'}, got {value!r}")
        self._position = state["epoch"] * self.batches_per_epoch + state["batch_in_epoch"]
