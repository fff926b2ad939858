"""Inference backends behind one small interface.

A backend is made from the reference model (weights) and its :class:`ModelCard`, and is called
with the three levels of a batch of spots, already normalised:

    backend(level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56))
        -> (B, n_genes) float32 tensor on the CPU

Inputs are float32 CPU tensors (possibly pinned), or bfloat16 ones where the backend's
``input_dtype`` says so (the streamed host path hands the torch backend in bf16 its batches in bf16,
rounded as the model's own cast would), and as tokens (B, 196, p*p*3) where its
``input_token_px`` says so (the torch backend of an LDPE model on the CPU); each backend moves them
to its device and precision. Optional attributes the engine reads: ``input_dtype``,
``input_token_px`` and ``concurrent_calls``
(:mod:`m2ort_fast.backends.workers`). Backends register here by name and are imported only when asked for, so that a
missing optional toolkit (Triton, onnxruntime, TensorRT) only matters to the backend that needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import torch

from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.device import resolve_device
from m2ort_fast.errors import M2ORTError
from m2ort_fast.model import M2ORT

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


# The optional toolkit each top-level module name belongs to: the pip extra that installs it.
TOOLKIT_EXTRAS = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "triton": "triton",
    "tensorrt": "tensorrt",
}


def register_backend(name: str, target: str) -> None:
    """Register a backend factory given as "package.module:callable" (imported when first asked for)."""
    _REGISTRY[name] = target


def unregister_backend(name: str) -> None:
    """Forget the backend called ``name`` (no error when there is none)."""
    _REGISTRY.pop(name, None)


def backend_names() -> list[str]:
    return list(_REGISTRY)


def backend_target(name: str) -> str:
    """The "package.module:callable" registered as ``name``; M2ORTError naming the known ones if none."""
    if name not in _REGISTRY:
        raise M2ORTError(f"unknown backend {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def backend_factory(name: str) -> Callable[..., Backend]:
    """The factory of the backend called ``name``, its module imported now: called as
    ``factory(model, card, device=..., **options)``. ImportError when its module cannot be imported
    (an optional toolkit imported at module level); M2ORTError for an unknown name."""
    module_name, attr = backend_target(name).split(":")
    return getattr(importlib.import_module(module_name), attr)


def make_backend(
    name: str, model: M2ORT, card: ModelCard, *, device: str | torch.device = "cpu", **options: Any
) -> Backend:
    """Build the backend called ``name`` for ``model`` on ``device``. A missing optional toolkit
    (onnxruntime, triton, tensorrt) is an M2ORTError naming the pip extra that installs it."""
    try:
        return backend_factory(name)(model, card, device=resolve_device(device), **options)
    except ModuleNotFoundError as exc:
        toolkit = (exc.name or "").split(".")[0]
        if toolkit not in TOOLKIT_EXTRAS:
            raise
        raise M2ORTError(
            f"the {name} backend needs {toolkit}, which is not installed "
            f"(pip install 'm2ort-fast[{TOOLKIT_EXTRAS[toolkit]}]')"
        ) from None
