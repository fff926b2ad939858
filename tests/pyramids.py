"""Small pyramidal TIFFs for tests, filled with real H&E pixels where the shared data is present.

    from pyramids import tissue_pixels, write_test_pyramid
    path = write_test_pyramid(tmp_path / "s.svs", layout="svs")   # levels 1, 4, 16 (Aperio-like)
    path = write_test_pyramid(tmp_path / "g.tiff", layout="generic")  # levels 1, 2, 4

Pixels come from a her2st section (decoded at 1/4 scale by the JPEG decoder, so it is fast) when
../shared/data is present, else a synthetic tissue-like image (pink stroma, purple nuclei, white
background), so tests that only need "something that looks like a slide" run everywhere.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from real_data import HER2ST

from m2ort_fast.convert import write_pyramid

TEST_MPP = 0.5
LAYOUT_DOWNSAMPLES = {"svs": (1, 4, 16), "generic": (1, 2, 4), "subifd": (1, 2, 4)}
# A her2st section at 1/4 scale; this corner holds tissue and background.
REAL_SECTION_JPEG = HER2ST / "C2" / "5714_HE_BT_C2.jpg"


@functools.lru_cache(maxsize=4)
def tissue_pixels(size_px: int = 2048, real: bool = True) -> np.ndarray:
    """(size_px, size_px, 3) uint8 H&E-like pixels: a crop of a real section when available."""
    if real and REAL_SECTION_JPEG.is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ~92 Mpx, a real section
            image = Image.open(REAL_SECTION_JPEG)
        with image:
            image.draft("RGB", (image.width // 4, image.height // 4))  # DCT-domain 1/4 decode
            pixels = np.asarray(image.convert("RGB"))
        if min(pixels.shape[:2]) >= size_px:
            top, left = (pixels.shape[0] - size_px) // 2, (pixels.shape[1] - size_px) // 2
            return np.ascontiguousarray(pixels[top : top + size_px, left : left + size_px])
    return synthetic_tissue(size_px)


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b).mean())


def jpeg_error_bound(image: np.ndarray, quality: int) -> float:
    """What JPEG itself costs these pixels: the mean absolute error of one encode/decode at
    ``quality`` by the codec tifffile writes tiles with (imagecodecs' libjpeg), plus 5% for the
    tile edges. A correct pyramid level meets it whatever the pixels (q90: ~3.4 on real tissue,
    ~6.1 on the synthetic tissue's per-pixel noise); an image shifted by one pixel does not
    (checked by :func:`assert_within_jpeg_error`)."""
    import imagecodecs

    decoded = imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(image, level=quality))
    return 1.05 * mean_abs_error(decoded, image) + 0.1


def assert_within_jpeg_error(decoded: np.ndarray, image: np.ndarray, quality: int) -> None:
    """``decoded`` is ``image`` up to JPEG at ``quality``; the bound is also checked to reject a
    one-pixel shift of ``image``, so that it can fail where it should."""
    bound = jpeg_error_bound(image, quality)
    assert mean_abs_error(decoded, image) <= bound, (mean_abs_error(decoded, image), bound)
    assert mean_abs_error(np.roll(image, 1, axis=1), image) > bound, "the bound would not see a shifted image"


def synthetic_tissue(size_px: int = 2048, seed: int = 0) -> np.ndarray:
    """Tissue-like pixels: smooth pink stroma blobs with purple nuclei on a white background."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((size_px // 64 + 1, size_px // 64 + 1)).astype(np.float32)
    tissue = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size_px, size_px), Image.BICUBIC))
    tissue = tissue > 110
    image = np.full((size_px, size_px, 3), 245, dtype=np.uint8)
    stroma = np.array([230, 150, 190], dtype=np.int16) + rng.integers(-20, 20, (size_px, size_px, 3), dtype=np.int16)
    image[tissue] = np.clip(stroma[tissue], 0, 255).astype(np.uint8)
    ys, xs = rng.integers(0, size_px - 8, (2, size_px * size_px // 400))
    for y, x in zip(ys, xs, strict=True):
        if tissue[y, x]:
            image[y : y + 6, x : x + 6] = (90, 50, 140)
    return image


def write_test_pyramid(
    path: Path,
    layout: str = "svs",
    *,
    size_px: int = 2048,
    mpp: float | None = TEST_MPP,
    tile_px: int = 256,
    quality: int = 90,
    real: bool = True,
) -> Path:
    """Write a JPEG-tiled pyramid of tissue_pixels(size_px) at ``path``.

    layout: "svs" (Aperio-like, levels 1, 4, 16), "generic" (levels 1, 2, 4) or "subifd"
    (levels 1, 2, 4 stored in SubIFDs of level 0, which only tiffslide reads).
    """
    image = tissue_pixels(size_px, real)
    if layout == "subifd":
        return _write_subifd_pyramid(Path(path), image, mpp, tile_px, quality)
    return write_pyramid(
        image, path, mpp=mpp, tile_px=tile_px, quality=quality, layout=layout, downsamples=LAYOUT_DOWNSAMPLES[layout]
    )


def _write_subifd_pyramid(path: Path, image: np.ndarray, mpp, tile_px: int, quality: int) -> Path:
    import tifffile

    from m2ort_fast.crop import resize_rgb

    options = dict(
        tile=(tile_px, tile_px),
        compression="jpeg",
        compressionargs={"level": quality},
        photometric="rgb",
        metadata=None,
    )
    downsamples = LAYOUT_DOWNSAMPLES["subifd"]
    h, w = image.shape[:2]
    with tifffile.TiffWriter(path) as tiff:
        resolution = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
        tiff.write(image, subifds=len(downsamples) - 1, **resolution, **options)
        for downsample in downsamples[1:]:
            tiff.write(resize_rgb(image, w // downsample, h // downsample), subfiletype=1, **options)
    return path
