"""TIFF sniffing: the one tifffile parse of a TIFF on open, and the tile check built on it.

``read_tiff_layout(path)`` walks the file's chain of image directories (a cut-off file), parses
it once with tifffile, checks it (no images, grayscale, data past the end of the file) and keeps
what the readers and the tile check need: the number of pyramid levels, vendor and mpp, each
level's tile shape and tile table. The reader library (cuCIM, tiffslide, OpenSlide) still opens
the file itself.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m2ort_fast.errors import SlideError, exception_detail
from m2ort_fast.slide._base import positive_float

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_tiff_header(head: bytes) -> bool:
    """Whether a file's first bytes are a TIFF's (classic or BigTIFF, either byte order)."""
    return head[:4] in TIFF_MAGICS


# --------------------------------------------------------------------------------------------
# The one parse


@dataclass
class TiffLevel:
    """One image size of a TIFF (its first page of that size in any series): where its tiles
    (or strips) lie and how they are compressed."""

    page: Any  # the tifffile TiffPage (keyframe): decodes non-JPEG tiles
    tile_w: int
    tile_h: int
    across: int  # tiles per row
    offsets: np.ndarray  # (n_tiles,) int64 byte offsets
    counts: np.ndarray  # (n_tiles,) int64 byte counts
    jpeg: bool
    tables: bytes | None  # shared JPEG tables


class TiffLayout:
    """What one tifffile parse of a TIFF found (see ``read_tiff_layout``).

    ``level_count``: pyramid levels of its first series. ``tile_sizes_px``: {(width_px, height_px):
    (tile_width_px, tile_height_px)} of every level of every series, None where the tags could
    not say. ``tif``: the open tifffile.TiffFile, until ``close()``. ``metadata()`` and
    ``tile_levels()`` raise the error their part of the parse met only when asked: unreadable
    metadata fails the open of a reader that needs it, damaged tile tables the tile check (not
    an open with ``verify_tiles=False``)."""

    def __init__(self, path: Path, tif, level_count: int):
        self.path = path
        self.tif = tif
        self.level_count = level_count
        self.tile_sizes_px: dict[tuple[int, int], tuple[int, int]] | None = None
        self._metadata: dict | None = None
        self._metadata_error: BaseException | None = None
        self._tile_levels: dict[tuple[int, int], TiffLevel] | None = None
        self._tile_levels_error: SlideError | None = None

    def metadata(self) -> dict:
        """{"vendor", "mpp"} from the tags: the Aperio description's MPP, else the resolution tags of level 0."""
        if self._metadata_error is not None:
            raise self._metadata_error
        assert self._metadata is not None
        return self._metadata

    def tile_levels(self) -> dict[tuple[int, int], TiffLevel]:
        """{(width_px, height_px): TiffLevel} of the levels the tile check can check; SlideError
        for tile tables that do not match their level."""
        if self._tile_levels_error is not None:
            raise self._tile_levels_error
        assert self._tile_levels is not None
        return self._tile_levels

    def close(self) -> None:
        if self.tif is not None:
            self.tif.close()
            self.tif = None

    def __enter__(self) -> TiffLayout:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_tiff_layout(path: Path) -> TiffLayout:
    """Parse a TIFF once (see TiffLayout); SlideError for a TIFF that is truncated or broken.
    The caller closes it (its tifffile stays open for a reader that decodes with it)."""
    import tifffile

    path = Path(path)
    file_size = path.stat().st_size
    if _ifd_chain_runs_past(path, file_size):
        raise SlideError(
            f"truncated: its directory of images points past the end of the file ({file_size} bytes)", path
        )
    try:
        tif = tifffile.TiffFile(path)
        try:
            layout = TiffLayout(path, tif, _checked_level_count(tif, path, file_size))
        except BaseException:
            tif.close()
            raise
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(f"damaged or truncated TIFF: {exception_detail(exc)}", path) from None
    with contextlib.ExitStack() as on_error:
        on_error.callback(layout.close)
        try:
            layout._metadata = _metadata_of(tif)
        except Exception as exc:  # raised by metadata(), when a reader asks
            layout._metadata_error = exc
        try:
            layout.tile_sizes_px = _tile_sizes_of(tif)
        except Exception:  # the file's tile grid is a hint for the read plan, which does without
            layout.tile_sizes_px = None
        try:
            layout._tile_levels = _tile_levels_of(tif, path)
        except SlideError as exc:  # raised by tile_levels(), when the tile check is made
            layout._tile_levels_error = exc
        on_error.pop_all()
    return layout


