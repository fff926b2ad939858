"""The `tensorrt` backend: a TensorRT engine built from the exported ONNX (cached per checkpoint,
TensorRT version, GPU, precision and batch profile; see m2ort_fast.export.tensorrt_engine). Its
tests skip unless `tensorrt` imports and a CUDA GPU is present."""

from __future__ import annotations

import logging
import os

import torch

from m2ort_fast.backends.aoti_backend import run_in_chunks
from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.errors import M2ORTError
from m2ort_fast.export.artifacts import checkpoint_hash, tensorrt_artifact
from m2ort_fast.export.cache import DEFAULT_BATCH_PROFILE, parse_batch_profile
from m2ort_fast.export.tensorrt_engine import TensorRTRunner, require_tensorrt
from m2ort_fast.model import M2ORT
from m2ort_fast.precision import check_backend_precision

log = logging.getLogger(__name__)


class TensorRTBackend:
    """backend(level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56)) -> (B, G)
    float32 on the CPU; CUDA only. Batches larger than the profile's max run in chunks."""

    name = "tensorrt"

    def __init__(
        self,
        model: M2ORT,
        card: ModelCard,
        *,
        device: torch.device,
        precision: str = "fp16",
        checkpoint_path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_profile=DEFAULT_BATCH_PROFILE,
    ):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise M2ORTError("the tensorrt backend needs a CUDA device (use --device cuda, or another backend)")
        self.precision = check_backend_precision(self.name, precision, self.device.type)
        require_tensorrt()
        self.batch_profile = parse_batch_profile(batch_profile)
        sha = checkpoint_hash(model, card, checkpoint_path)
        self.engine_path, reused = tensorrt_artifact(
            model,
            card,
            sha=sha,
            device=self.device,
            precision=precision,
            batch_profile=self.batch_profile,
            cache_dir=cache_dir,
        )
        log.info("tensorrt: %s engine %s", "reusing" if reused else "built", self.engine_path)
        self.runner = TensorRTRunner(self.engine_path, self.device)

    @torch.inference_mode()
    def __call__(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        levels = tuple(x.to(self.device, torch.float32, non_blocking=True) for x in (level1, level2, level3))
        return run_in_chunks(self.runner, levels, self.runner.max_batch)
