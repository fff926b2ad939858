"""The reference backend: the eager PyTorch model, on CPU or GPU, fp32/fp16/bf16.

fp32 runs the reference model as written (attention as matmul -> softmax -> matmul). Below fp32
on a GPU the attention is the one fused ``scaled_dot_product_attention`` op (``set_fused_attention``):
the same math, with the softmax accumulated in float32 inside the op rather than on a bf16/fp16
score matrix. On a CPU the fused op wins only with AMX (``device.cpu_has_amx``): without it
PyTorch's CPU flash-attention kernel runs its (T x T) blocks at a fraction of the bf16 GEMM rate,
and the literal form's two batched GEMMs and bf16 softmax ran `tiny` 1.2-1.4x and `small` 1.15x
faster on a 2-core AMD EPYC (AVX512_BF16, no AMX); on a 2-core Xeon with AMX the fused op ran
`tiny` 1.07-1.14x and `small` 1.37x faster than the literal form (`bench/backends.py` rows
torch-literal vs torch-fused, docs/backends.md), within the same quality bound
(bench/precision.py). ``fused_attention`` True / False overrides the choice.

A bf16 model on a CPU with AVX-512 runs its LayerNorms through the extension's kernel
(``backends.layer_norm``: torch's function in float32 by another route to the variance, 1.2-2.3x
faster); ``core_layer_norm`` True / False overrides the choice.

On the CPU a batch runs through the model in chunks of ``chunk_spots`` spots (default 16; the last
padded to it, so that a spot's prediction does not depend on its batch, its batch-mates or the
threads: see ``run_chunk``): at batch 64 the intermediates (level 1's patches alone are 19-38 MB)
are too large for the allocator to keep, so each batch faulted them in afresh and missed the
caches; `tiny` ran 1.2-1.3x faster in chunks of 16 or 32 (bench/backends.py, issue 26).
"""

from __future__ import annotations

import torch

from m2ort_fast.backends.layer_norm import core_layer_norm_available, use_core_layer_norm
from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.device import cpu_has_amx
from m2ort_fast.errors import M2ORTError
from m2ort_fast.model import M2ORT, PATCH_SIZES_PX, set_fused_attention
from m2ort_fast.precision import check_backend_precision, torch_dtype


class TorchBackend:
    name = "torch"

    def __init__(
        self,
        model: M2ORT,
        card: ModelCard,
        *,
        device: torch.device,
        precision: str = "fp32",
        checkpoint_path: str | None = None,
        chunk_spots: int | None = 16,
        fused_attention: bool | None = None,
        core_layer_norm: bool | None = None,
    ):
        if chunk_spots is not None and chunk_spots < 1:
            raise M2ORTError(f"chunk_spots must be at least 1, got {chunk_spots}")
        self.device = torch.device(device)
        self.precision = check_backend_precision(self.name, precision, self.device.type)
        self.dtype = torch_dtype(precision)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if fused_attention is None:  # see the module's docstring
            fused_attention = precision != "fp32" and (self.device.type != "cpu" or cpu_has_amx())
        set_fused_attention(self.model, fused_attention)
        if core_layer_norm is None:  # see backends.layer_norm
            core_layer_norm = self.dtype == torch.bfloat16 and self.device.type == "cpu" and core_layer_norm_available()
        # a kernel for bf16 CPU tensors: elsewhere the swapped modules would only call torch's
        on_kernel = bool(core_layer_norm) and self.dtype == torch.bfloat16 and self.device.type == "cpu"
        self.core_layer_norm = on_kernel and use_core_layer_norm(self.model) > 0
        # a GPU wants whole batches; on the CPU smaller model calls keep the intermediates reused
        self.chunk_spots = chunk_spots if self.device.type == "cpu" else None
        # on the CPU, calls from several threads at once (each on its own intra-op threads) are safe
        # and release the GIL: the host path runs one per core (backends.workers)
        self.concurrent_calls = self.device.type == "cpu"
        # a bf16 model's first op casts its float32 input: the host path hands it bf16 batches assembled
        # with that rounding (half the bytes to write, and no cast); other dtypes take float32
        self.input_dtype = torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float32
        # LDPE's first step lays each level out as tokens (two copies, 10-17% of `tiny` bf16 on the
        # CPU): the host path writes them so instead, straight from the uint8 patches
        self.input_token_px = PATCH_SIZES_PX if model.token_embed is None and self.device.type == "cpu" else None

    def __call__(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        return self.forward_on_device(level1, level2, level3).cpu()

    @torch.inference_mode()
    def forward_on_device(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        """(B, G) float32 predictions left on the backend's device (no host synchronisation). Each
        level: images (B, 3, H, W), or tokens (B, 196, p*p*3) where ``input_token_px`` is set."""
        # float32 in: the model casts each level in its first copy (patchify), not in a pass of its own
        levels = [x.to(self.device, non_blocking=True) for x in (level1, level2, level3)]
        if self.chunk_spots is None:
            return self.model(*levels).float()
        chunks = zip(*(x.split(self.chunk_spots) for x in levels), strict=True)
        return torch.cat([self.run_chunk(chunk) for chunk in chunks])

    def run_chunk(self, levels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The model on one chunk, padded with zeros to ``chunk_spots``: (n, G) float32. The GEMM
        kernels the CPU libraries pick depend on the row count and the threads, so a short chunk
        could round differently on one intra-op thread (the host path's) than on several (the naive
        path's); at a fixed row count every spot gets the same bits however it is batched."""
        n, rows = levels[0].shape[0], self.chunk_spots or levels[0].shape[0]
        if n < rows:
            levels = tuple(torch.cat([x, x.new_zeros((rows - n, *x.shape[1:]))]) for x in levels)
        return self.model(*levels)[:n].float()
