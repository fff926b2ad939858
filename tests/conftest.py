"""Shared fixtures. Where the real data lives: ``real_data.py``; which readers are installed: ``readers.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from real_data import HER2ST, her2st_section, require


@pytest.fixture
def her2st_dir() -> Path:
    return require(HER2ST)


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch):
    # CI has 2 cores; keep torch from oversubscribing them.
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def her2st_c2_pyramids(tmp_path_factory) -> dict:
    """The real C2 section (a flat JPEG without mpp) converted to an SVS-like (1, 4, 16, ...) and a
    generic (1, 2, 4, ...) pyramid, at the mpp derived from its spot table's 200 um array pitch.
    Keys: jpeg, svs, generic (paths), mpp, centers_px (N, 2) level-0 (x, y), preview_patches (the
    JPEG's patches read the preview code's way, one (N, S, S, 3) per level). Decoded once per run."""
    import numpy as np

    from m2ort_fast.convert import write_pyramid
    from m2ort_fast.crop import read_spot_patches
    from m2ort_fast.slide import open_slide
    from m2ort_fast.spots import load_spots

    folder = her2st_section("C2")
    spots = load_spots(folder / "C2_selection.tsv")
    mpp = spots.mpp_from_pitch
    jpeg = next(folder.glob("*_HE*.jpg"))
    out = tmp_path_factory.mktemp("her2st_c2")
    centers_px = np.asarray(spots.centers_px, dtype=np.float64)
    with open_slide(jpeg, mpp=mpp) as flat:
        paths = {
            layout: write_pyramid(flat.image, out / f"C2_{layout}.tiff", mpp=mpp, layout=layout)
            for layout in ("svs", "generic")
        }
        # what the preview code feeds the model: crops of the original JPEG, levels 2-3 resized
        preview = read_spot_patches(flat, centers_px, (mpp, 2 * mpp, 4 * mpp), level_source="resize")
    return {"jpeg": jpeg, **paths, "mpp": float(mpp), "centers_px": centers_px, "preview_patches": preview}
