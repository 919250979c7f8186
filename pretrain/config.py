"""The typed run config: one YAML file per run, validated once, plus `--set key=value` overrides; and the
curriculum file, which names a run config per stage.

Section and field names follow the design's training config (docs/design.md), so a block copied
from it parses as is; the three shape fields it keeps under training (vocabulary, JEPA embedding
size, prediction steps) live in the model's section, and their old names still parse (RENAMED).

Every number has one home here; the DeepSpeed JSON in ds_configs/ only carries what DeepSpeed alone
needs (pretrain/parallelize.py fills in the rest and fails loudly where the JSON disagrees with this
file). The model's own section is model/config.py.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.util
import math
import re
import warnings
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
                      field_validator, model_validator)

from cromwell.data.tokenizer import NUM_PREDICTOR_TOKENS
from cromwell.model.config import ModelConfig, Section


class ConfigError(ValueError):
    """A config problem, with the field (and file) it concerns in the message."""


# np.random.seed takes 32 bits, and the loader's generators refuse negative seeds.
Seed = Annotated[int, Field(ge=0, lt=2**32)]
Beta = Annotated[float, Field(ge=0, lt=1)]  # torch's AdamW refuses 1 and beyond

_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_count(value) -> int:
    """Token budgets are written like the design writes them: 5B, 80B, 1.5M, or a plain integer."""
    if isinstance(value, bool):
        raise ValueError(f"expected a count such as 5B or 1000000, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBT]?)\s*", value.upper())
        if m:
            return int(float(m.group(1)) * _SUFFIX.get(m.group(2), 1))
    raise ValueError(f"expected a count such as 5B or 1000000, got {value!r}")


class RunConfig(Section):
    name: str = "run"
    output_dir: str = "runs/run"
    seed: Seed = 1234
    # Start from the model weights of this checkpoint (a global_step<N> folder, or a checkpoint folder:
    # its newest complete one) with a fresh optimizer, schedule and data order: the next curriculum
    # stage. --resume of this run's own checkpoints takes precedence.
    init_from: str | None = None


class ParallelConfig(Section):
    tensor: PositiveInt = 1
    pipeline: PositiveInt = 1
    zero_stage: Literal[0, 1, 2, 3] = 1
    ds_config: str | None = None  # None: ds_configs/zero<stage>.json, or pipeline.json when pipeline > 1
    # Pipeline micro-batches are partitioned by parameter count unless a layer type is given.
    partition_method: str = "parameters"
    activation_checkpointing: bool = False

    @model_validator(mode="after")
    def _zero_with_pipeline(self):
        if self.pipeline > 1 and self.zero_stage != 1:
            raise ValueError(
                f"parallel.zero_stage={self.zero_stage} cannot be combined with parallel.pipeline="
                f"{self.pipeline}: use ZeRO stage 1 (DeepSpeed's pipeline engine does not support "
                "ZeRO-2/3, and reports no gradient norm without ZeRO)"
            )
        return self


class OptimizerConfig(Section):
    type: Literal["adamw"] = "adamw"
    lr: NonNegativeFloat = 3.0e-4  # 0 is allowed: a run that only evaluates, or checks that nothing moves
    beta1: Beta = 0.9
    beta2: Beta = 0.95
    eps: PositiveFloat = 1.0e-8
    weight_decay: NonNegativeFloat = 0.1
    grad_clip: NonNegativeFloat = 1.0  # 0: no clipping (DeepSpeed's gradient_clipping)


class SchedulerConfig(Section):
    type: Literal["cosine_decay", "linear", "constant"] = "cosine_decay"
    warmup_tokens: NonNegativeInt = 5 * 10**9
    warmup_steps: NonNegativeInt | None = None  # when set, replaces warmup_tokens (runs whose steps vary in tokens)
    min_lr: NonNegativeFloat = 1.0e-6

    @field_validator("warmup_tokens", mode="before")
    @classmethod
    def _count(cls, v):
        return parse_count(v)


class MaskingConfig(Section):
    """Which mask each modality gets (docs/design.md, JEPA masking). `language` is for samples without an
    image, `joint` for the text of samples with one; `vision` for the image's patches (block: the design's
    random 16x16-pixel blocks, i.e. patches; multiblock: I-JEPA's target blocks with a disjoint context)."""

    vision: Literal["block", "multiblock"] = "block"
    language: Literal["random", "span"] = "random"
    joint: Literal["random", "span"] = "span"


