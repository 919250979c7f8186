"""The VL-JEPA in one process: no leakage into the predictors (text and vision), exact text-only rows,
the EMA update and its schedule, the loss weights, the collapse statistics and the batch layout.
(Multi-process parity and the EMA under ZeRO-3 are in test_vljepa_parallel.py.)"""

import io

import numpy as np
import pytest
import torch
from megatron.core import parallel_state
from PIL import Image

from cromwell.data.multimodal import JEPASamples, runs
from cromwell.data.tokenizer import PAD_ID
from cromwell.model.gpt import init_weights, megatron_config
from cromwell.model.jepa import collapse_stats, ema_update, momentum
from cromwell.model.vljepa import VLJEPA
from cromwell.pretrain.config import load_config
from cromwell.pretrain.evaluation.held_out import collapse_check
from cromwell.pretrain.objectives import Loss
from cromwell.pretrain.objectives.hybrid import Hybrid
from cromwell.pretrain.distributed import init_distributed
from cromwell.pretrain.parallelize import whole_parameters

VOCAB = 300
TINY = ["model.type=vljepa", "training.objective=hybrid", "model.hidden_size=64", "model.num_layers=2",
        "model.num_heads=4", "model.ffn_hidden_size=128", "model.vision.hidden_size=64", "model.vision.num_layers=2",
        "model.vision.num_heads=4", "model.vision.image_size=64", "model.fusion.every=1",
        "model.predictor.num_layers=1", "model.predictor.num_heads=4", "model.predictor.embedding_dim=64",
        "model.vocab_size=300", "training.lm.context_length=32", "training.jepa.span_length=4",
        "training.train_steps=10"]


def config(*sets):
    return load_config("pretrain/configs/tiny.yaml", TINY + list(sets))


@pytest.fixture(scope="module", autouse=True)
def process_group():
    init_distributed(config())
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def build(cfg, seed=0, open_gates=True):
    model = VLJEPA(cfg.model, megatron_config(1), kernels=cfg.training.kernels)
    for name, layer in model.named_children():
        init_weights(layer, int(name), cfg.model, seed)
    if open_gates:  # at init the gates are closed; opened, the text really reads the image
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.data.fill_(0.5)
    objective = Hybrid(cfg)
    objective.setup(model, whole_parameters(_NoZero()), "cpu")
    return model, objective


class _NoZero:
    def zero_optimization_stage(self):
        return 0


