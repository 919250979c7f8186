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


def swiglu_size(hidden: int) -> int:
    """SwiGLU's 8/3 x hidden (its three matrices cost what GELU's two at 4x do), rounded up to 64."""
    return -(-(8 * hidden // 3) // 64) * 64


class HFConfig(Section):
    """A local Hugging Face causal LM (model.type: hf), optionally with LoRA adapters."""

    path: str | None = None
    lora: bool = False
    lora_rank: PositiveInt = 16
    lora_alpha: PositiveInt | None = None  # None: 2 x lora_rank
    lora_targets: list[str] = list(DEFAULT_LORA_TARGETS)
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


class VisionConfig(Section):
    """The ViT of model.type=vljepa (model/vit.py): pre-norm blocks over image_size/patch_size squared
    patches."""

    image_size: PositiveInt = 256
    patch_size: PositiveInt = 16
    hidden_size: PositiveInt = 1024
    num_layers: PositiveInt = 24
    num_heads: PositiveInt = 16
    ffn_hidden_size: PositiveInt | None = None  # None: 8/3 * hidden, rounded up to 64
    norm_eps: PositiveFloat = 1e-6

    @model_validator(mode="after")
    def _shapes(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"model.vision.image_size ({self.image_size}) must be divisible by "
                             f"model.vision.patch_size ({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.vision.hidden_size ({self.hidden_size}) must be divisible by "
                             f"model.vision.num_heads ({self.num_heads})")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or swiglu_size(self.hidden_size)


class FusionConfig(Section):
    """Cross-modal fusion (model/fusion.py): a gated cross-attention block after every `every`
    language blocks, reading the projected vision tokens."""

    every: PositiveInt = 4


class PredictorConfig(Section):
    """The JEPA head (model/jepa.py): projections of both encoders' states to `embedding_dim`, a vision
    predictor (a narrow transformer of `num_layers` at that width) and a text predictor for each of
    `prediction_steps` steps ahead."""

    embedding_dim: PositiveInt = 512
    prediction_steps: PositiveInt = 3
    num_layers: PositiveInt = 4
    num_heads: PositiveInt = 8


class ModelConfig(Section):
    # gpt: the project's language model below; hf: model.hf.path; vljepa: the vision-language JEPA
    # (the language model below plus model.vision, model.fusion and model.predictor)
    type: Literal["gpt", "hf", "vljepa"] = "gpt"
    # Rows of the embedding and the output projection before padding: at least the tokenizer's vocabulary
    # (model.type hf: the model's own tokenizer decides).
    vocab_size: PositiveInt = 50000
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
    vision: VisionConfig = VisionConfig()
    fusion: FusionConfig = FusionConfig()
    predictor: PredictorConfig = PredictorConfig()

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
        return self.ffn_hidden_size or swiglu_size(self.hidden_size)

    def padded_vocab_size(self, tp: int = 1) -> int:
        """vocab_size rounded up to make_vocab_size_divisible_by; the same for every TP size, which must
        divide it (so each rank's shard is equal)."""
        vocab_size = self.vocab_size
        multiple = self.make_vocab_size_divisible_by
        padded = -(-vocab_size // multiple) * multiple
        if padded % tp:
            raise ValueError(
                f"the padded vocabulary ({padded} = model.vocab_size {vocab_size} rounded up to "
                f"model.make_vocab_size_divisible_by {multiple}) is not divisible by parallel.tensor ({tp}); "
                f"set model.make_vocab_size_divisible_by to a multiple of {tp}"
            )
        return padded
