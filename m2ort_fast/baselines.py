"""A baseline stronger than the training mean: ridge regression from simple image statistics.

The question it answers (issue 12): does the model predict more than what the colour and texture
of a spot's patches already tell? Per spot, from the same uint8 patches the model sees (its three
levels, the patch cache's arrays), :func:`spot_image_features` takes per level

* the mean and standard deviation of R, G and B (0-255 units),
* the white / background fraction (unsaturated, bright pixels: glass, fat, lumens),
* the grey level's standard deviation and mean gradient magnitude (texture; nuclei are dark,
  small and dense, so texture rises with cellularity),

27 features in all. :class:`RidgeBaseline` fits expression (N, G) on them in closed form with
numpy: features standardized with the training spots' mean and std, targets centred, one ridge
penalty ``alpha`` shared by all genes. ``alpha`` is chosen from ``ALPHAS`` by inner validation on
the training spots only: leave one training section out when there are two or more sections (the
evaluation itself is across sections, so a penalty chosen within sections would be too weak),
otherwise ``INNER_FOLDS``-fold over spots with a fixed seed; the criterion is the mean squared
error over all spots and genes (what ridge minimises).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from m2ort_fast.tissue import MIN_TISSUE_SATURATION

# log-spaced, on standardized features: from nearly least squares (1e-3) to nearly the mean
# baseline (1e5; a few hundred to thousands of training spots make X^T X of that order).
ALPHAS = tuple(float(a) for a in np.logspace(-3, 5, 17))
INNER_FOLDS = 5
# Background: unsaturated (glass-like) and bright. The brightness floor keeps dark grey
# (pen marks, folds) out of it.
WHITE_MIN_BRIGHTNESS = 200
FEATURES_PER_LEVEL = (
    "mean_r",
    "mean_g",
    "mean_b",
    "std_r",
    "std_g",
    "std_b",
    "white_fraction",
    "grey_std",
    "grey_gradient_mean",
)
CHUNK_SPOTS = 64  # spots converted to float at a time (a 224 px level is 0.6 MB per spot as float32)


def feature_names(n_levels: int = 3) -> list[str]:
    return [f"level{i + 1}_{name}" for i in range(n_levels) for name in FEATURES_PER_LEVEL]


def _level_features(patches: np.ndarray) -> np.ndarray:
    """(n, S, S, 3) uint8 -> (n, 9) float64: the statistics of FEATURES_PER_LEVEL, pixel units."""
    rgb = np.asarray(patches)
    x = rgb.astype(np.float32)
    n = len(x)
    flat = x.reshape(n, -1, 3)
    mean = flat.mean(axis=1)
    std = flat.std(axis=1)
    # tissue.saturation's definition (HSV saturation), over a batch of patches
    brightest = rgb.max(axis=-1).astype(np.float32)
    darkest = rgb.min(axis=-1).astype(np.float32)
    sat = np.divide(brightest - darkest, brightest, out=np.zeros_like(brightest), where=brightest > 0)
    white = ((sat < MIN_TISSUE_SATURATION) & (brightest >= WHITE_MIN_BRIGHTNESS)).reshape(n, -1).mean(axis=1)
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (n, S, S), ITU-R 601 luma
    grey_std = grey.reshape(n, -1).std(axis=1)
    # central differences inside the patch: no border handling needed for a mean
    gx = grey[:, 1:-1, 2:] - grey[:, 1:-1, :-2]
    gy = grey[:, 2:, 1:-1] - grey[:, :-2, 1:-1]
    gradient = (np.sqrt(gx * gx + gy * gy) / 2).reshape(n, -1).mean(axis=1)
    return np.column_stack([mean, std, white, grey_std, gradient]).astype(np.float64)


def spot_image_features(levels: list[np.ndarray]) -> np.ndarray:
    """Per-spot image statistics of the model's input levels.

    levels: one uint8 (N, S, S, 3) array per level (S may differ per level), e.g. the patch
    cache's memory maps. Returns (N, 9 * len(levels)) float64, columns as ``feature_names``."""
    if not levels:
        raise ValueError("no levels")
    n = len(levels[0])
    if any(len(level) != n for level in levels):
        raise ValueError(f"levels have different spot counts: {[len(level) for level in levels]}")
    out = np.empty((n, len(FEATURES_PER_LEVEL) * len(levels)), dtype=np.float64)
    width = len(FEATURES_PER_LEVEL)
    for start in range(0, n, CHUNK_SPOTS):
        rows = slice(start, min(n, start + CHUNK_SPOTS))
        for i, level in enumerate(levels):
            out[rows, i * width : (i + 1) * width] = _level_features(level[rows])
    return out


