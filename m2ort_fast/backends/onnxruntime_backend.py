"""The `onnxruntime` backend: the model exported to ONNX (cached, see m2ort_fast.export) run by
onnxruntime. CPU provider on the CPU (fp32, fp16, or int8: the Linear layers dynamically quantized,
see export.onnx_export.quantize_int8; onnxruntime has no bf16 CPU kernels), CUDA provider on a GPU
when this onnxruntime build has it."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.errors import M2ORTError
from m2ort_fast.export.artifacts import checkpoint_hash, onnx_artifact
from m2ort_fast.export.onnx_export import INPUT_NAMES, read_onnx_card
from m2ort_fast.model import M2ORT
from m2ort_fast.precision import BATCH_DEPENDENT_WARNING, check_backend_precision, depends_on_batch

log = logging.getLogger(__name__)

GRAPH_OPTIMIZATION = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


class OnnxRuntimeBackend:
    """backend(level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56)) -> (B, G)
    float32 on the CPU.

    ``onnx_path``: use this exported file instead of exporting (its card must match ``card``).
    ``num_threads``: onnxruntime's intra-op threads (default: torch's, so comparisons with the
    torch backend use the same threads). ``graph_optimization``: disable/basic/extended/all.
    ``spin``: let onnxruntime's threads spin-wait between ops and runs (its default). Off here: a
    spinning pool keeps the cores busy after each batch, starving the streamed engine's other
    stages (and, in a benchmark, the backend timed next: on 2 cores the eager model ran 10-100x
    slower right after a spinning session)."""

    name = "onnxruntime"

    def __init__(
        self,
        model: M2ORT,
        card: ModelCard,
        *,
        device: torch.device,
        precision: str = "fp32",
        checkpoint_path: str | os.PathLike | None = None,
        onnx_path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        num_threads: int | None = None,
        graph_optimization: str = "all",
        spin: bool = False,
    ):
        import onnxruntime as ort

        self.device = torch.device(device)
        self.precision = check_backend_precision(self.name, precision, self.device.type)
        if depends_on_batch(precision):
            log.warning("onnxruntime %s: %s", precision, BATCH_DEPENDENT_WARNING)
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise M2ORTError(
                    "this onnxruntime build has no CUDA provider (install onnxruntime-gpu, or use --device cpu)"
                )
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        if onnx_path is None:
            sha = checkpoint_hash(model, card, checkpoint_path)
            onnx_path, reused = onnx_artifact(model, card, sha=sha, precision=precision, cache_dir=cache_dir)
            log.debug("onnxruntime: %s ONNX %s", "reusing" if reused else "exported", onnx_path)
        elif read_onnx_card(onnx_path).genes != card.genes:
            raise M2ORTError("ONNX file was exported for another gene panel than the checkpoint's", onnx_path)
        self.onnx_path = onnx_path
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1  # one chain of ops: parallelism is inside each op
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[graph_optimization])
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)

    def __call__(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        feed = {
            name: np.ascontiguousarray(x.detach().cpu().float().numpy())
            for name, x in zip(INPUT_NAMES, (level1, level2, level3), strict=True)
        }
        return torch.from_numpy(self.session.run(None, feed)[0])
