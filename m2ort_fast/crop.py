"""The crop/resize stage: a spot's model inputs cut from a slide and resized.

    with open_slide("slide.svs") as slide:
        patches = read_spot_patches(slide, centers_px, level_mpp=[0.5, 1.0, 2.0])

A spot's three model inputs cover the same physical square at the model's working resolution
(``level_mpp``, from the checkpoint) and at 1/2 and 1/4 of it. ``read_spot_patches`` reads each
from the pyramid level chosen by physical resolution (``best_level_for_mpp``); where no level has
the needed resolution it reads the next finer one and resizes (bilinear, antialiased:
:func:`resize_patches`, the one resize used everywhere). ``spot_squares`` says which squares; the
streamed engine (:mod:`m2ort_fast.engine`) reads the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from m2ort_fast.slide import LEVEL_SOURCES, MPP_TOLERANCE, Slide

__all__ = [
    "resize_rgb",
    "resize_patches",
    "best_level_for_mpp",
    "read_spot_patches",
    "check_model_inputs",
    "SpotSquares",
    "spot_squares",
]


def resize_rgb(image: np.ndarray, width_px: int, height_px: int, *, exact_factor: int | None = None) -> np.ndarray:
    """Bilinear resize of one (H, W, 3) uint8 image; antialiased when shrinking (PIL widens the
    bilinear filter by the scale factor when reducing_gap is None).

    exact_factor: shrink by exactly this factor from the top-left corner, dropping the last
    (< factor) rows and columns, as pyramid levels are made (W // factor pixels): resizing the whole
    image to W // factor would stretch it slightly and shift the pixel grid off the 2x/4x one.
    """
    box = None if exact_factor is None else (0, 0, width_px * exact_factor, height_px * exact_factor)
    return np.asarray(
        Image.fromarray(image).resize((width_px, height_px), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    )


def resize_patches(patches: np.ndarray, size_px: int) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, size_px, size_px, 3) uint8 with :func:`resize_rgb`."""
    out = np.empty((len(patches), size_px, size_px, 3), dtype=np.uint8)
    for i, patch in enumerate(patches):
        out[i] = resize_rgb(patch, size_px, size_px)
    return out


def best_level_for_mpp(slide: Slide, target_mpp: float) -> int:
    """The coarsest level whose mpp is at most ``target_mpp`` (within MPP_TOLERANCE); the finest
    level when every level is coarser (the caller then upsamples)."""
    level_mpps = [slide.level_mpp(level) for level in range(slide.level_count)]
    fine_enough = [level for level, mpp in enumerate(level_mpps) if mpp <= target_mpp * (1 + MPP_TOLERANCE)]
    if not fine_enough:
        return int(np.argmin(level_mpps))
    return max(fine_enough, key=lambda level: level_mpps[level])


def read_spot_patches(
    slide: Slide,
    centers_px: np.ndarray,
    level_mpp: Sequence[float],
    sizes_px: Sequence[int] = (224, 112, 56),
    *,
    level_source: str = "pyramid",
) -> list[np.ndarray]:
    """The model's inputs for N spots: one uint8 array (N, S_l, S_l, 3) per level l.

    centers_px: (N, 2) float spot centres (x, y) in level-0 pixels. level_mpp: microns per pixel
    of each input (from the checkpoint), sizes_px: their sizes; all cover one physical square.
    level_source: "pyramid" reads each input from the pyramid level chosen by mpp (resizing from
    the next finer level where none matches); "resize" reads only the first and makes the others
    by resizing it (the preview code's way).
    """
    check_model_inputs(level_mpp, sizes_px, level_source)
    centers_px = np.asarray(centers_px, dtype=np.float64).reshape(-1, 2)
    if level_source == "pyramid":
        reads: dict = {}  # (level, read_px) -> squares, shared by inputs that resolve to the same read
        return [
            _read_squares(slide, centers_px, mpp, size, reads) for mpp, size in zip(level_mpp, sizes_px, strict=True)
        ]
    first = _read_squares(slide, centers_px, level_mpp[0], sizes_px[0], {})
    return [first] + [resize_patches(first, size) for size in sizes_px[1:]]


def check_model_inputs(level_mpp: Sequence[float], sizes_px: Sequence[int], level_source: str) -> None:
    """ValueError unless there is one mpp per input size and ``level_source`` is one of LEVEL_SOURCES."""
    if len(level_mpp) != len(sizes_px):
        raise ValueError(f"{len(level_mpp)} level mpps for {len(sizes_px)} sizes")
    if level_source not in LEVEL_SOURCES:
        raise ValueError(f"level_source must be 'pyramid' or 'resize', not {level_source!r}")


@dataclass
class SpotSquares:
    """One model input's squares: read ``read_px`` squares of pyramid ``level`` at ``top_left_px``
    ((N, 2) int64 (x, y) in pixels of that level), then resize to ``size_px`` if they differ."""

    level: int
    read_px: int
    size_px: int
    top_left_px: np.ndarray


def spot_squares(slide: Slide, centers_px: np.ndarray, target_mpp: float, size_px: int) -> SpotSquares:
    """Where one model input's squares are read: the coarsest pyramid level fine enough for
    ``target_mpp``, the square's side in that level's pixels, and each square's top-left corner
    (the centre rounded to the level's pixel grid). The naive path and the streamed engine both
    read exactly these squares, which is what makes their patches equal."""
    level = best_level_for_mpp(slide, target_mpp)
    side_px = size_px * target_mpp / slide.level_mpp(level)
    read_px = size_px if abs(side_px - size_px) <= MPP_TOLERANCE * size_px else max(1, round(side_px))
    centers_level_px = np.asarray(centers_px, dtype=np.float64).reshape(-1, 2) / slide.level_downsamples[level]
    top_left_px = np.floor(centers_level_px - read_px / 2 + 0.5).astype(np.int64)
    return SpotSquares(level, int(read_px), int(size_px), top_left_px)


def _read_squares(slide: Slide, centers_px: np.ndarray, target_mpp: float, size_px: int, reads: dict) -> np.ndarray:
    """(N, size_px, size_px, 3): squares of side size_px * target_mpp microns centred on centers_px."""
    where = spot_squares(slide, centers_px, target_mpp, size_px)
    # On a 1,4,16 pyramid the 1/2-resolution input is read at the same level and size as the
    # full-resolution one: the same squares, so read them once.
    key = (where.level, where.read_px)
    if key not in reads:
        reads[key] = slide.read_level_squares(where.level, where.top_left_px, where.read_px)
    squares = reads[key]
    return squares if where.read_px == size_px else resize_patches(squares, size_px)
