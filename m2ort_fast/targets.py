"""Training targets as the paper's code makes them: gene panel, log1p CPM, splits by slide.

* Gene panel (``select_gene_panel``): in every training slide, rank the genes by their variance
  across that slide's spots; keep the genes that are in the top ``top_k`` of **every** slide (the
  intersection); sample ``n_genes`` of them with a fixed seed. The panel (names, in order) is
  saved into the checkpoint and is the only gene list used afterwards.
* Transform (``expression_targets``): counts of the panel's genes -> counts per million of the
  spot's panel total -> log1p. Spots whose panel total is 0 are dropped.
* Splits: the spec's 60 / 10 / 30 % by slide (``split_slides``), and leave-one-slide-out folds
  (``leave_one_out_folds``), the protocol used for the four HER2ST sections.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp

DEFAULT_PANEL_SIZE = 250
DEFAULT_TOP_K = 1000
PANEL_RULE = (
    "genes in the top {top_k} by variance of their counts across spots in every training slide "
    "(intersection), {n_genes} sampled with seed {seed}"
)


def _dense(counts) -> np.ndarray:
    return counts.toarray() if sp.issparse(counts) else np.asarray(counts)


def log1p_cpm(counts, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(N, G) counts -> ((N, G) log1p(counts / row total * 1e6) as ``dtype``, (N,) row total).

    Rows whose total is 0 come out as zeros (callers drop them)."""
    counts = _dense(counts).astype(np.float64)
    totals = counts.sum(axis=1)
    scale = np.divide(1e6, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(counts * scale[:, None]).astype(dtype, copy=False), totals


def gene_variances(counts) -> np.ndarray:
    """(N, G) counts -> (G,) variance of each gene's counts across spots.

    Raw counts, as the spec words the rule ("highest variance across spots"): it favours genes
    expressed well enough to be measured in most spots. (Variance of log1p CPM would favour
    sparse genes whose zeros and non-zeros alternate, which are mostly sampling noise.)"""
    values = _dense(counts).astype(np.float64)
    if not len(values):
        return np.zeros(values.shape[1])
    variances = values.var(axis=0)
    variances[variances < 1e-12] = 0.0  # rounding noise of a constant gene is no variance
    return variances


@dataclasses.dataclass
class GenePanel:
    genes: list[str]
    rule: str  # human-readable rule with its parameters, for the checkpoint's provenance
    top_k: int  # the top list size actually used (grown until the intersection is large enough)
    candidates: int  # size of the intersection the panel was sampled from


def select_gene_panel(
    samples, n_genes: int = DEFAULT_PANEL_SIZE, top_k: int = DEFAULT_TOP_K, seed: int = 0
) -> GenePanel:
    """The paper's gene panel over training samples (objects with ``.counts`` (N, G), ``.genes``).

    Genes are ranked by variance per slide; the intersection of each slide's top ``top_k`` is
    taken. Where fewer than ``n_genes`` genes survive, ``top_k`` is doubled until enough do (the
    value used is recorded in the result). The ``n_genes`` genes are then sampled with ``seed``
    and returned in the intersection's (alphabetical) order."""
    samples = list(samples)
    if not samples:
        raise ValueError("no training samples to choose a gene panel from")
    rankings: list[list[str]] = []
    for sample in samples:
        variances = gene_variances(sample.counts)
        order = np.argsort(-variances, kind="stable")
        rankings.append([sample.genes[i] for i in order if variances[i] > 0])
    common = set.intersection(*(set(sample.genes) for sample in samples))
    k = int(top_k)
    while True:
        candidates = set.intersection(*(set(ranked[:k]) for ranked in rankings)) & common
        longest = max(len(r) for r in rankings)
        if len(candidates) >= n_genes or k >= longest:
            break
        k *= 2
    ordered = sorted(candidates)
    if len(ordered) < n_genes:
        raise ValueError(f"only {len(ordered)} genes vary in every training slide; cannot pick {n_genes}")
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(ordered), size=n_genes, replace=False))
    genes = [ordered[i] for i in picked]
    rule = PANEL_RULE.format(top_k=k, n_genes=n_genes, seed=seed)
    return GenePanel(genes=genes, rule=rule, top_k=k, candidates=len(ordered))


