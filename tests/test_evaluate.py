"""`m2ort-fast evaluate` on a real HER2ST section folder as it is (a synthetic one where absent)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from real_data import HER2ST, her2st_section
from st_fixtures import write_st_section

from m2ort_fast.checkpoint import ModelCard, save_checkpoint
from m2ort_fast.errors import CheckpointError
from m2ort_fast.evaluate import add_subcommands, evaluate_sections
from m2ort_fast.model import M2ORT, VARIANTS


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    if (HER2ST / "C5").is_dir():
        return HER2ST / "C5"
    print("real data absent: evaluating on a synthetic HER2ST-style section")
    return write_st_section(tmp_path_factory.mktemp("synthetic") / "S2", grid=5, seed=3)


NEW_KEYS = (
    "pcc_gene_beyond_pc1_mean",
    "var_share_pc1_pred",
    "var_share_pc1to5_pred",
    "var_share_pc1_true",
    "var_share_pc1to5_true",
    "n_genes_beyond_pc1_pcc_undefined",
)


def _write_checkpoint(path, section, **provenance):
    """An untrained tiny model whose panel has two genes the section lacks, and a stored baseline."""
    import torch

    from m2ort_fast.datasets import read_sample

    sample = read_sample(section)
    totals = np.asarray(sample.counts.sum(axis=0)).ravel()
    genes = [sample.genes[i] for i in np.argsort(-totals)[:30]] + ["NOT_A_GENE_1", "NOT_A_GENE_2"]
    torch.manual_seed(0)
    model = M2ORT(VARIANTS["tiny"].with_genes(len(genes)))
    baseline = np.linspace(5, 9, len(genes)).round(3).tolist()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor(baseline))
    card = ModelCard.for_variant(
        "tiny", genes, 0.7, provenance={"train_mean_expression": baseline, "level_source": "resize", **provenance}
    )
    save_checkpoint(path, model, card)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, section):
    return _write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", section)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One patch cache for the module: each section's JPEG is decoded once."""
    return tmp_path_factory.mktemp("patch_cache")


