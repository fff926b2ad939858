"""Reading whole-slide images and flat H&E images behind one small interface.

    with open_slide("slide.svs") as slide:
        region = slide.read_region(x_px, y_px, level, width_px, height_px)  # (h, w, 3) uint8

Readers, tried in this order by ``open_slide(path)`` ("auto"):

- ``cucim``: cuCIM ``CuImage`` (decodes on the GPU where there is one, the CPU otherwise).
  Used for TIFF-based slides whose every pyramid level it sees.
- ``tiffslide``: the CPU fallback for TIFFs cuCIM cannot open, or whose levels it cannot see
  (pyramids stored in SubIFDs: cuCIM and OpenSlide see only level 0 of those).
- ``openslide``: other vendor formats (MIRAX, DICOM...) and TIFFs that neither of the above opens.
- ``flat``: a large JPEG/PNG/TIFF without a pyramid (e.g. the her2st sections, ~9270 x 9920 px):
  decoded once, kept in memory, one level; reads are numpy slices.

Coordinates follow OpenSlide: ``read_region`` takes the top-left corner in level-0 pixels and the
size in pixels of the level read. Everything outside the slide reads as white (255). A TIFF is
parsed once on open (``_tiff.read_tiff_layout``: truncation checks, vendor and mpp, tile shapes
and tables); its tiles are checked with a strict decoder before a reader decodes them.

Spot patches (the model's inputs) are cut from a slide by :mod:`m2ort_fast.crop`.

Modules: ``_base`` (the ``Slide`` interface), ``_open`` (``open_slide``), one per reader
(``_cucim``, ``_tiffslide``, ``_openslide``, ``_flat``), ``_tiff`` (the TIFF parse and tile check).
"""

from m2ort_fast.errors import SlideError
from m2ort_fast.slide._base import (
    DEFAULT_TILE_PX,
    LEVEL_SOURCES,
    MPP_RANGE,
    MPP_SOURCES,
    MPP_TOLERANCE,
    NO_MPP_MESSAGE,
    THUMBNAIL_CHUNK_PX,
    Slide,
    require_mpp,
)
from m2ort_fast.slide._flat import FLAT_DECODE_COPIES, FLAT_MAX_PIXELS, FlatSlide
from m2ort_fast.slide._open import READERS, open_slide

__all__ = [
    "FlatSlide",
    "Slide",
    "SlideError",
    "open_slide",
    "require_mpp",
    "READERS",
    "MPP_SOURCES",
    "MPP_RANGE",
    "LEVEL_SOURCES",
    "MPP_TOLERANCE",
    "FLAT_MAX_PIXELS",
    "FLAT_DECODE_COPIES",
    "THUMBNAIL_CHUNK_PX",
    "DEFAULT_TILE_PX",
    "NO_MPP_MESSAGE",
]
