"""Step-JEPA on a tiny random-init Llama built locally (nothing is downloaded)."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from data.tokenizer import NUM_PREDICTOR_TOKENS
from model import hf
from model.step_jepa import StepJEPA, predictor_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = [
    ("Tom has 3 boxes with 4 apples each.", ["He has 3 * 4 = 12 apples in total.", "He eats 2, so 12 - 2 = 10 remain.",
                                              "The answer is 10 apples left.\n#### 10"]),
    ("A car drives 60 km per hour for 2 hours.", ["The distance is 60 * 2 = 120 km.", "Half of that is 120 / 2 = 60 km.\n#### 60"]),
    ("Sara reads 5 pages a day for a week.", ["A week has 7 days, so 5 * 7 = 35 pages.", "She read 35 pages in total.\n#### 35"]),
    ("A shop sells 8 pens at 2 dollars each.", ["The pens cost 8 * 2 = 16 dollars.", "With a 4 dollar discount it is 12.\n#### 12"]),
]

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # a child run makes its own group


def chat(q, steps):
    return [{"role": "system", "content": "Solve step by step."}, {"role": "user", "content": q},
            {"role": "assistant", "content": "\n\n".join(steps)}]


CHATS = [chat(q, s) for q, s in STEPS]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    texts = [m["content"] for c in CHATS for m in c] * 4
    return hf.build_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")), texts, hidden=32, layers=2, vocab=400)


def setup(path, **kw):
    torch.manual_seed(0)
    model, tok = hf.load_causal_lm(path, **kw)
    encoder = hf.chat_encoder(tok)
    preds = tok.convert_tokens_to_ids(predictor_names(2))
    return model, tok, [encoder(c) for c in CHATS], preds


def test_predictor_tokens_added_and_embeddings_resized(tiny_dir):
    model, tok, examples, preds = setup(tiny_dir)
    assert len(set(preds)) == 2 and all(tok.convert_ids_to_tokens(p).startswith("<|predictor_") for p in preds)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # steps are found and decode back to the text they came from
    e = examples[0]
    assert tok.decode(e.input_ids[e.steps[1][0]:e.steps[1][1]]) == STEPS[0][1][1] + "\n\n"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["step", "two_view"])
def test_single_pass_matches_two_pass(tiny_dir, attn, mode):
    model, tok, examples, preds = setup(tiny_dir, attn_implementation=attn)
    backbone = hf.HFBackbone(model)
    results = []
    for single in (True, False):
        model.zero_grad()
        out = StepJEPA(preds, tok.pad_token_id, mode=mode, lbd=1.0, single_pass=single)(backbone, examples)
        out["loss"].backward()
        results.append((out, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (a, ga), (b, gb) = results
    assert a["jepa"].item() > 1e-3
    for key in ("loss", "lm", "jepa"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def embedding_rows(model, vocab):
    """The input embeddings as the model sees them: peft's trainable tokens overlay the frozen base rows."""
    with torch.no_grad():
        return model.get_input_embeddings()(torch.arange(vocab))


def test_lora_trains_adapters_and_predictor_rows_and_reloads(tiny_dir, tmp_path):
    model, tok, examples, preds = setup(tiny_dir, lora=True, lora_rank=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows_before = embedding_rows(model, len(tok))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = lambda n: "lora_" in n or "trainable_tokens_delta" in n
    assert trainable and all(adapter(n) for n in trainable)
    objective = StepJEPA(preds, tok.pad_token_id, lbd=1.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        objective(hf.HFBackbone(model), examples)["loss"].backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(adapter(k) for k in changed)
    assert any("lora_B" in k for k in changed)
    rows = embedding_rows(model, len(tok))
    moved = {i for i in range(len(rows)) if not torch.equal(rows[i], rows_before[i])}
    assert set(preds) <= moved <= set(tok.convert_tokens_to_ids(predictor_names(NUM_PREDICTOR_TOKENS)))

    hf.save(model, tok, str(tmp_path / "adapter"))
    torch.manual_seed(1)  # a different draw for any embedding row the adapter dir failed to restore
    reloaded, _ = hf.load_causal_lm(str(tmp_path / "adapter"))
    torch.testing.assert_close(embedding_rows(reloaded, len(tok)), rows, rtol=0, atol=0)
    with torch.no_grad():
        want = objective(hf.HFBackbone(model), examples)
        got = objective(hf.HFBackbone(reloaded), examples)
    # the jepa term involves the predictor embeddings, which only the saved adapter dir holds
    torch.testing.assert_close(got["loss"], want["loss"])


def test_entry_point_trains_and_saves(tiny_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 4))
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "pretrain", "step_jepa.py"), "--train_file", str(data),
           "--model_name", tiny_dir, "--output_dir", str(out), "--lbd", "0.5", "--predictors", "2",
           "--batch_size", "2", "--grad_accum", "2", "--num_epochs", "5", "--learning_rate", "3e-3",
           "--log_every", "5", "--zero_stage", "1"]
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = json.load(open(out / "train_log.json"))["log"]
    assert len(log) == 20
    first, last = log[0], log[-1]
    assert last["lm"] < first["lm"] - 0.5 and last["jepa"] < first["jepa"]
    # step 1 logs the mean over its two micro batches, all seen by the initial weights; the entry
    # point draws its weights and its order from --seed (42 by default)
    torch.manual_seed(42)
    model, tok = hf.load_causal_lm(tiny_dir)
    examples = [hf.chat_encoder(tok)(c) for c in CHATS * 4]
    order = list(range(len(examples)))
    random.Random(42).shuffle(order)
    objective = StepJEPA(tok.convert_tokens_to_ids(predictor_names(2)), tok.pad_token_id, lbd=0.5)
    with torch.no_grad():
        micro = [objective(hf.HFBackbone(model), [examples[i] for i in order[m:m + 2]]) for m in (0, 2)]
    for key in ("loss", "lm", "jepa"):
        assert first[key] == pytest.approx(sum(o[key].item() for o in micro) / 2, rel=1e-5)
    model, tok = hf.load_causal_lm(str(out))
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_bad_model_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not-a-model"):
        hf.load_causal_lm(str(tmp_path / "not-a-model"))


def test_answer_extraction():
    from tools.eval_reasoning import extract_number, gsm8k_correct, regex_match
    assert extract_number("so 3 + 4 = 7\n#### 1,234") == 1234
    assert extract_number("first 12 then 7.5 apples") == 7.5
    assert extract_number("no digits") is None
    assert gsm8k_correct("... the answer is\n#### 72", "48/2=24\n#### 72")
    assert not gsm8k_correct("#### 71", "#### 72")
    assert regex_match(" (dog)* \n", "(dog)*") and not regex_match("(dog)+", "(dog)*")


def test_eval_runs_side_by_side(tiny_dir, tmp_path):
    from tools.eval_reasoning import main as evaluate
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"question": q, "answer": "\n".join(s) + "\n#### 1"}) + "\n" for q, s in STEPS))
    plot = tmp_path / "steps.png"
    report = evaluate(["--task", "gsm8k", "--test_file", str(test), "--run", f"a={tiny_dir}", "--run", f"b={tiny_dir}",
                       "--max_new_tokens", "4", "--plot", str(plot), "--output", str(tmp_path / "eval.json")])
    assert set(report) == {"a", "b"} and report["a"]["n"] == 4
    assert report["a"]["pairs"] == sum(len(s) - 1 for _, s in STEPS)
    assert -1 <= report["a"]["consecutive_step_cosine"] <= 1
    assert plot.stat().st_size > 1000
