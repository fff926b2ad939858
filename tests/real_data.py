"""Where the tests find the real data (``../shared/data`` beside the checkout, or
``$M2ORT_SHARED_DATA``), and the skip, with its reason, where it is absent (as on a user's machine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("M2ORT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
HER2ST = SHARED_DATA / "her2st"
HER2ST_SECTIONS = ("C2", "C3", "C4", "C5")
SQUIDPY_VISIUM = SHARED_DATA / "squidpy_visium"  # 49 real Visium spots as scanpy/squidpy hold them


def require(folder: Path) -> Path:
    """``folder``, or skip the test saying that the shared data is absent."""
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder} (the repo's ../shared/data is absent on this machine)")
    return folder


def her2st_section(name: str) -> Path:
    """Folder of one real HER2+ section; skips the test where the shared data is absent."""
    return require(HER2ST / name)
