"""The objective on a toy backbone with learned absolute positions, so wrong position ids
would change the result (RoPE would hide an offset)."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cromwell.data.chats import ChatEncoder
from cromwell.data.chat_views import IGNORE, lm_batch, packed_batch, reference_view_batch
from cromwell.model.jepa import jepa_loss
from cromwell.pretrain.config import load_config
from cromwell.pretrain.objectives.step_jepa import StepJEPA

VOCAB, EOS, PAD = 128, 1, 0
PRED = [2, 3, 4]


def make_objective(mode="step", loss_type="cosine", lbd=0.1, gamma=1.0, single_pass=True) -> StepJEPA:
    cfg = load_config("pretrain/configs/tiny.yaml", [
        "training.objective=step_jepa", "data.chats=unused.jsonl", f"training.step_jepa.mode={mode}",
        f"training.step_jepa.loss_type={loss_type}", f"training.step_jepa.jepa_weight={lbd}",
        f"training.step_jepa.lm_weight={gamma}", f"training.step_jepa.single_pass={single_pass}"])
    return StepJEPA(cfg, encoder, PRED, PAD)


def evaluate(objective: StepJEPA, model, examples) -> dict:
    """The objective on one micro batch, as the loop would see a step made of only this batch."""
    batch = objective.collate(examples)
    sums, counts = objective.forward(model, batch).sums, objective.counts(batch)
    means = sums / counts.to(sums).clamp(min=1)
    return {"loss": objective.total(sums, counts), "lm": means[0], "jepa": means[1], "pairs": int(counts[1])}



class ToyBackbone(nn.Module):
    def __init__(self, d=32, layers=2):
        super().__init__()
        self.emb, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(256, d)
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB)
        self.calls = 0

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        self.calls += 1
        s = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(s).expand_as(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(s, s, dtype=torch.bool).tril()
        x = self.emb(input_ids) + self.pos(position_ids)
        for qkv, mlp in zip(self.qkv, self.mlp):
            q, k, v = qkv(x).unsqueeze(1).chunk(3, dim=-1)
            x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask).squeeze(1)
            x = x + mlp(x)
        return x

    def lm_loss(self, hidden, target, reduction="mean"):
        return F.cross_entropy(self.head(hidden), target, reduction=reduction)


# one token per character: 'a' -> 97 etc., the separator '|' -> 124
encoder = ChatEncoder(encode=lambda t: [ord(c) for c in t], render_prompt=lambda m: "SU>", eos_id=EOS, separator="|")


def chat(answer):
    return [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": answer}]


def test_encoder_step_boundaries():
    ex = encoder(chat("abc|de|fgh"))
    assert ex.n_prompt == 3
    text = lambda a, b: "".join(chr(i) for i in ex.input_ids[a:b])
    assert [text(a, b) for a, b in ex.steps] == ["abc|", "de|", "fgh"]
    assert ex.input_ids[-1] == EOS and ex.content_end == len(ex.input_ids) - 1
    assert ex.pairs("step") == [(7, 10)]
    assert ex.pairs("multistep") == [(7, 10), (10, 13)]
    assert ex.pairs("two_view") == [(3, 13)]
    assert encoder(chat("no separator here")).pairs("step") == []


def test_encoder_truncation_keeps_whole_steps_only():
    short = ChatEncoder(encoder.encode, encoder.render_prompt, EOS, "|", max_len=9)
    ex = short(chat("abc|de|fgh"))
    assert len(ex.input_ids) == 9 and ex.steps == [(3, 7)] and ex.pairs("step") == []


def test_reference_mask_isolates_step2():
    ex = encoder(chat("abc|de|fg"))  # prompt 0-2, step1 3-6, step2 7-9, step3 10-11, eos 12
    b = reference_view_batch([ex], "step", PRED, PAD)
    m, k = b.attention_mask[0, 0], len(PRED)
    ids = b.input_ids[0].tolist()
    assert ids[7:10] == PRED
    s2 = range(7 + k, 10 + k)
    for q in s2:  # step 2 sees only step 2
        assert m[q].nonzero().flatten().tolist() == list(range(7 + k, q + 1))
    for q in range(7, 7 + k):  # predictors see what precedes them
        assert m[q].nonzero().flatten().tolist() == list(range(q + 1))
    for q in range(10 + k, len(ids)):  # later steps are plain causal
        assert m[q].nonzero().flatten().tolist() == list(range(q + 1))
    assert b.view1.tolist() == [[0, 7 + k - 1]] and b.view2.tolist() == [[0, 10 + k - 1]]


def test_packed_layout_mask_positions_labels():
    exs = [encoder(chat("abc|de|fg")), encoder(chat("xy|z"))]
    b = packed_batch(exs, "step", PRED, PAD)
    k, n = len(PRED), 13
    ids, pos, m = b.input_ids[0].tolist(), b.position_ids[0].tolist(), b.attention_mask[0, 0]
    assert ids[:n] == exs[0].input_ids
    assert ids[n:n + k] == PRED and ids[n + k:n + k + 3] == exs[0].input_ids[7:10]
    assert pos[n:n + k + 3] == list(range(7, 10 + k))  # as in the reference's inserted sequence
    for q in range(n):
        assert m[q].nonzero().flatten().tolist() == list(range(q + 1))
    for j, q in enumerate(range(n, n + k)):
        assert m[q].nonzero().flatten().tolist() == list(range(7)) + list(range(n, q + 1))
    for q in range(n + k, n + k + 3):
        assert m[q].nonzero().flatten().tolist() == list(range(n + k, q + 1))
    assert b.view1.tolist() == [[0, n + k - 1], [1, 8 + k - 1]]
    assert b.view2.tolist() == [[0, n + k + 2], [1, 8 + k]]
    # labels: assistant tokens of the original sequence only (content and EOS)
    lab = b.labels[0].tolist()
    assert lab[:3] == [IGNORE] * 3 and lab[3:n] == exs[0].input_ids[3:] and set(lab[n:]) == {IGNORE}
    # the short row's padding attends only to itself
    row1 = b.attention_mask[1, 0]
    last = len(b.input_ids[1]) - 1
    assert row1[last].nonzero().flatten().tolist() == [last]


def test_packed_views_are_isolated():
    """Behaviour, not layout: the target's embedding ignores everything outside the target,
    the predictor's embedding ignores the target."""
    torch.manual_seed(0)
    net = ToyBackbone()

    def views(answer, prompt="SU>"):
        enc = ChatEncoder(encoder.encode, lambda m: prompt, EOS, "|")
        b = packed_batch([enc(chat(answer))], "step", PRED, PAD)
        h = net(b.input_ids, b.position_ids, b.attention_mask)
        return h[0, b.view1[0, 1]], h[0, b.view2[0, 1]]

    v1, v2 = views("abc|de|fg")
    v1_p, v2_p = views("abc|de|fg", prompt="XY>")
    assert torch.allclose(v2, v2_p) and not torch.allclose(v1, v1_p)
    v1_s, v2_s = views("abc|dx|fg")
    assert torch.allclose(v1, v1_s) and not torch.allclose(v2, v2_s)
    v1_t, v2_t = views("abc|de|zz")
    assert torch.allclose(v1, v1_t) and torch.allclose(v2, v2_t)


