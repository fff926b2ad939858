"""Patch cache: every spot's three levels read from the slide once, then memory-mapped.

Decoding a 9000 x 10000 px JPEG (or a WSI) for every epoch would dominate training time. The
first use of a (slide, spots, levels) combination reads all spots with
:func:`m2ort_fast.crop.read_spot_patches` and stores one ``.npy`` per level, uint8 (N, S, S, 3),
in a folder named by a hash of:

* the slide file's identity: absolute path, size and modification time (a changed file misses),
* the spot centres (their bytes),
* the microns per pixel of the slide and of the three levels, the level sizes and ``level_source``.

Later uses (other epochs, runs, folds) open the arrays with ``mmap_mode="r"``. A folder is written
under a temporary name and renamed when complete, so an interrupted build never looks valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from m2ort_fast.model import IMAGE_SIZES_PX

log = logging.getLogger(__name__)

CACHE_VERSION = 1
READ_CHUNK_SPOTS = 64  # spots read per call: bounds memory while building


def default_cache_dir() -> Path:
    base = os.environ.get("M2ORT_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "m2ort-fast"
    )
    return Path(base) / "patches"


def cache_key(
    slide_path, centers_px: np.ndarray, slide_mpp: float | None, level_mpp, sizes_px, level_source: str
) -> str:
    path = Path(slide_path).resolve()
    stat = path.stat()
    centers = np.ascontiguousarray(np.asarray(centers_px, dtype=np.float64))
    identity = {
        "version": CACHE_VERSION,
        "slide": str(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "centers_sha256": hashlib.sha256(centers.tobytes()).hexdigest(),
        "n": int(len(centers)),
        "slide_mpp": None if slide_mpp is None else round(float(slide_mpp), 6),
        "level_mpp": [round(float(m), 6) for m in level_mpp],
        "sizes_px": [int(s) for s in sizes_px],
        "level_source": level_source,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _slide_mpp_source(description: str) -> str:
    """A sample's free-text mpp source -> one of slide.MPP_SOURCES."""
    text = (description or "").lower()
    if text.startswith("spot-table"):
        return "spot-table"
    if text.startswith("metadata"):
        return "metadata"
    return "user"


class PatchCache:
    """Memory-mapped multi-level patches, one folder per (slide, spots, levels) key."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.root = Path(cache_dir) if cache_dir else default_cache_dir()

    def patches(
        self,
        slide_path,
        centers_px: np.ndarray,
        level_mpp,
        *,
        slide_mpp: float | None = None,
        mpp_source: str = "spot-table",
        sizes_px=IMAGE_SIZES_PX,
        level_source: str = "resize",
        progress: bool = False,
    ) -> list[np.ndarray]:
        """Three read-only uint8 arrays (N, S, S, 3), one per level, from the cache or built now.

        ``slide_mpp`` overrides the slide's own level-0 microns per pixel (the spot table's pitch
        for a JPEG without one)."""
        key = cache_key(slide_path, centers_px, slide_mpp, level_mpp, sizes_px, level_source)
        folder = self.root / key
        if not (folder / "meta.json").is_file():
            self._build(
                folder,
                slide_path,
                np.asarray(centers_px, dtype=np.float64),
                level_mpp,
                slide_mpp,
                mpp_source,
                sizes_px,
                level_source,
                progress,
            )
        return [np.load(folder / f"level{i + 1}.npy", mmap_mode="r") for i in range(len(sizes_px))]

    def _build(
        self, folder, slide_path, centers_px, level_mpp, slide_mpp, mpp_source, sizes_px, level_source, progress
    ):
        from m2ort_fast.crop import read_spot_patches
        from m2ort_fast.slide import open_slide

        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=self.root))
        try:
            n = len(centers_px)
            arrays = [
                np.lib.format.open_memmap(staging / f"level{i + 1}.npy", mode="w+", dtype=np.uint8, shape=(n, s, s, 3))
                for i, s in enumerate(sizes_px)
            ]
            slide = open_slide(slide_path)
            try:
                if slide_mpp is not None:
                    slide.set_mpp(float(slide_mpp), _slide_mpp_source(mpp_source))
                starts = range(0, n, READ_CHUNK_SPOTS)
                if progress:
                    from tqdm import tqdm

                    starts = tqdm(starts, desc=f"caching {Path(slide_path).name}", unit="chunk", leave=False)
                for start in starts:
                    stop = min(n, start + READ_CHUNK_SPOTS)
                    levels = read_spot_patches(
                        slide, centers_px[start:stop], list(level_mpp), tuple(sizes_px), level_source=level_source
                    )
                    for array, level in zip(arrays, levels, strict=True):
                        array[start:stop] = level
            finally:
                close = getattr(slide, "close", None)
                if close:
                    close()
            for array in arrays:
                array.flush()
            del arrays
            meta = {
                "slide": str(Path(slide_path).resolve()),
                "n_spots": n,
                "level_mpp": list(map(float, level_mpp)),
                "slide_mpp": slide_mpp,
                "sizes_px": list(sizes_px),
                "level_source": level_source,
            }
            (staging / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.replace(staging, folder)
            except OSError:  # another process finished the same key first
                if not (folder / "meta.json").is_file():
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("cached %d spots of %s in %s", len(centers_px), Path(slide_path).name, folder)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*.npy")) if self.root.is_dir() else 0
