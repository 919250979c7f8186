"""Masks built in the data path, next to the batches they describe: attention masks and positions for
packed documents, and the JEPA masks that choose what the predictor must predict."""

import numpy as np
import torch


def document_positions_and_mask(input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and attention for packed sequences whose documents end with eos.

    A document's eos belongs to it; the token after it starts the next document, at position 0,
    and no token attends across a document boundary (Megatron's reset_position_ids plus
    reset_attention_mask). Returns position_ids [b, s] and a bool mask [b, 1, s, s] (True = may
    attend). The label at an eos (the next document's first token) is still trained, as Megatron
    does unless eod_mask_loss is set: it teaches what documents start with.
    """
    b, s = input_ids.shape
    is_eos = input_ids == eos_id
    doc = is_eos.long().cumsum(1) - is_eos.long()  # eos counts towards the document it ends
    index = torch.arange(s).expand(b, s)
    after_eos = torch.zeros_like(is_eos)
    after_eos[:, 1:] = is_eos[:, :-1]
    start = torch.where(after_eos, index, 0).cummax(1).values
    same_doc = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return index - start, (same_doc & causal)[:, None]


# JEPA masks: which positions a sample's predictor must predict. Numpy only, drawn per sample in the
# DataLoader workers.

# Names the mask stream within a sample's seed material, so other per-sample randomness seeded from
# the same (seed, position) draws independently of the masks.
_MASK_STREAM = 0x6A657061  # "jepa"
# multiblock_mask redraws when the context keeps fewer than this fraction of the patches, as
# I-JEPA's min_keep does, and after this many draws keeps the draw with the largest context.
_MIN_CONTEXT = 0.1
_MAX_DRAWS = 100


def mask_rng(seed: int, position: int) -> np.random.Generator:
    """The generator for the sample at global `position` of the run seeded `seed`.

    One generator per sample, not per worker: a resumed run, or one with any number of workers or
    ranks, draws the same masks for the same sample.
    """
    if seed < 0 or position < 0:
        raise ValueError(f"mask seed and position must be non-negative, got {seed} and {position}")
    return np.random.default_rng([seed, position, _MASK_STREAM])


def random_mask(rng: np.random.Generator, length: int, ratio: float) -> np.ndarray:
    """bool [length] with exactly max(1, round(length * ratio)) True at uniformly random positions
    (none if length is 0): language "random" masking. An exact count, not a Bernoulli draw per
    position, so every sample has a prediction target and batches have steady work."""
    _check_ratio(ratio)
    _check_length(length)
    mask = np.zeros(length, dtype=bool)
    if length:
        mask[rng.choice(length, max(1, round(length * ratio)), replace=False)] = True
    return mask


def span_mask(rng: np.random.Generator, length: int, ratio: float, span: int) -> np.ndarray:
    """bool [length]: n = max(1, round(length * ratio / span)) spans of `span` consecutive True, no two
    touching (joint "span" masking: a whole phrase or code line is hidden, not tokens whose neighbours
    give them away). `span` is clipped to `length`; if n spans do not fit with a gap between each two,
    as many as fit. Every placement of the spans is equally likely."""
    _check_ratio(ratio)
    _check_length(length)
    if span < 1:
        raise ValueError(f"span must be at least 1, got {span}")
    mask = np.zeros(length, dtype=bool)
    if not length:
        return mask
    span = min(span, length)
    count = min(max(1, round(length * ratio / span)), (length + 1) // (span + 1))
    # Placements <-> count-subsets of range(free + count), where free is the room left after the
    # spans and their one-position gaps: the i-th smallest member c_i puts span i at c_i + i * span.
    free = length - count * span - (count - 1)
    starts = np.sort(rng.choice(free + count, count, replace=False)) + np.arange(count) * span
    for start in starts:
        mask[start:start + span] = True
    return mask


def block_mask(rng: np.random.Generator, grid: tuple[int, int], ratio: float) -> np.ndarray:
    """bool [h * w], raster order: exactly max(1, round(h * w * ratio)) patches at random (the design
    doc's vision "block" masking, a block being one 16 x 16-pixel patch)."""
    h, w = _check_grid(grid)
    return random_mask(rng, h * w, ratio)


def multiblock_mask(rng: np.random.Generator, grid: tuple[int, int], num_targets: int = 4,
                    scale: tuple[float, float] = (0.15, 0.2), aspect: tuple[float, float] = (0.75, 1.5),
                    context_scale: tuple[float, float] = (0.85, 1.0),
                    context_aspect: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """I-JEPA's multi-block masking (Assran et al. 2023): returns (context bool [h * w], targets bool
    [num_targets, h * w]), raster order.

    Each target is a rectangle covering a fraction of the grid in `scale` with aspect ratio
    height / width in `aspect`; targets may overlap each other. The context is a rectangle of
    `context_scale` and `context_aspect` minus the union of the targets, so the encoder never sees
    what it is asked to predict.

    Sampling follows I-JEPA's src/masks/multiblock.py, with these differences. Scale and aspect are
    uniform there too, but one uniform number sets both (so large blocks are always the tall ones),
    and one size serves a whole batch; here each block draws both, independently. I-JEPA rounds the
    drawn shape to whole patches, which on a 16 x 16 grid often leaves the ranges; here the block is
    the whole-patch shape nearest the drawn one among those inside both ranges. Positions are uniform
    over every placement (I-JEPA's never touch the bottom or right edge). Where I-JEPA shrinks a too
    small context by dropping targets from the subtraction, here the whole draw is repeated while
    the context keeps fewer than 10% of the patches (after 100 draws, the largest context wins).
    """
    h, w = _check_grid(grid)
    if num_targets < 1:
        raise ValueError(f"num_targets must be at least 1, got {num_targets}")
    target_shapes = _block_shapes((h, w), scale, aspect, "target")
    context_shapes = _block_shapes((h, w), context_scale, context_aspect, "context")
    best = None
    for _ in range(_MAX_DRAWS):
        targets = np.stack([_block(rng, (h, w), target_shapes, scale, aspect) for _ in range(num_targets)])
        context = _block(rng, (h, w), context_shapes, context_scale, context_aspect) & ~targets.any(0)
        if best is None or context.sum() > best[0].sum():
            best = context, targets
        if context.sum() >= _MIN_CONTEXT * h * w:
            break
    if not best[0].any():
        raise ValueError(f"the targets cover the whole context in {_MAX_DRAWS} draws: scale {scale} x "
                         f"{num_targets} targets leaves no context of scale {context_scale}")
    return best


def _block_shapes(grid, scale, aspect, name) -> np.ndarray:
    """[k, 2] every (height, width) in whole patches whose area fraction is in `scale` and aspect in
    `aspect`, both inclusive."""
    h, w = grid
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"{name} scale must satisfy 0 < low <= high <= 1, got {scale}")
    if not 0 < aspect[0] <= aspect[1]:
        raise ValueError(f"{name} aspect must satisfy 0 < low <= high, got {aspect}")
    heights, widths = np.meshgrid(np.arange(1, h + 1), np.arange(1, w + 1), indexing="ij")
    fraction, ratio = heights * widths / (h * w), heights / widths
    fits = (scale[0] <= fraction) & (fraction <= scale[1]) & (aspect[0] <= ratio) & (ratio <= aspect[1])
    if not fits.any():
        raise ValueError(f"no {name} block of whole patches on a {h}x{w} grid has scale in {scale} and "
                         f"aspect (height / width) in {aspect}")
    return np.stack([heights[fits], widths[fits]], axis=1)


def _block(rng, grid, shapes, scale, aspect) -> np.ndarray:
    h, w = grid
    area = rng.uniform(*scale) * h * w
    ratio = rng.uniform(*aspect)
    wanted = np.array([np.sqrt(area * ratio), np.sqrt(area / ratio)])
    height, width = shapes[np.argmin(((shapes - wanted) ** 2).sum(1))]
    top, left = rng.integers(0, h - height + 1), rng.integers(0, w - width + 1)
    block = np.zeros((h, w), dtype=bool)
    block[top:top + height, left:left + width] = True
    return block.reshape(-1)


def _check_ratio(ratio: float) -> None:
    if not 0 < ratio < 1:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")


def _check_length(length: int) -> None:
    if length < 0:
        raise ValueError(f"mask length must be non-negative, got {length}")


def _check_grid(grid) -> tuple[int, int]:
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid must be (height, width) in patches, both positive, got {grid}")
    return int(grid[0]), int(grid[1])
