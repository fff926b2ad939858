"""Metric functions against hand-computed values and scipy.stats.pearsonr."""

import numpy as np
import pytest
from scipy.stats import pearsonr

from m2ort_fast import metrics as M


def test_per_spot_hand_computed():
    true = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    pred = np.array([[2.0, 4.0, 6.0], [1.0, 0.0, 0.0]])
    # spot 0: perfectly linear -> 1; spot 1: means 1/3, centred (2/3,-1/3,-1/3) vs (-1/3,-1/3,2/3):
    # cov = -2/9 -... = (-2/9 + 1/9 - 2/9) = -1/3; var both 2/3 -> r = -0.5
    np.testing.assert_allclose(M.pcc_per_spot(pred, true), [1.0, -0.5])
    # RMSE spot 0: sqrt((1 + 4 + 9) / 3); spot 1: sqrt((1 + 0 + 1) / 3)
    np.testing.assert_allclose(M.rmse_per_spot(pred, true), [np.sqrt(14 / 3), np.sqrt(2 / 3)])
    np.testing.assert_allclose(M.mae_per_spot(pred, true), [2.0, 2 / 3])
    summary = M.summarize(pred, true)
    assert summary["pcc_spot_mean"] == pytest.approx(0.25)
    assert summary["rmse_spot_mean"] == pytest.approx((np.sqrt(14 / 3) + np.sqrt(2 / 3)) / 2)
    assert summary["mae"] == pytest.approx(8 / 6)


def test_against_scipy_pearsonr():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(40, 30))
    pred = true * 0.5 + rng.normal(size=true.shape)
    spot = M.pcc_per_spot(pred, true)
    gene = M.pcc_per_gene(pred, true)
    np.testing.assert_allclose(spot, [pearsonr(pred[i], true[i])[0] for i in range(40)], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gene, [pearsonr(pred[:, j], true[:, j])[0] for j in range(30)], rtol=1e-10, atol=1e-12)
    summary = M.summarize(pred, true, top_genes=5)
    assert summary["pcc_gene_mean"] == pytest.approx(gene.mean())
    assert summary["pcc_gene_top5_mean"] == pytest.approx(np.sort(gene)[-5:].mean())
    assert summary["pcc_spot_mean"] == pytest.approx(spot.mean())


def test_constant_rows_are_undefined_and_left_out():
    true = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [3.0, 1.0, 2.0]])
    pred = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    spot = M.pcc_per_spot(pred, true)
    assert np.isnan(spot[1]) and spot[0] == pytest.approx(1.0)
    summary = M.summarize(pred, true)
    assert summary["n_spots_pcc_undefined"] == 1
    assert summary["pcc_spot_mean"] == pytest.approx(1.0)
    # a constant prediction (the mean baseline) has undefined per-gene PCC everywhere
    baseline = np.broadcast_to(true.mean(axis=0), true.shape)
    assert M.summarize(baseline, true)["n_genes_pcc_undefined"] == 3


# ---- issue 12: principal-component variance shares and PCC beyond the measured PC1 ----------


def _orthonormal_spot_directions():
    """Two orthonormal (6,) spot directions, each summing to 0 (so they survive centring per gene)."""
    u1 = np.array([1.0, 1.0, 1.0, -1.0, -1.0, -1.0]) / np.sqrt(6)
    u2 = np.array([1.0, -1.0, 0.0, 1.0, -1.0, 0.0]) / 2.0
    assert abs(u1 @ u2) < 1e-15 and abs(u1.sum()) < 1e-15 and abs(u2.sum()) < 1e-15
    return u1, u2


def test_pc_variance_shares_known_spectrum():
    u1, u2 = _orthonormal_spot_directions()
    a = np.array([3.0, 0.0, 0.0])  # unit gene directions: singular values 3 and 1 exactly
    b = np.array([0.0, 1.0, 0.0])
    values = np.outer(u1, a) + np.outer(u2, b) + np.array([7.0, -2.0, 0.5])  # gene means do not count
    shares = M.pc_variance_shares(values, k=5)
    np.testing.assert_allclose(shares, [0.9, 0.1, 0.0, 0.0, 0.0], atol=1e-12)
    summary = M.summarize(values, values)
    assert summary["var_share_pc1_pred"] == pytest.approx(0.9)
    assert summary["var_share_pc1to5_pred"] == pytest.approx(1.0)
    assert summary["var_share_pc1_true"] == pytest.approx(0.9)


