"""The language model in one process: causality, masks and positions, init, and the loss paths."""

import pytest
import torch
from megatron.core import parallel_state

from cromwell.bench.step_jepa_cost import saved_activation_bytes
from cromwell.model.config import ModelConfig
from cromwell.model.gpt import GPT, init_weights, megatron_config
from cromwell.model.loss import lm_loss
from cromwell.pretrain.config import load_config
from cromwell.pretrain.optim import lr_at
from cromwell.pretrain.distributed import init_distributed


@pytest.fixture(scope="module")
def cfg():
    cfg = load_config("pretrain/configs/tiny.yaml", ["model.hidden_size=64", "model.num_layers=2",
                                                     "model.ffn_hidden_size=128", "model.vocab_size=300"])
    init_distributed(cfg)
    yield cfg
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _gpt(cfg, seed=0):
    gpt = GPT(cfg.model, megatron_config(1))
    for i, layer in enumerate(gpt.children()):
        init_weights(layer, i, cfg.model, seed)
    return gpt


def test_vocab_padding_does_not_depend_on_the_tp_size():
    m = ModelConfig(vocab_size=50000)
    # Megatron multiplies its divisor by the TP size (50000 -> 50048 at TP=1 but 50176 at TP=2),
    # so checkpoints could not move between TP sizes; here every TP size gets the same rows.
    assert {m.padded_vocab_size(tp) for tp in (1, 2, 4, 8, 16, 32, 64, 128)} == {50048}
    assert ModelConfig(vocab_size=600, make_vocab_size_divisible_by=64).padded_vocab_size(2) == 640
    with pytest.raises(ValueError, match=r"not divisible by parallel.tensor \(3\).*make_vocab_size_divisible_by"):
        m.padded_vocab_size(3)


def test_hidden_states_are_causal(cfg):
    gpt = _gpt(cfg)
    ids = torch.randint(0, 300, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 300
    a, b = gpt(ids), gpt(changed)
    assert a.shape == (2, 16, 64)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_explicit_causal_mask_and_relative_positions(cfg):
    gpt = _gpt(cfg)
    ids = torch.randint(0, 300, (2, 12))
    causal = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 1, 12, 12)
    torch.testing.assert_close(gpt(ids, attention_mask=causal), gpt(ids))
    # RoPE encodes relative position: shifting every position by a constant changes nothing...
    shifted = torch.arange(12).expand(2, 12) + 7
    torch.testing.assert_close(gpt(ids, position_ids=shifted), gpt(ids), atol=1e-5, rtol=1e-4)
    # ...while reordering positions does.
    assert not torch.allclose(gpt(ids, position_ids=torch.arange(12).flip(0).expand(2, 12)), gpt(ids), atol=1e-3)


def test_init_is_deterministic_and_per_parameter(cfg):
    a, b, c = _gpt(cfg, seed=0), _gpt(cfg, seed=0), _gpt(cfg, seed=1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    # Two blocks of the same shape get different weights (the layer index is part of the key).
    assert not torch.equal(a.get_submodule("1").attn.qkv.weight, a.get_submodule("2").attn.qkv.weight)
    assert a.get_submodule("1").attn.out.weight.std() < a.get_submodule("1").attn.qkv.weight.std()


def test_fused_loss_matches_reference_in_value_and_gradients(cfg):
    gpt = _gpt(cfg)
    ids = torch.randint(0, 300, (2, 16))
    labels = torch.roll(ids, -1, dims=1)
    labels[0, :5] = -100
    grads = {}
    for kernels in ("fused", "reference"):
        gpt.zero_grad()
        loss = lm_loss(gpt(ids), gpt.output_weight, labels, kernels)
        if kernels == "fused":  # the model's own loss is the same fused call, through its head module
            torch.testing.assert_close(gpt.lm_loss(gpt(ids), labels), loss)
        loss.backward()
        grads[kernels] = (loss.detach(), [p.grad.clone() for p in gpt.parameters()])
    torch.testing.assert_close(grads["fused"][0], grads["reference"][0])
    for gf, gr in zip(grads["fused"][1], grads["reference"][1]):
        torch.testing.assert_close(gf, gr, atol=1e-6, rtol=1e-4)
    assert 4.0 < grads["reference"][0] < 7.5  # near ln(384) at init


def test_lr_schedule_warms_up_then_decays_to_min(cfg):
    c = load_config("pretrain/configs/tiny.yaml", ["training.train_tokens=100K", "training.scheduler.warmup_tokens=20K"])
    per_step = c.tokens_per_step()  # 16 x 256 = 4096
    steps = c.train_steps()
    lrs = [lr_at(s, c) for s in range(steps + 1)]
    warm = 20_000 // per_step
    assert all(x < y for x, y in zip(lrs[:warm], lrs[1:warm + 1]))
    assert max(lrs) <= c.training.optimizer.lr
    assert all(x >= y for x, y in zip(lrs[warm + 1:], lrs[warm + 2:]))
    assert lrs[-1] == pytest.approx(c.training.scheduler.min_lr)


def test_activation_checkpointing_same_gradients_less_memory(cfg):
    ids = torch.randint(0, 300, (2, 32))
    labels = torch.roll(ids, -1, dims=1)
    results = {}
    for ckpt in (False, True):
        gpt = _gpt(cfg)
        gpt.checkpoint_activations = ckpt
        # Bytes autograd keeps for backward (activation memory): a count, exact on a busy machine.
        loss, saved = saved_activation_bytes(lambda: gpt.lm_loss(gpt(ids), labels))
        loss.backward()
        results[ckpt] = (loss.detach(), [p.grad for p in gpt.parameters()], saved)
    (l0, g0, m0), (l1, g1, m1) = results[False], results[True]
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Each block keeps only its input; without checkpointing it keeps every intermediate.
    assert m1 < 0.5 * m0, (m1, m0)


def test_document_mask_keeps_documents_apart(cfg):
    from cromwell.data.masks import document_positions_and_mask

    eos = 2
    ids = torch.tensor([[5, 6, 7, eos, 8, 9, eos, 10, 11, 12], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    pos, mask = document_positions_and_mask(ids, eos)
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], list(range(10))]
    assert mask[0, 0, 4].nonzero().flatten().tolist() == [4]  # the first token of document 2 sees only itself
    assert mask[0, 0, 6].nonzero().flatten().tolist() == [4, 5, 6]  # eos belongs to its document
    assert torch.equal(mask[1, 0], torch.ones(10, 10, dtype=torch.bool).tril())  # one document: plain causal
    # What the model computes for each document is what it computes for that document alone.
    gpt = _gpt(cfg)
    packed = gpt(ids, pos, mask)
    for start, end in ((0, 4), (4, 7), (7, 10)):
        alone = gpt(ids[:1, start:end])
        torch.testing.assert_close(packed[:1, start:end], alone, atol=1e-5, rtol=1e-4)
    # and without the mask the later documents would see the earlier ones
    assert not torch.allclose(gpt(ids)[:1, 4:7], gpt(ids[:1, 4:7]), atol=1e-3)
