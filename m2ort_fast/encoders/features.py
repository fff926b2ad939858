"""Encoder features of spots, computed once and cached on disk (frozen-encoder training, the probe).

A spot is keyed by the sha256 of its three uint8 levels, so the same spot finds its features in
every fold and set it appears in. Per spot the store holds ``n_views`` views (view 0: the spot as
read; others: :func:`m2ort_fast.encoders.augment.spot_view`), each the three levels' maps in float16:
(n_views, C, h_i, w_i) per level. The store's folder is named by the encoder (its weights' sha256)
and the views' recipe; it holds shards (``.npz``) written atomically, one per computing call.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2ort_fast.encoders.augment import spot_view
from m2ort_fast.encoders.base import ImageEncoder

STORE_VERSION = 1
BATCH_SPOTS = 32


def default_feature_dir() -> Path:
    base = os.environ.get("M2ORT_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "m2ort-fast"
    )
    return Path(base) / "features"


def spot_keys(levels: list[np.ndarray]) -> list[str]:
    """sha256 of each spot's three uint8 levels (N,)."""
    keys = []
    for i in range(len(levels[0])):
        digest = hashlib.sha256()
        for level in levels:
            digest.update(np.ascontiguousarray(level[i]).tobytes())
        keys.append(digest.hexdigest())
    return keys


class FeatureStore:
    """Cached encoder maps of spots: ``get(levels)`` -> per level float16 (N, n_views, C, h, w)."""

    def __init__(self, encoder: ImageEncoder, n_views: int = 1, root: str | os.PathLike | None = None):
        self.encoder = encoder.eval()
        self.n_views = int(n_views)
        from m2ort_fast.encoders.augment import BLUR_MAX_PX, HED_SCALE, HED_SHIFT, JPEG_P, STAIN_SD

        identity = {
            "version": STORE_VERSION,
            "encoder": {k: encoder.info.get(k) for k in ("name", "weights_sha256", "out_channels")},
            "n_views": self.n_views,
            "augment": [STAIN_SD, HED_SCALE, HED_SHIFT, BLUR_MAX_PX, JPEG_P],
        }
        if encoder.info.get("weights_sha256") is None:  # random init: no identity to cache under
            identity["instance"] = uuid.uuid4().hex
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
        self.folder = Path(root or default_feature_dir()) / key
        self.index: dict[str, tuple[Path, int]] = {}
        self._loaded: dict[Path, dict[str, np.ndarray]] = {}
        if self.folder.is_dir():
            for shard in sorted(self.folder.glob("*.npz")):
                with np.load(shard) as data:
                    for row, k in enumerate(data["keys"].tolist()):
                        self.index[k] = (shard, row)

    def _shard(self, path: Path) -> dict[str, np.ndarray]:
        if path not in self._loaded:
            with np.load(path) as data:
                self._loaded[path] = {name: data[name] for name in data.files}
        return self._loaded[path]

    @torch.no_grad()
    def _compute(self, levels: list[np.ndarray], rows: np.ndarray, keys: list[str], progress: bool) -> None:
        """Features of the spots ``rows``; one shard per batch, so an interrupted run keeps its work."""
        chunks = range(0, len(rows), BATCH_SPOTS)
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc=f"encoder features ({self.n_views} views)", unit="batch", leave=False)
        for start in chunks:
            part = rows[start : start + BATCH_SPOTS]
            arrays: dict[str, Any] = {"keys": np.asarray([keys[i] for i in part])}
            views = [
                [spot_view([lv[i] for lv in levels], int(keys[i][:15], 16), v) for i in part]
                for v in range(self.n_views)
            ]
            for li in range(3):
                maps = []
                for view in views:  # (spots, C, h, w) per view -> (spots, n_views, C, h, w)
                    x = torch.from_numpy(np.stack([v[li] for v in view])).permute(0, 3, 1, 2).float() / 255.0
                    maps.append(self.encoder(x).float().numpy().astype(np.float16))
                arrays[f"level{li + 1}"] = np.stack(maps, axis=1)
            self._write(arrays)

    def _write(self, arrays: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        shard = self.folder / f"{uuid.uuid4().hex}.npz"
        tmp = shard.with_name(f".{shard.name}.partial.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, shard)
        for row, k in enumerate(arrays["keys"].tolist()):
            self.index[k] = (shard, row)

    def get(self, levels: list[np.ndarray], progress: bool = False) -> list[np.ndarray]:
        """Features of the spots of ``levels`` (uint8 (N, S, S, 3) each), computing missing ones."""
        keys = spot_keys(levels)
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        rows = np.asarray([i for k, i in first.items() if k not in self.index], dtype=int)
        if len(rows):
            self._compute(levels, rows, keys, progress)
        out = []
        for li in range(3):
            name = f"level{li + 1}"
            out.append(np.stack([self._shard(self.index[k][0])[name][self.index[k][1]] for k in keys]))
        return out
