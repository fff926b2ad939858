"""The encoder variant (M2ORT over EfficientNet-Lite0's maps; both layers, the stride-8 one being
the default model's) through the engine's backends on the CPU: onnxruntime (fp32, int8),
AOTInductor (fp32) and torch bf16, against the fp32 reference. Export and compile run once per
module and layer."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from m2ort_fast.backends import make_backend
from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.encoders import build_encoder, encoder_card, encoder_model
from m2ort_fast.model import IMAGE_SIZES_PX

pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
# Exporting / compiling the full EfficientNet-Lite0 takes minutes on 2 cores (ONNX export ~3 min under
# load): its compiled backends run where M2ORT_ENCODER_EXPORT=1; the stride-8 layer's always.
EXPORT = os.environ.get("M2ORT_ENCODER_EXPORT") == "1"
GENES = [f"G{i}" for i in range(16)]


@pytest.fixture(scope="module", params=["efficientnet-lite0-s8", "efficientnet-lite0"])
def setup(request, tmp_path_factory):
    torch.manual_seed(0)
    model = encoder_model(build_encoder(request.param), len(GENES)).eval()
    with torch.no_grad():  # a head that spreads the genes apart, so relative errors mean something
        model.head.bias.copy_(torch.linspace(1.0, 6.0, len(GENES)))
    card = ModelCard.for_variant("tiny", GENES, 0.69, encoder=encoder_card(model.token_embed))
    return model, card, tmp_path_factory.mktemp("encoder-artifacts")


def spots(batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, s, s, generator=g) for s in IMAGE_SIZES_PX]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / (ref - ref.mean()).abs().max())


@pytest.mark.parametrize(
    "backend, precision, bound",
    [
        ("onnxruntime", "fp32", 1e-4),
        ("aoti", "fp32", 1e-4),
        ("torch", "bf16", 0.1),
        ("onnxruntime", "int8", 0.25),
    ],
)
def test_encoder_variant_runs_through_the_backend(setup, backend, precision, bound):
    model, card, cache_dir = setup
    if backend != "torch" and card.encoder["name"] == "efficientnet-lite0" and not EXPORT:
        pytest.skip("set M2ORT_ENCODER_EXPORT=1 to export / compile the full EfficientNet-Lite0 (minutes)")
    options = {"torch": {}, "onnxruntime": {"cache_dir": cache_dir}}.get(
        backend, {"cache_dir": cache_dir, "batch_profile": (1, 4, 8)}
    )
    # a copy: the torch backend casts the model it is given in place
    run = make_backend(backend, copy.deepcopy(model), card, device="cpu", precision=precision, **options)
    x = spots(5, seed=1)
    with torch.inference_mode():
        ref = model(*x)
    out = run(*x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    err = relative_error(out, ref)
    print(f"\n{backend} {precision}: max error / spread of the reference = {err:.2e}")
    assert err < bound