class MultiblockConfig(Section):
    num_targets: PositiveInt = 4
    scale: tuple[PositiveFloat, PositiveFloat] = (0.15, 0.2)
    aspect: tuple[PositiveFloat, PositiveFloat] = (0.75, 1.5)
    context_scale: tuple[PositiveFloat, PositiveFloat] = (0.85, 1.0)


class CollapseConfig(Section):
    """Representation-collapse monitor (ijepa#25, vjepa2#74): every `every_steps` the trainer logs the
    per-dimension standard deviation and effective rank of the predicted and target embeddings, and
    warns (with stop: true, ends the run) when either falls below its threshold."""

    every_steps: NonNegativeInt = 100  # 0: off
    min_std: NonNegativeFloat = 0.01
    min_rank: NonNegativeFloat = 1.5  # 1 is every embedding on one line
    stop: bool = False


class JepaConfig(Section):
    """How the JEPA objective trains (the JEPA head's shapes are the model's: model.predictor)."""

    mask_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.15
    step_weights: list[NonNegativeFloat] = [1.0, 0.8, 0.6]  # one per model.predictor.prediction_steps
    masking: MaskingConfig = MaskingConfig()
    multiblock: MultiblockConfig = MultiblockConfig()
    span_length: PositiveInt = 32
    loss: Literal["mse", "smooth_l1", "cosine"] = "mse"
    # The EMA target's momentum, linear from the first to the second over the run's steps (I-JEPA).
    momentum: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = (0.996, 1.0)
    collapse: CollapseConfig = CollapseConfig()


class LMConfig(Section):
    context_length: PositiveInt = 4096
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _untied(self):
        if self.tie_embeddings:
            raise ValueError("training.lm.tie_embeddings=true is not supported yet "
                             "(the design trains untied embeddings)")
        return self


class HybridConfig(Section):
    alpha: NonNegativeFloat = 0.3  # JEPA weight; 0: pure LM (no target pass, the JEPA head is frozen)
    beta: NonNegativeFloat = 0.7  # LM weight; 0: pure JEPA (the output projection is frozen)
    # Instruction tuning (stage 4 of the curriculum): the LM loss covers response tokens only, those after an
    # <|assistant|> up to its <|end|>; prompts and text outside any chat are not trained.
    instruction: bool = False
    # Which of the five modules this stage leaves as they are (a language-only stage need not move the ViT).
    freeze: list[Literal["vision_encoder", "cross_modal_fusion", "language_encoder", "autoregressive_head",
                         "jepa_head"]] = []

    @model_validator(mode="after")
    def _weights(self):
        if self.alpha + self.beta == 0:
            raise ValueError("training.hybrid.alpha and training.hybrid.beta are both 0: nothing would be trained")
        return self


class StepJepaConfig(Section):
    """Step-JEPA / LLM-JEPA (docs/design.md, Step-JEPA fine-tuning): loss = lm_weight * LM + jepa_weight *
    JEPA between two views of a chat."""

    mode: Literal["step", "multistep", "two_view"] = "step"
    loss_type: Literal["cosine", "l2", "mse", "infonce"] = "cosine"
    jepa_weight: NonNegativeFloat = 0.1  # lambda in LLM-JEPA's paper (pretrain/step_jepa.py --lbd)
    lm_weight: NonNegativeFloat = 1.0  # gamma there (--gamma)
    # K predictor tokens after the source view, of the tokenizer's reserved ones.
    predictors: Annotated[int, Field(ge=1, le=NUM_PREDICTOR_TOKENS)] = 1
    single_pass: bool = True  # one packed forward; false: the reference two passes
    separator: str = "\n\n"
    temperature: PositiveFloat = 0.1  # infonce only


