"""The tiffslide reader: pure-Python TIFF reading, the CPU fallback for TIFFs cuCIM cannot open
or whose levels it cannot see (pyramids stored in SubIFDs)."""

from __future__ import annotations

from pathlib import Path

from m2ort_fast.slide._base import Slide, positive_float
from m2ort_fast.slide._flat import as_rgb
from m2ort_fast.slide._tiff import TiffLayout, tiff_layout_for


class TiffSlideSlide(Slide):
    """tiffslide: pure-Python TIFF reader (sees SubIFD pyramids).

    ``tiff``: the file's parse (open_slide's); parsed here when not given."""

    reader_name = "tiffslide"

    def __init__(self, path: Path, *, tiff: TiffLayout | None = None):
        import tiffslide

        self._slide = tiffslide.TiffSlide(str(path))
        props = self._slide.properties
        with tiff_layout_for(path, tiff) as layout:
            tiff_meta = layout.metadata()
            tile_sizes = layout.tile_sizes_px
        super().__init__(
            path,
            props.get("tiffslide.vendor") or tiff_meta["vendor"],
            self._slide.level_dimensions,
            positive_float(props.get("tiffslide.mpp-x")) or tiff_meta["mpp"],
        )
        self._set_downsamples(self._slide.level_downsamples)
        self._set_tile_sizes(tile_sizes)

    def _read_level(self, level, x_px, y_px, width_px, height_px):
        region = self._slide.read_region(
            self._level0_location(level, x_px, y_px), level, (width_px, height_px), as_array=True
        )
        return as_rgb(region, self.path)

    def close(self):
        self._slide.close()
        super().close()
