"""Flat image (or any slide) -> tiled pyramidal TIFF that cuCIM, OpenSlide and tiffslide read.

    m2ort-fast convert section.jpg section.tiff --mpp 0.69

Layouts:
- ``svs`` (default): Aperio-SVS-like. Levels downsampled 1, 4, 16, ... (as Aperio scanners do),
  a stripped thumbnail as the second page, the mpp in the Aperio image description. OpenSlide
  reports it as vendor "aperio".
- ``generic``: levels 1, 2, 4, ... as reduced-resolution pages, mpp in the TIFF resolution tags
  (pixels per centimetre). OpenSlide reports it as "generic-tiff".

Tiles are JPEG (RGB, no chroma subsampling). Each level is the previous one resized (bilinear,
antialiased; :func:`m2ort_fast.crop.resize_rgb`). The output is written under a temporary name
and renamed, so an interrupted run leaves no half-written slide behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from m2ort_fast.crop import resize_rgb
from m2ort_fast.errors import M2ORTError, SlideError
from m2ort_fast.options import mpp_value, number, positive_int
from m2ort_fast.outputs import output_errors
from m2ort_fast.slide import FlatSlide, open_slide

log = logging.getLogger(__name__)

LAYOUTS = ("svs", "generic")
LEVEL_STEP = {"svs": 4, "generic": 2}  # downsample between successive levels
THUMBNAIL_MAX_SIDE_PX = 1024  # the SVS thumbnail page
APERIO_HEADER = "Aperio Image Library v10.0.0"  # OpenSlide and tifffile detect SVS by this prefix


def pyramid_downsamples(width_px: int, height_px: int, *, tile_px: int = 256, layout: str = "svs") -> list[int]:
    """Level downsamples 1, step, step^2, ... until a level fits in one tile."""
    step = LEVEL_STEP[layout]
    downsamples = [1]
    while max(width_px, height_px) // downsamples[-1] > tile_px:
        downsamples.append(downsamples[-1] * step)
    return downsamples


def write_pyramid(
    image: np.ndarray,
    dst: str | os.PathLike,
    *,
    mpp: float | None,
    tile_px: int = 256,
    quality: int = 90,
    layout: str = "svs",
    downsamples: Sequence[int] | None = None,
) -> Path:
    """Write ``image`` (H, W, 3) uint8 RGB as a JPEG-tiled pyramidal TIFF at ``dst``.

    ``mpp``: level-0 microns per pixel to record (None: none recorded). ``downsamples``: the
    levels' integer downsamples, starting at 1 (default: :func:`pyramid_downsamples`).
    Returns ``dst`` as a Path.
    """
    import tifffile

    dst = Path(dst)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if layout not in LAYOUTS:
        raise M2ORTError(f"unknown layout {layout!r} (choose {' or '.join(LAYOUTS)})", dst)
    if tile_px <= 0 or tile_px % 16:
        raise M2ORTError(f"tile size must be a positive multiple of 16 px, not {tile_px}", dst)
    if not 1 <= quality <= 100:
        raise M2ORTError(f"JPEG quality must be 1..100, not {quality}", dst)
    if mpp is not None and not mpp > 0:
        raise M2ORTError(f"mpp must be positive, not {mpp}", dst)
    if not dst.parent.is_dir():
        raise M2ORTError("output folder does not exist", dst.parent)
    height_px, width_px = image.shape[:2]
    downsamples = list(downsamples or pyramid_downsamples(width_px, height_px, tile_px=tile_px, layout=layout))
    if downsamples[0] != 1 or any(b <= a for a, b in zip(downsamples, downsamples[1:], strict=False)):
        raise ValueError(f"downsamples must start at 1 and increase, got {downsamples}")

    tile_options = dict(
        tile=(tile_px, tile_px),
        compression="jpeg",
        compressionargs={"level": quality},
        photometric="rgb",
        metadata=None,
    )
    # Size the offsets for the uncompressed worst case: BigTIFF past 2 GiB.
    bigtiff = image.nbytes * 4 // 3 > 2**31
    _remove_stale_temporaries(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        with output_errors(dst), tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tiff:
            level_image, level_downsample = image, 1
            for i, downsample in enumerate(downsamples):
                if downsample != level_downsample:
                    # Each level from the previous one (as libvips and scanners do): far cheaper
                    # than from level 0, and the bilinear filter is antialiased either way.
                    level_image = resize_rgb(
                        level_image,
                        max(1, width_px // downsample),
                        max(1, height_px // downsample),
                        exact_factor=downsample // level_downsample,
                    )
                    level_downsample = downsample
                level_h, level_w = level_image.shape[:2]
                if layout == "svs":
                    if i == 0:
                        description = (
                            f"{APERIO_HEADER}\n{width_px}x{height_px} [0,0 {width_px}x{height_px}] "
                            f"({tile_px}x{tile_px}) JPEG/RGB Q={quality}" + _aperio_fields(mpp)
                        )
                    else:
                        description = (
                            f"{APERIO_HEADER}\n{width_px}x{height_px} [0,0 {width_px}x{height_px}] "
                            f"({tile_px}x{tile_px}) -> {level_w}x{level_h} JPEG/RGB Q={quality}"
                        )
                    # Aperio readers (OpenSlide, tifffile) expect plain subfiles, not "reduced" ones.
                    tiff.write(level_image, description=description, **tile_options)
                    if i == 0:
                        _write_svs_thumbnail(tiff, image, quality, mpp)
                else:
                    resolution = {}
                    if mpp is not None:
                        pixels_per_cm = 1e4 / (mpp * width_px / level_w)
                        resolution = dict(resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
                    tiff.write(level_image, subfiletype=1 if i else 0, **resolution, **tile_options)
        with output_errors(dst):
            os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):  # a read-only folder has no temporary to remove
            tmp.unlink(missing_ok=True)
        raise
    return dst


def _remove_stale_temporaries(dst: Path) -> None:
    """Remove ``.<name>.tmp<pid>`` files that killed conversions to ``dst`` left behind (their
    process is gone; a conversion still running keeps its own)."""
    for tmp in dst.parent.glob(f".{dst.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def _aperio_fields(mpp: float | None) -> str:
    if mpp is None:
        return ""
    # AppMag by the usual convention (0.25 um/px ~ 40x); OpenSlide reports it as objective power.
    return f"|AppMag = {10 / mpp:.4g}|MPP = {mpp:.6g}"


def _write_svs_thumbnail(tiff, image: np.ndarray, quality: int, mpp: float | None) -> None:
    height_px, width_px = image.shape[:2]
    scale = min(1.0, THUMBNAIL_MAX_SIDE_PX / max(width_px, height_px))
    thumb_w, thumb_h = max(1, round(width_px * scale)), max(1, round(height_px * scale))
    thumbnail = resize_rgb(image, thumb_w, thumb_h) if scale < 1 else image
    tiff.write(
        thumbnail,
        compression="jpeg",
        compressionargs={"level": quality},
        photometric="rgb",
        metadata=None,
        rowsperstrip=16,
        description=f"{APERIO_HEADER}\n{width_px}x{height_px} -> {thumb_w}x{thumb_h} - " + _aperio_fields(mpp),
    )


def convert_to_pyramid(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    mpp: float | None = None,
    tile_px: int = 256,
    quality: int = 90,
    layout: str = "svs",
    reader: str = "auto",
) -> Path:
    """Convert ``src`` (a flat JPEG/PNG/TIFF or any slide) to a pyramidal TIFF at ``dst``.

    The mpp recorded is ``mpp`` when given, else the source's own; where neither exists the
    output has none (a warning says so; ``predict`` then needs --mpp or a spot table's pitch).
    The source's level 0 is decoded into memory whole.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix.lower() not in (".tif", ".tiff", ".svs"):
        raise M2ORTError("output must end in .tiff, .tif or .svs", dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise M2ORTError("output would overwrite the input", dst)
    with open_slide(src, mpp=mpp, reader=reader) as slide:
        width_px, height_px = slide.level_dimensions[0]
        if slide.mpp is None:
            log.warning(
                "%s: no mpp in the source and none given (--mpp); %s is written without one", src.name, dst.name
            )
        if isinstance(slide, FlatSlide):  # decoded whole already
            image = slide.image
        else:
            from m2ort_fast.slide import FLAT_MAX_PIXELS

            if width_px * height_px > FLAT_MAX_PIXELS:
                raise SlideError(f"level 0 ({width_px}x{height_px} px) is too large to convert in memory", src)
            image = slide.read_region(0, 0, 0, width_px, height_px)
        return write_pyramid(image, dst, mpp=slide.mpp, tile_px=tile_px, quality=quality, layout=layout)


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="flat image (JPEG/PNG/TIFF) or slide -> tiled pyramidal TIFF",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("image", help="flat image or slide to convert")
    p.add_argument("out", help="output .tiff (or .svs)")
    p.add_argument(
        "--mpp",
        type=mpp_value,
        default=None,
        help="level-0 microns per pixel to record (default: the source's; flat JPEG/PNG have none)",
    )
    p.add_argument("--tile-px", type=positive_int, default=256, help="tile size in pixels (default 256)")
    p.add_argument(
        "--quality",
        type=number(int, 1, 100, low_inclusive=True, what="JPEG quality"),
        default=90,
        help="JPEG quality 1-100 (default 90)",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="svs",
        help="svs: Aperio-like, levels 1,4,16,...; generic: levels 1,2,4,... (default svs)",
    )
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    out = convert_to_pyramid(
        args.image, args.out, mpp=args.mpp, tile_px=args.tile_px, quality=args.quality, layout=args.layout
    )
    with open_slide(out) as slide:
        levels = ", ".join(f"{w}x{h}" for w, h in slide.level_dimensions)
        mpp = f"{slide.mpp:.4g} um/px" if slide.mpp else "no mpp"
    print(f"{out}: {slide.level_count} levels ({levels}), {mpp}, {args.layout} layout")
    return 0
