"""The reference backend: the eager PyTorch model, on CPU or GPU, fp32/fp16/bf16."""

from __future__ import annotations

import torch

from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.model import M2ORT
from m2ort_fast.precision import torch_dtype


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
    ):
        self.device = device
        self.dtype = torch_dtype(precision)
        self.model = model.to(device=device, dtype=self.dtype).eval()

    @torch.inference_mode()
    def __call__(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        levels = [x.to(self.device, self.dtype, non_blocking=True) for x in (level1, level2, level3)]
        return self.model(*levels).float().cpu()
