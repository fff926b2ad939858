"""The cuCIM reader: decodes on the GPU where there is one, the CPU otherwise; batched,
multi-threaded reads of spot patches."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from m2ort_fast.errors import SlideError, exception_detail
from m2ort_fast.slide._base import Slide
from m2ort_fast.slide._tiff import TiffLayout, tiff_layout_for

log = logging.getLogger(__name__)


class CuCIMSlide(Slide):
    """cuCIM's CuImage: the fast reader, batched multi-threaded reads of spot patches.

    ``tiff``: the file's parse (open_slide's); parsed here when not given."""

    reader_name = "cucim"

    def __init__(self, path: Path, *, tiff: TiffLayout | None = None):
        from cucim.clara import CuImage

        self._image = CuImage(str(path))
        resolutions = self._image.resolutions
        with tiff_layout_for(path, tiff) as layout:
            tiff_meta = layout.metadata()
            tile_sizes = layout.tile_sizes_px
        super().__init__(path, tiff_meta["vendor"], resolutions["level_dimensions"], tiff_meta["mpp"])
        self._set_downsamples(resolutions["level_downsamples"])  # cuCIM maps locations with these
        self._set_tile_sizes(tile_sizes)
        self.num_workers = max(1, min(8, os.cpu_count() or 1))
        self._device = _cucim_device()

    def _read_level(self, level, x_px, y_px, width_px, height_px):
        return self._on_device(
            lambda: self._to_numpy(
                self._image.read_region(
                    self._level0_location(level, x_px, y_px), (width_px, height_px), level, device=self._device
                )
            )[..., :3]
        )

    @property
    def decodes_on_gpu(self) -> bool:
        """True while cuCIM decodes into GPU memory (it falls back to the CPU after a GPU failure)."""
        return self._device != "cpu"

    def read_level_region_tensor(self, level, x_level_px, y_level_px, width_px, height_px):
        """On the GPU: the decoded region handed to torch through the CUDA array interface (no copy
        to the host), white outside the level; on the CPU, the base class's host tensor."""
        if not self.decodes_on_gpu:
            return super().read_level_region_tensor(level, x_level_px, y_level_px, width_px, height_px)
        import torch

        device = torch.device(self._device)
        return self._read_clipped(
            level,
            x_level_px,
            y_level_px,
            width_px,
            height_px,
            self._read_level_on_gpu,
            lambda shape: torch.full(shape, 255, dtype=torch.uint8, device=device),
        )

    def _read_level_on_gpu(self, level, x_px, y_px, width_px, height_px):
        location = self._level0_location(level, x_px, y_px)
        return self._on_device(
            lambda: self._to_tensor(
                self._image.read_region(location, (width_px, height_px), level, device=self._device)
            )
        )

    def _to_tensor(self, region):
        import torch

        if self._device == "cpu":  # after a GPU failure
            return torch.from_numpy(self._to_numpy(region)[..., :3])
        # torch.as_tensor keeps `region` alive as long as the tensor (__cuda_array_interface__).
        return torch.as_tensor(region, device=self._device)[..., :3]

    def _read_level_batch(self, level, top_left_px, size_px):
        return self._on_device(lambda: self._read_batch(level, top_left_px, size_px))

    def _on_device(self, read: Callable[[], Any]) -> Any:
        if self._device == "cpu":
            return read()
        try:
            return read()
        except Exception as exc:  # the GPU read path failed: the CPU one still works
            log.warning(
                "%s: cuCIM reads on %s failed (%s); reading on the CPU",
                self.path.name,
                self._device,
                exception_detail(exc),
            )
            self._device = "cpu"
            return read()

    def _read_batch(self, level, top_left_px, size_px):
        if len(top_left_px) == 1:
            return self._read_level(level, *map(int, top_left_px[0]), size_px, size_px)[None]
        locations = [self._level0_location(level, int(x), int(y)) for x, y in top_left_px]
        out = np.empty((len(locations), size_px, size_px, 3), dtype=np.uint8)
        # One batch for all locations: in cuCIM 26.10 smaller batches of one call come back with
        # wrong pixels; and each batch's buffer is freed by the next, so copy it out at once.
        batches = self._image.read_region(
            locations,
            (size_px, size_px),
            level,
            num_workers=self.num_workers,
            batch_size=len(locations),
            device=self._device,
        )
        start = 0
        for batch in batches:
            pixels = self._to_numpy(batch)
            pixels = pixels.reshape(-1, *pixels.shape[-3:])
            out[start : start + len(pixels)] = pixels[..., :3]
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
    """ "cuda" where cupy sees a GPU (cuCIM then reads into GPU memory), else "cpu".
    M2ORT_CUCIM_DEVICE=cpu|cuda overrides."""
    if os.environ.get("M2ORT_CUCIM_DEVICE"):
        return os.environ["M2ORT_CUCIM_DEVICE"]
    try:
        import cupy

        return "cuda" if cupy.cuda.runtime.getDeviceCount() > 0 else "cpu"
    except Exception:  # no cupy, no driver, no device: all mean the CPU
        return "cpu"
