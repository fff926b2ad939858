"""The streamed engine: a slide's spots read tile by tile, once, in bounded memory.

    plan = plan_slide_reads(slide, centers_px, card.level_mpp, card.patch_sizes_px)
    run_stream(slide, plan, backend, mean, std, on_batch=lambda spots, predictions: ...)

Whole-slide inference is bound by decoding, not by the model. The naive path
(:func:`m2ort_fast.crop.read_spot_patches`) reads one square per spot per model input, so
neighbouring spots decode the same tiles again and again. Here the read plan (``plan``) decodes
each tile once; ``windows`` hold the decoded rows the current step needs; ``stages`` runs the
threads of a run joined by bounded queues; ``host`` is the data path on the CPU cores
(:func:`run_stream`), ``device`` the one that keeps pixels on the model's device
(:func:`run_stream_on_device`). Both give the naive path's predictions bit for bit.
"""

from m2ort_fast.engine.device import DeviceMemory, reserved_bytes, resolve_data_path, run_stream_on_device
from m2ort_fast.engine.host import StreamStats, iter_streamed_patches, read_step, run_stream
from m2ort_fast.engine.plan import (
    DATA_PATHS,
    DEFAULT_MAX_GPU_MEMORY_MB,
    DEFAULT_MAX_MEMORY_MB,
    ReadPlan,
    check_data_path,
    plan_slide_reads,
)

__all__ = [
    "DATA_PATHS",
    "DEFAULT_MAX_GPU_MEMORY_MB",
    "DEFAULT_MAX_MEMORY_MB",
    "DeviceMemory",
    "ReadPlan",
    "StreamStats",
    "check_data_path",
    "iter_streamed_patches",
    "plan_slide_reads",
    "read_step",
    "reserved_bytes",
    "resolve_data_path",
    "run_stream",
    "run_stream_on_device",
]