class TrainingConfig(Section):
    # What the loop optimises (pretrain/objectives/): lm reads token shards (data.shards), step_jepa
    # reads chats (data.chats), hybrid (the VL-JEPA's alpha * JEPA + beta * LM) reads token shards
    # whose samples may hold images.
    objective: Literal["lm", "step_jepa", "hybrid"] = "lm"
    batch_size: PositiveInt = 256
    micro_batch_size: PositiveInt = 4
    gradient_accumulation_steps: PositiveInt | None = 64  # None: derived from the other two and dp size
    train_tokens: PositiveInt = 250 * 10**9
    train_steps: PositiveInt | None = None  # when set, replaces train_tokens (runs whose steps vary in tokens)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    kernels: Literal["fused", "reference"] = "fused"  # reference: plain torch losses, for debugging
    # A step whose loss or gradient is not finite is skipped; this many in a row stop the run.
    max_nonfinite_steps: PositiveInt = 5
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    jepa: JepaConfig = JepaConfig()
    lm: LMConfig = LMConfig()
    hybrid: HybridConfig = HybridConfig()
    step_jepa: StepJepaConfig = StepJepaConfig()

    @field_validator("train_tokens", mode="before")
    @classmethod
    def _count(cls, v):
        return parse_count(v)

    @model_validator(mode="after")
    def _lr_range(self):
        o, s = self.optimizer, self.scheduler
        # Only a decaying schedule reaches min_lr; a constant one never reads it.
        if s.type != "constant" and s.min_lr > o.lr:
            raise ValueError(f"training.scheduler.min_lr ({s.min_lr}) is above training.optimizer.lr ({o.lr}): "
                             "the schedule would rise instead of decay")
        return self


class DataConfig(Section):
    tokenizer: str = "runs/tiny/tokenizer.json"
    # A corpus of token shards (tools/build_shards.py): a directory holding corpus.json and one
    # directory per source, or the same layout at an http(s):// URL.
    shards: str = "runs/tiny/shards"
    # Source name -> weight (any scale: 30/10/... or 0.3/0.1/...); sources left out are not read.
    # None: every source of the corpus by its number of samples.
    mixture: dict[str, NonNegativeFloat] | None = None
    valid_shards: str | None = None  # held-out shards for the validation loop
    chats: str | None = None  # jsonl of {"messages": [...]} records (chat objectives)
    valid_chats: str | None = None
    max_len: PositiveInt = 1024  # chat records are cut to this many tokens
    num_workers: NonNegativeInt = 1  # 0: read in the training process
    seed: Seed = 1234
    shuffle_window: PositiveInt = 8  # shards of a source whose samples are shuffled together
    # A sample that cannot be read (corrupt member, truncated or missing shard): stop with an error
    # naming it, or leave it out of the loss, count it (data_skipped_samples) and go on.
    on_error: Literal["raise", "skip"] = "raise"
    cache_dir: str | None = None  # local copies of remote (http) shards
    cache_limit_gb: PositiveFloat | None = None  # None: keep every shard downloaded
    remote_retries: NonNegativeInt = 5
    remote_backoff_s: NonNegativeFloat = 1.0  # the first retry's wait; each next one waits twice as long
    # Packed sequences: positions restart after every eos and attention stays inside each document.
    document_mask: bool = False


class ValidationConfig(Section):
    every_steps: NonNegativeInt = 0  # 0: no validation loop
    micro_batches: PositiveInt = 8  # per data-parallel rank and evaluation; the same batches every time


class CheckpointConfig(Section):
    model_config = ConfigDict(**Section.model_config, validate_by_name=True, serialize_by_alias=True)

    dir: str | None = None  # None: <run.output_dir>/checkpoints
    every_steps: PositiveInt = 1000
    keep: PositiveInt | None = None  # how many complete checkpoints to leave, the newest; None: all
    # A checkpoint when the run ends (its last step, or --stop-after). false: runs that keep nothing
    # (throughput and smoke runs); a stop signal still checkpoints, so that the run can resume.
    at_end: bool = True
    # `async` in the config (a Python keyword, hence the attribute's name): copy the state to host memory,
    # return to training and write on a thread; the next save and the end of the run wait for it.
    background: bool = Field(False, alias="async")


class WandbConfig(Section):
    enabled: bool = False
    project: str = "cromwell"
    entity: str | None = None
    mode: Literal["online", "offline"] = "offline"  # offline needs no network; `wandb sync` uploads later
    dir: str | None = None  # None: <run.output_dir>

    @model_validator(mode="after")
    def _installed(self):
        # An optional dependency (an offline wheelhouse leaves it out): say so when the config is read, on
        # every rank, rather than fail on rank 0 alone once training has started.
        if self.enabled and importlib.util.find_spec("wandb") is None:
            raise ValueError("logging.wandb.enabled is true but wandb is not installed (pip install wandb; "
                             "it is optional)")
        return self


class LoggingConfig(Section):
    log_every: PositiveInt = 10
    tensorboard: bool = True
    wandb: WandbConfig = WandbConfig()


