"""Two-epoch training on a handful of spots: the loss goes down, checkpoints carry the card, and a
run resumed after epoch 1 ends with exactly the weights of an uninterrupted 2-epoch run. Then the
issue-12 options: standardised targets folded into the head, the PCC loss, colour augmentation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from real_data import HER2ST
from safetensors.torch import load_file
from st_fixtures import write_st_section

from m2ort_fast.checkpoint import ModelCard, load_checkpoint, read_card, save_checkpoint
from m2ort_fast.errors import M2ORTError
from m2ort_fast.model import M2ORT, VARIANTS
from m2ort_fast.train import (
    RGB_FROM_HED,
    TrainConfig,
    augment,
    color_augment,
    config_from_args,
    fold_standardization,
    hed_jitter,
    hed_to_rgb,
    pcc_loss,
    rgb_to_hed,
    target_scaling,
    train,
    training_loss,
)


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    """A handful of spots of a real HER2ST section, or a synthetic one where the data is absent."""
    if (HER2ST / "C2").is_dir():
        return HER2ST / "C2", 8
    print("real data absent: training on a synthetic HER2ST-style section")
    return write_st_section(tmp_path_factory.mktemp("synthetic") / "S1"), 8


def _config(section, tmp_path, out, epochs):
    folder, spots = section
    return TrainConfig(
        sections=[str(folder)],
        variant="tiny",
        n_genes=24,
        epochs=epochs,
        batch_size=4,
        lr=1e-3,
        max_spots_per_section=spots,
        val_spot_fraction=0.25,
        seed=7,
        device="cpu",
        out=str(tmp_path / out),
        cache_dir=str(tmp_path / "cache"),
    )


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
        assert (
            torch.nn.functional.avg_pool2d(level, level.shape[-1] // 14)
            - torch.nn.functional.avg_pool2d(small, small.shape[-1] // 14)
        ).abs().max() < 0.1
    # corners outside the rotated square are white for a non-trivial rotation
    corner_values = out[0][:, 0, 0, 0]
    assert (corner_values == 0.5).any()


# ----------------------------------------------------------------------------------------------
# Issue 12 options: standardised targets (folded into the head), PCC loss, colour augmentation


def _inputs(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, s, s, generator=gen) for s in (224, 112, 56)]


def test_standardised_model_saved_and_reloaded_predicts_the_destandardised_output(tmp_path):
    n_genes = 6
    torch.manual_seed(0)
    model = M2ORT(VARIANTS["tiny"].with_genes(n_genes))
    rng = np.random.default_rng(0)
    targets = rng.gamma(2.0, 2.0, size=(16, n_genes)).astype(np.float32) * np.arange(1, n_genes + 1, dtype=np.float32)
    mean, std = target_scaling(targets)
    np.testing.assert_allclose(((targets - mean) / std).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(((targets - mean) / std).std(0), 1, rtol=1e-5)
    # one training step on the standardised targets
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = _inputs(4)
    loss = training_loss(model(*x), torch.from_numpy((targets[:4] - mean) / std), 0.5)
    loss.backward()
    optimizer.step()
    model.eval()
    card = ModelCard.for_variant("tiny", [f"g{i}" for i in range(n_genes)], 0.5, trained=True)
    save_checkpoint(tmp_path / "m.safetensors", fold_standardization(model, mean, std), card)
    reloaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    x = _inputs(3, seed=1)
    with torch.no_grad():
        expected = model(*x).double() * torch.from_numpy(std).double() + torch.from_numpy(mean).double()
        got = reloaded(*x).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # folding copies: the training model is untouched
    assert not torch.equal(model.head.bias, reloaded.head.bias)


def test_target_scaling_constant_gene_is_only_centred():
    targets = np.array([[1.0, 3.0], [2.0, 3.0], [3.0, 3.0]], dtype=np.float32)
    mean, std = target_scaling(targets)
    np.testing.assert_allclose(mean, [2.0, 3.0])
    np.testing.assert_allclose(std, [np.sqrt(2 / 3), 1.0], rtol=1e-6)


def test_training_with_standardised_targets_checkpoints_predict_log1p_cpm(section, tmp_path):
    cfg = _config(section, tmp_path, "std", 1)
    cfg.standardize_targets, cfg.pcc_loss_weight, cfg.color_augment = True, 0.5, True
    cfg.select_metric = "pcc_gene_mean"
    summary = train(cfg, progress=False)
    assert np.isfinite(summary["history"][0]["train_loss"]) and "best_pcc_gene_mean" in summary
    card = read_card(tmp_path / "std" / "last.safetensors")
    prov = card.provenance
    scaling = prov["target_standardization"]
    assert scaling["folded_into_head"] and len(scaling["mean"]) == len(scaling["std"]) == 24
    assert prov["config"]["standardize_targets"] and prov["config"]["pcc_loss_weight"] == 0.5
    assert "standardised" in prov["loss"] and "HED" in prov["augmentation"] and "pcc_gene_mean" in prov["selection"]
    # the in-training model (resume.pt, standardised scale), de-standardised, is the checkpoint's model
    state = torch.load(tmp_path / "std" / "resume.pt", map_location="cpu", weights_only=False)
    raw = M2ORT(VARIANTS["tiny"].with_genes(24))
    raw.load_state_dict(state["model"])
    raw.eval()
    saved, _ = load_checkpoint(tmp_path / "std" / "last.safetensors")
    x = _inputs(2)
    with torch.no_grad():
        expected = raw(*x).double() * torch.tensor(scaling["std"]).double() + torch.tensor(scaling["mean"]).double()
        got = saved(*x).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # mean/std stored to 6 decimals
    # the mean-baseline start: at bias 0 on the standardised scale the head's bias is the training mean
    assert abs(float(saved.head.bias.detach().mean()) - float(np.mean(prov["train_mean_expression"]))) < 1.0


def test_pcc_loss_known_answers():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(32, 5, generator=gen)
    assert float(pcc_loss(target, target)) == pytest.approx(0.0, abs=1e-6)
    # any positive affine map per gene is still a perfect correlation
    assert float(pcc_loss(target * torch.tensor([1.0, 2.0, 0.5, 3.0, 10.0]) + 4.0, target)) == pytest.approx(
        0.0, abs=1e-6
    )
    assert float(pcc_loss(-target, target)) == pytest.approx(2.0, abs=1e-6)
    # exactly uncorrelated: two orthogonal centred columns
    t = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    p = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    assert float(pcc_loss(p, t)) == pytest.approx(1.0, abs=1e-6)
    # gene 0 perfect, gene 1 anti-correlated: mean r = 0 -> loss 1
    two_t = torch.cat([t, t], 1)
    assert float(pcc_loss(torch.cat([t, -t], 1), two_t)) == pytest.approx(1.0, abs=1e-6)
    # a known r: pred = t + orthogonal noise of equal norm -> r = 1/sqrt(2)
    assert float(pcc_loss(t + p, t)) == pytest.approx(1 - 2**-0.5, abs=1e-6)
    # a gene constant over the batch has no correlation and is left out
    assert float(pcc_loss(torch.cat([t, p], 1), torch.cat([t, torch.full_like(t, 3.0)], 1))) == pytest.approx(
        0.0, abs=1e-6
    )
    # a constant prediction: r = 0, finite, and the loss still has a gradient towards the target
    pred = torch.zeros(4, 1, requires_grad=True)
    loss = pcc_loss(pred, t)
    assert float(loss.detach()) == pytest.approx(1.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    # the combined loss: MSE + w * PCC term
    assert float(training_loss(p, t, 0.5)) == pytest.approx(float(((p - t) ** 2).mean()) + 0.5, abs=1e-6)
    assert float(training_loss(p, t, 0.0)) == pytest.approx(float(((p - t) ** 2).mean()), abs=1e-6)


def test_hed_round_trip_and_white_stays_white():
    gen = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 8, 8, generator=gen) * 0.9 + 0.05
    torch.testing.assert_close(hed_to_rgb(rgb_to_hed(rgb)), rgb, rtol=1e-4, atol=1e-5)
    white = torch.ones(1, 3, 2, 2)
    assert rgb_to_hed(white).abs().max() < 1e-6
    # the fused jitter is the composition RGB -> HED -> scale, shift -> RGB (-> x gain, clip)
    scale = 1 + (torch.rand(2, 3, generator=gen) * 2 - 1) * 0.05
    shift = (torch.rand(2, 3, generator=gen) * 2 - 1) * 0.02
    slow = hed_to_rgb(rgb_to_hed(rgb) * scale.view(2, 3, 1, 1) + shift.view(2, 3, 1, 1))
    torch.testing.assert_close(hed_jitter(rgb, scale, shift), slow, rtol=1e-4, atol=1e-5)
    gain = torch.tensor([0.9, 1.1])
    expected = (
        torch.exp(
            torch.einsum(
                "bjhw,ji->bihw",
                rgb_to_hed(rgb) * scale.view(2, 3, 1, 1) + shift.view(2, 3, 1, 1),
                torch.tensor(RGB_FROM_HED, dtype=torch.float32),
            )
            * math.log(1e-6)
        )
        * gain.view(2, 1, 1, 1)
    ).clamp(0, 1)
    torch.testing.assert_close(hed_jitter(rgb, scale, shift, gain=gain), expected, rtol=1e-4, atol=1e-5)
    # no jitter: the identity (up to the 1e-6 floor)
    torch.testing.assert_close(hed_jitter(rgb, torch.ones(2, 3), torch.zeros(2, 3)), rgb, rtol=1e-4, atol=1e-5)


def _levels_sharing_colours(n=4, seed=0, pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0)):
    """Level 2 / 3 are subsamples of level 1, so a per-pixel colour transform commutes with taking them."""
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.rand(n, 3, 224, 224, generator=gen)
    mean = torch.tensor(pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(pixel_std).view(1, 3, 1, 1)
    level1 = (rgb - mean) / std
    return [level1, level1[:, :, ::2, ::2].contiguous(), level1[:, :, ::4, ::4].contiguous()]


@pytest.mark.parametrize(
    "pixel_mean,pixel_std", [((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
)
def test_color_augment_shapes_range_same_on_levels_and_seeded(pixel_mean, pixel_std):
    levels = _levels_sharing_colours(pixel_mean=pixel_mean, pixel_std=pixel_std)
    out = color_augment(levels, torch.Generator().manual_seed(3), pixel_mean, pixel_std)
    mean = torch.tensor(pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(pixel_std).view(1, 3, 1, 1)
    for x, y in zip(levels, out, strict=True):
        assert y.shape == x.shape and y.dtype == x.dtype
        rgb = y * std + mean
        assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5
    # it changed the colours, by a modest amount
    diff = (out[0] - levels[0]).mul(std).abs()
    assert 1e-3 < float(diff.mean()) < 0.2
    # the same per-pixel colour transform on the three levels
    torch.testing.assert_close(out[1], out[0][:, :, ::2, ::2], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[2], out[0][:, :, ::4, ::4], rtol=0, atol=1e-5)
    # different spots get different transforms
    assert not torch.allclose(out[0][0] - levels[0][0], out[0][1] - levels[0][1])
    # reproducible for a seed, different for another
    again = color_augment(levels, torch.Generator().manual_seed(3), pixel_mean, pixel_std)
    for a, b in zip(out, again, strict=True):
        assert torch.equal(a, b)
    other = color_augment(levels, torch.Generator().manual_seed(4), pixel_mean, pixel_std)
    assert not torch.equal(other[0], out[0])
    # the inputs are not modified
    assert torch.equal(levels[0], _levels_sharing_colours(pixel_mean=pixel_mean, pixel_std=pixel_std)[0])


def test_new_options_from_toml_and_command_line(tmp_path):
    import argparse

    from m2ort_fast.train import add_subcommands

    (tmp_path / "c.toml").write_text(
        'sections = ["A"]\nstandardize_targets = true\npcc_loss_weight = 0.5\n'
        'color_augment = true\nselect_metric = "pcc_gene_mean"\n'
    )
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    cfg = config_from_args(parser.parse_args(["train", "--config", str(tmp_path / "c.toml")]))
    assert cfg.standardize_targets and cfg.pcc_loss_weight == 0.5 and cfg.color_augment
    assert cfg.select_metric == "pcc_gene_mean"
    cfg = config_from_args(
        parser.parse_args(
            [
                "train",
                "--config",
                str(tmp_path / "c.toml"),
                "--no-standardize-targets",
                "--pcc-loss-weight",
                "1",
                "--no-color-augment",
                "--select-metric",
                "pcc_spot_mean",
            ]
        )
    )
    assert not cfg.standardize_targets and cfg.pcc_loss_weight == 1.0 and not cfg.color_augment
    assert cfg.select_metric == "pcc_spot_mean"
    defaults = TrainConfig()
    assert not defaults.standardize_targets and defaults.pcc_loss_weight == 0 and not defaults.color_augment
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--pcc-loss-weight", "-1"])
