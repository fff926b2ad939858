"""Gene panel, log1p CPM targets and splits (no slide needed)."""

import numpy as np
import pytest
import scipy.sparse as sp

from m2ort_fast.targets import (
    expression_targets,
    holdout_spots,
    leave_one_out_folds,
    log1p_cpm,
    select_gene_panel,
    split_slides,
)


class _Sample:
    def __init__(self, counts, genes):
        self.counts, self.genes = counts, genes


def test_log1p_cpm_hand_computed():
    counts = np.array([[1, 3, 0], [0, 0, 0]])
    values, totals = log1p_cpm(counts)
    np.testing.assert_allclose(values[0], np.log1p([250_000, 750_000, 0]), rtol=1e-6)
    np.testing.assert_array_equal(values[1], 0)
    np.testing.assert_array_equal(totals, [4, 0])


def test_expression_targets_use_panel_total_and_drop_empty_spots():
    genes = ["A", "B", "C", "D"]
    counts = sp.csr_matrix(np.array([[1, 1, 100, 2], [0, 5, 7, 0], [3, 0, 9, 0]]))
    targets = expression_targets(counts, genes, ["D", "A", "Z"])  # Z absent: counted as 0
    np.testing.assert_array_equal(targets.keep, [True, False, True])  # spot 1 has no D/A counts
    np.testing.assert_allclose(targets.values[0], np.log1p([2 / 3 * 1e6, 1 / 3 * 1e6, 0]), rtol=1e-6)
    np.testing.assert_allclose(targets.values[1], np.log1p([0, 1e6, 0]), rtol=1e-6)
    assert targets.missing_genes == ["Z"]


def _alternating(n_spots, n_genes, varying):
    """Counts where the genes in ``varying`` (pairs) swap 0 / 1000 between spots and the others are
    100 everywhere: spot totals are constant, so only the varying genes have non-zero variance."""
    counts = np.full((n_spots, n_genes), 100)
    for first in varying[::2]:
        counts[:, first] = np.where(np.arange(n_spots) % 2 == 0, 0, 1000)
        counts[:, first + 1] = np.where(np.arange(n_spots) % 2 == 0, 1000, 0)
    return counts


def test_gene_panel_is_intersection_of_top_variance_lists_and_seeded():
    genes = [f"G{i:02d}" for i in range(40)]
    a = _Sample(_alternating(12, 40, list(range(0, 20))), genes)  # G00-G19 vary
    b = _Sample(sp.csr_matrix(_alternating(12, 40, list(range(10, 30)))), genes)  # G10-G29 vary
    panel = select_gene_panel([a, b], n_genes=6, top_k=20, seed=3)
    assert len(panel.genes) == 6 and panel.candidates == 10 and panel.top_k == 20
    assert set(panel.genes) <= {f"G{i:02d}" for i in range(10, 20)}
    assert panel.genes == sorted(panel.genes)
    assert panel.genes == select_gene_panel([a, b], n_genes=6, top_k=20, seed=3).genes
    assert panel.genes != select_gene_panel([a, b], n_genes=6, top_k=20, seed=4).genes
    # top 5 of each (ties kept in gene order: G00-G04 and G10-G14) do not intersect: the top
    # list doubles until enough genes are common
    grown = select_gene_panel([a, b], n_genes=6, top_k=5, seed=0)
    assert grown.top_k == 20 and grown.candidates == 10
    with pytest.raises(ValueError, match="only 10 genes"):
        select_gene_panel([a, b], n_genes=11, top_k=20)
    # a gene one slide lacks is never picked
    c = _Sample(_alternating(12, 39, list(range(10, 30))), genes[1:])
    assert "G00" not in select_gene_panel([a, c], n_genes=6, top_k=40).genes


def test_splits():
    names = [f"S{i}" for i in range(10)]
    split = split_slides(names, seed=0)
    assert [len(split[k]) for k in ("train", "val", "test")] == [6, 1, 3]
    assert sorted(sum(split.values(), [])) == sorted(names)
    assert split == split_slides(names, seed=0) and split != split_slides(names, seed=1)
    folds = leave_one_out_folds(["C2", "C3", "C4", "C5"])
    assert [f["test"] for f in folds] == [["C2"], ["C3"], ["C4"], ["C5"]]
    assert all(f["test"][0] not in f["train"] and len(f["train"]) == 3 for f in folds)
    mask = holdout_spots(100, 0.1, seed=0)
    assert mask.sum() == 10 and np.array_equal(mask, holdout_spots(100, 0.1, seed=0))
