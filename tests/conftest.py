"""Shared fixtures: the real data in ../shared/data (skipped, with the reason, where absent)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("M2ORT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
HER2ST = SHARED_DATA / "her2st"
HER2ST_SECTIONS = ("C2", "C3", "C4", "C5")


_READER_MODULES = {"cucim": "cucim", "tiffslide": "tiffslide", "openslide": "openslide", "flat": "PIL"}


def _reader_missing(reader: str) -> str | None:
    """Why ``reader``'s library cannot be imported here, or None when it can."""
    try:
        importlib.import_module(_READER_MODULES[reader])
    except ImportError as exc:
        return f"the {reader} reader is not installed here ({exc})"
    return None


def reader_installed(reader: str) -> bool:
    return _reader_missing(reader) is None


def installed_readers(*readers: str) -> list:
    """``readers`` as pytest parameters, those whose library is not installed skipped with the
    reason (cuCIM has no wheels for some platforms; the README calls it optional)."""
    return [reader if _reader_missing(reader) is None
            else pytest.param(reader, marks=pytest.mark.skip(reason=_reader_missing(reader)))
            for reader in readers]


def her2st_section(name: str) -> Path:
    """Folder of one real HER2+ section; skips the test where the shared data is absent."""
    folder = HER2ST / name
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder} (the repo's ../shared/data is absent on this machine)")
    return folder


@pytest.fixture
def her2st_dir() -> Path:
    if not HER2ST.is_dir():
        pytest.skip(f"real data not found at {HER2ST} (the repo's ../shared/data is absent on this machine)")
    return HER2ST


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
    from m2ort_fast.slide import open_slide, read_spot_patches
    from m2ort_fast.spots import load_spots

    folder = her2st_section("C2")
    spots = load_spots(folder / "C2_selection.tsv")
    mpp = spots.mpp_from_pitch
    jpeg = next(folder.glob("*_HE*.jpg"))
    out = tmp_path_factory.mktemp("her2st_c2")
    centers_px = np.asarray(spots.centers_px, dtype=np.float64)
    with open_slide(jpeg, mpp=mpp) as flat:
        paths = {layout: write_pyramid(flat.image, out / f"C2_{layout}.tiff", mpp=mpp, layout=layout)
                 for layout in ("svs", "generic")}
        # what the preview code feeds the model: crops of the original JPEG, levels 2-3 resized
        preview = read_spot_patches(flat, centers_px, (mpp, 2 * mpp, 4 * mpp), level_source="resize")
    return {"jpeg": jpeg, **paths, "mpp": float(mpp), "centers_px": centers_px, "preview_patches": preview}
