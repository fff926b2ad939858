"""The fused ITMM and ICMM blocks as PyTorch custom ops, for ``torch.export`` and AOTInductor.

    torch.ops.m2ort_fast.itmm(x (B, T, D), gamma, beta, wq, wk, wv, w_proj, b_proj, eps) -> (B, T, D)
    torch.ops.m2ort_fast.icmm(x (B, T, D), gamma, beta, w1, b1, w2, b2, eps) -> (B, T, D)

Registered with ``torch.library.triton_op``: the op's body (:func:`.itmm.itmm`,
:func:`.icmm.icmm`) is traceable, and its kernel launches go through ``wrap_triton``, so
``torch.export`` records the Triton kernels themselves and AOTInductor compiles them into the
package next to its own kernels (with autotuning over our Hopper configs at build time). The batch
stays dynamic: nothing in the bodies branches on it.

:func:`export_ops` is the hook :mod:`m2ort_fast.export.aoti` looks for: ``{"itmm": f, "icmm": g}``
with ``f(x, itmm_module)`` and ``g(x, icmm_module)``, each (B, T, D) -> (B, T, D), taking the
weights from the reference modules. Outside tracing the ops run the kernels like the ``triton``
backend does (on the CPU only in Triton's interpreter).
"""

from __future__ import annotations

import torch

from m2ort_fast.kernels.icmm import ICMMWeights, icmm
from m2ort_fast.kernels.itmm import ITMMWeights, itmm
from m2ort_fast.model import ICMM, ITMM


@torch.library.triton_op("m2ort_fast::itmm", mutates_args=())
def itmm_op(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    w_proj: torch.Tensor,
    b_proj: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    return itmm(x, ITMMWeights(eps, gamma, beta, wq, wk, wv, w_proj, b_proj))


@torch.library.triton_op("m2ort_fast::icmm", mutates_args=())
def icmm_op(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    return icmm(x, ICMMWeights(eps, gamma, beta, w1, b1, w2, b2))


def itmm_block(x: torch.Tensor, module: ITMM) -> torch.Tensor:
    """ITMM of the reference ``module`` through the fused op: (B, T, D) -> (B, T, D)."""
    return itmm_op(
        x,
        module.norm.weight,
        module.norm.bias,
        module.to_q.weight,
        module.to_k.weight,
        module.to_v.weight,
        module.proj.weight,
        module.proj.bias,
        module.norm.eps,
    )


def icmm_block(x: torch.Tensor, module: ICMM) -> torch.Tensor:
    """ICMM of the reference ``module`` through the fused op: (B, T, D) -> (B, T, D)."""
    return icmm_op(
        x,
        module.norm.weight,
        module.norm.bias,
        module.fc1.weight,
        module.fc1.bias,
        module.fc2.weight,
        module.fc2.bias,
        module.norm.eps,
    )


def export_ops() -> dict:
    return {"itmm": itmm_block, "icmm": icmm_block}
