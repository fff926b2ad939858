"""The ``Slide`` interface every reader implements, its constants and shared helpers.

Coordinates follow OpenSlide: ``read_region`` takes the top-left corner in level-0 pixels and the
size in pixels of the level read. Everything outside the slide reads as white (255).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from m2ort_fast.errors import SlideError, exception_detail

if TYPE_CHECKING:
    import torch

    from m2ort_fast.slide._tiff import TileVerifier

log = logging.getLogger(__name__)

MPP_SOURCES = ("metadata", "user", "spot-table", "none")
# Microns per pixel of any microscope image: 0.01 (beyond any objective) to 100 (a thumbnail).
MPP_RANGE = (0.01, 100.0)
# How a spot's coarser inputs are made: read from the pyramid, or resized from the first input.
LEVEL_SOURCES = ("pyramid", "resize")
# Levels whose mpp is within this fraction of a target count as that resolution (pyramid level
# sizes are rounded to whole pixels, so a "4x" level is often 4.001x).
MPP_TOLERANCE = 0.01
# Thumbnails of huge single-level images are built from bands of this many rows/columns.
THUMBNAIL_CHUNK_PX = 4096
# The tile grid assumed where the file does not say (flat images, unknown formats).
DEFAULT_TILE_PX = 256
NO_MPP_MESSAGE = "no mpp metadata; pass --mpp"


class Slide:
    """One opened slide or flat image. Subclasses implement ``_read_level`` (and may override
    ``_read_level_batch`` with a faster batched read); everything else is shared."""

    reader_name = ""

    def __init__(self, path: Path, vendor: str, level_dimensions: Sequence[tuple[int, int]], mpp: float | None):
        self.path = Path(path)
        self.vendor = vendor
        self.level_dimensions = [(int(w), int(h)) for w, h in level_dimensions]
        self.level_count = len(self.level_dimensions)
        width0_px = self.level_dimensions[0][0]
        height0_px = self.level_dimensions[0][1]
        # OpenSlide's convention: the downsample of a level is the mean of its width and height ratios.
        self._set_downsamples([((width0_px / w) + (height0_px / h)) / 2 for w, h in self.level_dimensions])
        self.mpp: float | None = None
        self.mpp_source = "none"
        if mpp is not None and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
            self.set_mpp(mpp, "metadata")
        elif mpp is not None:
            log.warning(
                "%s: ignoring its metadata's mpp of %g um/px (outside %g..%g um/px); pass --mpp",
                self.path.name,
                mpp,
                *MPP_RANGE,
            )
        # Checks tile data before the reader decodes it (TIFF-based slides; see TileVerifier).
        self.tile_verifier: TileVerifier | None = None
        # (tile_width_px, tile_height_px) per level where the reader knows them (_set_tile_sizes).
        self._tile_sizes_px: tuple[tuple[int, int], ...] | None = None

    def _set_downsamples(self, reader_downsamples: Sequence[float]) -> None:
        # Levels are made by whole-number reductions and their sizes rounded down (9911 px / 2 ->
        # 4955, "2.0002x"); spot geometry uses the whole number, so pixel grids line up. The
        # reader's own value is kept for the level-0 locations it maps back to level pixels.
        self._reader_downsamples = [float(d) for d in reader_downsamples]
        width0_px, height0_px = self.level_dimensions[0]
        self.level_downsamples = []
        for d, (w, h) in zip(self._reader_downsamples, self.level_dimensions, strict=True):
            n = max(1, round(d))
            whole = w in (width0_px // n, -(-width0_px // n)) and h in (height0_px // n, -(-height0_px // n))
            self.level_downsamples.append(float(n) if whole else d)

    def _set_tile_sizes(self, by_size: dict[tuple[int, int], tuple[int, int]] | None) -> None:
        """Each level's tile size from ``by_size`` ({(width_px, height_px) of a level: (tile_width_px,
        tile_height_px)}, what the reader parsed); DEFAULT_TILE_PX for a level it lacks."""
        default = (DEFAULT_TILE_PX, DEFAULT_TILE_PX)
        self._tile_sizes_px = tuple(
            (int(tw), int(th))
            for tw, th in (by_size.get(dims, default) if by_size else default for dims in self.level_dimensions)
        )

    # -- metadata -------------------------------------------------------------------------------
    @property
    def level_tile_sizes_px(self) -> tuple[tuple[int, int], ...]:
        """(tile_width_px, tile_height_px) of each level, as the file stores it: a TIFF level's
        tiles (a stripped level's "tile" is a full-width strip of RowsPerStrip rows), OpenSlide's
        properties for other formats, else DEFAULT_TILE_PX (flat images are in memory: any grid
        will do). The read plan decodes whole tile rows of these."""
        if self._tile_sizes_px is None:
            return ((DEFAULT_TILE_PX, DEFAULT_TILE_PX),) * self.level_count
        return self._tile_sizes_px

    def set_mpp(self, mpp: float, source: str) -> None:
        """Set the level-0 microns per pixel and where it came from (one of MPP_SOURCES)."""
        if source not in MPP_SOURCES:
            raise ValueError(f"mpp source must be one of {MPP_SOURCES}, not {source!r}")
        if not (mpp is not None and math.isfinite(mpp) and mpp > 0):
            raise SlideError(f"mpp must be a positive number of microns per pixel, not {mpp!r}", self.path)
        if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
            raise SlideError(
                f"mpp {mpp:g} um/px ({source}) is outside {MPP_RANGE[0]:g}..{MPP_RANGE[1]:g} um/px, "
                f"the range of microscope images",
                self.path,
            )
        self.mpp = float(mpp)
        self.mpp_source = source

    def level_mpp(self, level: int) -> float:
        """Microns per pixel of ``level``; SlideError when the slide's mpp is unknown."""
        self._check_level(level)
        return require_mpp(self) * self.level_downsamples[level]

    def info(self) -> dict:
        """Description for ``m2ort-fast info``: levels as (width_px, height_px, downsample, mpp)."""
        levels = []
        for (w, h), ds in zip(self.level_dimensions, self.level_downsamples, strict=True):
            level_mpp = round(self.mpp * ds, 6) if self.mpp is not None else None
            levels.append((w, h, round(ds, 4), level_mpp))
        return {
            "path": str(self.path),
            "reader": self.reader_name,
            "vendor": self.vendor,
            "levels": levels,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
        }

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.path.name}: {self.reader_name}, {self.vendor}, "
            f"{self.level_count} levels, level 0 {self.level_dimensions[0]}, mpp {self.mpp} ({self.mpp_source})>"
        )

    # -- pixels ---------------------------------------------------------------------------------
    def read_region(self, x_px: int, y_px: int, level: int, width_px: int, height_px: int) -> np.ndarray:
        """(height_px, width_px, 3) uint8 RGB of ``level``; (x_px, y_px) is the top-left corner in
        level-0 pixels. Parts outside the slide are white."""
        self._check_level(level)
        downsample = self.level_downsamples[level]
        return self.read_level_region(
            level, int(math.floor(x_px / downsample)), int(math.floor(y_px / downsample)), int(width_px), int(height_px)
        )

    def read_level_region(
        self, level: int, x_level_px: int, y_level_px: int, width_px: int, height_px: int
    ) -> np.ndarray:
        """Like read_region, with the top-left corner in pixels of ``level`` itself."""
        return self._read_clipped(
            level,
            x_level_px,
            y_level_px,
            width_px,
            height_px,
            self._read_level,
            lambda shape: np.full(shape, 255, dtype=np.uint8),
        )

    def read_level_region_tensor(
        self, level: int, x_level_px: int, y_level_px: int, width_px: int, height_px: int
    ) -> torch.Tensor:
        """read_level_region as a (height_px, width_px, 3) uint8 torch tensor: in GPU memory where
        the reader decodes on the GPU (cuCIM; no copy), else a host tensor sharing the array."""
        import torch

        return torch.from_numpy(self.read_level_region(level, x_level_px, y_level_px, width_px, height_px))

    def _read_clipped(
        self,
        level: int,
        x_level_px: int,
        y_level_px: int,
        width_px: int,
        height_px: int,
        read: Callable[[int, int, int, int, int], Any],
        white: Callable[[tuple[int, int, int]], Any],
    ) -> Any:
        """The part of a region inside the level read by ``read`` (checked: _guarded_read) into
        ``white(shape)`` where the region reaches outside the level."""
        self._check_level(level)
        if width_px <= 0 or height_px <= 0:
            raise ValueError(f"region size must be positive, got {width_px}x{height_px}")
        level_w, level_h = self.level_dimensions[level]
        x0, y0 = max(x_level_px, 0), max(y_level_px, 0)
        x1, y1 = min(x_level_px + width_px, level_w), min(y_level_px + height_px, level_h)
        if x0 == x_level_px and y0 == y_level_px and x1 - x0 == width_px and y1 - y0 == height_px:
            return self._guarded_read(level, x0, y0, width_px, height_px, read)
        out = white((height_px, width_px, 3))
        if x1 > x0 and y1 > y0:
            out[y0 - y_level_px : y1 - y_level_px, x0 - x_level_px : x1 - x_level_px] = self._guarded_read(
                level, x0, y0, x1 - x0, y1 - y0, read
            )
        return out

    def read_level_squares(self, level: int, top_left_px: np.ndarray, size_px: int) -> np.ndarray:
        """(N, size_px, size_px, 3) uint8: squares of ``level`` whose top-left corners are
        ``top_left_px`` (N, 2) int (x, y) in pixels of that level; outside the slide is white."""
        top_left_px = np.asarray(top_left_px, dtype=np.int64).reshape(-1, 2)
        out = np.empty((len(top_left_px), size_px, size_px, 3), dtype=np.uint8)
        if len(out) == 0:
            return out
        self._check_level(level)
        level_w, level_h = self.level_dimensions[level]
        inside = (
            (top_left_px >= 0).all(axis=1)
            & (top_left_px[:, 0] + size_px <= level_w)
            & (top_left_px[:, 1] + size_px <= level_h)
        )
        if inside.any():
            if self.tile_verifier is not None:
                self.tile_verifier.verify_squares(level, top_left_px[inside], size_px)
            try:
                out[inside] = self._read_level_batch(level, top_left_px[inside], size_px)
            except SlideError:
                raise
            except Exception as exc:
                raise _read_error(self.path, level, exc) from None
        for i in np.flatnonzero(~inside):
            x, y = top_left_px[i]
            out[i] = self.read_level_region(level, int(x), int(y), size_px, size_px)
        return out

    def thumbnail(self, max_side_px: int = 2048) -> tuple[np.ndarray, float]:
        """The whole slide, longest side at most ``max_side_px``: ((h, w, 3) uint8, downsample of
        the thumbnail relative to level 0)."""
        width0_px, height0_px = self.level_dimensions[0]
        scale0 = min(1.0, max_side_px / max(width0_px, height0_px))
        thumb_w, thumb_h = max(1, round(width0_px * scale0)), max(1, round(height0_px * scale0))
        # Coarsest level still at least as large as the thumbnail (level 0 when none is).
        level = max(
            (i for i, (w, h) in enumerate(self.level_dimensions) if w >= thumb_w and h >= thumb_h),
            key=lambda i: self.level_downsamples[i],
            default=0,
        )
        level_w, level_h = self.level_dimensions[level]
        # Box-reduce by a whole factor chunk by chunk (a huge single level never sits in memory
        # at once; chunks are multiples of the factor, so no seams), then one exact resize.
        factor = max(1, min(level_w // thumb_w, level_h // thumb_h))
        chunk_px = THUMBNAIL_CHUNK_PX // factor * factor or factor
        reduced = np.empty((math.ceil(level_h / factor), math.ceil(level_w / factor), 3), dtype=np.uint8)
        for y in range(0, level_h, chunk_px):
            for x in range(0, level_w, chunk_px):
                w, h = min(chunk_px, level_w - x), min(chunk_px, level_h - y)
                chunk = self._guarded_read(level, x, y, w, h)
                if factor > 1:
                    chunk = np.asarray(Image.fromarray(chunk).reduce(factor))
                reduced[y // factor : y // factor + chunk.shape[0], x // factor : x // factor + chunk.shape[1]] = chunk
        if reduced.shape[:2] != (thumb_h, thumb_w):
            # m2ort_fast.crop.resize_rgb's resize (bilinear, antialiased), which this package cannot
            # import: crop builds on the slide package, not the reverse.
            reduced = np.asarray(
                Image.fromarray(reduced).resize((thumb_w, thumb_h), Image.Resampling.BILINEAR, reducing_gap=None)
            )
        return reduced, width0_px / thumb_w

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        if self.tile_verifier is not None:
            self.tile_verifier.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- for subclasses -------------------------------------------------------------------------
    def _read_level(self, level: int, x_px: int, y_px: int, width_px: int, height_px: int) -> np.ndarray:
        """(height_px, width_px, 3) uint8 of a rectangle of ``level`` that lies inside it
        (coordinates in pixels of that level)."""
        raise NotImplementedError

    def _read_level_batch(self, level: int, top_left_px: np.ndarray, size_px: int) -> np.ndarray:
        """(N, size_px, size_px, 3) uint8 for squares that lie inside ``level``."""
        return np.stack([self._read_level(level, int(x), int(y), size_px, size_px) for x, y in top_left_px])

    def _guarded_read(
        self,
        level: int,
        x_px: int,
        y_px: int,
        width_px: int,
        height_px: int,
        read: Callable[[int, int, int, int, int], Any] | None = None,
    ) -> Any:
        """``read`` (default: ``_read_level``) of a region inside the level, after the tile check;
        a decoder's failure becomes one SlideError naming the file."""
        if self.tile_verifier is not None:
            self.tile_verifier.verify_region(level, x_px, y_px, width_px, height_px)
        try:
            return (read or self._read_level)(level, x_px, y_px, width_px, height_px)
        except SlideError:
            raise
        except Exception as exc:  # a decoder's error on damaged tiles, a truncated file...
            raise _read_error(self.path, level, exc) from None

    def _check_level(self, level: int) -> None:
        if not (isinstance(level, (int, np.integer)) and 0 <= level < self.level_count):
            raise SlideError(f"no level {level} (the slide has levels 0..{self.level_count - 1})", self.path)

    def _level0_location(self, level: int, x_px: int, y_px: int) -> tuple[int, int]:
        """Level-0 location that level-coordinate readers (cuCIM, OpenSlide, tiffslide) map back
        to (x_px, y_px) of ``level``: they floor(location / downsample), so round up."""
        downsample = self._reader_downsamples[level]
        return int(math.ceil(x_px * downsample - 1e-6)), int(math.ceil(y_px * downsample - 1e-6))


def require_mpp(slide: Slide, option: str = "--mpp") -> float:
    """The slide's level-0 mpp; SlideError naming the file (and ``option``, which gives one) when it has none."""
    if slide.mpp is None:
        raise SlideError(NO_MPP_MESSAGE.replace("--mpp", option), slide.path)
    return slide.mpp


def _read_error(path: Path, level: int, exc: BaseException) -> SlideError:
    return SlideError(f"cannot read level {level} (damaged or truncated tile data?): {exception_detail(exc)}", path)


def positive_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None
