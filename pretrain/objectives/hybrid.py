"""The VL-JEPA hybrid objective (docs/design.md): alpha * JEPA + beta * LM on token shards whose samples may
hold an image (model/vljepa.py; what is predicted and why nothing leaks: model/jepa.py).

    total = beta * LM + alpha * (S_text + S_vision) / (N_text + N_vision)

LM is the mean next-token loss over labelled tokens. JEPA is the weighted mean of the per-prediction
losses: a vision prediction (one target patch) weighs 1, a text prediction at step k weighs
step_weights[k-1]. Both terms are normalised over the whole step, all micro batches and ranks.

One step costs one online pass (the ViT reads only the context patches, and the causal language pass
serves both losses), one forward of the EMA target encoder on the unmasked input, and the predictors.
So in a JEPA step the text reads the image's context patches only, as the ViT does (a masked-image
view, as in MAE-style training); with alpha = 0 both read every patch.
alpha = 0 skips the target and the predictors, and freezes the JEPA head: pure LM. beta = 0 still
reports the LM loss but trains no output projection: pure JEPA.

The target encoder lives here, beside the model, not in it: DeepSpeed would cast it to bf16, hand it
to the optimizer and partition it under ZeRO-3. It is fp32 and whole (per tensor-parallel shard) on
every rank; on a pipeline stage it holds the targets of that stage's layers, which the stage runs
beside its own (`ema_target`). The engine calls `setup` once its weights are final and `after_step`
after each optimizer step, with `whole(params)`, a context in which ZeRO-3-partitioned parameters are
gathered. Every rank then applies the same update to the same values, so targets cannot drift.

`loss` reads the model's outputs as a VL-JEPA pipeline's last stage gives them: (final hidden states,
the online ViT's tokens, the target's ViT tokens and final hidden states, the patches the ViT read),
and calls the heads of model/vljepa.Heads. `forward` (one process) runs the model and the target and
hands the same to `loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from cromwell.data.multimodal import JEPASamples
from cromwell.data.tokenizer import ASSISTANT, END, EOS_ID, IGNORE, PAD_ID, special_id
from cromwell.model.build import build
from cromwell.model.gpt import megatron_config
from cromwell.model.jepa import ema_update, momentum, span_means, target_embeddings
from cromwell.model.kernels import impl_of, masked_mse
from cromwell.model.vit import select
from cromwell.model.vljepa import VLJEPA, Heads
from cromwell.pretrain.config import Config
from cromwell.pretrain.objectives.base import Collated, Loss, Objective, token_batches

ASSISTANT_ID, END_ID = special_id(ASSISTANT), special_id(END)


def responses(input_ids: torch.Tensor) -> torch.Tensor:
    """bool [b, s]: whether label j (the token after input j) is part of a response, i.e. the last chat
    marker among inputs 0..j is <|assistant|>, not <|end|> or <|eos|> (so a response's closing marker
    is trained, and what follows it is not)."""
    closing = (input_ids == END_ID) | (input_ids == EOS_ID)
    marker = torch.where(input_ids == ASSISTANT_ID, 1, torch.where(closing, 2, 0))
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    last = torch.where(marker > 0, positions, 0).cummax(1).values
    return marker.gather(1, last) == 1


@dataclass
class HybridBatch:
    input_ids: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s]
    patches: torch.Tensor  # [bi, n, 3*p*p] of the rows image_rows [bi]
    image_rows: torch.Tensor
    context: torch.Tensor | None  # [bi, k] patches the online ViT reads (None: all; no JEPA)
    targets: torch.Tensor | None  # [bi, t, m] patches to predict
    pair_rows: torch.Tensor | None  # text predictions [p]: row, context position, predicted unit, step
    pair_context: torch.Tensor | None
    pair_start: torch.Tensor | None
    pair_end: torch.Tensor | None
    pair_step: torch.Tensor | None

    def to(self, device):
        return HybridBatch(*(None if t is None else t.to(device) for t in (getattr(self, f.name) for f in fields(self))))


class Hybrid(Objective):
    components = ("lm", "jepa_text", "jepa_vision")
    dynamic_shape = True  # images, masks and predictions vary in number from micro batch to micro batch

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.jepa, self.hybrid = cfg.training.jepa, cfg.training.hybrid
        self.weights = (self.hybrid.beta, self.hybrid.alpha, self.hybrid.alpha)
        self.target: VLJEPA | None = None
        self.predicts_embeddings = self.hybrid.alpha > 0

    def trains(self, module: str) -> bool:
        """Whether `module`, one of the model's five modules (model/vljepa.MODULES), gets an optimizer."""
        if module == "jepa_head" and not self.predicts_embeddings or module == "autoregressive_head" and self.hybrid.beta == 0:
            return False
        return module not in self.hybrid.freeze

    def total(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        counts = counts.to(sums)
        lm = sums[0] / counts[0].clamp(min=1)
        jepa = (sums[1] + sums[2]) / (counts[1] + counts[2]).clamp(min=1)
        return self.hybrid.beta * lm + self.hybrid.alpha * jepa

    # -- data ------------------------------------------------------------------------------------------

    def batches(self, split: str, dp_rank: int, dp_size: int):
        v, mb = self.cfg.model.vision, self.jepa.multiblock
        samples = JEPASamples(
            seed=self.cfg.data.seed, pad_id=PAD_ID, image_size=v.image_size, patch_size=v.patch_size,
            masks=self.predicts_embeddings, ratio=self.jepa.mask_ratio, language=self.jepa.masking.language,
            joint=self.jepa.masking.joint, vision=self.jepa.masking.vision, span_length=self.jepa.span_length,
            multiblock=(mb.num_targets, tuple(mb.scale), tuple(mb.aspect), tuple(mb.context_scale)))
        return Collated(token_batches(self.cfg, split, dp_rank, dp_size, samples), self.collate)

    def collate(self, batch) -> HybridBatch:
        input_ids, labels, extras = batch
        if self.hybrid.instruction:
            labels = torch.where(responses(input_ids), labels, IGNORE)
        v = self.cfg.model.vision
        rows = [i for i, e in enumerate(extras) if "patches" in e]
        patches = (torch.from_numpy(np.stack([extras[i]["patches"] for i in rows])) if rows
                   else torch.zeros(0, v.grid**2, 3 * v.patch_size**2))
        image_rows = torch.tensor(rows, dtype=torch.long)
        if not self.predicts_embeddings:
            return HybridBatch(input_ids, labels, patches, image_rows, *[None] * 7)
        # Multi-block contexts and targets differ in size: all are cut to the batch's shortest, as I-JEPA's collator does.
        context, targets = torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 1, 0, dtype=torch.long)
        if rows:
            size = min(len(extras[i]["context"]) for i in rows)
            context = torch.from_numpy(np.stack([extras[i]["context"][:size] for i in rows]))
            size = min(extras[i]["targets"].shape[1] for i in rows)
            targets = torch.from_numpy(np.stack([extras[i]["targets"][:, :size] for i in rows]))
        return HybridBatch(input_ids, labels, patches, image_rows, context, targets,
                           *self._pairs([e.get("units", np.zeros((0, 2), np.int64)) for e in extras]))

    def _pairs(self, units: list[np.ndarray]) -> list[torch.Tensor]:
        """Text predictions: from the context before each unit u, step k predicts unit u + k."""
        out = []
        for row, u in enumerate(units):
            for k in range(self.cfg.model.predictor.prediction_steps):
                n = len(u) - k
                if n > 0:
                    out.append(np.stack([np.full(n, row), u[:n, 0] - 1, u[k:, 0], u[k:, 1], np.full(n, k)], axis=1))
        pairs = np.concatenate(out) if out else np.zeros((0, 5), np.int64)
        return list(torch.from_numpy(pairs.astype(np.int64)).unbind(dim=1))

    def counts(self, batch: HybridBatch) -> torch.Tensor:
        lm = (batch.labels != IGNORE).sum().item()
        if not self.predicts_embeddings:
            return torch.tensor([lm, 0.0, 0.0], dtype=torch.float64)
        text = float(torch.tensor(self.jepa.step_weights, dtype=torch.float64)[batch.pair_step].sum())
        return torch.tensor([lm, text, batch.targets.numel()], dtype=torch.float64)

    def input_ids(self, batch: HybridBatch) -> torch.Tensor:
        return batch.input_ids

    # -- loss ------------------------------------------------------------------------------------------

    def inputs(self, b: HybridBatch) -> tuple[tuple, tuple]:
        """((patches, input_ids, image_rows, the patches the ViT reads: all without JEPA), (LM labels,
        JEPA indices: empty without JEPA))."""
        keep = b.context
        if keep is None:
            keep = torch.arange(b.patches.shape[1]).expand(len(b.patches), -1)
        none = torch.zeros(0, dtype=torch.long)
        targets = (b.labels, *(none if t is None else t for t in (b.targets, b.pair_rows, b.pair_context,
                                                                   b.pair_start, b.pair_end, b.pair_step)))
        return (b.patches, b.input_ids, b.image_rows, keep), targets

    def forward(self, model: VLJEPA, b: HybridBatch) -> Loss:
        bf16 = model.projections.text.weight.dtype == torch.bfloat16  # the loader's pixels are fp32
        patches = b.patches.to(torch.bfloat16 if bf16 else torch.float32)
        vision, hidden = model(b.input_ids, patches, b.image_rows, b.context)
        target_vision = target_text = None
        if self.predicts_embeddings:
            # The fp32 target computes in bf16 when the online model does: its weights stay exact averages.
            with torch.no_grad(), torch.autocast(patches.device.type, torch.bfloat16, enabled=bf16):
                target_vision, target_text = self.target(b.input_ids, patches, b.image_rows)
        heads = model.heads(None if self.target is None else self.target.projections)
        return self.loss(heads, (hidden, vision, target_vision, target_text, b.context), self.inputs(b)[1])

    def loss(self, heads: Heads, outputs, targets) -> Loss:
        """[lm, jepa_text, jepa_vision] loss sums from the encoders' outputs (online and target), with
        the predictions and their targets."""
        hidden, vision, target_vision, target_text, context = outputs
        labels, *jepa = targets
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.hybrid.beta > 0):
            lm = heads.lm_loss(hidden, labels, reduction="sum")
        if not self.predicts_embeddings:
            return Loss(torch.stack([lm, lm.new_zeros(()), lm.new_zeros(())]))
        targets, pair_rows, pair_context, pair_start, pair_end, pair_step = jepa
        with torch.no_grad():
            target_vision = select(target_vision, targets.flatten(1))
            target_vision, target_text = heads.target_projections(target_vision, target_text)
            target_vision = target_embeddings(target_vision).flatten(0, 1)
            target_text = span_means(target_embeddings(target_text), pair_rows, pair_start, pair_end)
        online_vision, online_text = heads.projections(vision, hidden[pair_rows, pair_context])
        predicted_vision = heads.vision_predictor(online_vision, context, targets).flatten(0, 2)
        predicted_text = heads.text_predictor(online_text, pair_step)
        weights = torch.tensor(self.jepa.step_weights, device=predicted_text.device)[pair_step]
        sums = torch.stack([lm, self._loss_sum(predicted_text, target_text, weights),
                            self._loss_sum(predicted_vision, target_vision, None)])
        return Loss(sums, torch.cat([predicted_vision, predicted_text]).detach(),
                    torch.cat([target_vision, target_text]).detach())

    def _loss_sum(self, predicted, target, weights) -> torch.Tensor:
        """Sum over rows of weight x loss (masked_mse is that sum over the number of rows)."""
        rows = len(predicted)
        if rows == 0:
            return predicted.sum()  # zero, with a gradient path for every predictor weight
        mask = torch.ones(rows, dtype=torch.bool, device=predicted.device)
        return masked_mse(predicted.float(), target.float(), mask, weights=weights, kind=self.jepa.loss,
                          impl=impl_of(self.cfg.training.kernels)) * rows

    # -- the EMA target --------------------------------------------------------------------------------

    def setup(self, model, whole, device) -> None:
        """The target starts as the online model (I-JEPA). On a pipeline stage it holds the targets of
        the stage's own layers."""
        if not self.predicts_embeddings:
            return
        cfg = self.cfg
        stage = {name for name, _ in model.named_children()}
        self.target = build(cfg.model, megatron_config(cfg.parallel.tensor), kernels=cfg.training.kernels,
                            target=True, only=stage)
        self.target.requires_grad_(False).to(device=device, dtype=torch.float32)
        for p in self.target.parameters():
            p.zero_()  # megatron's layers leave their weights uninitialised, and 0 x NaN is NaN
        self._ema(model, whole, 0.0)

    def ema_target(self) -> VLJEPA | None:
        return self.target

    def after_step(self, model: VLJEPA, whole, step: int) -> None:
        if self.target is not None:
            start, end = self.jepa.momentum
            self._ema(model, whole, momentum(step, self.cfg.train_steps(), start, end))

    def _ema(self, model: VLJEPA, whole, m: float) -> None:
        online = dict(model.named_parameters())
        for name, layer in self.target.named_children():  # one layer's parameters gathered at a time
            pairs = [(p, online[f"{name}.{n}"]) for n, p in layer.named_parameters()]
            with whole([o for _, o in pairs]):
                ema_update([t for t, _ in pairs], [o for _, o in pairs], m)

    def state_dict(self) -> dict:
        return {} if self.target is None else {"ema_target": self.target.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.target is not None:
            self.target.load_state_dict(state["ema_target"])
