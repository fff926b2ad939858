"""The reference model against the spec: sizes, FLOPs, the math of each block, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from m2ort_fast.checkpoint import ModelCard, load_checkpoint, read_card, save_checkpoint
from m2ort_fast.errors import CheckpointError
from m2ort_fast.model import (
    IMAGE_SIZES_PX,
    M2ORT,
    PAPER_VARIANTS,
    build_model,
    count_parameters,
    describe,
    flops_per_spot,
    get_config,
    patchify,
)

# docs/model.md's variant table: params (250 genes) and approximate FLOPs per spot.
SPEC_TABLE = {"small": (7.62e6, 3.4e9), "base": (17.14e6, 7.6e9), "large": (55.49e6, 23.8e9)}


@pytest.mark.parametrize("variant", PAPER_VARIANTS)
def test_parameter_counts_match_the_paper(variant):
    with torch.device("meta"):
        params = count_parameters(M2ORT(get_config(variant)))
    expected_params, expected_flops = SPEC_TABLE[variant]
    assert abs(params - expected_params) / expected_params < 0.02
    assert abs(flops_per_spot(get_config(variant)) - expected_flops) / expected_flops < 0.02
    assert describe(get_config(variant))["params"] == params


def random_levels(batch: int, generator=None):
    return [torch.rand(batch, 3, s, s, generator=generator) for s in IMAGE_SIZES_PX]


def test_forward_shapes_and_batch_independence():
    model = build_model("tiny", n_genes=17, seed=0)
    levels = random_levels(3)
    with torch.no_grad():
        out = model(*levels)
        single = model(*[x[1:2] for x in levels])
    assert out.shape == (3, 17)
    torch.testing.assert_close(out[1:2], single, rtol=1e-4, atol=1e-5)


def test_patchify_cuts_the_same_area_per_token_on_every_level():
    image = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    tokens = patchify(image, 16)
    assert tokens.shape == (2, 4, 16 * 16 * 3)
    # token 1 is the top-right patch; values are (p1 p2 c) ordered
    expected = image[0, :, 0:16, 16:32].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(tokens[0, 1], expected)


def test_itmm_is_attention_with_q_k_v_from_levels_1_2_3():
    cfg = get_config("tiny", 5)
    model = build_model("tiny", n_genes=5, seed=1)
    itmm = model.blocks[0].itmm
    x = torch.randn(2, 197, cfg.dim)
    d = cfg.level_dim
    with torch.no_grad():
        h = F.layer_norm(x, (cfg.dim,), itmm.norm.weight, itmm.norm.bias)
        split = lambda t: t.reshape(2, 197, cfg.heads, 64).transpose(1, 2)  # noqa: E731
        q = split(h[..., :d] @ itmm.to_q.weight.T)
        k = split(h[..., d : 2 * d] @ itmm.to_k.weight.T)
        v = split(h[..., 2 * d :] @ itmm.to_v.weight.T)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 197, -1)
        expected = x + attn @ itmm.proj.weight.T + itmm.proj.bias
        torch.testing.assert_close(itmm(x), expected, rtol=1e-4, atol=1e-5)
        icmm = model.blocks[0].icmm
        mlp = F.gelu(F.layer_norm(x, (cfg.dim,), icmm.norm.weight, icmm.norm.bias) @ icmm.fc1.weight.T + icmm.fc1.bias)
        torch.testing.assert_close(icmm(x), x + mlp @ icmm.fc2.weight.T + icmm.fc2.bias, rtol=1e-4, atol=1e-5)


def make_card(n_genes: int, variant: str = "tiny") -> ModelCard:
    return ModelCard.for_variant(variant, [f"G{i}" for i in range(n_genes)], mpp=0.7, model_id="test")


def test_checkpoint_round_trip(tmp_path):
    model = build_model("tiny", n_genes=7, seed=2)
    card = make_card(7)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, card)
    loaded, loaded_card = load_checkpoint(path, variant="tiny", genes=card.genes)
    assert loaded_card == card
    assert loaded_card.level_mpp == pytest.approx([0.7, 1.4, 2.8])
    levels = random_levels(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*levels), model(*levels))
    assert not list(tmp_path.glob(".*partial"))


def test_checkpoint_for_another_panel_or_variant_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, build_model("tiny", n_genes=7, seed=0), make_card(7))
    with pytest.raises(CheckpointError, match="another gene panel") as info:
        load_checkpoint(path, genes=[f"G{i}" for i in range(8)])
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="variant 'tiny', not 'small'"):
        load_checkpoint(path, variant="small")


def test_checkpoint_with_weights_of_the_wrong_shape_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    # weights of a 9-gene model under a card that lists 7 genes
    model = build_model("tiny", n_genes=9, seed=0)
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path),
        metadata={"m2ort_fast": make_card(7).to_json()},
    )
    with pytest.raises(CheckpointError, match="predict 9 genes but the checkpoint's gene panel lists 7"):
        load_checkpoint(path)
    card = json.loads(make_card(9).to_json())
    card["dim"] = 576
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"m2ort_fast": json.dumps(card)}
    )
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_unreadable_checkpoint_is_one_line_error(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_card(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.safetensors")


# --- the model stage's rewrites (issue 26) against the formulation they replaced -----------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_patchify_equals_the_one_copy_formulation(dtype, channels_last):
    from m2ort_fast.model_v1 import patchify_v1

    for size, patch in zip(IMAGE_SIZES_PX, (16, 8, 4), strict=True):
        image = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(size))
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        got = patchify(image, patch, dtype=dtype)
        assert got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, patchify_v1(image.to(dtype), patch))  # a copy: bit for bit


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_forward_equals_the_old_formulation_within_fp32_rounding(variant):
    from m2ort_fast.model_v1 import forward_v1

    model = build_model(variant, seed=3)
    levels = random_levels(4, torch.Generator().manual_seed(4))
    with torch.inference_mode():
        new, old = model(*levels), forward_v1(model, *levels)
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


def test_shipped_checkpoint_predicts_as_before():
    """The shipped paper model's weights load into the same state-dict keys and predict what the
    old forward did: fp32 within rounding, bf16 (fused attention, as the torch backend runs it)
    within bf16's."""
    from m2ort_fast.model import set_fused_attention
    from m2ort_fast.model_v1 import forward_v1
    from m2ort_fast.predict import SHIPPED_MODELS

    model, _ = load_checkpoint(SHIPPED_MODELS["m2ort-her2st-tiny"])
    assert set(model.state_dict()) == set(build_model("tiny").state_dict())
    levels = random_levels(6, torch.Generator().manual_seed(6))
    with torch.inference_mode():
        torch.testing.assert_close(model(*levels), forward_v1(model, *levels), rtol=1e-5, atol=1e-5)
        low = set_fused_attention(model.to(torch.bfloat16), True)
        new, old = low(*levels).float(), forward_v1(low, *levels).float()
    # bf16 rounds the class-token-only GEMMs differently: measured 0.031, one bf16 step at predictions of 4-8
    assert (new - old).abs().max() < 0.07


def test_a_spots_fp32_prediction_does_not_depend_on_its_place_in_the_batch():
    """Bit for bit: the engines (streamed, naive, device path) batch spots differently and are held
    to equal predictions. (Running the last block for the class token alone broke this by an ulp:
    the GEMMs' row blocking at B rows.)"""
    torch.manual_seed(0)
    model = M2ORT(get_config("tiny")).eval()
    levels = [torch.rand(16, 3, s, s) for s in IMAGE_SIZES_PX]
    with torch.no_grad():
        reference = model(*levels)
        for shift in (1, 3, 5):
            order = torch.arange(16).roll(shift)
            moved = model(*(x[order] for x in levels))[torch.argsort(order)]
            assert torch.equal(moved, reference), shift
