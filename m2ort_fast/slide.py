"""Reading whole-slide images and flat H&E images behind one small interface.

    with open_slide("slide.svs") as slide:
        patches = read_spot_patches(slide, centers_px, level_mpp=[0.5, 1.0, 2.0])

Readers, tried in this order by ``open_slide(path)`` ("auto"):

- ``cucim``: cuCIM ``CuImage`` (decodes on the GPU where there is one, the CPU otherwise).
  Used for TIFF-based slides whose every pyramid level it sees.
- ``tiffslide``: the CPU fallback for TIFFs cuCIM cannot open, or whose levels it cannot see
  (pyramids stored in SubIFDs: cuCIM and OpenSlide see only level 0 of those).
- ``openslide``: other vendor formats (MIRAX, DICOM...) and TIFFs that neither of the above opens.
- ``flat``: a large JPEG/PNG/TIFF without a pyramid (e.g. the her2st sections, ~9270 x 9920 px):
  decoded once, kept in memory, one level; reads are numpy slices.

Coordinates follow OpenSlide: ``read_region`` takes the top-left corner in level-0 pixels and the
size in pixels of the level read. Everything outside the slide reads as white (255).

A spot's three model inputs cover the same physical square at the model's working resolution
(``level_mpp``, from the checkpoint) and at 1/2 and 1/4 of it. ``read_spot_patches`` reads each
from the pyramid level chosen by physical resolution (``best_level_for_mpp``); where no level has
the needed resolution it reads the next finer one and resizes (bilinear, antialiased:
:func:`resize_patches`, the one resize used everywhere).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .errors import SlideError, exception_detail

log = logging.getLogger(__name__)

READERS = ("cucim", "tiffslide", "openslide", "flat")
MPP_SOURCES = ("metadata", "user", "spot-table", "none")
# Microns per pixel of any microscope image: 0.01 (beyond any objective) to 100 (a thumbnail).
MPP_RANGE = (0.01, 100.0)
# How a spot's coarser inputs are made: read from the pyramid, or resized from the first input.
LEVEL_SOURCES = ("pyramid", "resize")
# Levels whose mpp is within this fraction of a target count as that resolution (pyramid level
# sizes are rounded to whole pixels, so a "4x" level is often 4.001x).
MPP_TOLERANCE = 0.01
# The flat reader keeps the whole image in memory (3 bytes per pixel); refuse absurd sizes.
FLAT_MAX_PIXELS = 2_000_000_000
# Decoding a flat image holds about this many copies of its pixels at once (the decoder's and ours).
FLAT_DECODE_COPIES = 2
# Thumbnails of huge single-level images are built from bands of this many rows/columns.
THUMBNAIL_CHUNK_PX = 4096
NO_MPP_MESSAGE = "no mpp metadata; pass --mpp"

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# --------------------------------------------------------------------------------------------
# The interface


class Slide:
    """One opened slide or flat image. Subclasses implement ``_read_level`` (and may override
    ``_read_level_batch`` with a faster batched read); everything else is shared."""

    reader_name = ""

    def __init__(self, path: Path, vendor: str, level_dimensions: Sequence[tuple[int, int]],
                 mpp: float | None):
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
            log.warning("%s: ignoring its metadata's mpp of %g um/px (outside %g..%g um/px); pass --mpp",
                        self.path.name, mpp, *MPP_RANGE)
        # Checks tile data before the reader decodes it (TIFF-based slides; see _TileVerifier).
        self.tile_verifier: _TileVerifier | None = None

    def _set_downsamples(self, reader_downsamples: Sequence[float]) -> None:
        # Levels are made by whole-number reductions and their sizes rounded down (9911 px / 2 ->
        # 4955, "2.0002x"); spot geometry uses the whole number, so pixel grids line up. The
        # reader's own value is kept for the level-0 locations it maps back to level pixels.
        self._reader_downsamples = [float(d) for d in reader_downsamples]
        width0_px, height0_px = self.level_dimensions[0]
        self.level_downsamples = []
        for d, (w, h) in zip(self._reader_downsamples, self.level_dimensions):
            n = max(1, round(d))
            whole = w in (width0_px // n, -(-width0_px // n)) and h in (height0_px // n, -(-height0_px // n))
            self.level_downsamples.append(float(n) if whole else d)

    # -- metadata -------------------------------------------------------------------------------
    def set_mpp(self, mpp: float, source: str) -> None:
        """Set the level-0 microns per pixel and where it came from (one of MPP_SOURCES)."""
        if source not in MPP_SOURCES:
            raise ValueError(f"mpp source must be one of {MPP_SOURCES}, not {source!r}")
        if not (mpp is not None and math.isfinite(mpp) and mpp > 0):
            raise SlideError(f"mpp must be a positive number of microns per pixel, not {mpp!r}", self.path)
        if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
            raise SlideError(f"mpp {mpp:g} um/px ({source}) is outside {MPP_RANGE[0]:g}..{MPP_RANGE[1]:g} um/px, "
                             f"the range of microscope images", self.path)
        self.mpp = float(mpp)
        self.mpp_source = source

    def level_mpp(self, level: int) -> float:
        """Microns per pixel of ``level``; SlideError when the slide's mpp is unknown."""
        self._check_level(level)
        return require_mpp(self) * self.level_downsamples[level]

    def info(self) -> dict:
        """Description for ``m2ort-fast info``: levels as (width_px, height_px, downsample, mpp)."""
        levels = []
        for level, ((w, h), ds) in enumerate(zip(self.level_dimensions, self.level_downsamples)):
            level_mpp = round(self.mpp * ds, 6) if self.mpp is not None else None
            levels.append((w, h, round(ds, 4), level_mpp))
        return {"path": str(self.path), "reader": self.reader_name, "vendor": self.vendor, "levels": levels,
                "mpp": self.mpp, "mpp_source": self.mpp_source}

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.path.name}: {self.reader_name}, {self.vendor}, "
                f"{self.level_count} levels, level 0 {self.level_dimensions[0]}, mpp {self.mpp} ({self.mpp_source})>")

    # -- pixels ---------------------------------------------------------------------------------
    def read_region(self, x_px: int, y_px: int, level: int, width_px: int, height_px: int) -> np.ndarray:
        """(height_px, width_px, 3) uint8 RGB of ``level``; (x_px, y_px) is the top-left corner in
        level-0 pixels. Parts outside the slide are white."""
        self._check_level(level)
        downsample = self.level_downsamples[level]
        return self.read_level_region(level, int(math.floor(x_px / downsample)),
                                      int(math.floor(y_px / downsample)), int(width_px), int(height_px))

    def read_level_region(self, level: int, x_level_px: int, y_level_px: int, width_px: int,
                          height_px: int) -> np.ndarray:
        """Like read_region, with the top-left corner in pixels of ``level`` itself."""
        self._check_level(level)
        if width_px <= 0 or height_px <= 0:
            raise ValueError(f"region size must be positive, got {width_px}x{height_px}")
        level_w, level_h = self.level_dimensions[level]
        x0, y0 = max(x_level_px, 0), max(y_level_px, 0)
        x1, y1 = min(x_level_px + width_px, level_w), min(y_level_px + height_px, level_h)
        if x0 == x_level_px and y0 == y_level_px and x1 - x0 == width_px and y1 - y0 == height_px:
            return self._guarded_read(level, x0, y0, width_px, height_px)
        out = np.full((height_px, width_px, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y_level_px:y1 - y_level_px, x0 - x_level_px:x1 - x_level_px] = \
                self._guarded_read(level, x0, y0, x1 - x0, y1 - y0)
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
        inside = ((top_left_px >= 0).all(axis=1) & (top_left_px[:, 0] + size_px <= level_w)
                  & (top_left_px[:, 1] + size_px <= level_h))
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
        level = max((i for i, (w, h) in enumerate(self.level_dimensions) if w >= thumb_w and h >= thumb_h),
                    key=lambda i: self.level_downsamples[i], default=0)
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
                reduced[y // factor:y // factor + chunk.shape[0], x // factor:x // factor + chunk.shape[1]] = chunk
        if reduced.shape[:2] != (thumb_h, thumb_w):
            reduced = resize_rgb(reduced, thumb_w, thumb_h)
        return reduced, width0_px / thumb_w

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        if self.tile_verifier is not None:
            self.tile_verifier.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- for subclasses -------------------------------------------------------------------------
    def _read_level(self, level: int, x_px: int, y_px: int, width_px: int, height_px: int) -> np.ndarray:
        """(height_px, width_px, 3) uint8 of a rectangle of ``level`` that lies inside it
        (coordinates in pixels of that level)."""
        raise NotImplementedError

    def _read_level_batch(self, level: int, top_left_px: np.ndarray, size_px: int) -> np.ndarray:
        """(N, size_px, size_px, 3) uint8 for squares that lie inside ``level``."""
        return np.stack([self._read_level(level, int(x), int(y), size_px, size_px) for x, y in top_left_px])

    def _guarded_read(self, level: int, x_px: int, y_px: int, width_px: int, height_px: int) -> np.ndarray:
        if self.tile_verifier is not None:
            self.tile_verifier.verify_region(level, x_px, y_px, width_px, height_px)
        try:
            return self._read_level(level, x_px, y_px, width_px, height_px)
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


def _read_error(path: Path, level: int, exc: BaseException) -> SlideError:
    return SlideError(f"cannot read level {level} (damaged or truncated tile data?): {exception_detail(exc)}", path)


# --------------------------------------------------------------------------------------------
# Readers


class CuCIMSlide(Slide):
    """cuCIM's CuImage: the fast reader, batched multi-threaded reads of spot patches."""

    reader_name = "cucim"

    def __init__(self, path: Path):
        from cucim import CuImage

        self._image = CuImage(str(path))
        resolutions = self._image.resolutions
        tiff_meta = _tiff_metadata(path)
        super().__init__(path, tiff_meta["vendor"], resolutions["level_dimensions"], tiff_meta["mpp"])
        self._set_downsamples(resolutions["level_downsamples"])  # cuCIM maps locations with these
        self.num_workers = max(1, min(8, os.cpu_count() or 1))
        self._device = _cucim_device()

    def _read_level(self, level, x_px, y_px, width_px, height_px):
        return self._on_device(lambda: self._to_numpy(self._image.read_region(
            self._level0_location(level, x_px, y_px), (width_px, height_px), level, device=self._device))[..., :3])

    def _read_level_batch(self, level, top_left_px, size_px):
        return self._on_device(lambda: self._read_batch(level, top_left_px, size_px))

    def _on_device(self, read: Callable[[], np.ndarray]) -> np.ndarray:
        if self._device == "cpu":
            return read()
        try:
            return read()
        except Exception as exc:  # the GPU read path failed: the CPU one still works
            log.warning("%s: cuCIM reads on %s failed (%s); reading on the CPU", self.path.name, self._device,
                        exception_detail(exc))
            self._device = "cpu"
            return read()

    def _read_batch(self, level, top_left_px, size_px):
        if len(top_left_px) == 1:
            return self._read_level(level, *map(int, top_left_px[0]), size_px, size_px)[None]
        locations = [self._level0_location(level, int(x), int(y)) for x, y in top_left_px]
        out = np.empty((len(locations), size_px, size_px, 3), dtype=np.uint8)
        # One batch for all locations: in cuCIM 26.10 smaller batches of one call come back with
        # wrong pixels; and each batch's buffer is freed by the next, so copy it out at once.
        batches = self._image.read_region(locations, (size_px, size_px), level, num_workers=self.num_workers,
                                          batch_size=len(locations), device=self._device)
        start = 0
        for batch in batches:
            pixels = self._to_numpy(batch)
            pixels = pixels.reshape(-1, *pixels.shape[-3:])
            out[start:start + len(pixels)] = pixels[..., :3]
            start += len(pixels)
        if start != len(out):
            raise SlideError(f"cuCIM returned {start} of {len(out)} patches of level {level}", self.path)
        return out

    def _to_numpy(self, region) -> np.ndarray:
        if self._device == "cpu":
            return np.array(region, copy=True)
        import cupy

        return cupy.asnumpy(cupy.asarray(region))

    def close(self):
        self._image.close()
        super().close()


def _cucim_device() -> str:
    """"cuda" where cupy sees a GPU (cuCIM then reads into GPU memory), else "cpu".
    M2ORT_CUCIM_DEVICE=cpu|cuda overrides. (The GPU path has not been run here: no GPU.)"""
    if os.environ.get("M2ORT_CUCIM_DEVICE"):
        return os.environ["M2ORT_CUCIM_DEVICE"]
    try:
        import cupy

        return "cuda" if cupy.cuda.runtime.getDeviceCount() > 0 else "cpu"
    except Exception:  # no cupy, no driver, no device: all mean the CPU
        return "cpu"


class TiffSlideSlide(Slide):
    """tiffslide: pure-Python TIFF reader (sees SubIFD pyramids)."""

    reader_name = "tiffslide"

    def __init__(self, path: Path):
        import tiffslide

        self._slide = tiffslide.TiffSlide(str(path))
        props = self._slide.properties
        tiff_meta = _tiff_metadata(path)
        super().__init__(path, props.get("tiffslide.vendor") or tiff_meta["vendor"], self._slide.level_dimensions,
                         _positive_float(props.get("tiffslide.mpp-x")) or tiff_meta["mpp"])
        self._set_downsamples(self._slide.level_downsamples)

    def _read_level(self, level, x_px, y_px, width_px, height_px):
        region = self._slide.read_region(self._level0_location(level, x_px, y_px), level, (width_px, height_px),
                                         as_array=True)
        return _as_rgb(region, self.path)

    def close(self):
        self._slide.close()
        super().close()


class OpenSlideSlide(Slide):
    """OpenSlide: the broadest vendor coverage."""

    reader_name = "openslide"

    def __init__(self, path: Path):
        import openslide

        self._slide = openslide.OpenSlide(str(path))
        props = self._slide.properties
        super().__init__(path, props.get("openslide.vendor") or "unknown", self._slide.level_dimensions,
                         _positive_float(props.get("openslide.mpp-x")))
        self._set_downsamples(self._slide.level_downsamples)

    def _read_level(self, level, x_px, y_px, width_px, height_px):
        rgba = np.asarray(self._slide.read_region(self._level0_location(level, x_px, y_px), level,
                                                  (width_px, height_px)))
        return _as_rgb(rgba, self.path)

    def close(self):
        self._slide.close()
        super().close()


class FlatSlide(Slide):
    """A flat image decoded once into memory: one level; reads are numpy slices.

    ``max_decoded_mb``: refuse (before decoding) an image whose pixels alone exceed it; a flat
    image cannot be decoded in parts, so this is how a memory bound holds for it."""

    reader_name = "flat"

    def __init__(self, path: Path, *, max_decoded_mb: float | None = None):
        image, vendor, mpp = _decode_flat(path, max_decoded_mb)
        self.image = image  # (H, W, 3) uint8
        super().__init__(path, vendor, [(image.shape[1], image.shape[0])], mpp)

    def _read_level(self, level, x_px, y_px, width_px, height_px):
        return self.image[y_px:y_px + height_px, x_px:x_px + width_px].copy()

    def _read_level_batch(self, level, top_left_px, size_px):
        # Strided view of every size_px window, indexed by the corners: one gather, no Python loop.
        windows = np.lib.stride_tricks.sliding_window_view(self.image, (size_px, size_px), axis=(0, 1))
        return windows[top_left_px[:, 1], top_left_px[:, 0]].transpose(0, 2, 3, 1)

    def close(self):
        self.image = None
        super().close()


_OPENERS: dict[str, Callable[..., Slide]] = {
    "cucim": CuCIMSlide, "tiffslide": TiffSlideSlide, "openslide": OpenSlideSlide, "flat": FlatSlide,
}
# Options only some readers take (the others are opened without them).
_READER_OPTIONS = {"flat": ("max_decoded_mb",)}


# --------------------------------------------------------------------------------------------
# Opening


def open_slide(path: str | os.PathLike, *, mpp: float | None = None, reader: str = "auto",
               max_decoded_mb: float | None = None, verify_tiles: bool = True) -> Slide:
    """Open a slide (pyramidal TIFF/SVS/other OpenSlide formats) or a flat image.

    ``reader``: "auto" (cuCIM, else tiffslide, else OpenSlide; flat images: "flat") or one of
    READERS. ``mpp`` overrides the level-0 microns per pixel of the metadata (source "user").
    ``max_decoded_mb``: a flat image (decoded whole) larger than this is refused before decoding.
    ``verify_tiles``: check each tile of a TIFF-based slide with a strict decoder before the
    reader decodes it (readers print or ignore some decoder errors and return wrong pixels).
    Raises SlideError (one line naming the file) for a missing, unrecognised or damaged file.
    """
    path = Path(path)
    if reader != "auto" and reader not in READERS:
        raise SlideError(f"unknown reader {reader!r} (choose auto or one of {', '.join(READERS)})", path)
    if not path.exists():
        raise SlideError("no such file", path)
    if path.is_dir():
        raise SlideError("is a directory, not a slide or image file", path)
    try:
        with open(path, "rb") as f:
            header = f.read(16)
    except OSError as exc:
        raise SlideError(f"cannot read the file: {exc.strerror or exc}", path) from None
    if not header:
        raise SlideError("empty file, not a slide or image", path)
    is_tiff = header[:4] in _TIFF_MAGICS
    tiff_levels = _check_tiff(path) if is_tiff else None
    options = {"max_decoded_mb": max_decoded_mb}

    if reader != "auto":
        slide = _open_with(reader, path, options)
        if tiff_levels is not None and slide.level_count < tiff_levels:
            log.warning("%s: the %s reader sees %d of the file's %d pyramid levels", path.name, reader,
                        slide.level_count, tiff_levels)
    else:
        slide = _open_auto(path, is_tiff, tiff_levels, options)
    try:
        if is_tiff and verify_tiles and slide.reader_name != "flat":  # the flat reader verifies as it decodes
            slide.tile_verifier = _TileVerifier.for_slide(path, slide.level_dimensions)
        if mpp is not None:
            if slide.mpp is not None and abs(slide.mpp - mpp) > MPP_TOLERANCE * slide.mpp:
                log.warning("%s: --mpp %g overrides the slide's own %g um/px (%s)", path.name, mpp, slide.mpp,
                            slide.mpp_source)
            slide.set_mpp(mpp, "user")
    except BaseException:
        slide.close()
        raise
    log.debug("opened %r", slide)
    return slide


def _open_auto(path: Path, is_tiff: bool, tiff_levels: int | None, options: dict) -> Slide:
    if is_tiff:
        order = ["cucim", "tiffslide", "openslide"] + (["flat"] if tiff_levels == 1 else [])
    elif _pil_recognises(path):
        order = ["flat"]
    else:
        order = ["openslide"]  # MIRAX, DICOM and other vendor formats
    failures = []
    for name in order:
        try:
            slide = _open_with(name, path, options)
        except SlideError as exc:
            if order == ["flat"]:  # the only reader for this image: its own words are the answer
                raise
            failures.append(f"{name}: {str(exc).removeprefix(f'{path}: ')}")
            continue
        if tiff_levels is not None and slide.level_count < tiff_levels:
            failures.append(f"{name}: sees {slide.level_count} of {tiff_levels} levels")
            log.debug("%s: %s sees %d of %d levels; trying the next reader", path.name, name,
                      slide.level_count, tiff_levels)
            slide.close()
            continue
        return slide
    if not is_tiff and order == ["openslide"]:
        raise SlideError("not a slide or image (no reader recognises its format)", path)
    raise SlideError(f"no reader could open it ({'; '.join(failures)})", path)


def _open_with(reader: str, path: Path, options: dict | None = None) -> Slide:
    kwargs = {k: v for k, v in (options or {}).items() if k in _READER_OPTIONS.get(reader, ())}
    try:
        return _OPENERS[reader](path, **kwargs)
    except SlideError:
        raise
    except ImportError as exc:
        raise SlideError(f"the {reader} reader is not installed ({exc})", path) from None
    except Exception as exc:  # each library raises its own types for unreadable files
        raise SlideError(f"{reader} cannot open it: {exception_detail(exc)}", path) from None


def _pil_recognises(path: Path) -> bool:
    try:
        with _large_images_allowed(), Image.open(path) as image:
            return bool(image.format)
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# Metadata


def _check_tiff(path: Path) -> int:
    """Number of pyramid levels tifffile sees; SlideError for a TIFF that is truncated or broken."""
    import tifffile

    file_size = path.stat().st_size
    if _ifd_chain_runs_past(path, file_size):
        raise SlideError(f"truncated: its directory of images points past the end of the file ({file_size} bytes)",
                         path)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise SlideError("TIFF without images", path)
            levels = tif.series[0].levels
            samples = levels[0].keyframe.samplesperpixel
            if samples < 3:
                raise SlideError(f"grayscale image ({samples} sample per pixel): the model needs an RGB H&E slide", path)
            for level in levels:
                for page in level.pages:
                    if page is None:
                        continue
                    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                    counts = np.asarray(page.databytecounts, dtype=np.int64)
                    if len(offsets) and int((offsets + counts).max()) > file_size:
                        raise SlideError(f"truncated: image data runs past the end of the file ({file_size} bytes)",
                                         path)
            return len(levels)
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(f"damaged or truncated TIFF: {exception_detail(exc)}", path) from None


class _TileVerifier:
    """Checks a TIFF's tile (or strip) data with a strict decoder before a reader decodes it.

    The readers do not all fail on damaged data: cuCIM prints libjpeg's errors to stdout and
    returns the pixels it made of them; libjpeg's "corrupt data" warnings are ignored by cuCIM,
    tiffslide (imagecodecs) and OpenSlide alike. Each tile a read touches is decoded once here:
    JPEG by libjpeg-turbo in strict mode (warnings are errors) at 1/8 scale (the entropy data,
    where damage shows, is decoded in full; the inverse DCT mostly skipped), other compressions
    by tifffile's own codecs. A damaged tile is a SlideError naming the level and the tile.
    Damage a decoder cannot see (JPEG has no checksum) stays unseen, by this and by every reader.
    """

    def __init__(self, path: Path, levels: list[dict | None]):
        self.path = path
        self.levels = levels  # per slide level: geometry and segment table of the TIFF level, or None
        self._fd = os.open(path, os.O_RDONLY)

    @classmethod
    def for_slide(cls, path: Path, level_dimensions: Sequence[tuple[int, int]], tif=None) -> "_TileVerifier":
        """Match the slide's levels to the TIFF's by size (a level no TIFF level matches is not
        checked). ``tif``: the file already open as a tifffile.TiffFile (else it is opened here)."""
        import tifffile

        by_size: dict = {}
        try:
            with contextlib.nullcontext(tif) if tif is not None else tifffile.TiffFile(path) as tif:
                for series in tif.series:
                    for level in series.levels:
                        page = level.keyframe
                        size = (page.imagewidth, page.imagelength)
                        if size in by_size or page.planarconfig == 2:  # separate planes: not checked
                            continue
                        tile_w, tile_h = tiff_tile_shape(page)
                        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                        counts = np.asarray(page.databytecounts, dtype=np.int64)
                        if tile_w < 1 or tile_h < 1 or len(offsets) != len(counts) or len(offsets) < (
                                -(-page.imagewidth // tile_w) * -(-page.imagelength // tile_h)):
                            raise SlideError(f"damaged TIFF: the {size[0]}x{size[1]} px level's tile tables do "
                                             f"not match its size", path)
                        by_size[size] = {
                            "page": page, "tile_w": tile_w, "tile_h": tile_h, "across": -(-page.imagewidth // tile_w),
                            "offsets": offsets, "counts": counts, "jpeg": page.compression == 7,
                            "tables": page.jpegtables, "checked": np.zeros(len(offsets), dtype=bool)}
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(f"damaged or truncated TIFF: {exception_detail(exc)}", path) from None
        return cls(path, [by_size.get((int(w), int(h))) for w, h in level_dimensions])

    def verify_region(self, level: int, x_px: int, y_px: int, width_px: int, height_px: int) -> None:
        """Check the tiles under a rectangle of ``level`` (pixels of that level, inside it)."""
        geometry = self.levels[level] if level < len(self.levels) else None
        if geometry is None or width_px <= 0 or height_px <= 0:
            return
        tile_w, tile_h = geometry["tile_w"], geometry["tile_h"]
        cols = np.arange(x_px // tile_w, (x_px + width_px - 1) // tile_w + 1)
        rows = np.arange(y_px // tile_h, (y_px + height_px - 1) // tile_h + 1)
        self._verify(level, (rows[:, None] * geometry["across"] + cols[None, :]).ravel())

    def verify_squares(self, level: int, top_left_px: np.ndarray, size_px: int) -> None:
        """Check the tiles under squares of side ``size_px`` at ``top_left_px`` ((N, 2) x, y)."""
        geometry = self.levels[level] if level < len(self.levels) else None
        if geometry is None or len(top_left_px) == 0:
            return
        tile_w, tile_h = geometry["tile_w"], geometry["tile_h"]
        first = top_left_px // np.array([tile_w, tile_h])
        last = (top_left_px + size_px - 1) // np.array([tile_w, tile_h])
        spans = (last - first).max(axis=0) + 1
        indices = [np.minimum(first[:, 1] + dy, last[:, 1]) * geometry["across"] + np.minimum(first[:, 0] + dx, last[:, 0])
                   for dy in range(spans[1]) for dx in range(spans[0])]
        self._verify(level, np.unique(np.concatenate(indices)))

    def _verify(self, level: int, indices: np.ndarray) -> None:
        geometry = self.levels[level]
        indices = indices[(indices >= 0) & (indices < len(geometry["checked"]))]
        for index in indices[~geometry["checked"][indices]]:
            offset, count = int(geometry["offsets"][index]), int(geometry["counts"][index])
            if count:  # 0 bytes: a tile never written, which readers show as empty
                data = os.pread(self._fd, count, offset)
                where = (f"level {level}, tile {index} (column {index % geometry['across']}, "
                         f"row {index // geometry['across']}) at byte {offset}")
                if len(data) != count:
                    raise SlideError(f"truncated tile data in {where}", self.path)
                self._decode(geometry, int(index), data, where)
            geometry["checked"][index] = True

    def _decode(self, geometry: dict, index: int, data: bytes, where: str) -> None:
        if geometry["jpeg"]:
            tables = geometry["tables"]
            if tables and data[:2] == b"\xff\xd8":  # abbreviated tile: splice in the shared tables
                data = tables[:-2] + data[2:]
            _verify_jpeg(data, self.path, where)
            return
        try:
            geometry["page"].decode(data, index, jpegtables=geometry["tables"])
        except Exception as exc:
            raise SlideError(f"corrupt tile data in {where}: {exception_detail(exc)}", self.path) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def tiff_tile_shape(page) -> tuple[int, int]:
    """(width_px, height_px) of one tile of a tifffile page; a stripped page's "tile" is a
    full-width strip of RowsPerStrip rows."""
    if page.is_tiled:
        return page.tilewidth, page.tilelength
    return page.imagewidth, min(page.rowsperstrip or page.imagelength, page.imagelength)


def _verify_jpeg(data: bytes, path: Path, where: str) -> None:
    """SlideError unless libjpeg-turbo decodes ``data`` without an error or a warning (1/8 scale)."""
    import simplejpeg

    try:
        _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("Gray", "YCbCr", "RGB"):  # CMYK/YCCK: no RGB conversion to check with
            return
        simplejpeg.decode_jpeg(data, colorspace="rgb", min_factor=8, strict=True)
    except ValueError as exc:
        raise SlideError(f"corrupt JPEG data in {where}: {exception_detail(exc)}", path) from None


def _ifd_chain_runs_past(path: Path, file_size: int) -> bool:
    """Whether the TIFF's chain of image directories (IFDs) points past the end of the file or
    loops: the sign of a cut-off file, which tifffile only logs and cuCIM/OpenSlide silently
    read as a slide with fewer levels."""
    import struct

    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 16:  # not even a whole header (a classic one is 8 bytes, then its first IFD)
            return True
        order = "<" if head[:2] == b"II" else ">"
        if head[2:4] == struct.pack(order + "H", 43):  # BigTIFF
            count_fmt, entry_bytes, offset_fmt, offset = "Q", 20, "Q", struct.unpack(order + "Q", head[8:16])[0]
        else:
            count_fmt, entry_bytes, offset_fmt, offset = "H", 12, "I", struct.unpack(order + "I", head[4:8])[0]
        count_size, offset_size = struct.calcsize(count_fmt), struct.calcsize(offset_fmt)
        seen = set()
        while offset:
            if offset in seen or offset + count_size > file_size:
                return True
            seen.add(offset)
            f.seek(offset)
            (entries,) = struct.unpack(order + count_fmt, f.read(count_size))
            next_at = offset + count_size + entries * entry_bytes
            if next_at + offset_size > file_size:
                return True
            f.seek(next_at)
            (offset,) = struct.unpack(order + offset_fmt, f.read(offset_size))
    return False


def _tiff_metadata(path: Path) -> dict:
    """{"vendor", "mpp"} of a TIFF from its tags: the Aperio description's MPP, else the
    resolution tags of level 0."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if tif.is_svs:
            match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", page.description or "")
            return {"vendor": "aperio", "mpp": _positive_float(match.group(1)) if match else None}
        vendor = "hamamatsu" if tif.is_ndpi else "generic-tiff"
        return {"vendor": vendor, "mpp": _resolution_mpp(page)}


def _resolution_mpp(page) -> float | None:
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    try:  # damaged tags (a string where a number belongs...) mean no mpp, not a crash
        numerator, denominator = (float(v) for v in tags["XResolution"].value)
        pixels_per_unit = numerator / denominator if denominator else 0
        unit = int(tags["ResolutionUnit"].value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not (math.isfinite(pixels_per_unit) and pixels_per_unit > 0):
        return None
    if unit == 3:  # centimetre
        return 1e4 / pixels_per_unit
    if unit == 2:  # inch: trust it only at microscope scale; 72/96/300 dpi are editors' defaults
        mpp = 25400 / pixels_per_unit
        return mpp if mpp < 10 else None
    return None


def _positive_float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def require_mpp(slide: Slide) -> float:
    """The slide's level-0 mpp; SlideError naming the file when it has none."""
    if slide.mpp is None:
        raise SlideError(NO_MPP_MESSAGE, slide.path)
    return slide.mpp


# --------------------------------------------------------------------------------------------
# Flat images


@contextlib.contextmanager
def _large_images_allowed():
    # PIL refuses images over ~89 Mpx as "decompression bombs"; a her2st section is ~92 Mpx.
    # Our own limit (FLAT_MAX_PIXELS) is checked before decoding.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _decode_flat(path: Path, max_decoded_mb: float | None = None) -> tuple[np.ndarray, str, float | None]:
    """Decode a whole flat image: ((H, W, 3) uint8 RGB, vendor, mpp or None). Its size is checked
    against ``max_decoded_mb`` and the memory available, and its data with a strict decoder,
    before the full decode."""
    with open(path, "rb") as f:
        is_tiff = f.read(4) in _TIFF_MAGICS
    if is_tiff:
        return _decode_flat_tiff(path, max_decoded_mb)
    try:
        with _large_images_allowed(), Image.open(path) as image:
            _check_flat_size(path, image.width, image.height, max_decoded_mb)
            _check_rgb_mode(path, image.mode)
            vendor = (image.format or "image").lower()
            if image.format == "JPEG":
                _verify_jpeg(path.read_bytes(), path, "the image")
            image.load()
            rgb = _pil_to_rgb(image)
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(f"cannot decode the image (truncated or not an image?): {exception_detail(exc)}",
                         path) from None
    # JPEG/PNG resolution fields are screen/print settings, not the microscope's: no mpp.
    return rgb, vendor, None


def _decode_flat_tiff(path: Path, max_decoded_mb: float | None = None) -> tuple[np.ndarray, str, float | None]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.series[0].levels[0].keyframe
            _check_flat_size(path, page.imagewidth, page.imagelength, max_decoded_mb)
            verifier = _TileVerifier.for_slide(path, [(page.imagewidth, page.imagelength)], tif)
            with contextlib.closing(verifier):
                verifier.verify_region(0, 0, 0, page.imagewidth, page.imagelength)
            pixels = tif.series[0].levels[0].asarray()
            mpp = _resolution_mpp(page)
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(f"cannot decode the TIFF (truncated or damaged?): {exception_detail(exc)}", path) from None
    if pixels.dtype != np.uint8:
        raise SlideError(f"unsupported pixel type {pixels.dtype} (8-bit RGB expected)", path)
    return _as_rgb(pixels, path), "tiff", mpp


def _check_flat_size(path: Path, width_px: int, height_px: int, max_decoded_mb: float | None = None) -> None:
    """Refuse, before decoding, a flat image too large for the limit, the bound asked for, or the
    memory this machine has available (the header can claim any size: a 600-byte file once
    claimed 30000 x 30000 px)."""
    convert_hint = "convert it to a tiled pyramidal TIFF (m2ort-fast convert), which is read in parts"
    if width_px * height_px > FLAT_MAX_PIXELS:
        raise SlideError(f"{width_px}x{height_px} px is too large to decode into memory "
                         f"(limit {FLAT_MAX_PIXELS / 1e6:.0f} Mpx); use a tiled pyramidal TIFF", path)
    decoded_bytes = width_px * height_px * 3
    if max_decoded_mb is not None and decoded_bytes > max_decoded_mb * 2**20:
        raise SlideError(f"a flat image is decoded whole: its {width_px}x{height_px} px need "
                         f"{decoded_bytes / 2**20:.0f} MB, over the memory bound of {max_decoded_mb:g} MB "
                         f"(--max-memory-mb); raise the bound or {convert_hint}", path)
    available = available_memory_bytes()
    needed = decoded_bytes * FLAT_DECODE_COPIES
    if available is not None and needed > available:
        raise SlideError(f"decoding its {width_px}x{height_px} px needs about {needed / 2**30:.1f} GiB, and "
                         f"{available / 2**30:.1f} GiB of memory is available; {convert_hint}", path)


def available_memory_bytes() -> int | None:
    """Memory the kernel says a new allocation can get (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


# PIL modes that carry no colour: an H&E model cannot use them.
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _check_rgb_mode(path: Path, mode: str) -> None:
    if mode in _GRAYSCALE_MODES:
        raise SlideError(f"grayscale image (mode {mode}): the model needs an RGB H&E image", path)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"))
        return _composite_on_white(rgba)
    if image.mode == "RGB":  # no converted copy: a decoded section is ~280 MB
        return np.asarray(image)
    return np.asarray(image.convert("RGB"))


def _as_rgb(pixels: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, 3) uint8 from RGB or RGBA (transparent areas become white); grayscale is refused."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (1, 2)):
        raise SlideError("grayscale image: the model needs an RGB H&E image", path)
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return np.ascontiguousarray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        return _composite_on_white(pixels)
    raise SlideError(f"unsupported pixel layout {pixels.shape} (RGB expected)", path)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4]
    if (alpha == 255).all():
        return np.ascontiguousarray(rgba[..., :3])
    blended = rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha.astype(np.uint16))
    return ((blended + 127) // 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Spot patches


def resize_rgb(image: np.ndarray, width_px: int, height_px: int, *, exact_factor: int | None = None) -> np.ndarray:
    """Bilinear resize of one (H, W, 3) uint8 image; antialiased when shrinking (PIL widens the
    bilinear filter by the scale factor when reducing_gap is None).

    exact_factor: shrink by exactly this factor from the top-left corner, dropping the last
    (< factor) rows and columns, as pyramid levels are made (W // factor pixels): resizing the whole
    image to W // factor would stretch it slightly and shift the pixel grid off the 2x/4x one.
    """
    box = None if exact_factor is None else (0, 0, width_px * exact_factor, height_px * exact_factor)
    return np.asarray(Image.fromarray(image).resize((width_px, height_px), Image.BILINEAR, box=box, reducing_gap=None))


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


def read_spot_patches(slide: Slide, centers_px: np.ndarray, level_mpp: Sequence[float],
                      sizes_px: Sequence[int] = (224, 112, 56), *, level_source: str = "pyramid") -> list[np.ndarray]:
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
        return [_read_squares(slide, centers_px, mpp, size, reads) for mpp, size in zip(level_mpp, sizes_px)]
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
