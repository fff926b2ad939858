"""Get-or-build of each compiled artifact through the cache: what backends and the CLI call.

Each function returns (path, reused). The key is (checkpoint sha256, toolkit version, device
name, precision, batch profile), see :mod:`.cache`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from m2ort_fast.checkpoint import ModelCard, file_sha256
from m2ort_fast.export import aoti, onnx_export, tensorrt_engine
from m2ort_fast.export.cache import (
    ArtifactKey,
    cache_root,
    cached_artifact,
    device_name,
    parse_batch_profile,
    weights_sha256,
)
from m2ort_fast.export.graph import GRAPH_VERSION
from m2ort_fast.model import M2ORT
from m2ort_fast.precision import check_precision, is_quantized


def checkpoint_hash(model: M2ORT, card: ModelCard, checkpoint_path: str | os.PathLike | None = None) -> str:
    """sha256 of the checkpoint file when its path is known (cheap to trust: load_checkpoint
    built ``model`` from it), else of the in-memory weights and card."""
    if checkpoint_path is not None:
        return file_sha256(checkpoint_path)
    return weights_sha256(model, card)


def onnx_key(sha: str, precision: str) -> ArtifactKey:
    toolkit = f"torch {torch.__version__}, onnx opset {onnx_export.OPSET}, graph v{GRAPH_VERSION}"
    if is_quantized(precision):  # quantized by onnxruntime's quantizer: its version is part of the file
        import onnxruntime

        toolkit += f", onnxruntime {onnxruntime.__version__} quantize_dynamic"
    return ArtifactKey("onnx", sha, toolkit, "portable", check_precision(precision), None)


def onnx_artifact(
    model: M2ORT, card: ModelCard, *, sha: str, precision: str = "fp32", cache_dir: str | os.PathLike | None = None
) -> tuple[Path, bool]:
    return cached_artifact(
        onnx_key(sha, precision),
        "model.onnx",
        lambda path: onnx_export.export_onnx(model, card, path, precision=precision, checkpoint_sha256=sha),
        cache_dir,
    )


def aoti_key(
    sha: str, device: torch.device, precision: str, batch_profile: tuple[int, int, int], use_kernels: bool = True
) -> ArtifactKey:
    return ArtifactKey(
        "aoti",
        sha,
        aoti.toolkit_version(device, use_kernels),
        device_name(device),
        check_precision(precision),
        parse_batch_profile(batch_profile),
    )


def aoti_artifact(
    model: M2ORT,
    card: ModelCard,
    *,
    sha: str,
    device: torch.device,
    precision: str = "fp32",
    batch_profile: tuple[int, int, int],
    use_kernels: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Path, bool]:
    return cached_artifact(
        aoti_key(sha, device, precision, batch_profile, use_kernels),
        "model.pt2",
        lambda path: aoti.compile_aoti(
            model, card, path, device=device, precision=precision, batch_profile=batch_profile, use_kernels=use_kernels
        ),
        cache_dir,
    )


def tensorrt_key(sha: str, device: torch.device, precision: str, batch_profile: tuple[int, int, int]) -> ArtifactKey:
    import tensorrt as trt

    toolkit = (
        f"tensorrt {trt.__version__}, torch {torch.__version__}, onnx opset {onnx_export.OPSET}, graph v{GRAPH_VERSION}"
    )
    return ArtifactKey(
        "tensorrt", sha, toolkit, device_name(device), check_precision(precision), parse_batch_profile(batch_profile)
    )


def timing_cache_path(device: torch.device, cache_dir: str | os.PathLike | None = None) -> Path:
    """One TensorRT timing cache per (TensorRT version, GPU), shared by every engine built there."""
    import tensorrt as trt

    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{trt.__version__}-{device_name(device)}").strip("-")
    folder = cache_root(cache_dir) / "tensorrt"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"timing-{slug}.cache"


def tensorrt_artifact(
    model: M2ORT,
    card: ModelCard,
    *,
    sha: str,
    device: torch.device,
    precision: str = "fp16",
    batch_profile: tuple[int, int, int],
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Path, bool]:
    tensorrt_engine.require_tensorrt()
    onnx_path, _ = onnx_artifact(model, card, sha=sha, precision=precision, cache_dir=cache_dir)

    def build(path: Path) -> None:
        with torch.cuda.device(device):
            tensorrt_engine.build_engine(
                onnx_path, path, batch_profile=batch_profile, timing_cache_path=timing_cache_path(device, cache_dir)
            )

    return cached_artifact(tensorrt_key(sha, device, precision, batch_profile), "model.plan", build, cache_dir)
