"""Step-JEPA on a tiny random-init Llama built locally (nothing is downloaded)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cromwell.data.chats import ChatBatches, hf_chat_encoder
from cromwell.data.tokenizer import NUM_PREDICTOR_TOKENS, load_hf_tokenizer, predictor_token
from cromwell.model import hf
from cromwell.model.config import HFConfig
from test_step_jepa import evaluate, make_objective
from cromwell.tools.tiny_hf_model import build_tiny_llama

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
    return build_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")), texts, hidden=32, layers=2, vocab=400)


def predictor_ids(tok, k):
    return tok.convert_tokens_to_ids([predictor_token(i) for i in range(1, k + 1)])


def load(path, **kw):
    """(model, tokenizer) as the trainer loads them, LoRA making the predictor rows trainable."""
    tok = load_hf_tokenizer(path)
    model = hf.load_model(path, len(tok), HFConfig(path=path, **kw), predictor_ids(tok, NUM_PREDICTOR_TOKENS))
    return model, tok


def setup(path, **kw):
    torch.manual_seed(0)
    model, tok = load(path, **kw)
    return model, tok, [hf_chat_encoder(tok)(c) for c in CHATS], predictor_ids(tok, 2)


def hf_objective(tok, preds, **kw):
    obj = make_objective(**kw)
    obj.predictor_ids, obj.pad_id = preds, tok.pad_token_id
    return obj


def test_predictor_tokens_added_and_embeddings_resized(tiny_dir):
    model, tok, examples, preds = setup(tiny_dir)
    assert len(set(preds)) == 2 and all(tok.convert_ids_to_tokens(p).startswith("<|predictor_") for p in preds)
    assert model.lm.get_input_embeddings().weight.shape[0] == len(tok)
    # steps are found and decode back to the text they came from
    e = examples[0]
    assert tok.decode(e.input_ids[e.steps[1][0]:e.steps[1][1]]) == STEPS[0][1][1] + "\n\n"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["step", "two_view"])
def test_single_pass_matches_two_pass(tiny_dir, attn, mode):
    model, tok, examples, preds = setup(tiny_dir, attn_implementation=attn)
    results = []
    for single in (True, False):
        model.zero_grad()
        out = evaluate(hf_objective(tok, preds, mode=mode, lbd=1.0, single_pass=single), model, examples)
        out["loss"].backward()
        results.append((out, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (a, ga), (b, gb) = results
    assert a["jepa"].item() > 1e-3
    for key in ("loss", "lm", "jepa"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_same_gradients_less_memory(tiny_dir):
    from cromwell.bench.step_jepa_cost import saved_activation_bytes

    results = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        tok = load_hf_tokenizer(tiny_dir)
        model = hf.load_model(tiny_dir, len(tok), HFConfig(path=tiny_dir), checkpoint_activations=ckpt)
        model.lm.train()
        examples = [hf_chat_encoder(tok)(c) for c in CHATS]
        out, saved = saved_activation_bytes(lambda: evaluate(hf_objective(tok, predictor_ids(tok, 1), lbd=1.0), model, examples))
        out["loss"].backward()
        results[ckpt] = (out["loss"].detach(), [p.grad for p in model.parameters()], saved)
    (l0, g0, m0), (l1, g1, m1) = results[False], results[True]
    torch.testing.assert_close(l1, l0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert m1 < 0.8 * m0, (m1, m0)


def embedding_rows(model, vocab):
    """The input embeddings as the model sees them: peft's trainable tokens overlay the frozen base rows."""
    with torch.no_grad():
        return model.lm.get_input_embeddings()(torch.arange(vocab))