@contextlib.contextmanager
def tiff_layout_for(path: Path, layout: TiffLayout | None) -> Iterator[TiffLayout]:
    """``layout`` when the caller parsed the file already (open_slide does), else a parse of
    ``path`` closed on leaving."""
    if layout is not None:
        yield layout
        return
    with read_tiff_layout(path) as parsed:
        yield parsed


def _checked_level_count(tif, path: Path, file_size: int) -> int:
    """Number of pyramid levels tifffile sees; SlideError for a TIFF without (RGB) images or whose
    image data runs past the end of the file."""
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
                raise SlideError(f"truncated: image data runs past the end of the file ({file_size} bytes)", path)
    return len(levels)


def _metadata_of(tif) -> dict:
    """{"vendor", "mpp"} of a TIFF from its tags: the Aperio description's MPP, else the
    resolution tags of level 0."""
    page = tif.pages[0]
    if tif.is_svs:
        match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", page.description or "")
        return {"vendor": "aperio", "mpp": positive_float(match.group(1)) if match else None}
    vendor = "hamamatsu" if tif.is_ndpi else "generic-tiff"
    return {"vendor": vendor, "mpp": resolution_mpp(page)}


def _tile_sizes_of(tif) -> dict[tuple[int, int], tuple[int, int]]:
    """{(width_px, height_px): (tile_width_px, tile_height_px)} of every level of every series
    (the first level of a size wins)."""
    by_size: dict = {}
    for series in tif.series:
        for level in series.levels:
            page = level.keyframe
            by_size.setdefault((page.imagewidth, page.imagelength), tiff_tile_shape(page))
    return by_size


