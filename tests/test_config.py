"""The run config: every field the design names parses, and every bad value is an error naming its field."""

import json
import types
import typing
from pathlib import Path

import pytest
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from pydantic import BaseModel, ValidationError

from cromwell.pretrain.config import Config, ConfigError, check_deepspeed_keys, load_config, parse_count
from cromwell.pretrain.distributed import nccl_environment
from cromwell.pretrain.parallelize import deepspeed_config

TINY = "pretrain/configs/tiny.yaml"


def test_design_defaults_and_tiny_config():
    cfg = load_config(TINY, ["training.batch_size=256", "training.micro_batch_size=4",
                             "training.gradient_accumulation_steps=64"])
    assert cfg.batch_sizes(world_size=1) == (256, 4, 64, 1)
    o = cfg.training.optimizer
    assert (o.beta1, o.beta2, o.weight_decay, o.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert cfg.training.hybrid.alpha == 0.3 and cfg.training.hybrid.beta == 0.7
    assert cfg.training.lm.tie_embeddings is False


def test_counts_parse_like_the_design_writes_them():
    assert parse_count("5B") == 5_000_000_000
    assert parse_count("1.5M") == 1_500_000
    assert parse_count(1024) == 1024
    with pytest.raises(ValueError, match="5 apples"):
        parse_count("5 apples")


def test_set_overrides_parse_yaml_values():
    cfg = load_config(TINY, ["model.num_layers=7", "training.jepa.step_weights=[1.0, 0.5, 0.25]",
                             "training.scheduler.warmup_tokens=2M"])
    assert cfg.model.num_layers == 7
    assert cfg.training.jepa.step_weights == [1.0, 0.5, 0.25]
    assert cfg.training.scheduler.warmup_tokens == 2_000_000


def test_accumulation_is_derived_when_left_out():
    cfg = load_config(TINY)  # batch 16, micro 4, accumulation null
    assert cfg.batch_sizes(world_size=2) == (16, 4, 2, 2)
    assert cfg.batch_sizes(world_size=4) == (16, 4, 1, 4)


@pytest.mark.parametrize(
    "override,message",
    [
        (["training.lm.vocab_siz=3"], "training.lm.vocab_siz: Extra inputs are not permitted"),
        (["training.batch_size=many"], "training.batch_size: Input should be a valid integer"),
        (["parallel.zero_stage=4"], "parallel.zero_stage"),
        (["parallel.pipeline=2", "parallel.zero_stage=2"], "parallel.zero_stage=2 cannot be combined with parallel.pipeline=2"),
        (["model.predictor.prediction_steps=2"], "training.jepa.step_weights has 3 entries but model.predictor.prediction_steps is 2"),
        (["model.hidden_size=100", "model.num_heads=3"], "model.hidden_size (100) must be divisible by model.num_heads (3)"),
        (["training.hybrid.alpha=0", "training.hybrid.beta=0"], "training.hybrid.alpha and training.hybrid.beta are both 0"),
        (["training"], "--set expects key=value"),
        (["training.lm.tie_embeddings=true"], "training.lm.tie_embeddings=true is not supported yet"),
        (["training.objective=step_jepa"], "training.objective=step_jepa reads chat records: set data.chats"),
        (["model.type=hf"], "model.type=hf needs model.hf.path"),
        (["model.type=hf", "model.hf.path=x", "training.objective=step_jepa", "data.chats=c.jsonl",
          "parallel.zero_stage=3"], "model.type=hf supports parallel.zero_stage 0-2"),
        (["training.step_jepa.predictors=9"], "training.step_jepa.predictors: Input should be less than or equal to 8 (got 9)"),
        (["training.step_jepa.mode=steps"], "training.step_jepa.mode"),
        (["training.train_steps=0"], "training.train_steps: Input should be greater than 0 (got 0)"),
        (["model.make_vocab_size_divisible_by=0"], "model.make_vocab_size_divisible_by: Input should be greater than 0 (got 0)"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, override)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("training.optimizer.lr=-1.0e-4", "training.optimizer.lr: Input should be greater than or equal to 0 (got -0.0001)"),
        ("training.optimizer.lr=.nan", "training.optimizer.lr: Input should be a finite number (got nan)"),
        ("training.optimizer.lr=nan", "training.optimizer.lr: Input should be a finite number (got 'nan')"),
        ("training.optimizer.lr=.inf", "training.optimizer.lr: Input should be a finite number (got inf)"),
        ("checkpoint.every_steps=0", "checkpoint.every_steps: Input should be greater than 0 (got 0)"),
        ("logging.log_every=0", "logging.log_every: Input should be greater than 0 (got 0)"),
        ("data.num_workers=-1", "data.num_workers: Input should be greater than or equal to 0 (got -1)"),
        ("training.optimizer.beta2=1", "training.optimizer.beta2: Input should be less than 1 (got 1)"),
        ("training.optimizer.eps=0", "training.optimizer.eps: Input should be greater than 0 (got 0)"),
        ("training.scheduler.min_lr=0.01",
         "training: training.scheduler.min_lr (0.01) is above training.optimizer.lr (0.003): the schedule would rise"),
        ("training.jepa.step_weights=[1, -0.5, 0]",
         "training.jepa.step_weights.1: Input should be greater than or equal to 0 (got -0.5)"),
        ("training.jepa.mask_ratio=1", "training.jepa.mask_ratio: Input should be less than 1 (got 1)"),
        ("run.seed=4294967296", "run.seed: Input should be less than 4294967296 (got 4294967296)"),
    ],
)
def test_out_of_range_numbers_name_the_field_and_value(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert message in str(e.value)


def _numeric_fields(model: type[BaseModel], prefix: str = ""):
    """Dotted paths of every int or float field (optional or not) of the run config."""
    for name, field in model.model_fields.items():
        kind = field.annotation
        kinds = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
        # Outside a union pydantic moves the bounds to the field; inside one they stay Annotated.
        kinds = [typing.get_args(k)[0] if typing.get_origin(k) is typing.Annotated else k for k in kinds]
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _numeric_fields(kind, f"{prefix}{name}.")
        elif any(k in (int, float) for k in kinds):
            yield f"{prefix}{name}"


NUMERIC_FIELDS = list(_numeric_fields(Config))


def test_every_numeric_field_is_found():
    assert {"training.optimizer.lr", "training.train_steps", "model.hf.lora_alpha", "run.seed"} <= set(NUMERIC_FIELDS)
    assert "parallel.zero_stage" not in NUMERIC_FIELDS  # a Literal: its own error


@pytest.mark.parametrize("path", NUMERIC_FIELDS)
@pytest.mark.parametrize("value", ["-1", ".nan"])
def test_every_numeric_field_has_a_range(path, value):
    # No field of the run config means anything below 0, nor NaN.
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"{path}={value}"])
    assert f"  {path}: " in str(e.value)


