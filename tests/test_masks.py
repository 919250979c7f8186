"""data.masks' JEPA masks: exact counts, uniform positions, span and multi-block structure,
per-sample determinism, argument errors. Every draw is seeded, so no test is flaky or timed."""

import itertools

import numpy as np
import pytest

from cromwell.data.masks import block_mask, mask_rng, multiblock_mask, random_mask, span_mask

DRAWS = 2000


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def assert_uniform(masks: np.ndarray, p: float):
    """Each position's masked frequency within 5 binomial sigmas of p."""
    sigma = np.sqrt(p * (1 - p) / len(masks))
    assert np.abs(masks.mean(0) - p).max() < 5 * sigma


@pytest.mark.parametrize("length, ratio", [(1024, 0.15), (100, 0.5), (7, 0.01), (1, 0.9), (33, 0.999)])
def test_random_mask_count(length, ratio):
    for position in range(20):
        mask = random_mask(mask_rng(0, position), length, ratio)
        assert mask.shape == (length,) and mask.dtype == bool
        assert mask.sum() == max(1, round(length * ratio))


def test_random_mask_empty():
    assert random_mask(mask_rng(0, 0), 0, 0.15).shape == (0,)


def test_random_mask_uniform():
    masks = np.stack([random_mask(mask_rng(1, i), 64, 0.15) for i in range(DRAWS)])
    assert_uniform(masks, round(64 * 0.15) / 64)


@pytest.mark.parametrize("length, ratio, span, count", [
    (1024, 0.15, 32, 5),
    (100, 0.5, 10, 5),
    (40, 0.9, 10, 3),  # 4 wanted, 3 fit with gaps
    (64, 0.01, 8, 1),  # at least one
    (5, 0.15, 32, 1),  # the span clipped to the length
    (9, 0.5, 1, 4),  # 4.5 rounds to even
])
def test_span_mask_structure(length, ratio, span, count):
    for position in range(50):
        mask = span_mask(mask_rng(0, position), length, ratio, span)
        assert mask.shape == (length,) and mask.dtype == bool
        found = runs(mask)
        # Maximal runs: two spans with no gap between them would be one run of twice the length.
        assert [run_length for _, run_length in found] == [min(span, length)] * count


def test_span_mask_empty():
    assert span_mask(mask_rng(0, 0), 0, 0.5, 4).shape == (0,)


def test_span_mask_uniform_over_placements():
    # Two spans of 2 in 7 positions with a gap: 6 placements, each to be drawn equally often.
    placements = [starts for starts in itertools.combinations(range(6), 2) if starts[1] - starts[0] >= 3]
    assert len(placements) == 6
    drawn = [tuple(start for start, _ in runs(span_mask(mask_rng(2, i), 7, 4 / 7, 2))) for i in range(3000)]
    counts = np.array([drawn.count(starts) for starts in placements])
    assert counts.sum() == len(drawn)
    p = 1 / len(placements)
    assert np.abs(counts / len(drawn) - p).max() < 5 * np.sqrt(p * (1 - p) / len(drawn))


@pytest.mark.parametrize("grid, ratio", [((16, 16), 0.5), ((16, 16), 0.15), ((3, 5), 0.01)])
def test_block_mask_count(grid, ratio):
    for position in range(20):
        mask = block_mask(mask_rng(0, position), grid, ratio)
        assert mask.shape == (grid[0] * grid[1],) and mask.dtype == bool
        assert mask.sum() == max(1, round(grid[0] * grid[1] * ratio))


def test_block_mask_uniform():
    masks = np.stack([block_mask(mask_rng(3, i), (8, 8), 0.25) for i in range(DRAWS)])
    assert_uniform(masks, 0.25)


def rectangle(mask: np.ndarray, grid) -> tuple[int, int]:
    """(height, width) of the filled rectangle `mask` is, failing if it is anything else."""
    cells = mask.reshape(grid)
    rows, columns = np.flatnonzero(cells.any(1)), np.flatnonzero(cells.any(0))
    height, width = rows[-1] - rows[0] + 1, columns[-1] - columns[0] + 1
    assert cells[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1].all() and cells.sum() == height * width
    return height, width