def _tile_levels_of(tif, path: Path) -> dict[tuple[int, int], TiffLevel]:
    """{(width_px, height_px): TiffLevel} of every level of every series (the first level of a
    size wins; levels with separate colour planes are not checked); SlideError for tile tables
    that do not match their level, or for tags tifffile cannot read."""
    by_size: dict = {}
    try:
        for series in tif.series:
            for level in series.levels:
                page = level.keyframe
                size = (page.imagewidth, page.imagelength)
                if size in by_size or page.planarconfig == 2:  # separate planes: not checked
                    continue
                tile_w, tile_h = tiff_tile_shape(page)
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if (
                    tile_w < 1
                    or tile_h < 1
                    or len(offsets) != len(counts)
                    or len(offsets) < (-(-page.imagewidth // tile_w) * -(-page.imagelength // tile_h))
                ):
                    raise SlideError(
                        f"damaged TIFF: the {size[0]}x{size[1]} px level's tile tables do not match its size", path
                    )
                if page.jpegtables is not None and not isinstance(page.jpegtables, bytes):
                    raise SlideError(
                        f"damaged TIFF: the {size[0]}x{size[1]} px level's JPEGTables tag is not a byte string", path
                    )
                by_size[size] = TiffLevel(
                    page=page,
                    tile_w=tile_w,
                    tile_h=tile_h,
                    across=-(-page.imagewidth // tile_w),
                    offsets=offsets,
                    counts=counts,
                    jpeg=page.compression == 7,
                    tables=page.jpegtables,
                )
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(f"damaged or truncated TIFF: {exception_detail(exc)}", path) from None
    return by_size


def tiff_tile_shape(page) -> tuple[int, int]:
    """(width_px, height_px) of one tile of a tifffile page; a stripped page's "tile" is a
    full-width strip of RowsPerStrip rows."""
    if page.is_tiled:
        return page.tilewidth, page.tilelength
    return page.imagewidth, min(page.rowsperstrip or page.imagelength, page.imagelength)


def _ifd_chain_runs_past(path: Path, file_size: int) -> bool:
    """Whether the TIFF's chain of image directories (IFDs) points past the end of the file or
    loops: the sign of a cut-off file, which tifffile only logs and cuCIM/OpenSlide silently
    read as a slide with fewer levels."""
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


def resolution_mpp(page) -> float | None:
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


# --------------------------------------------------------------------------------------------
# The tile check


class TileVerifier:
    """Checks a TIFF's tile (or strip) data with a strict decoder before a reader decodes it.

    The readers do not all fail on damaged data: cuCIM prints libjpeg's errors to stdout and
    returns the pixels it made of them; libjpeg's "corrupt data" warnings are ignored by cuCIM,
    tiffslide (imagecodecs) and OpenSlide alike. Each tile a read touches is decoded once here:
    JPEG by libjpeg-turbo in strict mode (warnings are errors) at 1/8 scale (the entropy data,
    where damage shows, is decoded in full; the inverse DCT mostly skipped), other compressions
    by tifffile's own codecs. A damaged tile is a SlideError naming the level and the tile.
    Damage a decoder cannot see (JPEG has no checksum) stays unseen, by this and by every reader.
    """

    def __init__(self, path: Path, levels: list[TiffLevel | None]):
        self.path = path
        self.levels = levels  # per slide level: geometry and tile table of the TIFF level, or None
        # per slide level: which of its tiles were checked
        self._checked = [np.zeros(0 if level is None else len(level.offsets), dtype=bool) for level in levels]
        self._fd = os.open(path, os.O_RDONLY)

    @classmethod
    def from_layout(cls, layout: TiffLayout, level_dimensions: Sequence[tuple[int, int]]) -> TileVerifier:
        """Match the slide's levels to the TIFF's by size (a level no TIFF level matches is not
        checked); SlideError for tile tables that do not match their level."""
        by_size = layout.tile_levels()
        return cls(layout.path, [by_size.get((int(w), int(h))) for w, h in level_dimensions])

    @classmethod
    def for_slide(cls, path: Path, level_dimensions: Sequence[tuple[int, int]], tif=None) -> TileVerifier:
        """Like from_layout, from the file itself. ``tif``: the file already open as a
        tifffile.TiffFile (else it is opened here)."""
        import tifffile

        try:
            with contextlib.nullcontext(tif) if tif is not None else tifffile.TiffFile(path) as tif:
                by_size = _tile_levels_of(tif, path)
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
        tile_w, tile_h = geometry.tile_w, geometry.tile_h
        cols = np.arange(x_px // tile_w, (x_px + width_px - 1) // tile_w + 1)
        rows = np.arange(y_px // tile_h, (y_px + height_px - 1) // tile_h + 1)
        self._verify(level, geometry, (rows[:, None] * geometry.across + cols[None, :]).ravel())

    def verify_squares(self, level: int, top_left_px: np.ndarray, size_px: int) -> None:
        """Check the tiles under squares of side ``size_px`` at ``top_left_px`` ((N, 2) x, y)."""
        geometry = self.levels[level] if level < len(self.levels) else None
        if geometry is None or len(top_left_px) == 0:
            return
        tile_w, tile_h = geometry.tile_w, geometry.tile_h
        first = top_left_px // np.array([tile_w, tile_h])
        last = (top_left_px + size_px - 1) // np.array([tile_w, tile_h])
        spans = (last - first).max(axis=0) + 1
        indices = [
            np.minimum(first[:, 1] + dy, last[:, 1]) * geometry.across + np.minimum(first[:, 0] + dx, last[:, 0])
            for dy in range(spans[1])
            for dx in range(spans[0])
        ]
        self._verify(level, geometry, np.unique(np.concatenate(indices)))

    def _verify(self, level: int, geometry: TiffLevel, indices: np.ndarray) -> None:
        checked = self._checked[level]
        indices = indices[(indices >= 0) & (indices < len(checked))]
        for index in indices[~checked[indices]]:
            offset, count = int(geometry.offsets[index]), int(geometry.counts[index])
            if count:  # 0 bytes: a tile never written, which readers show as empty
                data = os.pread(self._fd, count, offset)
                where = (
                    f"level {level}, tile {index} (column {index % geometry.across}, "
                    f"row {index // geometry.across}) at byte {offset}"
                )
                if len(data) != count:
                    raise SlideError(f"truncated tile data in {where}", self.path)
                self._decode(geometry, int(index), data, where)
            checked[index] = True

    def _decode(self, geometry: TiffLevel, index: int, data: bytes, where: str) -> None:
        if geometry.jpeg:
            tables = geometry.tables
            if tables and data[:2] == b"\xff\xd8":  # abbreviated tile: splice in the shared tables
                data = tables[:-2] + data[2:]
            verify_jpeg(data, self.path, where)
            return
        try:
            geometry.page.decode(data, index, jpegtables=geometry.tables)
        except Exception as exc:
            raise SlideError(f"corrupt tile data in {where}: {exception_detail(exc)}", self.path) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def verify_jpeg(data: bytes, path: Path, where: str) -> None:
    """SlideError unless libjpeg-turbo decodes ``data`` without an error or a warning (1/8 scale)."""
    import simplejpeg

    try:
        _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("Gray", "YCbCr", "RGB"):  # CMYK/YCCK: no RGB conversion to check with
            return
        simplejpeg.decode_jpeg(data, colorspace="rgb", min_factor=8, strict=True)
    except ValueError as exc:
        raise SlideError(f"corrupt JPEG data in {where}: {exception_detail(exc)}", path) from None
