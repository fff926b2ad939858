"""Fused ICMM block (inter-level channel mixing), (B, T, D) -> (B, T, D):

    y = x + fc2(GELU(fc1(LayerNorm(x))))        (GELU in the exact erf form, torch's default)

Kernels (three launches, all from :mod:`.fused_linear`):

1. ``row_stats``: per-token LayerNorm mean and 1/std (reads x once, writes 8 bytes a token).
2. ``fused_linear`` for fc1: LayerNorm applied in the GEMM prologue as x tiles are loaded,
   bias + GELU in the epilogue on the fp32 accumulator; writes the hidden h (B*T, mlp) once.
3. ``fused_linear`` for fc2: bias + residual add of x in the epilogue; writes y once.

Why not one kernel: a program that kept h on chip would have to own whole output rows (mlp up
to 768 hidden, D up to 1152 outputs: a 128 x 1152 fp32 accumulator is 590 KB, beyond one SM's
registers) or recompute fc1 once per output tile. h is the only intermediate that reaches global
memory (written once, read once, in the activation dtype); LayerNorm's output and fc1's
pre-activation never do.

Global-memory passes that remain: x read 3 times (statistics, fc1, residual), h written once
and read once, y written once; eager PyTorch additionally writes and re-reads LN(x), fc1's output
and GELU's output, and the fc2 output before the residual add.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from m2ort_fast.kernels.fused_linear import fused_linear, reference_row_stats, row_stats
from m2ort_fast.model import ICMM


@dataclasses.dataclass(frozen=True)
class ICMMWeights:
    """The weights of one ICMM block, contiguous, in the block's device and dtype."""

    eps: float
    gamma: torch.Tensor  # (D,) LayerNorm
    beta: torch.Tensor
    w1: torch.Tensor  # (mlp, D)
    b1: torch.Tensor
    w2: torch.Tensor  # (D, mlp)
    b2: torch.Tensor

    @classmethod
    def from_module(cls, module: ICMM) -> ICMMWeights:
        def c(p):
            return p.detach().contiguous()

        return cls(
            module.norm.eps,
            c(module.norm.weight),
            c(module.norm.bias),
            c(module.fc1.weight),
            c(module.fc1.bias),
            c(module.fc2.weight),
            c(module.fc2.bias),
        )


def icmm(x: torch.Tensor, weights: ICMMWeights) -> torch.Tensor:
    """Fused ICMM block: x (B, T, D) -> (B, T, D) in x's dtype (three kernel launches)."""
    b, t, dim = x.shape
    rows = x.contiguous().view(b * t, dim)
    mean, rstd = row_stats(rows, weights.eps)
    hidden = fused_linear(rows, weights.w1, weights.b1, norm=(mean, rstd, weights.gamma, weights.beta), gelu=True)
    y = fused_linear(hidden, weights.w2, weights.b2, residual=rows)
    return y.view(b, t, dim)


def reference_icmm(x: torch.Tensor, weights: ICMMWeights) -> torch.Tensor:
    """The kernels' math in plain PyTorch (fp32 statistics, LN output rounded to x's dtype)."""
    mean, rstd = reference_row_stats(x, weights.eps)
    h = ((x.float() - mean[..., None]) * rstd[..., None] * weights.gamma.float() + weights.beta.float()).to(x.dtype)
    hidden = F.gelu(F.linear(h, weights.w1, weights.b1))
    return x + F.linear(hidden, weights.w2, weights.b2)