def test_lr_zero_and_constant_schedule_are_accepted():
    cfg = load_config(TINY, ["training.optimizer.lr=0", "training.scheduler.min_lr=0"])
    assert cfg.training.optimizer.lr == 0
    # A constant schedule never reaches min_lr, so min_lr above lr does not matter.
    load_config(TINY, ["training.optimizer.lr=0", "training.scheduler.type=constant"])


def test_inconsistent_batch_numbers_name_all_fields():
    cfg = load_config(TINY, ["training.batch_size=256", "training.gradient_accumulation_steps=64"])
    with pytest.raises(ConfigError) as e:
        cfg.batch_sizes(world_size=2)
    assert str(e.value) == (
        "training.batch_size (256) != training.micro_batch_size (4) x training.gradient_accumulation_steps "
        "(64) x data-parallel size (2) = 512"
    )
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        load_config(TINY, ["parallel.tensor=2"]).batch_sizes(world_size=3)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_deepspeed_config_takes_numbers_from_the_run_config(tmp_path):
    cfg = load_config(TINY, ["parallel.zero_stage=3"])
    ds = deepspeed_config(cfg, world_size=2, device="cpu")
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is False


def test_deepspeed_json_disagreeing_with_run_config_is_an_error(tmp_path):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {}}))
    cfg = load_config(TINY, [f"parallel.ds_config={ds_file}"])
    with pytest.raises(ConfigError) as e:
        deepspeed_config(cfg, world_size=2, device="cpu")
    assert "train_micro_batch_size_per_gpu = 8 disagrees with training.micro_batch_size" in str(e.value)
    ds_file.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="'optimizer' is set in the DeepSpeed JSON"):
        deepspeed_config(cfg, world_size=2, device="cpu")


@pytest.mark.parametrize("sets", [["parallel.zero_stage=1"], ["parallel.zero_stage=2"], ["parallel.zero_stage=3"],
                                  ["parallel.pipeline=2", "parallel.zero_stage=1"]])
def test_zero_communication_settings_follow_the_device(sets):
    cfg = load_config(TINY, sets)
    gpu = deepspeed_config(cfg, world_size=2, device="cuda")["zero_optimization"]
    cpu = deepspeed_config(cfg, world_size=2, device="cpu")["zero_optimization"]
    assert (gpu["overlap_comm"], gpu["reduce_bucket_size"], gpu["allgather_bucket_size"]) == (True, 5e8, 5e8)
    assert (cpu["overlap_comm"], cpu["reduce_bucket_size"], cpu["allgather_bucket_size"]) == (False, 5e7, 5e7)
    assert deepspeed_config(load_config(TINY, ["parallel.zero_stage=0"]), 2, "cuda")["zero_optimization"] == {"stage": 0}