def test_rank_one_prediction_has_pc1_share_one_and_constant_is_undefined():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(30, 12))
    rank_one = np.outer(rng.normal(size=30), rng.normal(size=12)) + rng.normal(size=12)
    summary = M.summarize(rank_one, true)
    assert summary["var_share_pc1_pred"] == pytest.approx(1.0)
    # 30 x 12 Gaussian noise spreads its variance: PC1 well under 1
    assert 0.05 < summary["var_share_pc1_true"] < 0.5
    assert summary["var_share_pc1_true"] < summary["var_share_pc1to5_true"] < 1.0
    constant = np.broadcast_to(true.mean(axis=0), true.shape)
    assert np.isnan(M.pc_variance_shares(constant)).all()
    assert np.isnan(M.summarize(constant, true)["var_share_pc1_pred"])


def test_pc1_share_matches_covariance_eigenvalues():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    eig = np.sort(np.linalg.eigvalsh(np.cov(values, rowvar=False)))[::-1]
    np.testing.assert_allclose(M.pc_variance_shares(values, k=3), eig[:3] / eig.sum(), rtol=1e-10)


def test_beyond_pc1_perfect_prediction_is_one():
    rng = np.random.default_rng(3)
    true = rng.normal(size=(25, 10))
    np.testing.assert_allclose(M.pcc_per_gene_beyond_pc1(true, true), 1.0)
    summary = M.summarize(true, true)
    assert summary["pcc_gene_beyond_pc1_mean"] == pytest.approx(1.0)
    assert summary["n_genes_beyond_pc1_pcc_undefined"] == 0


def test_beyond_pc1_of_a_prediction_that_is_only_the_measured_pc1_is_undefined():
    """Decision: nothing beyond PC1 means constant residuals -> NaN (counted, left out of the mean),
    as the per-gene PCC of a constant prediction is, whatever the scale of the PC1 part."""
    rng = np.random.default_rng(4)
    true = rng.normal(size=(25, 10)) + 100.0
    direction = M.pc1_spot_direction(true)
    centred = true - true.mean(axis=0)
    only_pc1 = np.outer(direction, direction @ centred) + true.mean(axis=0)
    for pred in (only_pc1, 1e4 * only_pc1 - 3.0):
        beyond = M.pcc_per_gene_beyond_pc1(pred, true)
        assert np.isnan(beyond).all()
        summary = M.summarize(pred, true)
        assert np.isnan(summary["pcc_gene_beyond_pc1_mean"])
        assert summary["n_genes_beyond_pc1_pcc_undefined"] == 10
        # ...while its ordinary per-gene PCC looks respectable
        assert summary["pcc_gene_mean"] > 0.2


def test_beyond_pc1_sees_past_the_shared_axis():
    """Truth = 3 u1 a + u2 b; prediction = 5 u1 c + u2 (b * s): residuals are u2 b and u2 (b * s),
    so the PCC per gene beyond PC1 is exactly s (+1 / -1), though u1 dominates both sides."""
    u1, u2 = _orthonormal_spot_directions()
    a = np.array([1.0, 1.0, 1.0, 1.0])
    b = np.array([0.3, -0.2, 0.25, -0.35])  # orthogonal to a, and 3 |a| > |b|: the truth's PC1 is u1
    assert a @ b == 0
    c = np.array([0.2, 1.5, -0.7, 0.9])
    s = np.array([1.0, -1.0, -1.0, 1.0])
    true = 3 * np.outer(u1, a) + np.outer(u2, b) + 2.0
    pred = 5 * np.outer(u1, c) + np.outer(u2, b * s) - 1.0
    np.testing.assert_allclose(M.pcc_per_gene_beyond_pc1(pred, true), s, atol=1e-12)
    # adding any multiple of the measured PC1 direction to the prediction changes nothing beyond it
    shifted = pred + np.outer(u1, [4.0, -9.0, 0.1, 2.0])
    np.testing.assert_allclose(M.pcc_per_gene_beyond_pc1(shifted, true), s, atol=1e-12)
    assert not np.allclose(M.pcc_per_gene(shifted, true), M.pcc_per_gene(pred, true))


