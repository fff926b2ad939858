"""Helpers shared by the kernel tests and the benchmark: run mode, error measure, bounds, weights.

Error bounds (max-norm relative error of the kernel against the fp32 reference, see
:func:`relative_error`), per dtype of the kernel run:

* fp32 (interpreter or GPU with IEEE fp32 products): 1e-4; measured ~1e-6.
* fp16 (GPU): 1e-2; activations are rounded to fp16 (2^-11) between the on-chip stages.
* bf16 (GPU): 5e-2; bf16 keeps 8 mantissa bits (2^-9 relative rounding) at each rounding.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

ERROR_BOUNDS = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@contextlib.contextmanager
def triton_interpreter():
    """Run the kernels in Triton's CPU interpreter inside this block (kernels read TRITON_INTERPRET
    at launch, so this works whatever imported triton first). numpy's BLAS is limited to one
    thread meanwhile: the interpreter does many tiny matmuls and a spinning BLAS pool makes them
    ~100x slower on a busy 2-core machine."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with _one_blas_thread():
            yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


@contextlib.contextmanager
def triton_compiled():
    """Run the kernels compiled for the GPU inside this block (TRITON_INTERPRET unset)."""
    previous = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if previous is not None:
            os.environ["TRITON_INTERPRET"] = previous


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # slower, still correct
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def relative_error(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor | None = None) -> float:
    """max |out - ref| / max |ref - x|: with x the block input, the error is measured against the
    block's update (the residual passes x through exactly and would hide errors); without x,
    against max |ref|."""
    out, ref = out.float(), ref.float()
    scale = (ref - x.float()).abs().max() if x is not None else ref.abs().max()
    return ((out - ref).abs().max() / scale.clamp_min(1e-30)).item()


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Weights that exercise every term: unit-scale activations (so attention is not uniform),
    LayerNorm affine away from (1, 0), non-zero biases."""
    gen = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) / sub.in_features**0.5)
            if sub.bias is not None:
                sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=gen))
        elif isinstance(sub, nn.LayerNorm):
            sub.weight.copy_(1 + 0.2 * torch.randn(sub.weight.shape, generator=gen))
            sub.bias.copy_(0.2 * torch.randn(sub.bias.shape, generator=gen))
    return module


# Shapes of the kernel tests. 197 tokens: not a multiple of 16, so every tile edge is masked. The
# interpreter is slow: batch 64 for the tiny variant only, batches 1 and 7 for every variant.
TOKENS = 197
CPU_CASES = [("tiny", 1), ("tiny", 7), ("tiny", 64)] + [(v, b) for v in ("small", "base", "large") for b in (1, 7)]


def random_tokens(batch: int, dim: int, seed: int) -> torch.Tensor:
    """(batch, 197, dim) fresh random block inputs, offset from zero like real activations."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TOKENS, dim, generator=gen) + 0.5
