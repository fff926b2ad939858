"""HEST-Benchmark's linear probe on an encoder's features: the third baseline of `m2ort-fast evaluate`.

Per spot: the encoder's map of level 1 (the 224 px window) averaged over positions (what a
classifier pools; 1280 values for EfficientNet-Lite0); standardised with the training spots'
statistics and reduced by PCA to ``PCA_DIMS`` components where wider (HEST-Benchmark: PCA 256, then
ridge); then :class:`m2ort_fast.baselines.RidgeBaseline` on the PCA scores as they are (centred,
not rescaled: whitening them gave the noise components the leading ones' weight, PCC/gene 0.20
against 0.29 on the C2 fold), penalty chosen by leaving one training section out. It answers: does
the M2ORT model on this encoder beat a linear read-out of it?
"""

from __future__ import annotations

import dataclasses

import numpy as np

from m2ort_fast.baselines import RidgeBaseline

PCA_DIMS = 256


class ViewZero:
    """View 0 of spots' encoder maps: from training's multi-view cache where it holds every spot
    asked for, else from a one-view cache (computing one view, not ``n_views``)."""

    def __init__(self, encoder, n_views: int):
        from m2ort_fast.encoders.features import FeatureStore

        self.stores = [FeatureStore(encoder, n_views=n_views), FeatureStore(encoder, n_views=1)]

    def get(self, levels: list[np.ndarray], progress: bool = False) -> list[np.ndarray]:
        from m2ort_fast.encoders.features import spot_keys

        keys = spot_keys(levels)
        store = next((s for s in self.stores if all(k in s.index for k in keys)), self.stores[-1])
        return [f[:, :1] for f in store.get(levels, progress)]


def pooled_features(store, levels: list[np.ndarray], progress: bool = False) -> np.ndarray:
    """(N, C) float64: view 0 of level 1's cached map, averaged over its positions."""
    level1 = store.get(levels, progress)[0]  # (N, V, C, h, w) float16
    return level1[:, 0].astype(np.float64).mean(axis=(-2, -1))


@dataclasses.dataclass
class ProbeBaseline:
    """Standardise -> PCA (``components`` (F, k)) -> ridge. ``predict(features (N, F))`` -> (N, G)."""

    mean: np.ndarray
    std: np.ndarray
    components: np.ndarray
    ridge: RidgeBaseline
    encoder: str

    @classmethod
    def fit(
        cls, features: np.ndarray, targets: np.ndarray, groups, encoder: str, dims: int = PCA_DIMS
    ) -> ProbeBaseline:
        x = np.asarray(features, dtype=np.float64)
        mean, std = x.mean(axis=0), x.std(axis=0)
        std[std < 1e-12] = 1.0
        z = (x - mean) / std
        k = min(dims, x.shape[1], max(1, len(x) - 1))
        _, _, vt = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
        components = vt[:k].T
        ridge = RidgeBaseline.fit(z @ components, targets, groups=groups, scale=False)  # PCA scores: not whitened
        return cls(mean, std, components, ridge, encoder)

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.std
        return self.ridge.predict(z @ self.components)

    def describe(self) -> dict:
        return {"encoder": self.encoder, "pca_components": int(self.components.shape[1]), **self.ridge.describe()}
