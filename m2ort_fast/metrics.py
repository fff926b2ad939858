"""Metrics of predicted vs measured expression, on the transformed scale (log1p CPM).

Two families, named so they cannot be confused (``M2ORT_SPEC.md`` "Metrics"):

* **per spot** (what the M2ORT paper's tables report): for each spot, Pearson correlation / RMSE
  between predicted and measured values across the panel's genes; then the mean over spots.
* **per gene** (what HEST and most later work report): for each gene, Pearson correlation across
  the spots of a section; then the mean over genes, and the mean over the 50 best-predicted genes.

A correlation is undefined where one side is constant (a gene measured as 0 in every spot of a
section, say); such spots or genes are NaN in the per-item arrays, left out of the means, and
counted in the summary so a reader sees how many were left out.
"""

from __future__ import annotations

import numpy as np

TOP_GENES = 50


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of a with the same row of b: (N, K), (N, K) -> (N,).

    NaN where a row of either side is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two arrays of the same 2-D shape, got {a.shape} and {b.shape}")
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    num = (a * b).sum(axis=1)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[den <= 1e-12 * np.maximum(1.0, np.abs(num))] = np.nan
    return np.clip(r, -1.0, 1.0)


def pcc_per_spot(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N, G), (N, G) -> (N,): each spot's Pearson correlation across genes (the paper's PCC)."""
    return _pearson_rows(pred, true)


def pcc_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N, G), (N, G) -> (G,): each gene's Pearson correlation across spots."""
    return _pearson_rows(np.asarray(pred).T, np.asarray(true).T)


def rmse_per_spot(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N, G), (N, G) -> (N,): each spot's root mean squared error across genes."""
    diff = np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    return np.sqrt((diff * diff).mean(axis=1))


def mae_per_spot(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N, G), (N, G) -> (N,): each spot's mean absolute error across genes."""
    return np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64)).mean(axis=1)


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def summarize(pred: np.ndarray, true: np.ndarray, top_genes: int = TOP_GENES) -> dict:
    """All metrics of one section (or any set of spots): a flat dict of floats and counts.

    pred, true: (N, G) on the same transformed scale. Keys:
    ``pcc_spot_mean`` (the paper's PCC), ``rmse_spot_mean`` (the paper's RMSE), ``mae``,
    ``pcc_gene_mean``, ``pcc_gene_top{top_genes}_mean``, ``n_spots``, ``n_genes`` and the counts of
    spots / genes whose correlation is undefined (constant values)."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    spot_pcc = pcc_per_spot(pred, true)
    gene_pcc = pcc_per_gene(pred, true) if pred.shape[0] >= 2 else np.full(pred.shape[1], np.nan)
    finite_gene = np.sort(gene_pcc[np.isfinite(gene_pcc)])[::-1]
    return {
        "pcc_spot_mean": _nanmean(spot_pcc),
        "rmse_spot_mean": float(rmse_per_spot(pred, true).mean()) if pred.size else float("nan"),
        "mae": float(np.abs(pred - true).mean()) if pred.size else float("nan"),
        "pcc_gene_mean": _nanmean(gene_pcc),
        f"pcc_gene_top{top_genes}_mean": _nanmean(finite_gene[:top_genes]),
        "n_spots": int(pred.shape[0]),
        "n_genes": int(pred.shape[1]),
        "n_spots_pcc_undefined": int((~np.isfinite(spot_pcc)).sum()),
        "n_genes_pcc_undefined": int((~np.isfinite(gene_pcc)).sum()),
    }