class Config(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    training: TrainingConfig = TrainingConfig()
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, tree):
        return migrate(tree) if isinstance(tree, dict) else tree

    @model_validator(mode="after")
    def _step_weights(self):
        steps = self.model.predictor.prediction_steps
        if len(self.training.jepa.step_weights) != steps:
            raise ValueError(f"training.jepa.step_weights has {len(self.training.jepa.step_weights)} entries but "
                             f"model.predictor.prediction_steps is {steps}")
        return self

    @model_validator(mode="after")
    def _objective_inputs(self):
        if self.training.objective == "step_jepa" and not self.data.chats:
            raise ValueError("training.objective=step_jepa reads chat records: set data.chats (a jsonl file)")
        if self.model.type == "hf" and (self.parallel.tensor > 1 or self.parallel.pipeline > 1):
            raise ValueError("model.type=hf trains data-parallel only: parallel.tensor and parallel.pipeline must be 1")
        if self.model.type == "hf" and self.parallel.zero_stage == 3:
            raise ValueError("model.type=hf supports parallel.zero_stage 0-2: its weights load whole on every rank, "
                             "which ZeRO-3 is there to avoid")
        if (self.model.type == "vljepa") != (self.training.objective == "hybrid"):
            raise ValueError("training.objective=hybrid trains model.type=vljepa, and a vljepa model trains with the "
                             f"hybrid objective (got objective {self.training.objective!r}, model {self.model.type!r})")
        if self.model.type == "hf" and self.training.objective != "step_jepa":
            raise ValueError("model.type=hf is for chat fine-tuning: use training.objective=step_jepa")
        return self

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run.output_dir) / "checkpoints")

    def batch_sizes(self, world_size: int) -> tuple[int, int, int, int]:
        """(global batch, micro batch, accumulation, data-parallel size), checked against each other.

        This is the one place these four numbers meet: everything else asks here.
        """
        model_parallel = self.parallel.tensor * self.parallel.pipeline
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor ({self.parallel.tensor}) "
                f"x parallel.pipeline ({self.parallel.pipeline})"
            )
        dp = world_size // model_parallel
        t = self.training
        accum = t.gradient_accumulation_steps
        if accum is None:
            if t.batch_size % (t.micro_batch_size * dp):
                raise ConfigError(
                    f"training.batch_size ({t.batch_size}) is not divisible by training.micro_batch_size "
                    f"({t.micro_batch_size}) x data-parallel size ({dp})"
                )
            accum = t.batch_size // (t.micro_batch_size * dp)
        if t.batch_size != t.micro_batch_size * accum * dp:
            raise ConfigError(
                f"training.batch_size ({t.batch_size}) != training.micro_batch_size ({t.micro_batch_size}) "
                f"x training.gradient_accumulation_steps ({accum}) x data-parallel size ({dp}) "
                f"= {t.micro_batch_size * accum * dp}"
            )
        return t.batch_size, t.micro_batch_size, accum, dp

    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step of packed sequences (what token budgets are counted in)."""
        return self.training.batch_size * self.training.lm.context_length

    def train_steps(self) -> int:
        if self.training.train_steps is not None:
            return self.training.train_steps
        return math.ceil(self.training.train_tokens / self.tokens_per_step())

    def warmup_steps(self) -> float:
        s = self.training.scheduler
        return s.warmup_steps if s.warmup_steps is not None else s.warmup_tokens / self.tokens_per_step()


# Keys that moved, old -> new. Everything that decides a tensor's shape lives in the model's section.
RENAMED = {
    "training.lm.vocab_size": "model.vocab_size",
    "training.jepa.embedding_dim": "model.predictor.embedding_dim",
    "training.jepa.prediction_steps": "model.predictor.prediction_steps",
    "training.optimizers": "training.optimizer",  # one optimizer
    "training.step_jepa.lbd": "training.step_jepa.jepa_weight",
    "training.step_jepa.gamma": "training.step_jepa.lm_weight",
}


def migrate(tree: dict, where: str = "the config") -> dict:
    """A config tree with the keys of RENAMED under their new names, saying so once per old key (configs
    and checkpoints written before the move keep working). An old and a new key that disagree are an
    error naming both."""
    tree = copy.deepcopy(tree)
    for old, new in RENAMED.items():
        *parents, leaf = old.split(".")
        node = tree
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        *new_parents, new_leaf = new.split(".")
        target = tree
        for key in new_parents:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ValueError(f"{old} moved to {new}, but {key} is not a section")
        if isinstance(value, dict) and isinstance(target.get(new_leaf), dict):  # a section: merged field by field
            clash = [k for k in value if k in target[new_leaf] and target[new_leaf][k] != value[k]]
            value = {**target[new_leaf], **value} if not clash else value
        else:
            clash = new_leaf in target and target[new_leaf] != value
        if clash:
            raise ValueError(f"{old} ({value!r}) and {new} ({target[new_leaf]!r}) disagree; {old} is the old name of "
                             f"{new}: keep {new} only")
        target[new_leaf] = value
        warnings.warn(f"{where}: config key {old} is now {new}; the old name still works", FutureWarning,
                      stacklevel=2)
    return tree


def _current_name(dotted: str) -> str:
    """An override's key under its current name: `--set training.lm.vocab_size=N` sets model.vocab_size,
    whichever name the file uses."""
    for old, new in RENAMED.items():
        if dotted == old or dotted.startswith(old + "."):
            warnings.warn(f"--set {dotted}: config key {old} is now {new}; the old name still works", FutureWarning,
                          stacklevel=3)
            return new + dotted[len(old):]
    return dotted


def _set_path(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    # YAML parsing gives `--set a.b=3` an int, `=true` a bool, `=[1,2]` a list, as in the file.
    node[keys[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(tree, _current_name(key.strip()), raw)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            # A whole section's check names its values itself; echoing the section would bury it.
            got = "" if isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
            lines.append(f"  {field}: {msg}{got}" if field else f"  {msg}")
        raise ConfigError(f"{path}: invalid config\n" + "\n".join(lines)) from None


# -- the curriculum file (pretrain/curriculum.py runs it, slurm/submit_curriculum.sh submits it) --


class Stage(Section):
    name: str
    config: str
    tokens: PositiveFloat  # share of the curriculum's total_tokens
    set: list[str] = []


class Curriculum(Section):
    output_dir: str
    total_tokens: int
    stages: list[Stage]
    set: list[str] = []  # overrides for every stage

    @field_validator("total_tokens", mode="before")
    @classmethod
    def _count(cls, v):
        return parse_count(v)


def load_curriculum(path: Path) -> Curriculum:
    if not path.is_file():
        raise ConfigError(f"curriculum file not found: {path}")
    try:
        return Curriculum.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as e:
        raise ConfigError(f"{path}: invalid curriculum: {e}") from None


def stage_args(curriculum: Curriculum, overrides: list[str]) -> list[tuple[str, str, list[str], Config]]:
    """(name, run config file, overrides, the loaded config) of every stage, each starting from the
    previous stage's checkpoints."""
    out, previous = [], None
    for stage in curriculum.stages:
        sets = [*curriculum.set, *stage.set, *overrides, f"run.name={stage.name}",
                f"run.output_dir={Path(curriculum.output_dir) / stage.name}",
                f"training.train_tokens={int(stage.tokens * curriculum.total_tokens)}"]
        if previous:
            sets.append(f"run.init_from={previous.checkpoint_dir}")
        previous = load_config(stage.config, sets)
        out.append((stage.name, stage.config, sets, previous))
    return out


