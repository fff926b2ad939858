"""The models inside the package: picked by name (``--checkpoint NAME``), the default being the
encoder model that won its leave-one-section-out comparison (issue 25)."""

from __future__ import annotations

import anndata
import numpy as np
import pytest

from m2ort_fast.checkpoint import read_card
from m2ort_fast.cli import main
from m2ort_fast.predict import (
    DEFAULT_CHECKPOINT,
    DEFAULT_MODEL,
    DEMO_SLIDE,
    DEMO_SPOTS,
    SHIPPED_MODELS,
    Predictor,
    checkpoint_path,
)


def test_every_shipped_name_is_its_cards_model_id():
    assert DEFAULT_CHECKPOINT == SHIPPED_MODELS[DEFAULT_MODEL]
    for name, path in SHIPPED_MODELS.items():
        assert path.is_file() and read_card(path).model_id == name


def test_names_resolve_and_paths_pass_through(tmp_path, monkeypatch):
    assert checkpoint_path(None) == DEFAULT_CHECKPOINT
    assert checkpoint_path("m2ort-her2st-tiny") == SHIPPED_MODELS["m2ort-her2st-tiny"]
    assert checkpoint_path(tmp_path / "mine.safetensors") == tmp_path / "mine.safetensors"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m2ort-her2st-tiny").write_bytes(b"")  # a file of that name here is what the user means
    assert checkpoint_path("m2ort-her2st-tiny").resolve() == (tmp_path / "m2ort-her2st-tiny").resolve()


def test_the_default_won_its_comparison_on_every_fold():
    """The ship rule of issue 25, on the figures the default's card carries: PCC per gene above
    the colour ridge on every held-out section, and on average above both fitted baselines."""
    card = read_card(DEFAULT_CHECKPOINT)
    assert card.encoder["name"] == "efficientnet-lite0-s8" and not card.encoder["weights_in_checkpoint"]
    folds = card.provenance["held_out_leave_one_section_out"]
    assert sorted(folds) == ["C2", "C3", "C4", "C5"]
    model = [f["model"]["pcc_gene_mean"] for f in folds.values()]
    for baseline in ("colour_ridge", "encoder_probe"):
        other = [f[baseline]["pcc_gene_mean"] for f in folds.values()]
        assert np.mean(model) > np.mean(other)
    assert all(f["model"]["pcc_gene_mean"] > f["colour_ridge"]["pcc_gene_mean"] for f in folds.values())
    assert {"ERBB2", "GRB7", "ESR1"} <= set(card.genes)  # the markers a HER2+ reader looks for


def test_predict_by_name_from_the_command_line(capsys, tmp_path):
    code = main(
        ["predict", str(DEMO_SLIDE), "--spots", str(DEMO_SPOTS), "--checkpoint", "m2ort-her2st-tiny"]
        + ["--out", str(tmp_path), "--quiet", "--heatmaps", "0"]
    )
    assert code == 0, capsys.readouterr().err
    adata = anndata.read_h5ad(tmp_path / "demo_slide.h5ad")
    assert adata.uns["m2ort_fast"]["model_id"] == "m2ort-her2st-tiny" and adata.n_vars == 250


def test_an_unknown_name_is_one_line(capsys):
    code = main(["predict", str(DEMO_SLIDE), "--checkpoint", "m2ort-her2st-huge", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "m2ort-her2st-huge" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", list(SHIPPED_MODELS))
def test_predictor_takes_a_name(name):
    predictor = Predictor(name, progress=False)
    assert predictor.checkpoint == SHIPPED_MODELS[name] and predictor.card.model_id == name


@pytest.mark.parametrize("name", list(SHIPPED_MODELS))
def test_info_counts_the_model_the_card_builds(name):
    """`info --checkpoint`: parameters of the model as loaded (an encoder's included), not of the
    configuration's linear patch embedding."""
    from m2ort_fast.checkpoint import card_size, load_checkpoint
    from m2ort_fast.model import count_parameters

    model, card = load_checkpoint(SHIPPED_MODELS[name])
    size = card_size(card)
    assert size["params"] == count_parameters(model) and size["gflops_per_spot"] > 0.1