@pytest.mark.parametrize("grid, kwargs", [
    ((16, 16), {}),
    ((12, 20), {"num_targets": 2, "scale": (0.1, 0.3), "aspect": (0.5, 2.0), "context_aspect": (0.5, 2.0)}),
])
def test_multiblock_structure(grid, kwargs):
    scale, aspect = kwargs.get("scale", (0.15, 0.2)), kwargs.get("aspect", (0.75, 1.5))
    num_targets = kwargs.get("num_targets", 4)
    cells = grid[0] * grid[1]
    covered = np.zeros(cells, dtype=bool)
    for position in range(500):
        context, targets = multiblock_mask(mask_rng(0, position), grid, **kwargs)
        assert context.shape == (cells,) and targets.shape == (num_targets, cells)
        assert context.dtype == bool and targets.dtype == bool
        for target in targets:
            height, width = rectangle(target, grid)
            assert scale[0] <= height * width / cells <= scale[1]
            assert aspect[0] <= height / width <= aspect[1]
        union = targets.any(0)
        assert not (context & union).any()
        assert context.sum() >= 0.1 * cells
        covered |= union
    # Targets reach every patch, the bottom row and right column too.
    assert covered.all()


def test_multiblock_context_is_a_square_minus_the_targets():
    for position in range(200):
        context, targets = multiblock_mask(mask_rng(4, position), (16, 16), num_targets=1, scale=(0.25, 0.25),
                                           aspect=(1.0, 1.0), context_scale=(1.0, 1.0))
        np.testing.assert_array_equal(context, ~targets[0])


def test_multiblock_targets_overlap_sometimes():
    overlaps = 0
    for position in range(200):
        _, targets = multiblock_mask(mask_rng(5, position), (16, 16))
        overlaps += targets.sum() > targets.any(0).sum()
    assert overlaps > 0


def test_same_sample_same_masks():
    draws = [
        lambda rng: random_mask(rng, 1024, 0.15),
        lambda rng: span_mask(rng, 1024, 0.15, 32),
        lambda rng: block_mask(rng, (16, 16), 0.5),
        lambda rng: np.concatenate([multiblock_mask(rng, (16, 16))[0][None], multiblock_mask(rng, (16, 16))[1]]),
    ]
    for draw in draws:
        same = draw(mask_rng(7, 3))
        np.testing.assert_array_equal(draw(mask_rng(7, 3)), same)
        assert not np.array_equal(draw(mask_rng(7, 4)), same)
        assert not np.array_equal(draw(mask_rng(8, 3)), same)


def test_masks_do_not_depend_on_draw_order():
    # What a resumed run or another worker split sees: sample 5's masks whatever was drawn before.
    forward = [span_mask(mask_rng(0, i), 256, 0.15, 32) for i in range(10)]
    backward = [span_mask(mask_rng(0, i), 256, 0.15, 32) for i in reversed(range(10))][::-1]
    np.testing.assert_array_equal(np.stack(forward), np.stack(backward))


@pytest.mark.parametrize("call, message", [
    (lambda rng: random_mask(rng, 10, 0.0), "ratio"),
    (lambda rng: random_mask(rng, 10, 1.0), "ratio"),
    (lambda rng: random_mask(rng, 10, -0.5), "ratio"),
    (lambda rng: random_mask(rng, -1, 0.5), "length"),
    (lambda rng: span_mask(rng, 10, 0.5, 0), "span"),
    (lambda rng: span_mask(rng, 10, 1.5, 2), "ratio"),
    (lambda rng: block_mask(rng, (0, 16), 0.5), "grid"),
    (lambda rng: block_mask(rng, (16,), 0.5), "grid"),
    (lambda rng: block_mask(rng, (16, 16), 1.0), "ratio"),
    (lambda rng: multiblock_mask(rng, (16, -1)), "grid"),
    (lambda rng: multiblock_mask(rng, (16, 16), num_targets=0), "num_targets"),
    (lambda rng: multiblock_mask(rng, (16, 16), scale=(0.3, 0.2)), "scale"),
    (lambda rng: multiblock_mask(rng, (16, 16), scale=(0.0, 0.2)), "scale"),
    (lambda rng: multiblock_mask(rng, (16, 16), aspect=(0.0, 1.0)), "aspect"),
    (lambda rng: multiblock_mask(rng, (16, 16), scale=(0.5, 0.5), aspect=(1.0, 1.0)), "no target block"),
    # A square context cannot cover 85% of a 12 x 20 grid.
    (lambda rng: multiblock_mask(rng, (12, 20)), "no context block"),
    (lambda rng: multiblock_mask(rng, (16, 16), scale=(1.0, 1.0), aspect=(1.0, 1.0)), "cover the whole context"),
])
def test_argument_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(mask_rng(0, 0))


@pytest.mark.parametrize("seed, position", [(-1, 0), (0, -1)])
def test_mask_rng_rejects_negatives(seed, position):
    with pytest.raises(ValueError, match="non-negative"):
        mask_rng(seed, position)
