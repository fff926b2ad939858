"""Shared fixtures: the real data in ../shared/data (skipped, with the reason, where absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("M2ORT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
HER2ST = SHARED_DATA / "her2st"
HER2ST_SECTIONS = ("C2", "C3", "C4", "C5")


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
