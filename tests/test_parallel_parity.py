"""Parallelism is correct when it changes nothing: ZeRO-1/2/3 on 2 data-parallel ranks, TP=2, PP=2,
TP=2 x PP=2 and activation checkpointing give the losses and gradient norms of one process, and the
same held-out losses afterwards, for the same init and global batches; for the LM objective and for
Step-JEPA, whose micro batches hold different numbers of labelled tokens.

Real multi-process runs under the deepspeed launcher (gloo, CPU), through the trainer's own
build_engine and train_step. Tolerance: fp32 with a different reduction order (sharded optimizer,
all-reduced partial sums, split matmuls) moves results by ~1e-6 relative per step; 1e-4 relative
over 3 steps leaves margin while catching any real error (a wrong shard, a missing all-reduce, a
double-counted gradient or a per-micro-batch normalisation moves them by >1e-2).
"""

import json
from pathlib import Path

import pytest

from conftest import launch, tiny_overrides

STEPS = 3
RTOL = 1e-4
# Megatron's rule (128 x TP) would pad 600 to 640 at TP=1 but 768 at TP=2: with the TP-independent
# padding both build the same 640-row embedding and start from the same weights.
VOCAB = ["model.vocab_size=600"]


def _run(tiny_data, tmp_path, name, nproc, sets, base=()):
    out = tmp_path / f"{name}.json"
    args = ["--config", "pretrain/configs/tiny.yaml", *tiny_overrides(tiny_data, tmp_path / name),
            *[a for s in [*base, *sets] for a in ("--set", s)], "--steps", str(STEPS), "--out", str(out)]
    launch("tests/dist/parity_worker.py", args, nproc)
    return json.loads(out.read_text())


def _assert_same(result, baseline):
    for key in result["losses"][0]:
        got, want = [s[key] for s in result["losses"]], [s[key] for s in baseline["losses"]]
        assert got == pytest.approx(want, rel=RTOL), key
    assert result["grad_norm"] == pytest.approx(baseline["grad_norm"], rel=RTOL)
    assert result["eval"] == pytest.approx(baseline["eval"], rel=RTOL)
    # Training moves the loss, so equal losses are not equal constants.
    assert abs(result["losses"][-1]["loss"] - result["losses"][0]["loss"]) > 1e-3


LM = VOCAB + ["training.batch_size=8", "training.micro_batch_size=2"]


@pytest.fixture(scope="module")
def baseline(tiny_data, tmp_path_factory):
    return _run(tiny_data, tmp_path_factory.mktemp("baseline"), "single", 1, ["parallel.zero_stage=0"], LM)


# TP=2 alone and PP=2 alone are in tp2_pp2 and pp2_checkpointing here, and run again alone with the
# VL-JEPA, whose language blocks are these (tests/test_vljepa_parallel.py).
@pytest.mark.parametrize(
    "name,nproc,sets",
    [
        ("zero1", 2, ["parallel.zero_stage=1"]),
        ("zero2", 2, ["parallel.zero_stage=2"]),
        ("tp2_pp2", 4, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1"]),
        ("checkpointing", 1, ["parallel.zero_stage=0", "parallel.activation_checkpointing=true"]),
        ("pp2_checkpointing", 2, ["parallel.pipeline=2", "parallel.zero_stage=1",
                                  "parallel.activation_checkpointing=true"]),
    ],
)
def test_parallel_layouts_match_one_process(baseline, tiny_data, tmp_path, name, nproc, sets):
    result = _run(tiny_data, tmp_path, name, nproc, sets, LM)
    assert result["losses"][0]["loss"] > 5.0, "the model should start near ln(vocab): is the data real?"
    _assert_same(result, baseline)


def test_zero3_partitions_parameters_and_matches_one_process(baseline, tiny_data, tmp_path, zero3_json):
    """Built under deepspeed.zero.Init, each of 2 ranks holds half of every parameter from the start,
    and the layout-independent init still gives exactly the one-process weights."""
    result = _run(tiny_data, tmp_path, "zero3", 2, ["parallel.zero_stage=3", f"parallel.ds_config={zero3_json}"], LM)
    _assert_same(result, baseline)
    ratio = result["max_rank_parameter_bytes"] / baseline["max_rank_parameter_bytes"]
    assert 0.45 < ratio < 0.55, ratio


CHATS = [("lines with the string 'dog'", "Find dog.\n\nThen .*dog.*"),
         ("lines ending with a vowel", "A vowel ends it.\n\nSo .*[AEIOUaeiou]"),
         ("lines with a number", ".*[0-9].*"),
         ("lines starting with the word 'cat' and then anything at all", "Start with cat.\n\nThen anything.\n\ncat.*")]


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    records = [{"messages": [{"role": "system", "content": "Convert to regex."}, {"role": "user", "content": u},
                             {"role": "assistant", "content": a}]} for u, a in CHATS * 6]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _step_jepa(chats):
    return VOCAB + ["training.objective=step_jepa", f"data.chats={chats}", "training.step_jepa.mode=multistep",
                    "training.step_jepa.jepa_weight=1.0", "training.batch_size=4"]


def test_step_jepa_data_parallel_is_token_weighted(tiny_data, tmp_path, chats):
    """One process with the step's 4 chats in one micro batch vs 2 ranks with 2 chats each (different
    numbers of labelled tokens and JEPA pairs): equal only if the loss is normalised over the step."""
    base = _step_jepa(chats)
    one = _run(tiny_data, tmp_path, "sj_one", 1, ["training.micro_batch_size=4", "parallel.zero_stage=0"], base)
    assert one["losses"][0]["jepa"] > 0
    for name, sets in (("sj_dp2", ["training.micro_batch_size=2", "parallel.zero_stage=2"]),
                       ("sj_tp2", ["training.micro_batch_size=4", "parallel.tensor=2"])):
        _assert_same(_run(tiny_data, tmp_path, name, 2, sets, base), one)


@pytest.fixture(scope="module")
def short_documents(tiny_data, tmp_path_factory):
    """Shards of short documents (the stdlib's paragraphs), so that every sequence packs several."""
    from conftest import PYTHON, run

    root = tmp_path_factory.mktemp("short_docs")
    train = [json.loads(line)["text"] for line in (Path(tiny_data["shards"]).parent / "train.jsonl").open()]
    paragraphs = [p for text in train[:10] for p in text.split("\n\n") if p.strip()]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    run([PYTHON, "tools/build_shards.py", "--input", str(root / "docs.jsonl"), "--tokenizer", tiny_data["tokenizer"],
         "--context-length", "64", "--samples-per-shard", "32", "--output", str(root / "shards"), "--workers", "1"])
    return str(root / "shards")


def test_document_mask_through_a_pipeline_matches_one_process(tiny_data, tmp_path, short_documents):
    """Positions that restart at every document and the block-diagonal mask travel with the
    activations through 2 pipeline stages."""
    docs = LM + [f"data.shards={short_documents}"]
    plain = _run(tiny_data, tmp_path, "docs", 1, ["parallel.zero_stage=0"], docs)
    masked = _run(tiny_data, tmp_path, "docs_masked", 1, ["parallel.zero_stage=0", "data.document_mask=true"], docs)
    assert abs(masked["losses"][0]["loss"] - plain["losses"][0]["loss"]) > 1e-3  # the mask changes the model's input
    _assert_same(_run(tiny_data, tmp_path, "docs_masked_pp2", 2,
                      ["parallel.pipeline=2", "parallel.zero_stage=1", "data.document_mask=true"], docs), masked)
