"""The `triton` backend: the reference model's weights, every encoder block through the fused
Triton kernels of :mod:`m2ort_fast.kernels` (ITMM: LN + q/k/v + flash attention, projection +
residual; ICMM: LN + fc1 + GELU, fc2 + residual).

The patch embedding (LDPE), the class/positional tokens, the final LayerNorm of the class token
and the regression head stay in PyTorch: they are a small share of the FLOPs. On a CUDA GPU the
kernels run in bf16 (default) or fp16 (fp32 also works, with IEEE fp32 products); on the CPU only
Triton's interpreter can run them (TRITON_INTERPRET=1; slow; fp32 or fp16 - bf16 products are
wrong there), which is what the tests use.
"""

from __future__ import annotations

import torch

from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.errors import M2ORTError
from m2ort_fast.kernels.icmm import ICMMWeights, icmm
from m2ort_fast.kernels.itmm import ITMMWeights, itmm
from m2ort_fast.kernels.runtime import check_can_run
from m2ort_fast.model import M2ORT
from m2ort_fast.precision import check_backend_precision, check_precision, torch_dtype


class TritonBackend:
    """backend(level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56)) -> (B, G)
    float32 on the CPU. precision None: bf16 on a GPU, fp32 in the CPU interpreter."""

    name = "triton"

    def __init__(
        self,
        model: M2ORT,
        card: ModelCard,
        *,
        device: torch.device,
        precision: str | None = None,
        checkpoint_path: str | None = None,
    ):
        self.device = torch.device(device)
        if precision is None:
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = check_backend_precision(
            self.name, check_precision(precision, "the triton backend"), self.device.type
        )
        self.dtype = torch_dtype(precision)
        check_can_run(self.device, self.dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        try:
            self.blocks = [
                (ITMMWeights.from_module(block.itmm), ICMMWeights.from_module(block.icmm))
                for block in self.model.encoder_blocks()
            ]
        except ValueError as exc:
            raise M2ORTError(f"model {card.model_id} cannot run on the triton backend: {exc}") from None

    @torch.inference_mode()
    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encoder blocks (kernels) + final norm of the class token: (B, 197, D) -> (B, D)."""
        tokens = tokens.to(self.device, self.dtype).contiguous()
        for itmm_weights, icmm_weights in self.blocks:
            tokens = icmm(itmm(tokens, itmm_weights), icmm_weights)
        return self.model.norm(tokens[:, 0])

    def __call__(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        return self.forward_on_device(level1, level2, level3).cpu()

    @torch.inference_mode()
    def forward_on_device(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        """(B, G) float32 predictions left on the backend's device (no host synchronisation)."""
        levels = [x.to(self.device, self.dtype, non_blocking=True) for x in (level1, level2, level3)]
        tokens = self.model.embed(*levels)
        return self.model.head(self.encode(tokens)).float()
