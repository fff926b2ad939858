"""The OpenSlide reader: the broadest vendor coverage (MIRAX, DICOM... and TIFFs that neither
cuCIM nor tiffslide opens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m2ort_fast.slide._base import DEFAULT_TILE_PX, Slide, positive_float
from m2ort_fast.slide._flat import as_rgb
from m2ort_fast.slide._tiff import TiffLayout


class OpenSlideSlide(Slide):
    """OpenSlide: the broadest vendor coverage.

    ``tiff``: a TIFF's parse (open_slide's), for its tile sizes; other formats' come from
    OpenSlide's properties."""

    reader_name = "openslide"

    def __init__(self, path: Path, *, tiff: TiffLayout | None = None):
        import openslide

        self._slide = openslide.OpenSlide(str(path))
        props = self._slide.properties
        super().__init__(
            path,
            props.get("openslide.vendor") or "unknown",
            self._slide.level_dimensions,
            positive_float(props.get("openslide.mpp-x")),
        )
        self._set_downsamples(self._slide.level_downsamples)
        if tiff is not None and tiff.tile_sizes_px is not None:
            self._set_tile_sizes(tiff.tile_sizes_px)
        else:
            self._tile_sizes_px = _property_tile_sizes(props, self.level_count)

    def _read_level(self, level, x_px, y_px, width_px, height_px):
        rgba = np.asarray(
            self._slide.read_region(self._level0_location(level, x_px, y_px), level, (width_px, height_px))
        )
        return as_rgb(rgba, self.path)

    def close(self):
        self._slide.close()
        super().close()


def _property_tile_sizes(props, level_count: int) -> tuple[tuple[int, int], ...] | None:
    """(tile_width_px, tile_height_px) per level from OpenSlide's ``openslide.level[i].tile-width``
    and ``-height`` (DEFAULT_TILE_PX where one is missing); None (the default grid) when they
    cannot be read."""
    try:
        return tuple(
            (
                int(props.get(f"openslide.level[{i}].tile-width", DEFAULT_TILE_PX)),
                int(props.get(f"openslide.level[{i}].tile-height", DEFAULT_TILE_PX)),
            )
            for i in range(level_count)
        )
    except Exception:
        return None