def test_lora_trains_adapters_and_predictor_rows_and_reloads(tiny_dir, tmp_path):
    model, tok, examples, preds = setup(tiny_dir, lora=True, lora_rank=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows_before = embedding_rows(model, len(tok))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = lambda n: "lora_" in n or "trainable_tokens_delta" in n
    assert trainable and all(adapter(n) for n in trainable)
    objective = hf_objective(tok, preds, lbd=1.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        evaluate(objective, model, examples)["loss"].backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(adapter(k) for k in changed)
    assert any("lora_B" in k for k in changed)
    rows = embedding_rows(model, len(tok))
    moved = {i for i in range(len(rows)) if not torch.equal(rows[i], rows_before[i])}
    assert set(preds) <= moved <= set(predictor_ids(tok, NUM_PREDICTOR_TOKENS))

    hf.save(model, tok, str(tmp_path / "adapter"))
    torch.manual_seed(1)  # a different draw for any embedding row the adapter dir failed to restore
    reloaded, _ = load(str(tmp_path / "adapter"))
    torch.testing.assert_close(embedding_rows(reloaded, len(tok)), rows, rtol=0, atol=0)
    with torch.no_grad():
        want = evaluate(objective, model, examples)
        got = evaluate(objective, reloaded, examples)
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
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 20
    first, last = log[0], log[-1]
    assert last["lm"] < first["lm"] - 0.5 and last["jepa"] < first["jepa"]
    # Step 1 logs its two micro batches' losses weighted by their labelled tokens and pairs, all seen
    # by the initial weights; the entry point draws its weights and its order from --seed (42).
    torch.manual_seed(42)
    model, tok = load(tiny_dir)
    objective = hf_objective(tok, predictor_ids(tok, 2), lbd=0.5)
    batches = ChatBatches([hf_chat_encoder(tok)(c) for c in CHATS * 4], micro_batch_size=2, dp_rank=0, dp_size=1,
                          seed=42)
    micro = [objective.collate(next(batches)) for _ in range(2)]
    with torch.no_grad():
        sums = sum(objective.forward(model, b).sums for b in micro)
    counts = sum(objective.counts(b) for b in micro)
    assert first["loss"] == pytest.approx(objective.total(sums, counts).item(), rel=1e-5)
    assert first["lm"] == pytest.approx((sums[0] / counts[0]).item(), rel=1e-5)
    assert first["jepa"] == pytest.approx((sums[1] / counts[1]).item(), rel=1e-5)
    model, tok = load(str(out))
    assert model.lm.get_input_embeddings().weight.shape[0] == len(tok)
    assert (out / "checkpoints" / "latest").read_text() == "global_step20"


def test_bad_model_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not-a-model"):
        load(str(tmp_path / "not-a-model"))


def test_answer_extraction():
    from cromwell.pretrain.evaluation.reasoning import extract_number, gsm8k_correct, regex_match
    assert extract_number("so 3 + 4 = 7\n#### 1,234") == 1234
    assert extract_number("first 12 then 7.5 apples") == 7.5
    assert extract_number("no digits") is None
    assert gsm8k_correct("... the answer is\n#### 72", "48/2=24\n#### 72")
    assert not gsm8k_correct("#### 71", "#### 72")
    assert regex_match(" (dog)* \n", "(dog)*") and not regex_match("(dog)+", "(dog)*")


def test_eval_runs_side_by_side(tiny_dir, tmp_path):
    from cromwell.tools.eval_reasoning import main as evaluate
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"question": q, "answer": "\n".join(s) + "\n#### 1"}) + "\n" for q, s in STEPS))
    plot = tmp_path / "steps.png"
    report = evaluate(["--task", "gsm8k", "--test_file", str(test), "--run", f"a={tiny_dir}", "--run", f"b={tiny_dir}",
                       "--max_new_tokens", "4", "--plot", str(plot), "--output", str(tmp_path / "eval.json")])
    assert set(report) == {"a", "b"} and report["a"]["n"] == 4
    assert report["a"]["pairs"] == sum(len(s) - 1 for _, s in STEPS)
    assert -1 <= report["a"]["consecutive_step_cosine"] <= 1
    assert plot.stat().st_size > 1000
