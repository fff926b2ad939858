"""`m2ort-fast evaluate` on a real HER2ST section folder as it is (a synthetic one where absent)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import HER2ST
from m2ort_fast.checkpoint import ModelCard, save_checkpoint
from m2ort_fast.errors import CheckpointError
from m2ort_fast.evaluate import add_subcommands, evaluate_sections
from m2ort_fast.model import M2ORT, VARIANTS
from st_fixtures import write_st_section


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    if (HER2ST / "C5").is_dir():
        return HER2ST / "C5"
    print("real data absent: evaluating on a synthetic HER2ST-style section")
    return write_st_section(tmp_path_factory.mktemp("synthetic") / "S2", grid=5, seed=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, section):
    """An untrained tiny model whose panel has two genes the section lacks, and a stored baseline."""
    from m2ort_fast.datasets import read_sample

    import torch

    sample = read_sample(section)
    totals = np.asarray(sample.counts.sum(axis=0)).ravel()
    genes = [sample.genes[i] for i in np.argsort(-totals)[:30]] + ["NOT_A_GENE_1", "NOT_A_GENE_2"]
    torch.manual_seed(0)
    model = M2ORT(VARIANTS["tiny"].with_genes(len(genes)))
    baseline = np.linspace(5, 9, len(genes)).round(3).tolist()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor(baseline))
    card = ModelCard.for_variant("tiny", genes, 0.7, provenance={"train_mean_expression": baseline,
                                                                 "level_source": "resize"})
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, model, card)
    return path


def test_evaluate_section_folder_as_it_is(section, checkpoint, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    out = tmp_path / "report"
    args = parser.parse_args(["evaluate", "--checkpoint", str(checkpoint), str(section), "--out", str(out),
                              "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--quiet"])
    assert args.func(args) == 0
    report = json.loads((out / "report.json").read_text())
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
    table = pd.read_csv(out / f"{name}_genes.csv")
    assert len(table) == 32 and table["missing_in_section"].sum() == 2
    assert list(table["rank"]) == list(range(1, 33))
    assert (out / f"{name}_best_genes.png").stat().st_size > 1000
    assert (out / f"{name}.json").is_file()

    # recomputing the mean baseline from given sections replaces the stored one
    again = evaluate_sections(checkpoint, [section], baseline_sections=[section], cache_dir=tmp_path / "cache",
                              device="cpu", progress=False, plot_genes=0)
    base = again["sections"][0]["baseline_metrics"]
    assert again["baseline"].startswith("computed from")
    # the mean of the section itself is the best constant: lower RMSE than the stored one
    assert base["rmse_spot_mean"] < b["rmse_spot_mean"]
    assert again["sections"][0]["metrics"] == m  # same predictions from the cached patches


def test_evaluate_refuses_a_non_checkpoint(section, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        evaluate_sections(bad, [section], progress=False)