def _evaluate_cli(checkpoint, section, out, cache_dir) -> dict:
    """Run the evaluate subcommand as the CLI does; its report.json."""
    import argparse

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    args = parser.parse_args(
        [
            "evaluate",
            "--checkpoint",
            str(checkpoint),
            str(section),
            "--out",
            str(out),
            "--cache-dir",
            str(cache_dir),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    return json.loads((out / "report.json").read_text())


def test_evaluate_section_folder_as_it_is(section, checkpoint, cache_dir, tmp_path, capsys):
    out = tmp_path / "report"
    report = _evaluate_cli(checkpoint, section, out, cache_dir)
    (entry,) = report["sections"]
    name = entry["section"]
    assert entry["n_panel_genes_missing"] == 2 and entry["model_mpp"] == 0.7
    assert 0.6 < entry["section_mpp"] < 0.8  # from the section's own spot table
    m, b = entry["metrics"], entry["baseline_metrics"]
    for key in ("pcc_spot_mean", "rmse_spot_mean", "mae", "pcc_gene_mean", "pcc_gene_top50_mean"):
        assert key in m and key in b
    assert np.isfinite(m["pcc_spot_mean"]) and np.isfinite(m["rmse_spot_mean"])
    assert b["n_genes_pcc_undefined"] == 32  # a constant prediction has no per-gene correlation
    assert report["baseline"].startswith("checkpoint provenance")
    for key in NEW_KEYS:
        assert key in m and key in b
        assert key.startswith("n_") or key in report["mean_over_sections"]
    assert 0 < m["var_share_pc1_pred"] <= m["var_share_pc1to5_pred"] <= 1
    assert 0 < m["var_share_pc1_true"] <= m["var_share_pc1to5_true"] <= 1
    assert b["var_share_pc1_true"] == m["var_share_pc1_true"]  # the same measurement
    assert np.isnan(b["var_share_pc1_pred"]) and np.isnan(b["pcc_gene_beyond_pc1_mean"])  # constant prediction
    # this checkpoint names no training sections: no ridge baseline unless --baseline-sections
    assert report["ridge_baseline"]["source"].startswith("unavailable")
    assert "ridge_baseline_metrics" not in entry
    printed = capsys.readouterr().out
    assert "PCC/gene>PC1" in printed and "PC1 share" in printed and f"{name} mean baseline" in printed
    assert "measured: PC1 share" in printed and "ridge baseline: unavailable" in printed
    # what the counting noise leaves (metrics.measurement_signal): beside the measured PC1 share
    signal = entry["measurement"]
    assert "its signal (counting noise removed): PC1 share" in printed
    assert 0 < signal["pcc_gene_ceiling_mean"] <= 1 and np.isfinite(signal["var_share_pc1_signal"])
    assert report["measurement_mean_over_sections"] == signal  # one section
    table = pd.read_csv(out / f"{name}_genes.csv")
    assert len(table) == 32 and table["missing_in_section"].sum() == 2
    # the per-gene ceiling sits on its gene's row (sorted by PCC); genes missing from the counts have none
    assert table.loc[table["missing_in_section"], "pcc_ceiling"].isna().all()
    assert table.loc[~table["missing_in_section"], "pcc_ceiling"].notna().sum() >= 25
    assert list(table["rank"]) == list(range(1, 33))
    assert "pcc_beyond_pc1" in table and "ridge_pcc" not in table
    assert (out / f"{name}_best_genes.png").stat().st_size > 1000
    assert (out / f"{name}.json").is_file()

    # recomputing the mean baseline from given sections replaces the stored one
    again = evaluate_sections(
        checkpoint,
        [section],
        baseline_sections=[section],
        cache_dir=cache_dir,
        device="cpu",
        progress=False,
        plot_genes=0,
    )
    base = again["sections"][0]["baseline_metrics"]
    assert again["baseline"].startswith("computed from")
    # the encoder probe (issue 25) is fitted on the same sections and scored like the model
    assert again["probe_baseline"]["source"].startswith("PCA-ridge probe on efficientnet-lite0 features")
    assert np.isfinite(again["sections"][0]["probe_baseline_metrics"]["pcc_gene_mean"])
    # the mean of the section itself is the best constant: lower RMSE than the stored one
    assert base["rmse_spot_mean"] < b["rmse_spot_mean"]
    assert again["sections"][0]["metrics"] == m  # same predictions from the cached patches
    # ...and the ridge baseline is fitted on the given sections: here the section itself, in-sample
    ridge_entry = again["sections"][0]
    assert ridge_entry["ridge_in_sample"] is True
    r = ridge_entry["ridge_baseline_metrics"]
    for key in ("pcc_spot_mean", "rmse_spot_mean", "mae", "pcc_gene_mean") + NEW_KEYS:
        assert key in r
    assert again["ridge_baseline"]["validation"].startswith("5-fold over spots")  # one section: no LOSO
    assert again["ridge_baseline"]["n_train_spots"] == m["n_spots"]
    # in-sample least squares with an intercept is never worse than the section's own mean
    assert r["rmse_spot_mean"] <= base["rmse_spot_mean"] + 1e-6
    assert "ridge_baseline_mean_over_sections" in again


def test_evaluate_ridge_from_the_checkpoints_training_sections(cache_dir, tmp_path, capsys):
    """Real data: a checkpoint whose provenance says it was trained on C2-C4 is evaluated on C5;
    the ridge baseline is fitted on C2-C4 (leave one of them out to choose alpha) and reported."""
    held = her2st_section("C5")
    for name in ("C2", "C3", "C4"):
        her2st_section(name)
    ckpt = _write_checkpoint(
        tmp_path / "fold.safetensors",
        held,
        split={"train": ["C2", "C3", "C4"], "val": [], "test": ["C5"]},
        config={"data_root": str(HER2ST)},
    )
    out = tmp_path / "report"
    report = _evaluate_cli(ckpt, held, out, cache_dir)
    ridge = report["ridge_baseline"]
    assert ridge["source"].startswith("ridge on image features, fitted on C2, C3, C4")
    assert ridge["validation"].startswith("leave one training section out") and ridge["alpha"] in ridge["alphas"]
    assert ridge["n_features"] == 27 and ridge["n_train_spots"] > 500
    (entry,) = report["sections"]
    assert entry["ridge_in_sample"] is False
    for block in ("metrics", "baseline_metrics", "ridge_baseline_metrics"):
        for key in ("pcc_spot_mean", "rmse_spot_mean", "mae", "pcc_gene_mean") + NEW_KEYS:
            assert key in entry[block], (block, key)
    r = entry["ridge_baseline_metrics"]
    assert np.isfinite(r["pcc_spot_mean"]) and np.isfinite(r["pcc_gene_mean"])
    assert 0 < r["var_share_pc1_pred"] <= 1
    for key in ("pcc_spot_mean", "pcc_gene_beyond_pc1_mean", "var_share_pc1_pred"):
        assert key in report["ridge_baseline_mean_over_sections"]
    table = pd.read_csv(out / "C5_genes.csv")
    assert {"ridge_pcc", "ridge_pcc_beyond_pc1", "ridge_rmse", "pcc_beyond_pc1"} <= set(table.columns)
    printed = capsys.readouterr().out
    assert "C5 ridge baseline" in printed and "(in-sample)" not in printed


def test_evaluate_refuses_a_non_checkpoint(section, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        evaluate_sections(bad, [section], progress=False)
