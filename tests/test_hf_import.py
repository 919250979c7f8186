"""A Hugging Face Llama starts a run (run.init_from, pretrain/checkpoint/hf_import.py): a tiny
LlamaForCausalLM saved here is imported into the GPT at TP=2 x PP=2 and at TP=1 and into the VL-JEPA's
language path at TP=2 x PP=2; a run at learning rate 0 saves what it imported, and that model's logits
equal transformers' on the same tokens; a run that trains from it starts at the same loss and learns;
a config or vocabulary that does not fit is an error naming each difference.

Tolerance: 1e-4 absolute on the logits, as for the exports in tests/test_convert.py (fp32, another
program's arithmetic: measured differences are about 1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state

from conftest import TINY_MODEL, launch, run, tiny_overrides, vl_sets, PYTHON

TOKENS = [5, 17, 300, 42, 42, 9, 511, 120, 64, 3]
TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def process_group():
    from cromwell.pretrain.config import load_config
    from cromwell.pretrain.distributed import init_distributed

    init_distributed(load_config("pretrain/configs/tiny.yaml"))
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def make_llama(tokenizer: str, out: Path, vocab: int = 512, **overrides) -> Path:
    """A LlamaForCausalLM of the tiny model's shapes, every tensor random (norm gains too), saved with the
    run's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    fields = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
                  tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**fields, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.05)
    model.save_pretrained(out, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_file=tokenizer).save_pretrained(out)
    return out


def llama_logits(path: Path, tokens: list[int]) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


@pytest.fixture(scope="module")
def llama(tiny_data, tmp_path_factory) -> Path:
    return make_llama(tiny_data["tokenizer"], tmp_path_factory.mktemp("llama") / "llama")


def _imported(out: Path, *, nproc: int, args: list[str]) -> Path:
    """Train one step at learning rate 0 (nothing moves) and return the checkpoint it saved."""
    frozen = ["--set", "training.optimizer.lr=0", "--set", "training.scheduler.min_lr=0", "--set", "training.train_steps=1"]
    launch("pretrain/train.py", ["--config", "pretrain/configs/tiny.yaml", *args, *frozen], nproc)
    return out / "checkpoints" / "global_step1"


def _loaded(tag_dir: Path):
    from cromwell.pretrain.checkpoint.load import load, locate

    return load(locate(tag_dir))


LAYOUTS = {"tp2pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1"]),
           "tp1": (1, ["parallel.zero_stage=0"])}


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_gpt_imports_a_llama_with_its_logits(tiny_data, llama, tmp_path, layout):
    nproc, sets = LAYOUTS[layout]
    out = tmp_path / "run"
    tag_dir = _imported(out, nproc=nproc, args=[*tiny_overrides(tiny_data, out),
                                               *_sets([*sets, f"run.init_from={llama}", "training.batch_size=8",
                                                       "training.micro_batch_size=2"])])
    loaded = _loaded(tag_dir)
    with torch.no_grad():
        ours = (loaded.model(torch.tensor([TOKENS]))[0] @ loaded.model.output_weight.T)[:, :512]
    want = llama_logits(llama, TOKENS)
    assert torch.allclose(ours, want, rtol=0, atol=TOLERANCE), (ours - want).abs().max()


def test_the_vljepa_language_path_imports_a_llama(vl_data, tmp_path):
    from test_convert import text_logits

    llama = make_llama(vl_data["tokenizer"], tmp_path / "llama", vocab=600)
    out = tmp_path / "run"
    tag_dir = _imported(out, nproc=4, args=vl_sets(vl_data, out, "parallel.tensor=2", "parallel.pipeline=2",
                                                  "parallel.zero_stage=1", f"run.init_from={llama}"))
    loaded = _loaded(tag_dir)
    ours = text_logits(loaded.cfg, loaded.model, TOKENS)
    want = llama_logits(llama, TOKENS)
    assert torch.allclose(ours, want, rtol=0, atol=TOLERANCE), (ours - want).abs().max()


