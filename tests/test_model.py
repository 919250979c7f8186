"""The language model in one process: causality, masks and positions, init, and the loss paths."""

import pytest
import torch
from megatron.core import parallel_state

from model.gpt import GPT, init_weights, megatron_config, padded_vocab_size
from model.loss import lm_loss
from pretrain.config import load_config
from pretrain.optim import lr_at
from pretrain.parallel import init_distributed


@pytest.fixture(scope="module")
def cfg():
    cfg = load_config("pretrain/configs/tiny.yaml", ["model.hidden_size=64", "model.num_layers=2",
                                                     "model.ffn_hidden_size=128", "training.lm.vocab_size=300"])
    init_distributed(cfg)
    yield cfg
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _gpt(cfg, seed=0):
    gpt = GPT(cfg.model, padded_vocab_size(cfg.training.lm.vocab_size, 1), megatron_config(1))
    for i, layer in enumerate(gpt.children()):
        init_weights(layer, i, cfg.model, seed)
    return gpt


def test_vocab_is_padded_per_tp_rank():
    assert padded_vocab_size(50000, 1) == 50048
    assert padded_vocab_size(50000, 2) == 50176
    assert padded_vocab_size(50000, 2) % (2 * 128) == 0


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
    assert max(lrs) <= c.training.optimizers.lr
    assert all(x >= y for x, y in zip(lrs[warm + 1:], lrs[warm + 2:]))
    assert lrs[-1] == pytest.approx(c.training.scheduler.min_lr)
