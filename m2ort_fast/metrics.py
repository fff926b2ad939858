"""Metrics of predicted vs measured expression, on the transformed scale (log1p CPM).

Two families, named so they cannot be confused (``docs/model.md`` "Metrics"):

* **per spot** (what the M2ORT paper's tables report): for each spot, Pearson correlation / RMSE
  between predicted and measured values across the panel's genes; then the mean over spots.
* **per gene** (what HEST and most later work report): for each gene, Pearson correlation across
  the spots of a section; then the mean over genes, and the mean over the 50 best-predicted genes.

A correlation is undefined where one side is constant (a gene measured as 0 in every spot of a
section, say); such spots or genes are NaN in the per-item arrays, left out of the means, and
counted in the summary so a reader sees how many were left out.

Two more views show whether a prediction is more than "more or less tissue" (issue 12):

* **variance share of the first principal components** (``pc_variance_shares``) of the spot x
  gene matrix, centred per gene, for the prediction and for the measurement. A model that only
  learned one tissue/no-tissue axis has a PC1 share near 1 while the measured one is far lower.
* **per-gene PCC of the residuals after the measurement's PC1** (``pcc_per_gene_beyond_pc1``):
  the spot direction of the measured matrix's first principal component is projected out of
  every gene column of both matrices, then the per-gene PCC is taken as above. Adding any amount
  of that one direction to a prediction does not change it. A prediction with nothing beyond that
  direction has constant residuals, so its residual PCC is undefined (NaN, counted), like the
  per-gene PCC of a constant prediction.

And what the measurement itself allows (``measurement_signal``, from the counts): ST counts carry
counting noise that no image can predict, and that noise spreads over every gene, so the
measurement's PC1 share is far below that of its noise-free signal, which is what a perfect
predictor of expected expression would output. Binomial data thinning splits each spot's counts
into two halves with independent noise; their cross-covariance estimates the signal's covariance
(its PC1 share: ``var_share_pc1_signal``) and their per-gene correlation the split-half
reliability, whose square root stepped up to full depth bounds the PCC per gene any prediction
can reach (``pcc_gene_ceiling_mean``).
"""

from __future__ import annotations

import numpy as np

from m2ort_fast.targets import log1p_cpm  # counts -> the targets' scale (measurement_signal)

TOP_GENES = 50
TOP_PCS = 5  # the summary reports PC1 alone and PC1..PC5 together
# A residual whose norm is below this fraction of the norm it came from is rounding noise (of a
# column that lay on the removed direction, of a constant matrix minus its mean): treated as 0.
RESIDUAL_RTOL = 1e-9


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


def _centred_columns(x: np.ndarray) -> np.ndarray:
    """(N, G) -> (N, G) float64 with each column (gene) minus its mean over spots."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D spots x genes array, got shape {x.shape}")
    return x - x.mean(axis=0, keepdims=True) if len(x) else x


def _has_variance(values: np.ndarray, centred: np.ndarray) -> bool:
    """False where the centred matrix is only the rounding noise of subtracting equal values (a
    constant prediction leaves ~1e-16 relative residue, which an SVD would call a perfect PC1)."""
    if centred.size == 0:
        return False
    scale = np.linalg.norm(np.asarray(values, dtype=np.float64))
    return bool(np.isfinite(scale)) and np.linalg.norm(centred) > RESIDUAL_RTOL * scale


def pc_variance_shares(values: np.ndarray, k: int = TOP_PCS) -> np.ndarray:
    """(N, G) -> (k,): fraction of the total variance (genes centred over spots, unscaled) carried
    by each of the first k principal components. Components beyond the matrix's rank carry 0;
    all NaN where the matrix has no variance (a constant prediction such as the mean baseline)."""
    centred = _centred_columns(values)
    if not _has_variance(values, centred):
        return np.full(k, np.nan)
    power = np.linalg.svd(centred, compute_uv=False) ** 2
    total = power.sum()
    shares = np.zeros(k)
    m = min(k, len(power))
    shares[:m] = power[:m] / total
    return shares


def pc1_spot_direction(true: np.ndarray) -> np.ndarray | None:
    """(N, G) -> (N,) unit vector over spots: the score direction of the first principal component
    of ``true`` (genes centred). It sums to 0. None where ``true`` has no variance."""
    centred = _centred_columns(true)
    if not _has_variance(true, centred):
        return None
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    if s[0] <= 0:
        return None
    return u[:, 0]


def remove_direction(values: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """(N, G), (N,) unit -> (N, G): the genes centred over spots, minus their projection on
    ``direction``. Columns that lay on the direction (up to rounding) come out exactly 0."""
    centred = _centred_columns(values)
    direction = np.asarray(direction, dtype=np.float64)
    residual = centred - np.outer(direction, direction @ centred)
    before = np.linalg.norm(centred, axis=0)
    after = np.linalg.norm(residual, axis=0)
    residual[:, after <= RESIDUAL_RTOL * before] = 0.0  # so the PCC sees a constant, not noise
    return residual


def pcc_per_gene_beyond_pc1(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N, G), (N, G) -> (G,): per-gene PCC across spots after the spot direction of the first
    principal component of ``true`` is projected out of both sides (see the module's docstring).
    NaN for a gene whose residual is constant on either side; all NaN if ``true`` has no variance."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"expected two arrays of the same 2-D shape, got {pred.shape} and {true.shape}")
    direction = pc1_spot_direction(true) if len(true) >= 3 else None
    if direction is None:
        return np.full(true.shape[1], np.nan)
    return pcc_per_gene(remove_direction(pred, direction), remove_direction(true, direction))


def _thinned_halves(counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N, G) integer counts -> two (M, G) log1p CPM matrices, genes centred, from a binomial 50/50
    split of every count (M: the spots with counts in both halves)."""
    half = rng.binomial(counts, 0.5)
    rest = counts - half
    rows = (half.sum(axis=1) > 0) & (rest.sum(axis=1) > 0)
    return (
        _centred_columns(log1p_cpm(half[rows], dtype=np.float64)[0]),
        _centred_columns(log1p_cpm(rest[rows], dtype=np.float64)[0]),
    )


