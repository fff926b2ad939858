"""Two-epoch training on a handful of spots: the loss goes down, checkpoints carry the card, and a
run resumed after epoch 1 ends with exactly the weights of an uninterrupted 2-epoch run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import HER2ST
from m2ort_fast.checkpoint import load_checkpoint, read_card
from m2ort_fast.errors import M2ORTError
from m2ort_fast.train import TrainConfig, augment, train
from st_fixtures import write_st_section


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    """A handful of spots of a real HER2ST section, or a synthetic one where the data is absent."""
    if (HER2ST / "C2").is_dir():
        return HER2ST / "C2", 8
    print("real data absent: training on a synthetic HER2ST-style section")
    return write_st_section(tmp_path_factory.mktemp("synthetic") / "S1"), 8


def _config(section, tmp_path, out, epochs):
    folder, spots = section
    return TrainConfig(sections=[str(folder)], variant="tiny", n_genes=24, epochs=epochs, batch_size=4, lr=1e-3,
                       max_spots_per_section=spots, val_spot_fraction=0.25, seed=7, device="cpu",
                       out=str(tmp_path / out), cache_dir=str(tmp_path / "cache"))


def test_two_epochs_loss_down_and_resume_is_exact(section, tmp_path):
    full = train(_config(section, tmp_path, "full", 2), progress=False)
    losses = [row["train_loss"] for row in full["history"]]
    assert len(losses) == 2 and losses[1] < losses[0], losses

    first = train(_config(section, tmp_path, "resumed", 1), progress=False)
    assert len(first["history"]) == 1
    resumed = train(_config(section, tmp_path, "resumed", 2), resume=True, progress=False)
    assert [r["train_loss"] for r in resumed["history"]] == losses
    a = load_file(str(tmp_path / "full" / "last.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    card = read_card(tmp_path / "full" / "best.safetensors")
    assert card.trained and card.variant == "tiny" and len(card.genes) == 24
    assert 0.5 < card.mpp < 1.0  # from the spot table's pitch
    prov = card.provenance
    assert "intersection" in prov["gene_panel_rule"] and len(prov["train_mean_expression"]) == 24
    assert prov["split"]["validation"].startswith("25%") and prov["data"][0]["n_spots"] == 8
    model, _ = load_checkpoint(tmp_path / "full" / "best.safetensors")
    history = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and "val_pcc_spot_mean" in history[0]
    assert (tmp_path / "full" / "metrics.csv").read_text().startswith("epoch,train_loss")
    # the patch cache was built once and reused by the two later runs
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_resume_without_a_run_is_a_one_line_error(tmp_path):
    cfg = TrainConfig(sections=["x"], out=str(tmp_path / "none"))
    with pytest.raises(M2ORTError, match="nothing to resume"):
        train(cfg, resume=True, progress=False)


def test_augment_same_transform_on_all_levels_and_white_fill():
    gen = torch.Generator().manual_seed(0)
    # a marker in one corner of every level: after the transform it is in the same place on all three
    levels = []
    for size in (224, 112, 56):
        x = torch.zeros(6, 3, size, size)
        x[:, :, : size // 4, : size // 4] = 1.0
        levels.append(x)
    white = torch.full((3,), 0.5)
    out = augment(levels, gen, white)
    down = [torch.nn.functional.avg_pool2d(o, 224 // o.shape[-1]) for o in out]
    for level in down[1:]:
        small = torch.nn.functional.avg_pool2d(down[0], down[0].shape[-1] // level.shape[-1])
        assert (torch.nn.functional.avg_pool2d(level, level.shape[-1] // 14) - torch.nn.functional.avg_pool2d(
            small, small.shape[-1] // 14)).abs().max() < 0.1
    # corners outside the rotated square are white for a non-trivial rotation
    corner_values = out[0][:, 0, 0, 0]
    assert (corner_values == 0.5).any()
