"""The model's typed config. The run config (pretrain/config.py) embeds it as its `model` section, so
a model can be built, tested and benchmarked without the trainer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, model_validator


class Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default. A NaN or infinite
    # number is refused too: it would only surface as a NaN loss or a crash steps later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class HFConfig(Section):
    """A local Hugging Face causal LM (model.type: hf), optionally with LoRA adapters."""

    path: str | None = None
    lora: bool = False
    lora_rank: PositiveInt = 16
    lora_alpha: PositiveInt | None = None  # None: 2 x lora_rank
    lora_targets: list[str] = list(DEFAULT_LORA_TARGETS)
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


class ModelConfig(Section):
    type: Literal["gpt", "hf"] = "gpt"  # gpt: the project's model below; hf: model.hf.path
    hidden_size: PositiveInt = 1024
    num_layers: PositiveInt = 24
    num_heads: PositiveInt = 16
    ffn_hidden_size: PositiveInt | None = None  # None: SwiGLU's 8/3 * hidden, rounded up to 64
    norm_eps: PositiveFloat = 1e-5
    rope_theta: PositiveFloat = 10000.0
    init_std: PositiveFloat = 0.02
    # Megatron's make-vocab-size-divisible-by, but not multiplied by the TP size: the padded
    # vocabulary (and so every checkpoint) is the same at every TP size that divides it.
    make_vocab_size_divisible_by: PositiveInt = 128
    hf: HFConfig = HFConfig()

    @model_validator(mode="after")
    def _shapes(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("model.hidden_size / model.num_heads must be even (RoPE rotates pairs)")
        if self.type == "hf" and not self.hf.path:
            raise ValueError("model.type=hf needs model.hf.path (a local Hugging Face model directory)")
        return self

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return -(-(8 * self.hidden_size // 3) // 64) * 64

    def padded_vocab_size(self, vocab_size: int, tp: int = 1) -> int:
        """vocab_size rounded up to make_vocab_size_divisible_by; the same for every TP size, which
        must divide it (so each rank's shard is equal)."""
        multiple = self.make_vocab_size_divisible_by
        padded = -(-vocab_size // multiple) * multiple
        if padded % tp:
            raise ValueError(
                f"the padded vocabulary ({padded} = training.lm.vocab_size {vocab_size} rounded up to "
                f"model.make_vocab_size_divisible_by {multiple}) is not divisible by parallel.tensor ({tp}); "
                f"set model.make_vocab_size_divisible_by to a multiple of {tp}"
            )
        return padded
