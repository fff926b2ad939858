"""The `triton` backend end to end vs the `torch` backend (tiny variant), and its errors."""

from __future__ import annotations

import pytest
import torch

from m2ort_fast.backends import make_backend
from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.errors import M2ORTError
from m2ort_fast.kernels.testing import ERROR_BOUNDS, randomize_, relative_error, triton_compiled, triton_interpreter
from m2ort_fast.model import IMAGE_SIZES_PX, build_model

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model_and_card(n_genes=50):
    model = randomize_(build_model("tiny", n_genes=n_genes, seed=0), seed=5)
    card = ModelCard.for_variant("tiny", genes=[f"G{i}" for i in range(n_genes)], mpp=0.5)
    return model, card


def _levels(batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, s, s, generator=gen) for s in IMAGE_SIZES_PX]


def test_triton_backend_matches_torch_backend_interpreter():
    model, card = _model_and_card()
    levels = _levels(3)
    expected = make_backend("torch", model, card, device="cpu")(*levels)
    with triton_interpreter():
        backend = make_backend("triton", model, card, device="cpu")
        assert backend.precision == "fp32"
        out = backend(*levels)
    assert out.shape == (3, 50) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert relative_error(out, expected) < ERROR_BOUNDS[torch.float32]


def test_triton_backend_on_the_shipped_encoder_model_interpreter():
    """The default model's tokens come from EfficientNet-Lite0 (7 x 7 + the class token: 50, not
    the paper's 197): the mixing kernels mask any token count."""
    from m2ort_fast.checkpoint import load_checkpoint
    from m2ort_fast.predict import DEFAULT_CHECKPOINT

    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    assert model.token_embed is not None and model.pos_embed.shape[1] == 50
    levels = _levels(2, seed=3)
    expected = make_backend("torch", model, card, device="cpu")(*levels)
    with triton_interpreter():
        out = make_backend("triton", model, card, device="cpu")(*levels)
    assert relative_error(out, expected) < ERROR_BOUNDS[torch.float32]


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, card = _model_and_card()
    with pytest.raises(M2ORTError, match="need a CUDA GPU.*TRITON_INTERPRET=1"):
        make_backend("triton", model, card, device="cpu")


def test_triton_backend_rejects_bf16_in_the_interpreter():
    model, card = _model_and_card()
    with triton_interpreter(), pytest.raises(M2ORTError, match="bf16"):
        make_backend("triton", model, card, device="cpu", precision="bf16")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_triton_backend_gpu_matches_fp32_reference(precision, dtype):
    model, card = _model_and_card()
    levels = _levels(16)
    expected = make_backend("torch", model, card, device="cpu")(*levels)  # fp32 reference
    with triton_compiled():
        out = make_backend("triton", model, card, device="cuda", precision=precision)(*levels)
    assert relative_error(out, expected) < ERROR_BOUNDS[dtype]
