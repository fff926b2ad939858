"""The C++ read plan (_core.plan_reads through stream.plan_slide_reads): every tile decoded once,
every spot's patches covered, memory within the budget."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from pyramids import write_test_pyramid

from m2ort_fast import _core
from m2ort_fast.engine import iter_streamed_patches, plan_slide_reads
from m2ort_fast.errors import M2ORTError
from m2ort_fast.slide import open_slide

LEVEL_MPP = (0.5, 1.0, 2.0)  # test pyramids are 0.5 um/px: level 1 exact, the others from levels 1/2 or resized
SIZES = (224, 112, 56)


@pytest.fixture(scope="module")
def svs_path(tmp_path_factory):
    return write_test_pyramid(tmp_path_factory.mktemp("plan") / "s.svs", "svs", size_px=2048)


def dense_centers(size_px: int, spacing_px: float, margin_px: float = -60) -> np.ndarray:
    """A square lattice of centres, some beyond the slide's edge (margin < 0)."""
    axis = np.arange(margin_px, size_px - margin_px, spacing_px)
    xx, yy = np.meshgrid(axis, axis)
    return np.stack([xx.ravel(), yy.ravel()], 1) + 0.37  # off the pixel grid


class CountingReads:
    """Records every region the reader decodes: level, x, y, width, height (level px)."""

    def __init__(self, slide):
        self.regions = []
        original = slide._read_level

        def counting(level, x_px, y_px, width_px, height_px):
            self.regions.append((level, x_px, y_px, width_px, height_px))
            return original(level, x_px, y_px, width_px, height_px)

        slide._read_level = counting

    def tile_counts(self, tiles) -> Counter:
        counts = Counter()
        for level, x, y, w, h in self.regions:
            tw, th = tiles[level]
            for ty in range(y // th, -(-(y + h) // th)):
                for tx in range(x // tw, -(-(x + w) // tw)):
                    counts[(level, tx, ty)] += 1
        return counts


def patch_tiles(plan, tiles, level_dims) -> set:
    needed = set()
    for source, squares in plan.inputs:
        level = plan.sources[source]
        tw, th = tiles[level]
        w, h = level_dims[level]
        for x, y in squares.top_left_px:
            x0, x1 = max(x, 0), min(x + squares.read_px, w)
            y0, y1 = max(y, 0), min(y + squares.read_px, h)
            for ty in range(y0 // th, -(-y1 // th)):
                for tx in range(x0 // tw, -(-x1 // tw)):
                    needed.add((level, tx, ty))
    return needed


@pytest.mark.parametrize("max_memory_mb", [256, 17])  # 17: two stripes
def test_each_tile_decoded_once_and_every_patch_covered(svs_path, max_memory_mb):
    with open_slide(svs_path, reader="tiffslide") as slide:
        centers = dense_centers(2048, 110)
        plan = plan_slide_reads(slide, centers, LEVEL_MPP, SIZES, max_memory_mb=max_memory_mb, step_spots=40)
        reads = CountingReads(slide)
        seen = np.zeros(len(centers), dtype=int)
        for spots, patches in iter_streamed_patches(slide, plan):
            seen[spots] += 1
            assert [p.shape[1] for p in patches] == list(SIZES)
        assert (seen == 1).all(), "every spot's patches exactly once"
        tiles = slide.level_tile_sizes_px
        counts = reads.tile_counts(tiles)
        needed = patch_tiles(plan, tiles, slide.level_dimensions)
    assert needed <= set(counts), "every tile a patch touches was decoded"
    assert sum(counts.values()) == plan.tiles_decoded
    assert plan.tiles_needed == len(needed)
    if max_memory_mb == 256:
        assert len(plan.stripe_rows) == 1
        assert max(counts.values()) == 1, "one stripe: each tile decoded exactly once"
        assert plan.tiles_decoded == plan.tiles_needed  # dense spots: no tile decoded in vain
    else:
        assert len(plan.stripe_rows) > 1, "the small budget must force stripes"
        # Only the tile columns that neighbouring stripes share are decoded again, once per stripe.
        assert max(counts.values()) <= len(plan.stripe_rows)
        assert plan.tiles_decoded < 1.6 * plan.tiles_needed
    assert plan.peak_bytes <= max_memory_mb * 2**20
    assert plan.naive_tile_reads > 5 * plan.tiles_decoded


def test_sparse_spots_get_small_windows(svs_path):
    with open_slide(svs_path, reader="tiffslide") as slide:
        centers = np.array([[300.0, 200.0], [1700.0, 1900.0], [1000.0, 1000.0]])
        plan = plan_slide_reads(slide, centers, LEVEL_MPP, SIZES)
    # Far-apart spots: separate steps, rows between them never decoded, windows of a patch + tiles.
    assert plan.n_steps == 3
    assert plan.stripe_rows.max() <= 3 * 256
    assert list(plan.order) == [0, 2, 1]


def test_budget_too_small_is_a_one_line_error(svs_path):
    with open_slide(svs_path, reader="tiffslide") as slide:
        with pytest.raises(M2ORTError, match="too small.*max-memory-mb"):
            plan_slide_reads(slide, dense_centers(2048, 300), LEVEL_MPP, SIZES, max_memory_mb=0.5)


def test_plan_reads_rejects_bad_input():
    centers = np.zeros((2, 2))
    top_left = np.zeros((2, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="top_left_px must have shape"):
        _core.plan_reads(centers, [(100, 100, 16, 16)], [(0, 8, np.zeros((3, 2), dtype=np.int64))])
    with pytest.raises(ValueError, match="names source 1"):
        _core.plan_reads(centers, [(100, 100, 16, 16)], [(1, 8, top_left)])
    with pytest.raises(ValueError, match="decreases"):
        _core.plan_reads(
            np.array([[0.0, 0.0], [0.0, 50.0]]), [(100, 100, 16, 16)], [(0, 8, np.array([[0, 40], [0, 10]]))]
        )
    empty = _core.plan_reads(np.zeros((0, 2)), [(100, 100, 16, 16)], [(0, 8, np.zeros((0, 2), dtype=np.int64))])
    assert len(empty["step_stripe"]) == 0 and list(empty["step_offsets"]) == [0]
