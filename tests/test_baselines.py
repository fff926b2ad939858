"""The ridge image-feature baseline: features of known patches, and ridge fits with known answers."""

import numpy as np
import pytest

from m2ort_fast.baselines import ALPHAS, FEATURES_PER_LEVEL, RidgeBaseline, feature_names, spot_image_features


def _levels(patch_by_level):
    """One spot: its (S, S, 3) uint8 patch per level -> the (1, S, S, 3) arrays the cache gives."""
    return [np.asarray(p, dtype=np.uint8)[None] for p in patch_by_level]


def _named(features: np.ndarray, level: int) -> dict:
    width = len(FEATURES_PER_LEVEL)
    return dict(zip(FEATURES_PER_LEVEL, features[0, level * width : (level + 1) * width], strict=True))


def test_features_of_uniform_patches():
    white = np.full((16, 16, 3), 255)
    purple = np.broadcast_to(np.array([120, 60, 160]), (8, 8, 3))
    features = spot_image_features(_levels([white, purple, white[:4, :4]]))
    assert features.shape == (1, 27) and len(feature_names()) == 27
    w, p = _named(features, 0), _named(features, 1)
    assert (w["mean_r"], w["mean_g"], w["mean_b"]) == (255, 255, 255)
    assert w["white_fraction"] == 1.0 and w["std_r"] == 0 and w["grey_std"] == 0 and w["grey_gradient_mean"] == 0
    assert (p["mean_r"], p["mean_g"], p["mean_b"]) == (120, 60, 160)
    assert p["white_fraction"] == 0.0  # saturated: stain, not glass
    assert p["grey_gradient_mean"] == 0
    # light grey (unsaturated) is background too; dark grey is not (brightness floor)
    grey = spot_image_features(_levels([np.full((8, 8, 3), 230), np.full((8, 8, 3), 90), np.full((4, 4, 3), 230)]))
    assert _named(grey, 0)["white_fraction"] == 1.0 and _named(grey, 1)["white_fraction"] == 0.0


def test_features_of_a_half_black_half_white_patch():
    size = 8
    patch = np.zeros((size, size, 3))
    patch[:, size // 2 :] = 255  # vertical edge in the middle
    f = _named(spot_image_features(_levels([patch, patch, patch])), 2)
    assert f["mean_r"] == pytest.approx(127.5) and f["std_g"] == pytest.approx(127.5)
    assert f["white_fraction"] == pytest.approx(0.5)
    assert f["grey_std"] == pytest.approx(127.5, rel=1e-5)
    # central differences (x+1 - x-1) / 2 are 127.5 in the two columns beside the edge and 0
    # elsewhere, over the (size-2)^2 interior pixels
    assert f["grey_gradient_mean"] == pytest.approx(2 * 127.5 * (size - 2) / (size - 2) ** 2, rel=1e-5)


def test_features_are_per_spot_and_chunk_independent():
    rng = np.random.default_rng(0)
    levels = [rng.integers(0, 256, (150, s, s, 3), dtype=np.uint8) for s in (24, 12, 6)]
    all_at_once = spot_image_features(levels)
    one_by_one = np.concatenate([spot_image_features([lv[i : i + 1] for lv in levels]) for i in range(150)])
    np.testing.assert_allclose(all_at_once, one_by_one)
    with pytest.raises(ValueError):
        spot_image_features([levels[0], levels[1][:10], levels[2]])


def test_ridge_recovers_a_linear_map():
    """Noise-free targets: inner validation picks the smallest penalty and the map comes back,
    in the features' own units (features on very different scales)."""
    rng = np.random.default_rng(1)
    scales = np.array([100.0, 0.01, 1.0, 30.0, 5.0])
    x = (rng.normal(size=(240, 5)) + 2.0) * scales  # means off 0, two of each feature's std
    w = rng.normal(size=(5, 4)) / scales[:, None]
    b = np.array([5.0, 7.0, -1.0, 0.5])
    y = x @ w + b
    groups = np.repeat(["A", "B", "C"], 80)
    ridge = RidgeBaseline.fit(x, y, groups=groups)
    assert ridge.alpha == min(ALPHAS)
    assert ridge.validation.startswith("leave one training section out")
    np.testing.assert_allclose(ridge.coef, w, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(ridge.intercept, b, atol=1e-3)
    x_new = (rng.normal(size=(20, 5)) + 2.0) * scales
    np.testing.assert_allclose(ridge.predict(x_new), x_new @ w + b, atol=1e-2)


def test_ridge_matches_the_normal_equations():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 3)) * [1.0, 10.0, 0.1]
    y = rng.normal(size=(60, 2))
    alpha = 7.0
    ridge = RidgeBaseline.fit(x, y, alphas=[alpha])
    assert ridge.validation.startswith("none")
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    w_std = np.linalg.solve(z.T @ z + alpha * np.eye(3), z.T @ (y - y.mean(axis=0)))
    expected = (z @ w_std + y.mean(axis=0)).astype(np.float32)
    np.testing.assert_allclose(ridge.predict(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_ridge_shrinks_to_the_mean_when_features_say_nothing(seed):
    """Targets independent of the features, with a different offset per section (as sections have):
    the cross-section penalty is the largest, and the fit is (nearly) the training mean."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 6))
    groups = np.repeat([0, 1, 2, 3], 50)
    y = rng.normal(size=(200, 5)) + groups[:, None] * 0.3
    ridge = RidgeBaseline.fit(x, y, groups=groups)
    assert ridge.alpha >= 1e3
    assert np.abs(ridge.predict(x) - y.mean(axis=0)).max() < 0.05


def test_ridge_inner_folds_without_groups_and_bad_shapes():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 2))
    y = x @ np.array([[1.0], [-2.0]]) + 0.1 * rng.normal(size=(50, 1))
    ridge = RidgeBaseline.fit(x, y)
    assert ridge.validation.startswith("5-fold over spots")
    assert ridge.alpha < 10 and len(ridge.validation_mse) == len(ALPHAS)
    assert ridge.describe()["n_train_spots"] == 50
    with pytest.raises(ValueError):
        RidgeBaseline.fit(x, y[:40])
