"""Flat images (a large JPEG/PNG/TIFF without a pyramid, e.g. the her2st sections, ~9270 x 9920
px): decoded once into memory, after checks of their size and data; and the RGB handling every
reader shares (grayscale refused, transparency composited on white)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from m2ort_fast.errors import SlideError, exception_detail
from m2ort_fast.slide._base import Slide
from m2ort_fast.slide._tiff import TiffLayout, TileVerifier, is_tiff_header, resolution_mpp, verify_jpeg

# The flat reader keeps the whole image in memory (3 bytes per pixel); refuse absurd sizes.
FLAT_MAX_PIXELS = 2_000_000_000
# Decoding a flat image holds about this many copies of its pixels at once (the decoder's and ours).
FLAT_DECODE_COPIES = 2


class FlatSlide(Slide):
    """A flat image decoded once into memory: one level; reads are numpy slices.

    ``max_decoded_mb``: refuse (before decoding) an image whose pixels alone exceed it; a flat
    image cannot be decoded in parts, so this is how a memory bound holds for it. ``tiff``: a
    TIFF's parse (open_slide's), whose open file is decoded."""

    reader_name = "flat"

    def __init__(self, path: Path, *, max_decoded_mb: float | None = None, tiff: TiffLayout | None = None):
        image, vendor, mpp = _decode_flat(path, max_decoded_mb, tiff)
        self.image = image  # (H, W, 3) uint8
        super().__init__(path, vendor, [(image.shape[1], image.shape[0])], mpp)

    def _read_level(self, level, x_px, y_px, width_px, height_px):
        return self.image[y_px : y_px + height_px, x_px : x_px + width_px].copy()

    def _read_level_batch(self, level, top_left_px, size_px):
        # Strided view of every size_px window, indexed by the corners: one gather, no Python loop.
        windows = np.lib.stride_tricks.sliding_window_view(self.image, (size_px, size_px), axis=(0, 1))
        return windows[top_left_px[:, 1], top_left_px[:, 0]].transpose(0, 2, 3, 1)

    def close(self):
        self.image = None
        super().close()


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


def pil_recognises(path: Path) -> bool:
    try:
        with _large_images_allowed(), Image.open(path) as image:
            return bool(image.format)
    except Exception:
        return False


def _decode_flat(
    path: Path, max_decoded_mb: float | None = None, tiff: TiffLayout | None = None
) -> tuple[np.ndarray, str, float | None]:
    """Decode a whole flat image: ((H, W, 3) uint8 RGB, vendor, mpp or None). Its size is checked
    against ``max_decoded_mb`` and the memory available, and its data with a strict decoder,
    before the full decode. ``tiff``: the file's parse when it is a TIFF (else it is sniffed)."""
    if tiff is None:
        with open(path, "rb") as f:
            is_tiff = is_tiff_header(f.read(4))
    if tiff is not None or is_tiff:
        return _decode_flat_tiff(path, max_decoded_mb, tiff)
    try:
        with _large_images_allowed(), Image.open(path) as image:
            _check_flat_size(path, image.width, image.height, max_decoded_mb)
            _check_rgb_mode(path, image.mode)
            vendor = (image.format or "image").lower()
            if image.format == "JPEG":
                _check_jpeg_data_at_an_eighth(path, image.width, image.height)
                verify_jpeg(path.read_bytes(), path, "the image")
            image.load()
            rgb = _pil_to_rgb(image)
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(
            f"cannot decode the image (truncated or not an image?): {exception_detail(exc)}", path
        ) from None
    # JPEG/PNG resolution fields are screen/print settings, not the microscope's: no mpp.
    return rgb, vendor, None


def _check_jpeg_data_at_an_eighth(path: Path, width_px: int, height_px: int) -> None:
    """Decode the JPEG at 1/8 scale (libjpeg's DCT scaling: 1/64 of the pixels) and refuse data
    that ends early, before the strict check, which holds a full-size buffer: a 632-byte file
    claiming 30000 x 30000 px cost 2.7 GB there, now 17 MB."""
    with _large_images_allowed(), Image.open(path) as draft:
        draft.draft("RGB", (max(1, width_px // 8), max(1, height_px // 8)))
        try:
            draft.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise SlideError(
                f"corrupt JPEG data in the image: Premature end of JPEG file or damaged data (the data does not "
                f"hold the {width_px}x{height_px} px its header claims: {exception_detail(exc)})",
                path,
            ) from None


def _decode_flat_tiff(
    path: Path, max_decoded_mb: float | None = None, tiff: TiffLayout | None = None
) -> tuple[np.ndarray, str, float | None]:
    import tifffile

    try:
        with (
            contextlib.nullcontext(tiff.tif) if tiff is not None and tiff.tif is not None else tifffile.TiffFile(path)
        ) as tif:
            page = tif.series[0].levels[0].keyframe
            _check_flat_size(path, page.imagewidth, page.imagelength, max_decoded_mb)
            level0 = [(page.imagewidth, page.imagelength)]
            verifier = (
                TileVerifier.from_layout(tiff, level0)
                if tiff is not None
                else TileVerifier.for_slide(path, level0, tif)
            )
            with contextlib.closing(verifier):
                verifier.verify_region(0, 0, 0, page.imagewidth, page.imagelength)
            pixels = tif.series[0].levels[0].asarray()
            mpp = resolution_mpp(page)
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(f"cannot decode the TIFF (truncated or damaged?): {exception_detail(exc)}", path) from None
    if pixels.dtype != np.uint8:
        raise SlideError(f"unsupported pixel type {pixels.dtype} (8-bit RGB expected)", path)
    return as_rgb(pixels, path), "tiff", mpp


def _check_flat_size(path: Path, width_px: int, height_px: int, max_decoded_mb: float | None = None) -> None:
    """Refuse, before decoding, a flat image too large for the limit, the bound asked for, or the
    memory this machine has available (the header can claim any size: a 600-byte file once
    claimed 30000 x 30000 px)."""
    convert_hint = "convert it to a tiled pyramidal TIFF (m2ort-fast convert), which is read in parts"
    if width_px * height_px > FLAT_MAX_PIXELS:
        raise SlideError(
            f"{width_px}x{height_px} px is too large to decode into memory "
            f"(limit {FLAT_MAX_PIXELS / 1e6:.0f} Mpx); use a tiled pyramidal TIFF",
            path,
        )
    decoded_bytes = width_px * height_px * 3
    if max_decoded_mb is not None and decoded_bytes > max_decoded_mb * 2**20:
        raise SlideError(
            f"a flat image is decoded whole: its {width_px}x{height_px} px need "
            f"{decoded_bytes / 2**20:.0f} MB, over the memory bound of {max_decoded_mb:g} MB "
            f"(--max-memory-mb); raise the bound or {convert_hint}",
            path,
        )
    available = available_memory_bytes()
    needed = decoded_bytes * FLAT_DECODE_COPIES
    if available is not None and needed > available:
        raise SlideError(
            f"decoding its {width_px}x{height_px} px needs about {needed / 2**30:.1f} GiB, and "
            f"{available / 2**30:.1f} GiB of memory is available; {convert_hint}",
            path,
        )


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


def as_rgb(pixels: np.ndarray, path: Path) -> np.ndarray:
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