def measurement_signal(counts: np.ndarray, repeats: int = 8, seed: int = 0) -> dict:
    """(N, G) counts over the panel, of the spots scored -> {"var_share_pc1_signal",
    "pcc_gene_ceiling_mean", "pcc_gene_ceiling" (G,)}: what the measurement's counting noise
    leaves to predict (the module's docstring), averaged over ``repeats`` thinnings (fixed seed).

    Both halves are log1p CPM, as the targets; the signal covariance is the symmetrised
    cross-covariance of the halves (noise independent between them cancels), its PC1 share the top
    eigenvalue over its trace (the signal's total variance). The ceiling of gene g is
    sqrt(2 r / (1 + r)) for the halves' correlation r (Spearman-Brown), 0 where r <= 0, NaN where a
    half is constant. NaN throughout with fewer than 3 spots or no signal variance."""
    counts = np.rint(np.asarray(counts, dtype=np.float64)).astype(np.int64)
    rng = np.random.default_rng(seed)
    shares, ceilings = [], []
    for _ in range(repeats if counts.shape[0] >= 3 else 0):
        a, b = _thinned_halves(counts, rng)
        if len(a) < 3:
            continue
        eigenvalues = np.linalg.eigvalsh((a.T @ b + b.T @ a) / 2)
        shares.append(eigenvalues[-1] / eigenvalues.sum() if eigenvalues.sum() > 0 else np.nan)
        r = pcc_per_gene(a, b)
        ceilings.append(np.sqrt(np.clip(2 * r / (1 + r), 0.0, 1.0)))
    per_gene = np.full(counts.shape[1], np.nan)
    if ceilings:
        ceiling = np.asarray(ceilings)
        measured = np.isfinite(ceiling).any(axis=0)
        per_gene[measured] = np.nanmean(ceiling[:, measured], axis=0)
    return {
        "var_share_pc1_signal": _nanmean(np.asarray(shares, dtype=np.float64)),
        "pcc_gene_ceiling_mean": _nanmean(per_gene),
        "pcc_gene_ceiling": per_gene,
    }


def summarize(pred: np.ndarray, true: np.ndarray, top_genes: int = TOP_GENES) -> dict:
    """All metrics of one section (or any set of spots): a flat dict of floats and counts.

    pred, true: (N, G) on the same transformed scale. Keys:
    ``pcc_spot_mean`` (the paper's PCC), ``rmse_spot_mean`` (the paper's RMSE), ``mae``,
    ``pcc_gene_mean``, ``pcc_gene_top{top_genes}_mean``, ``pcc_gene_beyond_pc1_mean`` (per-gene
    PCC after the measured PC1 direction is removed from both sides), ``var_share_pc1_pred`` /
    ``var_share_pc1to5_pred`` and ``var_share_pc1_true`` / ``var_share_pc1to5_true`` (fraction of
    the variance on PC1, on PC1..PC5 together), ``n_spots``, ``n_genes`` and the counts of spots /
    genes whose correlation is undefined (constant values)."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    spot_pcc = pcc_per_spot(pred, true)
    gene_pcc = pcc_per_gene(pred, true) if pred.shape[0] >= 2 else np.full(pred.shape[1], np.nan)
    beyond = pcc_per_gene_beyond_pc1(pred, true)
    finite_gene = np.sort(gene_pcc[np.isfinite(gene_pcc)])[::-1]
    pred_shares, true_shares = pc_variance_shares(pred), pc_variance_shares(true)
    return {
        "pcc_spot_mean": _nanmean(spot_pcc),
        "rmse_spot_mean": float(rmse_per_spot(pred, true).mean()) if pred.size else float("nan"),
        "mae": float(np.abs(pred - true).mean()) if pred.size else float("nan"),
        "pcc_gene_mean": _nanmean(gene_pcc),
        f"pcc_gene_top{top_genes}_mean": _nanmean(finite_gene[:top_genes]),
        "pcc_gene_beyond_pc1_mean": _nanmean(beyond),
        "var_share_pc1_pred": float(pred_shares[0]),
        f"var_share_pc1to{TOP_PCS}_pred": float(pred_shares.sum()),
        "var_share_pc1_true": float(true_shares[0]),
        f"var_share_pc1to{TOP_PCS}_true": float(true_shares.sum()),
        "n_spots": int(pred.shape[0]),
        "n_genes": int(pred.shape[1]),
        "n_spots_pcc_undefined": int((~np.isfinite(spot_pcc)).sum()),
        "n_genes_pcc_undefined": int((~np.isfinite(gene_pcc)).sum()),
        "n_genes_beyond_pc1_pcc_undefined": int((~np.isfinite(beyond)).sum()),
    }
