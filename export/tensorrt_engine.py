"""TensorRT engines built from the exported ONNX file, and their runtime.

The code follows TensorRT's current Python API (10.x/11.x); the tests that exercise it skip unless
``tensorrt`` imports and a CUDA GPU is present.

Build (:func:`build_engine`):
* a strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``: required for this in
  10.12+, where weak typing is deprecated; always on and the flag ignored in 11.x). Networks are
  always explicit-batch since 10.0. Precision therefore comes from the graph: the fp16/bf16 ONNX
  export casts the weights and activations inside the graph (float32 in and out). The
  ``BuilderFlag.FP16``/``BF16`` precision flags are the weakly typed way and were removed in 11.x;
  TF32 stays allowed for fp32 builds (TensorRT's default).
* the ONNX file parsed with ``OnnxParser.parse_from_file``;
* one optimization profile over the batch dimension (min, opt, max) for the three inputs;
* a timing cache file shared by all builds on the device (read before, written after), so a
  rebuild for another checkpoint of the same variant skips most kernel timing;
* the serialized engine written under a temporary name then renamed, and a JSON sidecar
  (``<engine>.json``) with the build info.

Run (:class:`TensorRTRunner`): ``set_input_shape`` + ``set_tensor_address`` on torch CUDA tensors,
``execute_async_v3`` on the current torch CUDA stream.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from m2ort_fast.errors import M2ORTError
from m2ort_fast.export.cache import DEFAULT_BATCH_PROFILE
from m2ort_fast.export.onnx_export import INPUT_NAMES, OUTPUT_NAME, read_onnx_metadata

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 4 << 30  # scratch memory the builder may use for tactics


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot be used here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt not importable"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def require_tensorrt():
    reason = tensorrt_unavailable_reason()
    if reason:
        raise M2ORTError(f"the tensorrt backend cannot run here: {reason}")
    import tensorrt as trt

    return trt


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    batch_profile: tuple[int, int, int] = DEFAULT_BATCH_PROFILE,
    timing_cache_path: str | os.PathLike | None = None,
    workspace_bytes: int = WORKSPACE_BYTES,
) -> dict:
    """Build a TensorRT engine from ``onnx_path`` into ``engine_path`` (+ ``.json`` sidecar).
    Returns the sidecar's content."""
    trt = require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    start = time.perf_counter()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise M2ORTError(f"TensorRT's ONNX parser refused the model: {errors}", onnx_path)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        per_sample = tuple(tensor.shape)[1:]  # (3, S, S); the batch dim is -1 (dynamic)
        low, opt, high = ((b, *per_sample) for b in batch_profile)
        profile.set_shape(tensor.name, low, opt, high)
    config.add_optimization_profile(profile)

    timing_cache = None
    if timing_cache_path is not None:
        timing_cache_path = Path(timing_cache_path)
        previous = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
        timing_cache = config.create_timing_cache(previous)
        config.set_timing_cache(timing_cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise M2ORTError("TensorRT failed to build an engine (see the TensorRT log above)", onnx_path)
    tmp = engine_path.with_name(f".{engine_path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(memoryview(serialized))
    os.replace(tmp, engine_path)
    if timing_cache is not None and timing_cache_path is not None:
        _write_atomic(timing_cache_path, memoryview(config.get_timing_cache().serialize()))

    onnx_meta = read_onnx_metadata(onnx_path)
    sidecar = {
        "format": "tensorrt",
        "tensorrt_version": trt.__version__,
        "device": torch.cuda.get_device_name(),
        "compute_capability": list(torch.cuda.get_device_capability()),
        "precision": onnx_meta.get("precision", "fp32"),
        "strongly_typed": True,
        "batch_profile": list(batch_profile),
        "inputs": list(INPUT_NAMES),
        "output": OUTPUT_NAME,
        "onnx": str(onnx_path),
        "checkpoint_sha256": onnx_meta.get("checkpoint_sha256"),
        "timing_cache": str(timing_cache_path) if timing_cache_path else None,
        "workspace_bytes": workspace_bytes,
        "build_s": round(time.perf_counter() - start, 2),
        "card": onnx_meta.get("m2ort_fast"),
    }
    _write_atomic(sidecar_path(engine_path), json.dumps(sidecar, indent=2).encode())
    log.info("TensorRT engine built in %.1f s: %s", sidecar["build_s"], engine_path)
    return sidecar


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


_TORCH_DTYPES: dict[object, torch.dtype] = {}  # TensorRT's DataType -> torch's, filled on first use


def _torch_dtype(trt, trt_dtype) -> torch.dtype:
    if not _TORCH_DTYPES:
        _TORCH_DTYPES.update(
            {
                trt.float32: torch.float32,
                trt.float16: torch.float16,
                trt.bfloat16: torch.bfloat16,
                trt.int32: torch.int32,
                trt.int64: torch.int64,
            }
        )
    return _TORCH_DTYPES[trt_dtype]


class TensorRTRunner:
    """A deserialized engine with one execution context.

    runner(level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56)) CUDA float32
    -> (B, n_genes) CUDA float32, B within the engine's batch profile."""

    def __init__(self, engine_path: str | os.PathLike, device: torch.device):
        trt = require_tensorrt()
        self._trt = trt
        self.device = torch.device(device)
        self.path = Path(engine_path)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(_logger(trt))
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise M2ORTError(
                    "TensorRT could not deserialize the engine (built by another TensorRT version or for another GPU?)",
                    self.path,
                )
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(self.input_names) != sorted(INPUT_NAMES) or self.output_names != [OUTPUT_NAME]:
            raise M2ORTError(
                f"engine has tensors {names}, expected inputs {list(INPUT_NAMES)} and output {OUTPUT_NAME!r}", self.path
            )
        # get_tensor_profile_shape -> [min, opt, max] shapes of profile 0
        self.max_batch = int(self.engine.get_tensor_profile_shape(INPUT_NAMES[0], 0)[2][0])

    def __call__(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        stream = torch.cuda.current_stream(self.device)
        keep_alive = []
        for name, x in zip(INPUT_NAMES, (level1, level2, level3), strict=True):
            x = x.to(self.device, _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))).contiguous()
            keep_alive.append(x)
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        out_shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
        out = torch.empty(
            out_shape, device=self.device, dtype=_torch_dtype(self._trt, self.engine.get_tensor_dtype(OUTPUT_NAME))
        )
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for engine {self.path}")
        # the inputs must stay alive until the stream has consumed them
        for x in keep_alive:
            x.record_stream(stream)
        return out
