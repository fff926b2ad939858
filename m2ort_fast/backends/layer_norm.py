"""The torch backend's LayerNorm for a bf16 model on the CPU: ``_core.layer_norm_bf16``.

torch's CPU LayerNorm on bf16 rows converts each value twice and runs at 1.9-2.2 G values/s on the
AMX Xeon (about 60% of its float32 rate), and its LayerNorms were 23% of `tiny` bf16's time. The
extension's kernel reads each row once for its sums and once to write it, on AVX-512: 1.2-2.3x
torch's on the model's rows (768-, 192-, 64- and 48-wide; docs/backends.md). It computes
torch's function in float32 (the variance from pivoted sums, where torch updates Welford's), so
outputs differ from torch's by a bf16 rounding here and there, within the bf16 bound
(bench/precision.py), and the same for a spot whatever its batch, threads or kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from m2ort_fast import _core


def core_layer_norm_available() -> bool:
    """Whether the extension's LayerNorm beats torch's here: where it has its AVX-512 kernel (its
    scalar loop, the same bits, is the readable reference and slower than torch's)."""
    return "avx512_bw" in _core.layer_norm_kernels()


class CoreLayerNorm(nn.LayerNorm):
    """An ``nn.LayerNorm`` over the last axis (the same parameters and state-dict keys) that runs
    ``_core.layer_norm_bf16`` on bf16 CPU tensors where autograd records nothing, on torch's
    intra-op thread count; anything else goes through torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        records_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.dtype != torch.bfloat16 or x.device.type != "cpu" or records_grad:
            return super().forward(x)
        x = x.contiguous()
        out = torch.empty_like(x)
        _core.layer_norm_bf16(
            x.view(torch.uint16).numpy(),
            self.weight.view(torch.uint16).numpy(),
            self.bias.view(torch.uint16).numpy(),
            self.eps,
            out=out.view(torch.uint16).numpy(),
            num_threads=torch.get_num_threads(),
        )
        return out

    @classmethod
    def sharing(cls, norm: nn.LayerNorm) -> CoreLayerNorm:
        """A CoreLayerNorm holding ``norm``'s own weight and bias tensors."""
        core = cls(norm.normalized_shape, eps=norm.eps, device="meta")
        core.weight, core.bias = norm.weight, norm.bias
        return core


def use_core_layer_norm(model: nn.Module) -> int:
    """Swap every ``nn.LayerNorm`` of ``model`` over one axis, with weight and bias, for a
    :class:`CoreLayerNorm` sharing its parameters; returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm and len(child.normalized_shape) == 1 and child.bias is not None:
                setattr(parent, name, CoreLayerNorm.sharing(child))
                swapped += 1
    return swapped