def test_beyond_pc1_matches_explicit_regression():
    """The residual of each gene column after least-squares regression on the truth's PC1 score."""
    rng = np.random.default_rng(5)
    true = rng.normal(size=(50, 7)) @ rng.normal(size=(7, 7))
    pred = 0.5 * true + rng.normal(size=true.shape)
    centred = true - true.mean(axis=0)
    eigval, eigvec = np.linalg.eigh(centred.T @ centred)
    score = centred @ eigvec[:, -1]  # PC1 scores of the spots
    design = np.column_stack([np.ones(50), score])

    def residual(x):
        coef, *_ = np.linalg.lstsq(design, x, rcond=None)
        return x - design @ coef

    expected = [pearsonr(residual(pred)[:, j], residual(true)[:, j])[0] for j in range(7)]
    np.testing.assert_allclose(M.pcc_per_gene_beyond_pc1(pred, true), expected, rtol=1e-9, atol=1e-12)


def test_beyond_pc1_undefined_without_truth_variance():
    true = np.ones((5, 3))
    pred = np.arange(15.0).reshape(5, 3)
    assert np.isnan(M.pcc_per_gene_beyond_pc1(pred, true)).all()
    with pytest.raises(ValueError):
        M.pcc_per_gene_beyond_pc1(pred[:4], true)


def _poisson_counts(mean_counts: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(mean_counts)


@pytest.mark.parametrize("amplitude, log_depth", [(0.4, 1.5), (0.6, 2.0), (0.8, 3.0)])
def test_measurement_signal_matches_a_perfect_predictor(amplitude, log_depth):
    # expected counts vary along two spot axes; Poisson counts of a few to ~20 per gene and spot.
    # The perfect predictor outputs the expected expression: the estimate, from the counts alone,
    # must give its PC1 share and its PCC per gene against the measurement
    from m2ort_fast.targets import log1p_cpm

    rng = np.random.default_rng(1)
    expected = np.exp(log_depth + amplitude * rng.normal(size=(400, 2)) @ rng.normal(size=(2, 60)))
    counts = _poisson_counts(expected)
    measured = log1p_cpm(counts, dtype=np.float64)[0]
    perfect = log1p_cpm(expected, dtype=np.float64)[0]
    signal = M.measurement_signal(counts)
    assert signal["var_share_pc1_signal"] == pytest.approx(M.pc_variance_shares(perfect)[0], abs=0.05)
    assert signal["var_share_pc1_signal"] > M.pc_variance_shares(measured)[0] + 0.05
    assert signal["pcc_gene_ceiling_mean"] == pytest.approx(np.nanmean(M.pcc_per_gene(perfect, measured)), abs=0.08)
    assert signal["pcc_gene_ceiling"].shape == (60,)


def test_measurement_signal_of_pure_noise_has_a_low_ceiling():
    # every spot has the same expected profile: nothing to predict beyond the mean
    counts = _poisson_counts(np.full((300, 40), 20.0))
    signal = M.measurement_signal(counts)
    assert signal["pcc_gene_ceiling_mean"] < 0.25


def test_measurement_signal_ceiling_rises_with_depth():
    rng = np.random.default_rng(2)
    axis = rng.normal(size=(300, 1))
    shape = np.exp(0.5 * axis @ rng.normal(size=(1, 30)))
    shallow = M.measurement_signal(_poisson_counts(1.0 * shape, seed=3))["pcc_gene_ceiling_mean"]
    deep = M.measurement_signal(_poisson_counts(100.0 * shape, seed=3))["pcc_gene_ceiling_mean"]
    assert deep > shallow + 0.2
    assert deep > 0.9


def test_measurement_signal_undefined_cases():
    few = M.measurement_signal(np.ones((2, 5), dtype=np.int64))
    assert np.isnan(few["var_share_pc1_signal"]) and np.isnan(few["pcc_gene_ceiling_mean"])
    zero_gene = _poisson_counts(np.full((50, 4), 10.0))
    zero_gene[:, 0] = 0
    ceiling = M.measurement_signal(zero_gene)["pcc_gene_ceiling"]
    assert np.isnan(ceiling[0]) and np.isfinite(ceiling[1:]).all()