def test_loss_types():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert jepa_loss(a, -a, "cosine", reduction="sum").item() == pytest.approx(4.0)
    assert jepa_loss(a, a, "cosine").item() == pytest.approx(0.0)
    assert jepa_loss(a, -a, "cosine").item() == pytest.approx(2.0)
    b = a + torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert jepa_loss(a, b, "l2").item() == pytest.approx(2.5)
    assert jepa_loss(a, b, "mse").item() == pytest.approx(25 / 4)
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) / 0.1
    assert jepa_loss(a, a, "infonce").item() == pytest.approx(F.cross_entropy(logits, torch.arange(2)).item())
    assert jepa_loss(a, a.flip(0), "infonce") > jepa_loss(a, a, "infonce")
    with pytest.raises(ValueError, match="huber"):
        jepa_loss(a, a, "huber")


def grads(net, out):
    net.zero_grad()
    out["loss"].backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()])


@pytest.mark.parametrize("mode", ["step", "multistep", "two_view"])
@pytest.mark.parametrize("loss_type", ["cosine", "l2", "mse", "infonce"])
def test_single_pass_equals_two_pass(mode, loss_type):
    torch.manual_seed(1)
    net = ToyBackbone()
    exs = [encoder(chat("abcd|efg|hi|jklm")), encoder(chat("ab|cde")), encoder(chat("no steps"))]
    outs = {}
    for single in (True, False):
        obj = make_objective(mode, loss_type, lbd=0.7, gamma=1.3, single_pass=single)
        net.calls = 0
        out = evaluate(obj, net, exs)
        outs[single] = (out, grads(net, out), net.calls)
    (a, ga, calls_a), (b, gb, calls_b) = outs[True], outs[False]
    assert (calls_a, calls_b) == (1, 2)
    assert a["pairs"] == b["pairs"] == {"step": 2, "multistep": 4, "two_view": 3}[mode]
    assert a["jepa"].item() > 0
    for key in ("loss", "lm", "jepa"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    assert torch.isclose(a["loss"], 1.3 * a["lm"] + 0.7 * a["jepa"])


def test_lm_loss_is_assistant_tokens_only():
    torch.manual_seed(2)
    net = ToyBackbone()
    exs = [encoder(chat("abc|de")), encoder(chat("xyz|uvw|rs"))]
    out = evaluate(make_objective(lbd=0.0), net, exs)
    assert out["pairs"] == 0 and out["jepa"].item() == 0
    b = lm_batch(exs, PAD)
    logits = net.head(net(b.input_ids, b.position_ids, None))
    nll, count = 0.0, 0
    for r, ex in enumerate(exs):
        for t in range(ex.n_prompt, len(ex.input_ids)):  # token t is predicted from position t-1
            nll -= logits[r, t - 1].log_softmax(-1)[ex.input_ids[t]]
            count += 1
    torch.testing.assert_close(out["lm"], nll / count)
    # the single pass's LM loss is the same number: appended tokens carry no labels
    packed = evaluate(make_objective(lbd=1.0), net, exs)
    torch.testing.assert_close(packed["lm"], out["lm"])


def test_step_loss_is_weighted_by_labelled_tokens_across_micro_batches():
    """Two micro batches with 3 and 13 labelled tokens: the step's LM loss is the mean over its 16
    tokens (as if they were one batch), not the mean of the two batches' means."""
    torch.manual_seed(3)
    net = ToyBackbone()
    small, large = [encoder(chat("ab"))], [encoder(chat("cdefghij|klm"))]
    obj = make_objective(lbd=0.5)
    batches = [obj.collate(small), obj.collate(large)]
    counts = sum(obj.counts(b) for b in batches)
    assert [obj.counts(b)[0].item() for b in batches] == [3.0, 13.0]
    sums = sum(obj.forward(net, b).sums for b in batches)
    whole = evaluate(obj, net, small + large)
    torch.testing.assert_close(obj.total(sums, counts), whole["loss"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums[0] / counts[0], whole["lm"].double(), rtol=1e-6, atol=1e-6)
    a, b = evaluate(obj, net, small)["lm"], evaluate(obj, net, large)["lm"]
    torch.testing.assert_close(whole["lm"], (3 * a + 13 * b) / 16)


def _project_gpt(vocab=VOCAB, kernels="fused"):
    """The project's GPT (model/gpt.py) in a one-process group, TP = 1."""
    from megatron.core import parallel_state

    from cromwell.model.config import ModelConfig
    from cromwell.model.gpt import GPT, init_weights, megatron_config
    from cromwell.pretrain.distributed import join_process_group

    join_process_group()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    # No padding: the toy backbones the GPT is compared with have exactly `vocab` rows.
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64, vocab_size=vocab,
                      make_vocab_size_divisible_by=1)
    gpt = GPT(cfg, megatron_config(1), kernels=kernels)
    for i, layer in enumerate(gpt.children()):
        init_weights(layer, i, cfg, seed=3)
    return gpt


@pytest.mark.parametrize("kernels", ["fused", "reference"])
def test_project_gpt_single_pass_equals_two_pass(kernels):
    gpt = _project_gpt(kernels=kernels)
    exs = [encoder(chat("abcd|efg|hi")), encoder(chat("ab|cdefg"))]
    results = []
    for single in (True, False):
        out = evaluate(make_objective("multistep", lbd=0.5, single_pass=single), gpt, exs)
        results.append((out, grads(gpt, out)))
    (a, ga), (b, gb) = results
    assert a["jepa"].item() > 0
    for key in ("loss", "lm", "jepa"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_project_chat_encoder_uses_role_tokens(tmp_path):
    from cromwell.data.chats import project_chat_encoder
    from cromwell.data.tokenizer import ASSISTANT, EOS_ID, SYSTEM
    from cromwell.tools.train_tokenizer import MIN_VOCAB_SIZE, train_tokenizer

    tok = train_tokenizer(["lines with the string 'dog'", "(dog)*", "Convert to regex."], MIN_VOCAB_SIZE + 20,
                          show_progress=False)
    ex = project_chat_encoder(tok)([{"role": "system", "content": "Convert to regex."},
                                    {"role": "user", "content": "lines with 'dog'"},
                                    {"role": "assistant", "content": "(dog)*"}])
    assert ex.input_ids[1] == tok.token_to_id(SYSTEM) and ex.input_ids[ex.n_prompt - 1] == tok.token_to_id(ASSISTANT)
    assert tok.decode(ex.input_ids[ex.n_prompt:ex.content_end]) == "(dog)*" and ex.input_ids[-1] == EOS_ID
    with pytest.raises(ValueError, match="'tool'"):
        project_chat_encoder(tok)([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}])


def _run_entry_point(tmp_path, name, nproc=1, sets=(), args=()) -> list[dict]:
    """pretrain/step_jepa.py on the project's GPT (tiny.yaml shrunk) over 16 NL-RX-like chats; its log."""
    from conftest import launch
    from cromwell.tools.train_tokenizer import MIN_VOCAB_SIZE, train_tokenizer

    pairs = [("lines with the string 'dog'", ".*dog.*"), ("lines ending with a vowel", ".*[AEIOUaeiou]"),
             ("lines with a number", ".*[0-9].*"), ("lines starting with 'cat'", "cat.*")]
    chats = [[{"role": "system", "content": "Convert to regex."}, {"role": "user", "content": u},
              {"role": "assistant", "content": a}] for u, a in pairs] * 4
    tok = train_tokenizer([m["content"] for c in chats for m in c], MIN_VOCAB_SIZE + 40, show_progress=False)
    tok.save(str(tmp_path / "tok.json"))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    sets = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=64",
            f"model.vocab_size={tok.get_vocab_size()}", "training.kernels=reference", *sets]
    out = tmp_path / name
    launch("pretrain/step_jepa.py", ["--config", "pretrain/configs/tiny.yaml", *[a for s in sets for a in ("--set", s)],
                                     "--tokenizer", str(tmp_path / "tok.json"), "--train_file", str(data),
                                     "--output_dir", str(out), "--mode", "two_view", "--lbd", "1.0",
                                     "--batch_size", "4", "--learning_rate", "1e-2", *args], nproc)
    assert (out / "checkpoints" / "latest").exists()  # DeepSpeed checkpoint
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_entry_point_trains_project_gpt(tmp_path):
    log = _run_entry_point(tmp_path, "run", args=["--num_epochs", "4"])
    assert len(log) == 16 and log[-1]["lm"] < log[0]["lm"] - 1.0


def test_entry_point_pipeline_matches_one_stage(tmp_path):
    """Two pipeline stages (2 processes) train the same numbers as one process: same data, same
    init, so the first step's loss agrees and the second agrees only if the gradients crossed the
    stages intact."""
    args = ["--grad_accum", "2", "--max_steps", "2"]
    one = _run_entry_point(tmp_path, "pp1", args=args)
    two = _run_entry_point(tmp_path, "pp2", nproc=2, sets=["parallel.pipeline=2"], args=args)
    assert len(one) == len(two) == 2 and one[0]["jepa"] > 0
    for a, b in zip(one, two):
        for key in ("loss", "lm", "jepa"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)