# Marker genes a HER2+ breast-cancer reader looks for (issue 25): HER2 amplicon (ERBB2, GRB7), hormone
# receptors (ESR1, PGR), luminal / basal keratins, proliferation, immune and stroma markers.
HER2_MARKERS = ("ERBB2", "GRB7", "ESR1", "PGR", "FOXA1", "GATA3", "KRT5", "KRT18", "MKI67", "CD74", "PTPRC", "COL1A1")


def add_marker_genes(genes: list[str], samples, markers) -> tuple[list[str], dict]:
    """The panel plus the ``markers`` it lacks that are measured (counted above 0 somewhere) in
    every one of ``samples``; returns (panel, what was added and what was not, for the provenance)."""
    added: list[str] = []
    not_measured: list[str] = []
    for gene in markers:
        if gene in genes or gene in added:
            continue
        measured = all(
            gene in sample.genes and float(sample.counts[:, sample.genes.index(gene)].sum()) > 0 for sample in samples
        )
        (added if measured else not_measured).append(gene)
    return list(genes) + added, {"markers_added": added, "markers_not_measured": not_measured}


@dataclasses.dataclass
class Targets:
    values: np.ndarray  # (M, P) float32 log1p CPM over the panel, for the kept spots
    keep: np.ndarray  # (N,) bool: spots kept (panel total > 0)
    missing_genes: list[str]  # panel genes absent from the sample's counts (counted as 0)


def panel_counts(counts, genes: list[str], panel: list[str]) -> tuple[np.ndarray, list[str]]:
    """(N, G) counts over ``genes`` -> ((N, P) counts over ``panel``, panel genes not in ``genes``).

    Genes of the panel that the sample lacks are counted as 0."""
    index = {g: i for i, g in enumerate(genes)}
    present = [(j, index[g]) for j, g in enumerate(panel) if g in index]
    missing = [g for g in panel if g not in index]
    columns = [i for _, i in present]
    sub = counts[:, columns]
    sub = _dense(sub)
    out = np.zeros((sub.shape[0], len(panel)), dtype=np.float64)
    out[:, [j for j, _ in present]] = sub
    return out, missing


def expression_targets(counts, genes: list[str], panel: list[str]) -> Targets:
    """The paper's targets: panel counts -> CPM of the spot's panel total -> log1p; spots whose
    panel total is 0 are dropped (see ``keep``)."""
    sub, missing = panel_counts(counts, genes, panel)
    values, totals = log1p_cpm(sub)
    keep = totals > 0
    return Targets(values=values[keep], keep=keep, missing_genes=missing)


def split_slides(names: list[str], seed: int = 0, fractions=(0.6, 0.1, 0.3)) -> dict[str, list[str]]:
    """The spec's split by slide: shuffle with ``seed``, then 60 % train / 10 % val / 30 % test.

    Rounded so that train gets at least one slide; val / test may be empty for very few slides."""
    names = list(names)
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    n = len(names)
    n_test = int(round(fractions[2] * n))
    n_val = int(round(fractions[1] * n))
    n_train = max(1, n - n_test - n_val)
    n_val = min(n_val, n - n_train)
    n_test = n - n_train - n_val
    return {
        "train": shuffled[:n_train],
        "val": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }


def leave_one_out_folds(names: list[str]) -> list[dict[str, list[str]]]:
    """One fold per slide: that slide is the test set, the others train (val chosen by the caller)."""
    names = list(names)
    return [{"train": [m for m in names if m != name], "val": [], "test": [name]} for name in names]


def holdout_spots(n_spots: int, fraction: float, seed: int) -> np.ndarray:
    """(n_spots,) bool: a seeded random ``fraction`` of spots held out for validation, used when no
    whole slide can be spared for it (e.g. leave-one-out on four slides)."""
    mask = np.zeros(n_spots, dtype=bool)
    n_hold = int(round(fraction * n_spots))
    if n_hold:
        mask[np.random.default_rng(seed).choice(n_spots, size=n_hold, replace=False)] = True
    return mask