def _solve_paths(x_std: np.ndarray, y_centred: np.ndarray, alphas) -> list[np.ndarray]:
    """Ridge weights (F, G) for each alpha from one SVD of the standardized features (N, F)."""
    u, s, vt = np.linalg.svd(x_std, full_matrices=False)
    uty = u.T @ y_centred
    return [vt.T @ ((s / (s * s + alpha))[:, None] * uty) for alpha in alphas]


@dataclasses.dataclass
class RidgeBaseline:
    """Ridge regression from features (N, F) to expression (N, G): ``predict(x) = x @ coef + intercept``.

    coef (F, G) and intercept (G,) are in the features' own units (the standardization is folded
    in). alpha: the penalty on standardized features. validation_mse: the inner-validation MSE of
    each alpha tried (``alphas``); validation: how the inner split was made."""

    coef: np.ndarray
    intercept: np.ndarray
    alpha: float
    alphas: list[float]
    validation_mse: list[float]
    validation: str
    feature_mean: np.ndarray
    feature_std: np.ndarray
    n_train: int

    @classmethod
    def fit(
        cls, features: np.ndarray, targets: np.ndarray, groups=None, alphas=ALPHAS, seed: int = 0, scale: bool = True
    ) -> RidgeBaseline:
        """Fit on features (N, F) and targets (N, G); ``groups`` (N,) labels (e.g. the section of
        each spot) make the inner validation leave one group out. One alpha: no validation.
        ``scale`` False: features are centred only (e.g. PCA scores, whose variances carry the
        signal: scaling each to unit variance would weigh noise components like the leading ones)."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(targets, dtype=np.float64)
        if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
            raise ValueError(f"features (N, F) and targets (N, G) needed, got {x.shape} and {y.shape}")
        if len(x) < 2:
            raise ValueError("a ridge fit needs at least two spots")
        alphas = [float(a) for a in alphas]
        folds, how = _inner_folds(len(x), groups, seed)
        if len(alphas) > 1 and folds:
            sse = np.zeros(len(alphas))
            for held in folds:
                train = np.ones(len(x), dtype=bool)
                train[held] = False
                mean, std = _standardizer(x[train], scale)
                y_mean = y[train].mean(axis=0)
                weights = _solve_paths((x[train] - mean) / std, y[train] - y_mean, alphas)
                x_held = (x[held] - mean) / std
                for k, w in enumerate(weights):
                    sse[k] += (((x_held @ w + y_mean) - y[held]) ** 2).sum()
            mse = sse / (len(x) * y.shape[1])
            best = int(np.argmin(mse))  # first minimum: ALPHAS ascends, ties go to less shrinkage
        else:  # nothing to choose from, or too few spots to hold any out: the first alpha
            mse, best = np.full(len(alphas), np.nan), 0
            if len(alphas) == 1:
                how = "none (one alpha given)"
        mean, std = _standardizer(x, scale)
        y_mean = y.mean(axis=0)
        (w_std,) = _solve_paths((x - mean) / std, y - y_mean, [alphas[best]])
        coef = w_std / std[:, None]
        return cls(
            coef=coef,
            intercept=y_mean - mean @ coef,
            alpha=alphas[best],
            alphas=alphas,
            validation_mse=[float(v) for v in mse],
            validation=how,
            feature_mean=mean,
            feature_std=std,
            n_train=len(x),
        )

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N, F) -> (N, G) float32 predictions."""
        return (np.asarray(features, dtype=np.float64) @ self.coef + self.intercept).astype(np.float32)

    def describe(self) -> dict:
        """JSON-ready summary (no arrays over the genes)."""
        return {
            "alpha": self.alpha,
            "alphas": self.alphas,
            "validation_mse": self.validation_mse,
            "validation": self.validation,
            "n_train_spots": self.n_train,
            "n_features": int(self.coef.shape[0]),
        }


def _standardizer(x: np.ndarray, scale: bool = True) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    std = x.std(axis=0) if scale else np.ones(x.shape[1])
    std[std < 1e-12] = 1.0  # a constant feature stays 0 after centring; no division by ~0
    return mean, std


def _inner_folds(n: int, groups, seed: int) -> tuple[list[np.ndarray], str]:
    """Index arrays of the held-out spots of each inner fold, and a description."""
    if groups is not None:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} labels for {n} spots")
        names = list(dict.fromkeys(groups.tolist()))
        if len(names) >= 2:
            return (
                [np.flatnonzero(groups == g) for g in names],
                "leave one training section out (" + ", ".join(map(str, names)) + ")",
            )
    k = min(INNER_FOLDS, n)
    if k < 2:
        return [], "none (too few spots)"
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, k)], f"{k}-fold over spots (seed {seed})"
