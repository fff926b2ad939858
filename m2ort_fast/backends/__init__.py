"""Inference backends behind one small interface.

A backend is made from the reference model (weights) and its :class:`ModelCard`, and is called
with the three levels of a batch of spots, already normalised:

    backend(level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56))
        -> (B, n_genes) float32 tensor on the CPU

Inputs are float32 CPU tensors (possibly pinned); each backend moves them to its device and
precision. Backends register here by name and are imported only when asked for, so that a
missing optional toolkit (Triton, onnxruntime, TensorRT) only matters to the backend that needs it.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

from ..checkpoint import ModelCard
from ..errors import M2ORTError
from ..model import M2ORT

# name -> "module:factory"; the factory is called as factory(model, card, device=..., **options), where
# options always hold `precision` and `checkpoint_path` (the file the weights came from, or None: compiled
# backends key their caches on it) and may hold backend-specific settings.
_REGISTRY: dict[str, str] = {
    "torch": "m2ort_fast.backends.torch_backend:TorchBackend",
    "onnxruntime": "m2ort_fast.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "aoti": "m2ort_fast.backends.aoti_backend:AOTIBackend",
    "tensorrt": "m2ort_fast.backends.tensorrt_backend:TensorRTBackend",
    "auto": "m2ort_fast.backends.auto:AutoBackend",
    "triton": "m2ort_fast.backends.triton_backend:TritonBackend",
}


class Backend(Protocol):
    name: str
    device: torch.device

    def __call__(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor: ...


def register_backend(name: str, target: str) -> None:
    """Register a backend factory given as "package.module:callable"."""
    _REGISTRY[name] = target


def backend_names() -> list[str]:
    return list(_REGISTRY)


def make_backend(name: str, model: M2ORT, card: ModelCard, *, device: str | torch.device = "cpu", **options) -> Backend:
    """Build the backend called ``name`` for ``model`` on ``device``."""
    if name not in _REGISTRY:
        raise M2ORTError(f"unknown backend {name!r}; available: {', '.join(_REGISTRY)}")
    module_name, attr = _REGISTRY[name].split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(model, card, device=resolve_device(device), **options)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' -> cuda when there is one, else cpu; a cuda device asked for without CUDA is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise M2ORTError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)") from None
    if device.type not in ("cpu", "cuda"):
        raise M2ORTError(f"device {device} is not supported (use cpu, cuda, cuda:N or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise M2ORTError(f"device {device} asked for, but this machine has no CUDA GPU (use --device cpu)")
    return device
