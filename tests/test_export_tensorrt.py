"""TensorRT engine build and parity: run only where `tensorrt` imports and a CUDA GPU is present
(never the case where this project was written: TensorRT could not be installed there)."""

from __future__ import annotations

import json

import pytest
import torch

from m2ort_fast.backends import make_backend
from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.errors import M2ORTError
from m2ort_fast.export.tensorrt_engine import sidecar_path, tensorrt_unavailable_reason
from m2ort_fast.model import IMAGE_SIZES_PX, build_model

REASON = tensorrt_unavailable_reason()
needs_tensorrt = pytest.mark.skipif(REASON is not None, reason=f"tensorrt not importable / no CUDA GPU ({REASON})")


def tiny():
    return build_model("tiny", seed=0), ModelCard.for_variant("tiny", [f"G{i}" for i in range(250)], 0.5)


def test_tensorrt_backend_refuses_the_cpu():
    model, card = tiny()
    with pytest.raises(M2ORTError, match="needs a CUDA device"):
        make_backend("tensorrt", model, card, device="cpu")


@needs_tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-2), ("fp16", 3e-2), ("bf16", 6e-2)])
def test_tensorrt_engine_matches_reference(tmp_path, precision, tolerance):
    # fp32 builds may use TF32 (TensorRT's default), hence 1e-2 rather than 1e-5
    model, card = tiny()
    backend = make_backend(
        "tensorrt", model, card, device="cuda", precision=precision, cache_dir=tmp_path, batch_profile=(1, 8, 32)
    )
    sidecar = json.loads(sidecar_path(backend.engine_path).read_text())
    assert sidecar["precision"] == precision and sidecar["batch_profile"] == [1, 8, 32]
    assert list(tmp_path.glob("tensorrt/timing-*.cache"))
    for batch in (1, 7, 40):  # 40 > max 32: chunks
        g = torch.Generator().manual_seed(batch)
        x = [torch.rand(batch, 3, s, s, generator=g) for s in IMAGE_SIZES_PX]
        with torch.inference_mode():
            ref = model(*x)
        out = backend(*x)
        assert (out - ref).abs().max() / ref.abs().max() < tolerance
    again = make_backend(
        "tensorrt", model, card, device="cuda", precision=precision, cache_dir=tmp_path, batch_profile=(1, 8, 32)
    )
    assert again.engine_path == backend.engine_path