def stage_configs(curriculum: Curriculum, overrides: list[str]) -> list[Config]:
    """Every stage's run config, each starting from the previous stage's checkpoints."""
    return [cfg for *_, cfg in stage_args(curriculum, overrides)]


@functools.cache
def _deepspeed_keys() -> frozenset[str]:
    """The top-level keys the installed DeepSpeed reads: its config parser is run on a dict that
    notes every key looked up, so there is no list here to fall behind a DeepSpeed upgrade."""
    from deepspeed.runtime.config import DeepSpeedConfig

    looked_up = set()

    class Recording(dict):
        def __contains__(self, key):
            looked_up.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            looked_up.add(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            looked_up.add(key)
            return super().get(key, default)

        def keys(self):  # DeepSpeed often asks `key in d.keys()`
            return self

    # Batch sizes that fit any world size, so the parser gets through with nothing else set.
    DeepSpeedConfig(Recording(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
    return frozenset(looked_up)


def check_deepspeed_keys(ds: dict, source: str) -> None:
    """Refuse top-level keys DeepSpeed does not read: it ignores them, so a misspelt section would
    silently fall back to DeepSpeed's defaults. (Keys inside zero_optimization, bf16 and the other
    sections DeepSpeed parses with pydantic models are already refused by DeepSpeed itself.)"""
    known = _deepspeed_keys()
    unknown = [key for key in ds if key not in known]
    if unknown:
        named = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            named.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{source}: DeepSpeed does not read {', '.join(named)} (it ignores unknown keys silently)")