def test_zero_communication_settings_of_the_json_are_kept_on_either_device(tmp_path):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 2e7}}))
    cfg = load_config(TINY, [f"parallel.ds_config={ds_file}", "parallel.zero_stage=2"])
    for device, allgather in (("cuda", 5e8), ("cpu", 5e7)):
        zero = deepspeed_config(cfg, world_size=2, device=device)["zero_optimization"]
        assert (zero["overlap_comm"], zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (False, 2e7, allgather)


def test_nccl_environment_for_one_node_many_nodes_and_tensor_parallelism():
    one_node = {"WORLD_SIZE": "8", "LOCAL_SIZE": "8", "RANK": "3"}  # the deepspeed launcher's variables
    assert nccl_environment(one_node, 1) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN",
                                             "NCCL_SOCKET_IFNAME": "lo"}
    assert nccl_environment({"WORLD_SIZE": "1"}, 2)["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    two_nodes = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "NCCL_DEBUG": "INFO"}  # torchrun's
    assert nccl_environment(two_nodes, 1) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def test_wandb_enabled_without_wandb_installed_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="logging.wandb.enabled is true but wandb is not installed"):
        load_config(TINY, ["logging.wandb.enabled=true"])
    assert load_config(TINY).logging.wandb.enabled is False


def test_bf16_on_cpu_is_refused():
    cfg = load_config(TINY, ["training.precision=bf16"])
    with pytest.raises(ConfigError, match="training.precision=bf16 needs a GPU"):
        deepspeed_config(cfg, world_size=1, device="cpu")


def test_train_and_warmup_steps_come_from_tokens_or_steps():
    cfg = load_config(TINY)  # 1.2M tokens, warmup 60K, 16 x 256 tokens per step
    assert cfg.train_steps() == -(-1_200_000 // 4096) and cfg.warmup_steps() == pytest.approx(60_000 / 4096)
    cfg = load_config(TINY, ["training.train_steps=7", "training.scheduler.warmup_steps=2"])
    assert cfg.train_steps() == 7 and cfg.warmup_steps() == 2


@pytest.mark.parametrize("path", sorted(Path("ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_deepspeed_jsons_have_only_known_keys(path):
    check_deepspeed_keys(json.loads(path.read_text()), str(path))


def test_unknown_deepspeed_keys_are_named_with_the_closest_known_key():
    ds = {"zero_optimisation": {"stage": 1}, "gradient_clipping": 1.0, "flops_profiler": {}, "xyzzy": 1}
    with pytest.raises(ConfigError) as e:
        check_deepspeed_keys(ds, "my_ds.json")
    assert str(e.value) == ("my_ds.json: DeepSpeed does not read 'zero_optimisation' (did you mean "
                            "'zero_optimization'?), 'xyzzy' (it ignores unknown keys silently)")


def test_deepspeed_refuses_unknown_zero_keys_itself():
    # Why check_deepspeed_keys looks at the top level only: DeepSpeed's pydantic section models
    # refuse what they do not know. Should a DeepSpeed upgrade stop doing so, this fails.
    with pytest.raises(ValidationError, match="reduce_bucket_sise"):
        DeepSpeedZeroConfig(stage=1, reduce_bucket_sise=10)


def test_shape_fields_under_their_old_names_still_parse_with_a_warning():
    with pytest.warns(FutureWarning, match="training.lm.vocab_size is now model.vocab_size"):
        cfg = load_config(TINY, ["training.lm.vocab_size=600", "training.jepa.embedding_dim=64",
                                 "training.jepa.prediction_steps=2", "training.jepa.step_weights=[1, 0.5]"])
    assert (cfg.model.vocab_size, cfg.model.predictor.embedding_dim, cfg.model.predictor.prediction_steps) == (600, 64, 2)
    assert "vocab_size" not in cfg.training.lm.model_dump()


def test_an_old_and_a_new_name_in_one_file_that_disagree_are_an_error(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("model:\n  vocab_size: 700\ntraining:\n  lm:\n    vocab_size: 600\n")
    with pytest.raises(ConfigError, match=r"training.lm.vocab_size \(600\) and model.vocab_size \(700\) disagree"):
        load_config(path)


def test_an_old_section_name_is_merged_into_the_new_one(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("training:\n  optimizers:\n    lr: 0.002\n  optimizer:\n    beta2: 0.9\n")
    with pytest.warns(FutureWarning, match="training.optimizers is now training.optimizer"):
        cfg = load_config(path, ["training.optimizers.weight_decay=0.0"])
    o = cfg.training.optimizer
    assert (o.lr, o.beta2, o.weight_decay) == (0.002, 0.9, 0.0)

