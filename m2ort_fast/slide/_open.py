"""``open_slide``: the reader for a file (chosen in order, or the one asked for), its mpp, and the
tile check for TIFF-based slides."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from m2ort_fast.errors import SlideError, exception_detail
from m2ort_fast.slide._base import MPP_TOLERANCE, Slide
from m2ort_fast.slide._cucim import CuCIMSlide
from m2ort_fast.slide._flat import FlatSlide, pil_recognises
from m2ort_fast.slide._openslide import OpenSlideSlide
from m2ort_fast.slide._tiff import TiffLayout, TileVerifier, is_tiff_header, read_tiff_layout
from m2ort_fast.slide._tiffslide import TiffSlideSlide

log = logging.getLogger(__name__)

READERS = ("cucim", "tiffslide", "openslide", "flat")

_OPENERS: dict[str, Callable[..., Slide]] = {
    "cucim": CuCIMSlide,
    "tiffslide": TiffSlideSlide,
    "openslide": OpenSlideSlide,
    "flat": FlatSlide,
}
# Options only some readers take (the others are opened without them). "tiff": the TIFF's parse.
_READER_OPTIONS = {
    "cucim": ("tiff",),
    "tiffslide": ("tiff",),
    "openslide": ("tiff",),
    "flat": ("max_decoded_mb", "tiff"),
}


def open_slide(
    path: str | os.PathLike,
    *,
    mpp: float | None = None,
    reader: str = "auto",
    max_decoded_mb: float | None = None,
    verify_tiles: bool = True,
) -> Slide:
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
    is_tiff = is_tiff_header(header)
    # A TIFF is parsed (and checked) once, here; the readers and the tile check use the parse.
    tiff = read_tiff_layout(path) if is_tiff else None
    with tiff if tiff is not None else contextlib.nullcontext():
        tiff_levels = tiff.level_count if tiff is not None else None
        options = {"max_decoded_mb": max_decoded_mb, "tiff": tiff}

        if reader != "auto":
            slide = _open_with(reader, path, options)
            if tiff_levels is not None and slide.level_count < tiff_levels:
                log.warning(
                    "%s: the %s reader sees %d of the file's %d pyramid levels",
                    path.name,
                    reader,
                    slide.level_count,
                    tiff_levels,
                )
        else:
            slide = _open_auto(path, tiff, options)
        try:
            if tiff is not None and verify_tiles and slide.reader_name != "flat":  # flat verifies as it decodes
                slide.tile_verifier = TileVerifier.from_layout(tiff, slide.level_dimensions)
            if mpp is not None:
                if slide.mpp is not None and abs(slide.mpp - mpp) > MPP_TOLERANCE * slide.mpp:
                    log.warning(
                        "%s: --mpp %g overrides the slide's own %g um/px (%s)",
                        path.name,
                        mpp,
                        slide.mpp,
                        slide.mpp_source,
                    )
                slide.set_mpp(mpp, "user")
        except BaseException:
            slide.close()
            raise
    log.debug("opened %r", slide)
    return slide


def _open_auto(path: Path, tiff: TiffLayout | None, options: dict) -> Slide:
    is_tiff = tiff is not None
    tiff_levels = tiff.level_count if tiff is not None else None
    if is_tiff:
        order = ["cucim", "tiffslide", "openslide"] + (["flat"] if tiff_levels == 1 else [])
    elif pil_recognises(path):
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
            log.debug(
                "%s: %s sees %d of %d levels; trying the next reader", path.name, name, slide.level_count, tiff_levels
            )
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
