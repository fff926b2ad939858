"""The `aoti` backend: an AOTInductor package of the whole model (compiled on first use for this
device, precision and batch profile, then reused from the cache; see m2ort_fast.export.aoti).
On CUDA the package embeds the Triton kernels of m2ort_fast.kernels when they are exported as
traceable ops (see export.aoti.kernel_ops)."""

from __future__ import annotations

import logging
import os

import torch

from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.export.aoti import load_aoti
from m2ort_fast.export.artifacts import aoti_artifact, checkpoint_hash
from m2ort_fast.export.cache import DEFAULT_BATCH_PROFILE, parse_batch_profile
from m2ort_fast.model import M2ORT
from m2ort_fast.precision import check_backend_precision

log = logging.getLogger(__name__)


def run_in_chunks(run, levels: tuple[torch.Tensor, ...], max_batch: int) -> torch.Tensor:
    """run(*levels) over chunks of at most ``max_batch`` spots (the artifact's largest batch),
    concatenated on the CPU as float32: (B, G)."""
    batch = levels[0].shape[0]
    outputs = [
        run(*(x[start : start + max_batch] for x in levels)).float().cpu() for start in range(0, batch, max_batch)
    ]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class AOTIBackend:
    """backend(level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56)) -> (B, G)
    float32 on the CPU. ``batch_profile`` (min, opt, max): the batch sizes compiled for; larger
    batches run in chunks of max."""

    name = "aoti"

    def __init__(
        self,
        model: M2ORT,
        card: ModelCard,
        *,
        device: torch.device,
        precision: str = "fp32",
        checkpoint_path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_profile=DEFAULT_BATCH_PROFILE,
        use_kernels: bool = True,
    ):
        self.device = torch.device(device)
        self.precision = check_backend_precision(self.name, precision, self.device.type)
        self.batch_profile = parse_batch_profile(batch_profile)
        sha = checkpoint_hash(model, card, checkpoint_path)
        self.package_path, reused = aoti_artifact(
            model,
            card,
            sha=sha,
            device=self.device,
            precision=precision,
            batch_profile=self.batch_profile,
            use_kernels=use_kernels,
            cache_dir=cache_dir,
        )
        log.info("aoti: %s package %s", "reusing" if reused else "compiled", self.package_path)
        self.runner = load_aoti(self.package_path, self.device)

    @torch.inference_mode()
    def __call__(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        levels = tuple(x.to(self.device, torch.float32, non_blocking=True) for x in (level1, level2, level3))
        return run_in_chunks(self.runner, levels, self.batch_profile[2])
