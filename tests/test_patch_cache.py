"""PatchCache: each spot's three levels read from the slide once, then memory-mapped; a key that
changes with the slide file, the spots and the levels; no half-built folder left behind."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from m2ort_fast.errors import M2ORTError
from m2ort_fast.patch_cache import PatchCache, cache_key
from m2ort_fast.predict import DEMO_SLIDE, DEMO_SPOTS
from m2ort_fast.spots import load_spots

SIZES_PX = (224, 112, 56)


@pytest.fixture
def demo(tmp_path):
    """A copy of the demo slide (its mtime is ours to change), 12 of its spots and their level mpp."""
    slide = tmp_path / "demo_slide.tiff"
    shutil.copyfile(DEMO_SLIDE, slide)
    centers_px = load_spots(DEMO_SPOTS).centers_px[:12]
    from m2ort_fast.slide import open_slide

    with open_slide(slide) as opened:
        mpp = opened.mpp
    return slide, centers_px, [mpp, 2 * mpp, 4 * mpp]


def test_cached_patches_equal_a_direct_read_and_are_read_once(demo, tmp_path, monkeypatch):
    from m2ort_fast.crop import read_spot_patches
    from m2ort_fast.slide import open_slide

    slide, centers_px, level_mpp = demo
    cache = PatchCache(tmp_path / "cache")
    cached = cache.patches(slide, centers_px, level_mpp, level_source="pyramid")
    with open_slide(slide) as opened:
        direct = read_spot_patches(opened, centers_px, level_mpp, SIZES_PX, level_source="pyramid")
    for level, (got, want) in enumerate(zip(cached, direct, strict=True)):
        assert isinstance(got, np.memmap) and not got.flags.writeable, level
        assert got.shape == (len(centers_px), SIZES_PX[level], SIZES_PX[level], 3)
        np.testing.assert_array_equal(got, want)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was built again")

    monkeypatch.setattr(PatchCache, "_build", no_rebuild)
    again = cache.patches(slide, centers_px, level_mpp, level_source="pyramid")
    for got, want in zip(again, cached, strict=True):
        np.testing.assert_array_equal(got, want)
    assert cache.size_bytes() == sum(os.path.getsize(a.filename) for a in cached) > sum(a.nbytes for a in cached)


def test_the_key_follows_the_file_the_spots_and_the_levels(demo):
    slide, centers_px, level_mpp = demo
    key = cache_key(slide, centers_px, None, level_mpp, SIZES_PX, "pyramid")
    assert key == cache_key(slide, centers_px.copy(), None, level_mpp, SIZES_PX, "pyramid")
    moved = centers_px.copy()
    moved[0, 0] += 1
    others = [
        cache_key(slide, moved, None, level_mpp, SIZES_PX, "pyramid"),
        cache_key(slide, centers_px[:-1], None, level_mpp, SIZES_PX, "pyramid"),
        cache_key(slide, centers_px, 0.5, level_mpp, SIZES_PX, "pyramid"),
        cache_key(slide, centers_px, None, [m * 1.01 for m in level_mpp], SIZES_PX, "pyramid"),
        cache_key(slide, centers_px, None, level_mpp, SIZES_PX, "resize"),
    ]
    stat = slide.stat()
    os.utime(slide, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file changed
    others.append(cache_key(slide, centers_px, None, level_mpp, SIZES_PX, "pyramid"))
    assert key not in others and len(set(others)) == len(others)


def test_a_failed_build_leaves_nothing_behind(tmp_path, demo):
    _, centers_px, level_mpp = demo
    broken = tmp_path / "broken.tiff"
    broken.write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header and no image
    cache = PatchCache(tmp_path / "cache")
    with pytest.raises(M2ORTError):
        cache.patches(broken, centers_px, level_mpp)
    assert list((tmp_path / "cache").iterdir()) == []
