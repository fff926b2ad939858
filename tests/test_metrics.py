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