def test_training_continues_from_a_llama(tiny_data, llama, tmp_path):
    """The first step's loss is the imported model's (the lr-0 run's, on the same first batch); then it learns."""
    common = [*TINY_MODEL, "training.batch_size=8", "training.micro_batch_size=2", f"run.init_from={llama}",
              "parallel.zero_stage=1", "training.scheduler.warmup_tokens=0"]
    frozen, trained = tmp_path / "frozen", tmp_path / "trained"
    _imported(frozen, nproc=2, args=[*tiny_overrides(tiny_data, frozen), *_sets(common)])
    launch("pretrain/train.py", ["--config", "pretrain/configs/tiny.yaml", *tiny_overrides(tiny_data, trained),
                                 *_sets([*common, "training.train_steps=8"])], 2)
    first = json.loads((frozen / "metrics.jsonl").read_text().splitlines()[0])
    losses = [json.loads(x)["loss"] for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] == pytest.approx(first["loss"], rel=1e-6)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses


def test_a_llama_that_does_not_fit_is_refused_naming_each_difference(tiny_data, tmp_path):
    from cromwell.pretrain.checkpoint import CheckpointError
    from cromwell.pretrain.checkpoint.hf_import import check
    from cromwell.pretrain.config import load_config

    cfg = load_config("pretrain/configs/tiny.yaml", [*TINY_MODEL, f"data.tokenizer={tiny_data['tokenizer']}"])
    other = make_llama(tiny_data["tokenizer"], tmp_path / "other", hidden_size=32, num_key_value_heads=2,
                       rope_theta=500000.0)
    with pytest.raises(CheckpointError) as e:
        check(other, cfg)
    message = str(e.value)
    assert "hidden_size 32 != model.hidden_size 64" in message
    assert "rope_theta 500000.0 != model.rope_theta 10000.0" in message
    assert "num_key_value_heads 2: the model has one key/value head per query head" in message
    assert "head_dim" not in message  # 32 / 4 is the Llama's own head size: only the hidden size differs
    # Another vocabulary: two tokens swapped in the Llama's tokenizer.
    swapped = make_llama(tiny_data["tokenizer"], tmp_path / "swapped")
    tokenizer = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab)[100], sorted(vocab)[200]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(CheckpointError, match=r"tokenizer: 2 tokens have other ids than in data.tokenizer"):
        check(swapped, cfg)
    # Through the trainer: the same message, and the run stops before training.
    out = tmp_path / "run"
    proc = run([PYTHON, "pretrain/train.py", "--config", "pretrain/configs/tiny.yaml", *tiny_overrides(tiny_data, out),
                *_sets([f"run.init_from={other}", "parallel.zero_stage=0"])], check=False)
    assert proc.returncode != 0 and "hidden_size 32 != model.hidden_size 64" in proc.stdout + proc.stderr
    assert not (out / "metrics.jsonl").exists()


def test_the_converter_makes_a_llama_a_checkpoint_of_any_layout(tiny_data, llama, tmp_path):
    """--to-deepspeed from the Llama with the run config it starts: a step-0 checkpoint at TP=2 x PP=2 whose
    model has the Llama's logits, and which a run resumes from."""
    import yaml

    from cromwell.pretrain.config import load_config

    cfg = load_config("pretrain/configs/tiny.yaml", [*TINY_MODEL, f"data.tokenizer={tiny_data['tokenizer']}",
                                                     f"data.shards={tiny_data['shards']}", "training.batch_size=8",
                                                     "training.micro_batch_size=2", "training.train_steps=2"])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "converted"
    run([PYTHON, "tools/convert_ckpt.py", "--to-deepspeed", "--checkpoint", str(llama), "--config", str(config),
         "--out", str(out), "--tp", "2", "--pp", "2", "--zero", "1"])
    loaded = _loaded(out / "checkpoints" / "global_step0")
    with torch.no_grad():
        ours = (loaded.model(torch.tensor([TOKENS]))[0] @ loaded.model.output_weight.T)[:, :512]
    want = llama_logits(llama, TOKENS)
    assert torch.allclose(ours, want, rtol=0, atol=TOLERANCE), (ours - want).abs().max()
    launch("pretrain/train.py", ["--config", str(out / "run_config.yaml"), "--resume"], 4)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
