"""Fused linear kernel (LN prologue, bias, GELU, residual epilogue) and row statistics vs their
PyTorch references. CPU: Triton's interpreter, fp32 (bound 1e-4); GPU: fp16/bf16 against the fp32
reference (bounds in m2ort_fast.kernels.testing)."""

from __future__ import annotations

import pytest
import torch

from m2ort_fast.kernels.fused_linear import fused_linear, reference_fused_linear, reference_row_stats, row_stats
from m2ort_fast.kernels.testing import ERROR_BOUNDS, relative_error, triton_compiled, triton_interpreter

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _problem(m, k, n, seed, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = 1.5 + torch.randn(m, k, generator=gen)  # an offset mean, as in a residual stream
    w = torch.randn(n, k, generator=gen) / k**0.5
    bias = 0.1 * torch.randn(n, generator=gen)
    gamma = 1 + 0.2 * torch.randn(k, generator=gen)
    beta = 0.2 * torch.randn(k, generator=gen)
    residual = torch.randn(m, n, generator=gen)
    return [t.to(device, dtype) for t in (x, w, bias, gamma, beta, residual)]


# (M, K, N): 197 tokens x 1 or 2 spots; K = 80 is not a multiple of any BLOCK_K (masking).
SHAPES = [(197, 192, 256), (394, 256, 192), (197, 80, 96)]
FLAGS = [  # (layer norm, bias, gelu, residual): fc1 of ICMM, fc2 / ITMM projection, plain
    (True, True, True, False),
    (False, True, False, True),
    (False, False, False, False),
    (True, False, False, True),
]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_row_stats_match_layer_norm_statistics(m, k, n):
    x = _problem(m, k, n, seed=m + k)[0]
    with triton_interpreter():
        mean, rstd = row_stats(x, 1e-5)
    ref_mean, ref_rstd = reference_row_stats(x, 1e-5)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd, ref_rstd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("norm,bias,gelu,residual", FLAGS)
def test_fused_linear_matches_reference_fp32_interpreter(m, k, n, norm, bias, gelu, residual):
    x, w, b, gamma, beta, res = _problem(m, k, n, seed=n)
    stats = (*reference_row_stats(x, 1e-5), gamma, beta) if norm else None
    kwargs = dict(norm=stats, gelu=gelu, residual=res if residual else None)
    with triton_interpreter():
        out = fused_linear(x, w, b if bias else None, **kwargs)
    ref = reference_fused_linear(x, w, b if bias else None, **kwargs)
    assert relative_error(out, ref, res if residual else None) < ERROR_BOUNDS[torch.float32]


def test_reference_is_layer_norm_linear_gelu():
    """The reference's hand-written normalisation is torch's LayerNorm."""
    x, w, b, gamma, beta, _ = _problem(197, 192, 256, seed=3)
    ref = reference_fused_linear(x, w, b, norm=(*reference_row_stats(x, 1e-5), gamma, beta), gelu=True)
    expected = torch.nn.functional.gelu(
        torch.nn.functional.linear(torch.nn.functional.layer_norm(x, (192,), gamma, beta, 1e-5), w, b)
    )
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n", [*SHAPES, (256 * 197, 1152, 768), (64 * 197, 768, 768)])
@pytest.mark.parametrize("norm,bias,gelu,residual", FLAGS)
def test_fused_linear_gpu(dtype, m, k, n, norm, bias, gelu, residual):
    x, w, b, gamma, beta, res = _problem(m, k, n, seed=n, device="cuda", dtype=dtype)
    with triton_compiled():
        mean, rstd = row_stats(x, 1e-5)
        stats = (mean, rstd, gamma, beta) if norm else None
        out = fused_linear(x, w, b if bias else None, norm=stats, gelu=gelu, residual=res if residual else None)
    f32 = [t.float() for t in (x, w, b, gamma, beta, res)]
    ref_stats = (*reference_row_stats(f32[0], 1e-5), f32[3], f32[4]) if norm else None
    ref = reference_fused_linear(
        f32[0], f32[1], f32[2] if bias else None, norm=ref_stats, gelu=gelu, residual=f32[5] if residual else None
    )
    assert relative_error(out, ref, f32[5] if residual else None) < ERROR_BOUNDS[dtype]
