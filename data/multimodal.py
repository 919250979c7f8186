"""What the VL-JEPA objective needs of each sample beyond its tokens, made in the loader's workers
(`TokenBatches(sample_fn=JEPASamples(...))`): the image as patches, and the JEPA masks.

Masks are drawn from a generator keyed by (seed, the sample's global position), so a resumed run, or
one with other ranks, workers or micro batches, draws the same masks for the same sample.

Text masks cover positions 1 .. n-1 of the sample's n real (non-padding) input tokens: position 0
has no earlier state to predict it from. They are returned as units, the maximal runs of masked
positions, [start, end) each: model/jepa.py predicts units, not single tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cromwell.data.images import patchify, preprocess
from cromwell.data.masks import block_mask, mask_rng, multiblock_mask, random_mask, span_mask


def runs(mask: np.ndarray) -> np.ndarray:
    """[U, 2] int64: start and end of each maximal run of True in a bool vector."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1).astype(np.int64)


@dataclass(frozen=True)
class JEPASamples:
    """sample_fn(position, ids, image, where) -> {"patches" [n, 3*p*p] float32 (with an image),
    "context" [k] / "targets" [t, m] int64 patch indices (with an image, when masking), "units" [U, 2]
    int64 (when masking)}. A picklable value, as DataLoader workers need."""

    seed: int
    pad_id: int
    image_size: int
    patch_size: int
    masks: bool  # False: the image only (pure LM needs no mask)
    ratio: float = 0.15
    language: str = "random"
    joint: str = "span"
    vision: str = "block"
    span_length: int = 32
    multiblock: tuple = (4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0))  # targets, scale, aspect, context scale

    def __call__(self, position: int, ids: np.ndarray, image: bytes | None, where: str) -> dict:
        out = {}
        if image is not None:
            pixels = preprocess(image, where, self.image_size)
            out["patches"] = patchify(pixels[None], self.patch_size)[0]
        if not self.masks:
            return out
        rng = mask_rng(self.seed, position)
        if image is not None:
            out["context"], out["targets"] = self._vision(rng)
        real = int((ids[:-1] != self.pad_id).sum())
        text = np.zeros(real, dtype=bool)
        if real > 1:
            strategy = self.joint if image is not None else self.language
            text[1:] = (span_mask(rng, real - 1, self.ratio, self.span_length) if strategy == "span"
                        else random_mask(rng, real - 1, self.ratio))
        out["units"] = runs(text)
        return out

    def _vision(self, rng) -> tuple[np.ndarray, np.ndarray]:
        grid = (self.image_size // self.patch_size,) * 2
        if self.vision == "block":
            hidden = block_mask(rng, grid, self.ratio)
            return np.flatnonzero(~hidden), np.flatnonzero(hidden)[None]
        num_targets, scale, aspect, context_scale = self.multiblock
        context, targets = multiblock_mask(rng, grid, num_targets, scale, aspect, context_scale)
        # Target blocks differ in size; every block of a batch is cut to the smallest, as I-JEPA's collator does.
        blocks = [np.flatnonzero(t) for t in targets]
        size = min(len(b) for b in blocks)
        return np.flatnonzero(context), np.stack([b[:size] for b in blocks])
