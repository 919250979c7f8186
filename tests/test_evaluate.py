"""tools/evaluate.py on real checkpoints (conftest's vl_layouts: the VL-JEPA trained 3 steps in each layout)
and on a tiny Hugging Face Llama: perplexity is exp of the mean token loss computed here independently, every
layout (and TP=2 evaluation) scores alike, JEPA scores are sane, and the generation tasks run through the
same path for both kinds of model, with a report in JSON and Markdown."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED_DATA, launch
from cromwell.data.loader import TokenBatches
from cromwell.data.multimodal import JEPASamples
from cromwell.data.tokenizer import PAD_ID
from cromwell.pretrain.checkpoint import safe_load
from cromwell.pretrain.config import Config


def evaluate(tmp_path: Path, *args, nproc: int = 1) -> dict:
    out = tmp_path / "report.json"
    launch("tools/evaluate.py", [*args, "--out", str(out)], nproc)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def process_group():
    from megatron.core import parallel_state

    from cromwell.pretrain.config import load_config
    from cromwell.pretrain.distributed import init_distributed

    init_distributed(load_config("pretrain/configs/tiny.yaml"))
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@torch.no_grad()
def independent_perplexity(tag_dir: Path, valid_shards: str, micro: int) -> tuple[float, int]:
    """exp(mean next-token loss) over the held-out samples evaluate.py reads (every sample once, in the
    loader's order, whole micro batches), with the weights read by torch alone and torch's cross-entropy."""
    from cromwell.model.gpt import megatron_config
    from cromwell.model.build import build

    states = safe_load(tag_dir / "mp_rank_00_model_states.pt")
    cfg = Config.model_validate(states["config"])
    model = build(cfg.model, megatron_config(1))
    model.load_state_dict({k.removeprefix("model."): v for k, v in states["module"].items() if v is not None})
    v = cfg.model.vision
    loader = TokenBatches(valid_shards, weights=None, vocab_size=cfg.model.vocab_size, global_batch=micro,
                          micro_batch_size=micro, dp_rank=0, dp_size=1, seed=cfg.data.seed,
                          sample_fn=JEPASamples(seed=0, pad_id=PAD_ID, image_size=v.image_size,
                                                patch_size=v.patch_size, masks=False))
    samples = sum(m.num_samples for m in loader.plan.manifests)
    total, tokens = 0.0, 0
    for _ in range(samples // micro):
        ids, labels, extras = next(loader)
        rows = [i for i, e in enumerate(extras) if "patches" in e]
        patches = torch.from_numpy(np.stack([extras[i]["patches"] for i in rows]))
        _, hidden = model(ids, patches, torch.tensor(rows))
        logits = (hidden @ model.output_weight.T).double()
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
        tokens += int((labels != -100).sum())
    loader.close()
    return float(np.exp(total / tokens)), tokens


def test_perplexity_is_exp_of_the_mean_token_loss(process_group, vl_layouts, vl_data, tmp_path):
    tag_dir = vl_layouts["single"]["checkpoint"]
    report = evaluate(tmp_path, "--checkpoint", f"single={tag_dir}", "--tasks", "perplexity",
                      "--valid-shards", vl_data["valid_shards"])
    ppl, tokens = independent_perplexity(tag_dir, vl_data["valid_shards"], 2)
    assert report["single"]["perplexity"]["tokens"] == tokens > 1000
    assert report["single"]["perplexity"]["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert (tmp_path / "report.md").read_text().startswith("| metric | single |")


def test_every_layout_scores_alike_and_tp2_evaluates_as_one_process(vl_layouts, vl_data, tmp_path):
    """The layouts' checkpoints (same init and batches; weights within 6e-6 of each other) give the same
    scores, read by one process; the TP=2 checkpoint read by two tensor-parallel ranks gives its own."""
    names = ["single", "tp2", "zero3", "pp2", "tp2pp2"]
    args = [a for n in names for a in ("--checkpoint", f"{n}={vl_layouts[n]['checkpoint']}")]
    report = evaluate(tmp_path, *args, "--tasks", "perplexity,jepa_mse", "--valid-shards", vl_data["valid_shards"])
    for name in names[1:]:
        for task, metric in (("perplexity", "ppl"), ("jepa_mse", "jepa_mse"), ("jepa_mse", "jepa_cosine")):
            assert report[name][task][metric] == pytest.approx(report["single"][task][metric], rel=1e-4), (name, metric)
    jepa = report["single"]["jepa_mse"]
    assert jepa["jepa_mse"] > 0 and -1 <= jepa["jepa_cosine"] <= 1 and 1 <= jepa["jepa_rank"] <= 64
    tp = evaluate(tmp_path / "tp", "--tp", "2", "--checkpoint", f"tp2={vl_layouts['tp2']['checkpoint']}", "--tasks",
                  "perplexity", "--valid-shards", vl_data["valid_shards"], nproc=2)
    assert tp["tp2"]["perplexity"]["ppl"] == pytest.approx(report["tp2"]["perplexity"]["ppl"], rel=1e-5)


def test_a_stage_with_frozen_modules_evaluates(vl_data, tmp_path):
    """Stage 1 trains no output projection (beta 0) and stage 2 no vision encoder: under ZeRO-1 over two ranks a
    frozen parameter is in no optimizer partition, only in the module's weights, which is where it is read.
    An instruction-tuned stage's perplexity counts every token, not only the answers it trained on."""
    from conftest import vl_sets

    for name, more in (("no_head", ["training.hybrid.beta=0", "training.hybrid.alpha=1"]),
                       ("no_vision", ["training.hybrid.alpha=0", "training.hybrid.instruction=true",
                                      "training.hybrid.freeze=[vision_encoder, cross_modal_fusion]"])):
        launch("pretrain/train.py", ["--config", "pretrain/configs/tiny.yaml",
                                     *vl_sets(vl_data, tmp_path / name, "training.train_steps=2", "parallel.zero_stage=1")
                                     + [a for s in more for a in ("--set", s)]], 2)
    report = evaluate(tmp_path, "--checkpoint", f"no_head={tmp_path / 'no_head'}", "--checkpoint",
                      f"no_vision={tmp_path / 'no_vision'}", "--tasks", "perplexity,jepa_mse", "--valid-shards",
                      vl_data["valid_shards"])
    for name in ("no_head", "no_vision"):
        assert report[name]["perplexity"]["ppl"] > 1 and report[name]["perplexity"]["tokens"] > 1000
        assert report[name]["jepa_mse"]["jepa_mse"] > 0


def test_image_to_code_reads_each_pair_and_scores_per_kind(vl_layouts, vl_data, tmp_path):
    pairs = Path(vl_data["shards"]).parent / "pairs"
    report = evaluate(tmp_path, "--checkpoint", f"single={vl_layouts['single']['checkpoint']}", "--tasks",
                      "image_to_code", "--pairs", str(pairs), "--limit", "10", "--max-new-tokens", "24")
    result = report["single"]["image_to_code"]
    assert sum(result[kind]["n"] for kind in ("code", "chart", "ui", "statement", "doc")) == 10
    assert len(result["examples"]) == 10


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from cromwell.tools.tiny_hf_model import build_tiny_llama

    text = ["Natural language to regular expressions. Question: what is 2 + 3? Answer: 5.\n" * 20]
    return build_tiny_llama(str(tmp_path_factory.mktemp("llama") / "llama"), text, hidden=64, layers=2)


def test_a_hugging_face_model_is_scored_by_the_same_code(tiny_llama, tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: HumanEval, GSM8K and NL-RX come from ../shared/data")
    report = evaluate(tmp_path, "--checkpoint", f"llama={tiny_llama}", "--tasks", "perplexity,humaneval,gsm8k,nlrx",
                      "--limit", "3", "--max-new-tokens", "16", "--samples", "2")
    llama = report["llama"]
    assert "skipped" in llama["perplexity"]
    assert llama["gsm8k"]["n"] == 3 and 0 <= llama["gsm8k"]["accuracy"] <= 1
    assert llama["nlrx"]["n"] == 3 and 0 <= llama["nlrx"]["exact_match"] <= 1
    assert llama["humaneval"]["greedy"]["pass@1"] == 0.0  # random weights write no working code
    assert "pass@1" in llama["humaneval"]["sampled"]


def test_bad_input_is_named(tmp_path):
    proc = launch("tools/evaluate.py", ["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.json")], 1,
                  check=False)
    assert proc.returncode != 0 and "nowhere: no such file or directory" in proc.stderr
    proc = launch("tools/evaluate.py", ["--checkpoint", str(tmp_path), "--tasks", "perplexity,bleu", "--out",
                                        str(tmp_path / "r.json")], 1, check=False)
    assert proc.returncode != 0 and "unknown ['bleu']" in proc.stderr