def png(seed: int, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def batch(objective, cfg, rows, images, first_position=0, vision="block"):
    """Collate rows [b, s+1] of ids with images (bytes or None) the way the loader's workers do."""
    v = cfg.model.vision
    fn = JEPASamples(seed=7, pad_id=PAD_ID, image_size=v.image_size, patch_size=v.patch_size,
                     masks=objective.predicts_embeddings, ratio=0.15, language="random", joint="span", vision=vision,
                     span_length=cfg.training.jepa.span_length)
    rows = torch.as_tensor(rows)
    extras = [fn(first_position + i, r.numpy(), img, f"sample {i}") for i, (r, img) in enumerate(zip(rows, images))]
    labels = rows[:, 1:].clone()
    labels[labels == PAD_ID] = -100
    return objective.collate((rows[:, :-1], labels, extras))


def predictions(model, objective, b):
    """(text predictions, vision predictions, text targets, vision targets) of one batch."""
    captured = {}
    orig_text, orig_vision = model.text_predictor.forward, model.vision_predictor.forward
    model.text_predictor.forward = lambda *a: captured.setdefault("text", orig_text(*a))
    model.vision_predictor.forward = lambda *a: captured.setdefault("vision", orig_vision(*a))
    try:
        loss = objective.forward(model, b)
    finally:
        del model.text_predictor.forward, model.vision_predictor.forward
    n_text = len(captured["text"])
    return captured["text"], captured["vision"], loss.target[-n_text:], loss.target[:-n_text]


def ids(seed, b=3, s=33):
    return torch.randint(3, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def test_text_predictions_never_read_the_units_they_predict():
    cfg = config()
    model, objective = build(cfg)
    rows = ids(0)
    b = batch(objective, cfg, rows, [png(1), None, png(2)])
    assert len(b.pair_rows) > 0 and set(b.pair_step.tolist()) == {0, 1, 2}
    text, _, target, _ = predictions(model, objective, b)
    # Change every token of row 1 from its second unit's start s on. The predictions OF that unit (at every
    # step), and every other prediction made from a context before s, must not move; the unit's target must.
    row = 1
    starts = sorted(set(b.pair_start[b.pair_rows == row].tolist()))
    assert len(starts) >= 3
    s = starts[1]
    changed = rows.clone()
    changed[row, s:] = (changed[row, s:] + 1 - 3) % (VOCAB - 3) + 3
    b2 = batch(objective, cfg, changed, [png(1), None, png(2)])
    assert torch.equal(b2.pair_start, b.pair_start)  # the masks come from the sample position, not its content
    text2, _, target2, _ = predictions(model, objective, b2)
    of_unit = (b.pair_rows == row) & (b.pair_start == s)
    before = (b.pair_rows == row) & (b.pair_context < s)
    assert of_unit.sum() == 2 and before.sum() > of_unit.sum()
    torch.testing.assert_close(text2[before], text[before], rtol=0, atol=0)
    assert (target2[of_unit] - target[of_unit]).abs().amax(dim=1).min() > 1e-3
    # Predictions from contexts that read the changed tokens do move (the test can tell), and the other
    # rows are untouched altogether.
    assert not torch.allclose(text2[(b.pair_rows == row) & ~before], text[(b.pair_rows == row) & ~before])
    torch.testing.assert_close(text2[b.pair_rows != row], text[b.pair_rows != row], rtol=0, atol=0)


def test_vision_predictions_never_read_the_patches_they_predict():
    cfg = config()
    model, objective = build(cfg)
    rows = ids(1)
    b = batch(objective, cfg, rows, [png(1), None, png(2)])
    text, vision, _, target = predictions(model, objective, b)
    # Scribble over the target patches of both images: the predictions (vision and text, since the
    # text reads only the context patches too) stay, the targets move.
    patches = b.patches.clone()
    for i in range(len(patches)):
        patches[i, b.targets[i].flatten()] = torch.randn_like(patches[i, b.targets[i].flatten()])
    b.patches = patches
    text2, vision2, _, target2 = predictions(model, objective, b)
    torch.testing.assert_close(vision2, vision, rtol=0, atol=0)
    torch.testing.assert_close(text2, text, rtol=0, atol=0)
    assert (target2 - target).abs().amax(dim=1).min() > 1e-3
    # The context patches, by contrast, do reach the predictions.
    b.patches[:, b.context[0, 0]] += 1.0
    assert not torch.allclose(predictions(model, objective, b)[1], vision)


def test_multiblock_targets_are_hidden_from_the_predictions_too():
    cfg = config("model.vision.image_size=128")  # an 8 x 8 grid: room for I-JEPA's 4 target blocks
    model, objective = build(cfg)
    b = batch(objective, cfg, ids(7), [png(1, 128), None, png(2, 128)], vision="multiblock")
    assert b.targets.shape[:2] == (2, 4) and b.context.shape[0] == 2
    for context, targets in zip(b.context, b.targets):
        assert not set(context.tolist()) & set(targets.flatten().tolist())  # context disjoint from every block
    _, vision, _, target = predictions(model, objective, b)
    assert vision.shape == (2, 4, b.targets.shape[2], 64)
    b.patches = b.patches.clone()
    for i in range(len(b.patches)):
        b.patches[i, b.targets[i].flatten()] = torch.randn_like(b.patches[i, b.targets[i].flatten()])
    _, vision2, _, target2 = predictions(model, objective, b)
    torch.testing.assert_close(vision2, vision, rtol=0, atol=0)
    assert (target2 - target).abs().amax(dim=1).min() > 1e-3


def test_text_only_rows_compute_the_language_model_exactly():
    cfg = config()
    model, _ = build(cfg)
    rows = ids(2, b=2, s=16)
    patches = torch.randn(1, 16, 768)
    _, mixed = model(rows, patches, torch.tensor([1]))
    _, alone = model(rows[:1], patches[:0], torch.zeros(0, dtype=torch.long))
    torch.testing.assert_close(mixed[0], alone[0], rtol=0, atol=0)
    _, no_image = model(rows[1:], patches[:0], torch.zeros(0, dtype=torch.long))
    assert not torch.allclose(mixed[1], no_image[0])  # the image row does read its image


def test_ema_update_is_exact_and_targets_get_no_gradient():
    cfg = config()
    model, objective = build(cfg)
    target = objective.ema_target()
    online = dict(model.named_parameters())
    for name, p in target.named_parameters():
        assert torch.equal(p, online[name]), f"{name}: the target starts as the online model"
        assert not p.requires_grad
    b = batch(objective, cfg, ids(3), [png(3), None, png(4)])
    objective.total(objective.forward(model, b).sums, objective.counts(b)).backward()
    assert all(p.grad is None for p in target.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    before = {n: p.clone() for n, p in target.named_parameters()}
    objective.after_step(model, whole_parameters(_NoZero()), step=4)
    m = momentum(4, 10, 0.996, 1.0)
    for name, p in target.named_parameters():
        assert torch.equal(p, before[name] * m + online[name] * (1 - m)), name
    assert not any(torch.equal(p, before[n]) for n, p in target.named_parameters() if p.numel() > 1)


def test_ema_keeps_fp32_targets_of_bf16_weights():
    target, online = [torch.ones(4)], [torch.full((4,), 3.0, dtype=torch.bfloat16)]
    ema_update(target, online, 0.999)
    assert target[0].dtype == torch.float32
    assert torch.equal(target[0], torch.ones(4) * 0.999 + torch.full((4,), 3.0) * (1 - 0.999))


def test_momentum_schedule_hits_its_endpoints():
    assert momentum(0, 100, 0.996, 1.0) == 0.996
    assert momentum(100, 100, 0.996, 1.0) == 1.0
    assert momentum(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert momentum(150, 100, 0.996, 1.0) == 1.0


@pytest.mark.parametrize("alpha,beta", [(0.0, 1.0), (1.0, 0.0), (0.3, 0.7)])
def test_loss_weights(alpha, beta):
    cfg = config(f"training.hybrid.alpha={alpha}", f"training.hybrid.beta={beta}")
    model, objective = build(cfg)
    b = batch(objective, cfg, ids(4), [png(5), None, png(6)])
    sums, counts = objective.forward(model, b).sums, objective.counts(b).float()
    lm = sums[0] / counts[0]
    total = objective.total(sums, counts)
    if alpha == 0:
        assert objective.ema_target() is None and b.context is None  # no target pass, the ViT reads every patch
        torch.testing.assert_close(total, lm)
        _, hidden = model(b.input_ids, b.patches, b.image_rows)
        torch.testing.assert_close(lm, model.lm_loss(hidden, b.labels))
    else:
        jepa = (sums[1] + sums[2]) / (counts[1] + counts[2])
        torch.testing.assert_close(total, beta * lm + alpha * jepa)
    assert objective.trains("jepa_head") == (alpha > 0)
    assert objective.trains("autoregressive_head") == (beta > 0)


def test_step_weights_weigh_the_text_predictions():
    cfg = config()
    model, objective = build(cfg)
    b = batch(objective, cfg, ids(5), [None, None, None])
    text, _, target, _ = predictions(model, objective, b)
    per_pair = (text - target).pow(2).mean(dim=1)
    weights = torch.tensor([1.0, 0.8, 0.6])[b.pair_step]
    sums, counts = objective.forward(model, b).sums, objective.counts(b)
    torch.testing.assert_close(sums[1], (weights * per_pair).sum())
    assert counts[1] == pytest.approx(float(weights.sum()))
    assert counts[2] == 0 and sums[2] == 0


def test_pairs_predict_the_kth_next_unit_from_before_the_first():
    cfg = config()
    _, objective = build(cfg)
    units = np.array([[3, 4], [7, 9], [12, 13], [20, 24]])
    rows, context, start, end, step = objective._pairs([np.zeros((0, 2), np.int64), units])
    assert set(rows.tolist()) == {1}
    got = sorted(zip(step.tolist(), context.tolist(), start.tolist(), end.tolist()))
    assert got == sorted([(0, 2, 3, 4), (0, 6, 7, 9), (0, 11, 12, 13), (0, 19, 20, 24),
                          (1, 2, 7, 9), (1, 6, 12, 13), (1, 11, 20, 24),
                          (2, 2, 12, 13), (2, 6, 20, 24)])
    assert (context < start).all()


def test_masks_cover_real_tokens_only_and_follow_the_sample_position():
    cfg = config()
    _, objective = build(cfg)
    row = np.full(33, PAD_ID, dtype=np.int64)
    row[:21] = np.arange(21) + 5
    fn = JEPASamples(seed=1, pad_id=PAD_ID, image_size=64, patch_size=16, masks=True, ratio=0.15, language="span",
                     span_length=4)
    out = fn(12, row, png(0), "x")
    assert out["patches"].shape == (16, 768) and out["targets"].shape == (1, 2)
    assert sorted(out["context"].tolist() + out["targets"][0].tolist()) == list(range(16))
    assert out["units"].min() >= 1 and out["units"].max() <= 20  # positions 1..19 of 20 real inputs
    again = fn(12, row, png(0), "x")
    assert all(np.array_equal(out[k], again[k]) for k in out)
    assert not np.array_equal(fn(13, row, png(0), "x")["units"], out["units"])
    np.testing.assert_array_equal(runs(np.array([0, 1, 1, 0, 1], bool)), [[1, 3], [4, 5]])


def test_collapse_stats_tell_collapsed_from_healthy_embeddings():
    healthy = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    std, rank = collapse_stats(healthy)
    assert std == pytest.approx(1.0, abs=0.1) and rank > 40
    line = torch.randn(512, 1) * torch.randn(1, 64) + 0.01 * torch.randn(512, 64)
    _, rank = collapse_stats(line)
    assert rank < 5
    std, _ = collapse_stats(torch.ones(512, 64) + 1e-6 * torch.randn(512, 64))
    assert std < 1e-5


def test_collapse_monitor_fires_on_collapsed_embeddings_only():
    cfg = config()
    model, objective = build(cfg)
    b = batch(objective, cfg, ids(6, b=4), [png(7), None, png(8), None])
    limits = cfg.training.jepa.collapse
    stats, problems = collapse_check(objective.forward(model, b), limits.min_std, limits.min_rank)
    assert problems == [] and stats["jepa_target_rank"] > 5 and stats["jepa_predicted_std"] > 0.01
    collapsed = Loss(torch.zeros(3), torch.ones(64, 64), torch.randn(64, 1) * torch.randn(1, 64))
    stats, problems = collapse_check(collapsed, limits.min_std, limits.min_rank)
    assert any("predicted embeddings' per-dimension std" in p for p in problems)
    assert any("target embeddings' effective rank" in p for p in problems)


def test_instruction_mode_trains_response_tokens_only():
    from cromwell.data.tokenizer import ASSISTANT, END, EOS_ID, USER, special_id
    from cromwell.pretrain.objectives.hybrid import responses

    user, assistant, end = special_id(USER), special_id(ASSISTANT), special_id(END)
    #        0     1   2   3          4   5   6    7     8          9   10   11
    row = [user, 40, 41, end, assistant, 50, 51, end, user, 42, end, assistant]
    inputs = torch.tensor([row])
    # label j is input j+1: the response's tokens 50, 51 and its <|end|> are trained, nothing else is
    # (the second turn's answer begins after the last input).
    assert responses(inputs)[0].nonzero().flatten().tolist() == [4, 5, 6, 11]
    cfg = config("training.hybrid.instruction=true", "training.hybrid.alpha=0", "training.hybrid.beta=1")
    _, objective = build(cfg)
    rows = torch.tensor([row + [60, end, EOS_ID]])
    b = objective.collate((rows[:, :-1], rows[:, 1:], [{}]))
    trained = (b.labels[0] != -100).nonzero().flatten().tolist()
    assert [rows[0, j + 1].item() for j in trained] == [50, 51, end, 60, end]


@pytest.mark.parametrize("kernels,impl", [("fused", "auto"), ("reference", "reference")])
def test_training_kernels_reaches_the_jepa_loss_and_the_cross_entropy(monkeypatch, kernels, impl):
    """One switch: the config's training.kernels picks the implementation of both fused losses."""
    import cromwell.model.gpt as gpt
    from cromwell.pretrain.objectives import hybrid

    seen = {"mse": [], "ce": []}
    real_mse, real_ce = hybrid.masked_mse, gpt.lm_loss
    monkeypatch.setattr(hybrid, "masked_mse", lambda *a, **kw: seen["mse"].append(kw["impl"]) or real_mse(*a, **kw))
    monkeypatch.setattr(gpt, "lm_loss", lambda *a: seen["ce"].append(a[3]) or real_ce(*a))
    cfg = config(f"training.kernels={kernels}")
    model, objective = build(cfg)
    b = batch(objective, cfg, ids(8), [png(9), None, png(10)])
    objective.forward(model, b)
    assert seen["mse"] == [impl, impl] and seen["ce"] == [kernels]
