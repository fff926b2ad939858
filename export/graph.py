"""The graph that every compiled artifact (ONNX, AOTInductor, and TensorRT through the ONNX file)
is made from: the reference model's weights, float32 in and out, ``precision`` inside.

    ExportGraph(model, dtype)(level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56))
        -> (B, n_genes) float32

It computes the reference's function (:mod:`m2ort_fast.model`, which stays the ground truth) with
two rewrites that are exact in real arithmetic; the parity tests bound what rounding they move:

* **Attention is one ``scaled_dot_product_attention`` op** (``fused_attention``, the default)
  instead of matmul -> scale -> softmax -> matmul. Inductor lowers it on CUDA to the flash /
  memory-efficient kernels, which never write the (B, heads, 197, 197) score matrix to memory; the
  ONNX exporter at opset 18 writes it as MatMul/Softmax, left to onnxruntime's and TensorRT's own
  graph fusions. An AOTInductor package for the CPU keeps the literal form
  (``fused_attention=False``): Inductor lowers the fused op there to PyTorch's CPU flash-attention
  kernel, slower than its own GEMMs and fused softmax (`tiny`, batch 64, 2-core AMD EPYC: 1.3x in
  bf16, 1.2x in fp32).
* **The last block runs for the class token only.** The head reads nothing but the class token,
  so in the last block the 196 patch tokens' queries, attention rows, output projection and MLP
  are dead; only the keys and values of every token are needed. That removes about 1/depth of
  the encoder less its last k/v projections (~13% of the FLOPs of ``small``).

With ``block_ops`` (the traceable Triton ops of :mod:`m2ort_fast.kernels`, on CUDA), every block
but the last runs through those ops; the last, class-token-only block stays in PyTorch for the
compiler.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from m2ort_fast.model import ICMM, IMAGE_SIZES_PX, ITMM, M2ORT
from m2ort_fast.precision import torch_dtype

# Part of every artifact's cache key: bump it when the exported graph's computation changes, so
# that artifacts built from an older graph are not reused. 2: fused attention op, class-token-only last
# block. 3: the attention form is a choice (AOTInductor on the CPU: literal).
GRAPH_VERSION = 3


class ExportGraph(nn.Module):
    """What is exported: the model in ``dtype`` with the rewrites above, float32 in and out.

    forward(level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56)) float32
    -> (B, n_genes) float32.

    ``block_ops``: ``{"itmm": f, "icmm": g}`` with ``f(x, block.itmm)``, ``g(x, block.icmm)`` mapping
    (B, T, D) -> (B, T, D); used for every block but the last. ``fused_attention``: the attention as
    one op (see the module's docstring)."""

    def __init__(
        self,
        model: M2ORT,
        dtype: torch.dtype = torch.float32,
        block_ops: dict[str, Callable] | None = None,
        fused_attention: bool = True,
    ):
        super().__init__()
        self.dtype = dtype
        self.model = model
        self.block_ops = block_ops
        self.fused_attention = fused_attention

    def _block(self, itmm: ITMM, icmm: ICMM, tokens: torch.Tensor) -> torch.Tensor:
        if self.block_ops is not None:
            return self.block_ops["icmm"](self.block_ops["itmm"](tokens, itmm), icmm)
        return icmm(itmm(tokens, fused=self.fused_attention))

    def forward(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        model = self.model
        tokens = model.embed(*(x.to(self.dtype) for x in (level1, level2, level3)))
        *blocks, last = model.encoder_blocks()
        for block in blocks:
            tokens = self._block(block.itmm, block.icmm, tokens)
        cls = last.icmm(last.itmm(tokens, query_tokens=1, fused=self.fused_attention))  # (B, 1, D)
        return model.head(model.norm(cls[:, 0])).float()


def export_model(
    model: M2ORT,
    precision: str,
    device: torch.device | str = "cpu",
    block_ops: dict[str, Callable] | None = None,
    fused_attention: bool = True,
) -> ExportGraph:
    """The model wrapped for export in ``precision`` on ``device``; the caller's model is not changed."""
    dtype = torch_dtype(precision)
    device = torch.device(device)
    p = next(model.parameters())
    if p.dtype != dtype or p.device != device:
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return ExportGraph(model.eval(), dtype, block_ops, fused_attention).eval()


def sample_inputs(batch: int = 2, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Random float32 levels (B, 3, S, S) for S in 224, 112, 56. Batch 2, not 1: an example batch
    of 1 would let export specialise the batch dimension."""
    return tuple(torch.rand(batch, 3, s, s, device=device) for s in IMAGE_SIZES_PX)
