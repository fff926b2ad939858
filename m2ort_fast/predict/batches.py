"""From a slide's spot centres to predictions, in batches: the naive engine (one read per spot
per level) and the streamed one (:mod:`m2ort_fast.engine`), both into a sink with ``write(rows,
predictions)`` and ``written`` (the ``.h5ad`` writer, or :class:`InMemoryPredictions`)."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from m2ort_fast import _core
from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.crop import read_spot_patches
from m2ort_fast.engine import DeviceMemory, ReadPlan, plan_slide_reads, reserved_bytes, run_stream, run_stream_on_device
from m2ort_fast.errors import M2ORTError
from m2ort_fast.profiling import StageTimer
from m2ort_fast.slide import Slide

if TYPE_CHECKING:
    from m2ort_fast.predict.predictor import Predictor

log = logging.getLogger(__name__)


class PredictionSink(Protocol):
    written: np.ndarray  # (n_spots,) bool: rows already predicted (a resumed run skips them)

    def write(self, spots: np.ndarray, predictions: np.ndarray) -> None: ...


class InMemoryPredictions:
    """Where the engines write when nothing goes to disk: (n_spots, n_genes) float32."""

    def __init__(self, n_spots: int, n_genes: int):
        self.predictions = np.zeros((n_spots, n_genes), dtype=np.float32)
        self.written = np.zeros(n_spots, dtype=bool)

    def write(self, spots: np.ndarray, predictions: np.ndarray) -> None:
        self.predictions[spots] = predictions
        self.written[spots] = True


def normalize_levels(
    levels: list[np.ndarray], card: ModelCard, rows: np.ndarray | slice | None = None, num_threads: int = 0
) -> list[torch.Tensor]:
    """uint8 (N, S, S, 3) per level -> float32 (N, 3, S, S) tensors, normalised as the card says."""
    out = []
    for level in levels:
        batch = np.ascontiguousarray(level if rows is None else level[rows])
        out.append(
            torch.from_numpy(_core.assemble_batch(batch, card.pixel_mean, card.pixel_std, num_threads=num_threads))
        )
    return out


def check_finite(predictions: np.ndarray, slide: Slide, predictor: Predictor) -> None:
    """M2ORTError naming the checkpoint when the model gave NaN or infinite predictions: a
    broken checkpoint or a precision the model overflows in; never written as results."""
    finite = np.isfinite(predictions)
    if not finite.all():
        bad = int((~finite.all(axis=1)).sum())
        raise M2ORTError(
            f"the model gave non-finite predictions (NaN or inf) for {bad} of {len(predictions)} "
            f"spots of a batch of {slide.path.name} (backend {predictor.backend_name}, precision "
            f"{predictor.precision}): the checkpoint's weights or this precision are broken; "
            f"nothing was written",
            predictor.checkpoint,
        )


def predict_naive(predictor: Predictor, slide: Slide, centers_px: np.ndarray, timer: StageTimer) -> np.ndarray:
    """Predictions (N, n_genes) float32 for spot centres (N, 2) in level-0 px, one read per spot per level."""
    card, n = predictor.card, len(centers_px)
    batch_size = predictor.batch_for(n)
    predictions = np.empty((n, len(card.genes)), dtype=np.float32)
    starts = range(0, n, batch_size)
    if predictor.progress and n > batch_size:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=slide.path.name, unit="batch", leave=False)
    for start in starts:
        stop = min(start + batch_size, n)
        with timer.stage("read"):
            patches = read_spot_patches(
                slide, centers_px[start:stop], card.level_mpp, card.patch_sizes_px, level_source=predictor.level_source
            )
        with timer.stage("assemble"):
            levels = normalize_levels(patches, card, num_threads=predictor.num_threads)
        with timer.stage("model"):
            predictions[start:stop] = predictor.backend(*levels).numpy()
        check_finite(predictions[start:stop], slide, predictor)
    return predictions


def predict_streamed(
    predictor: Predictor, slide: Slide, centers_px: np.ndarray, timer: StageTimer, sink: PredictionSink
) -> dict:
    """Predictions streamed from the read plan straight into ``sink`` (bounded memory); only the
    spots a resumed staging folder has not written yet are read and predicted. -> the engine's
    statistics (read plan, resumed spots, data path, device peak)."""
    todo = np.flatnonzero(~sink.written)
    resumed_spots = int(len(centers_px) - len(todo))
    if resumed_spots:
        log.info(
            "%s: resuming an interrupted run: %d of %d spots were already predicted",
            slide.path.name,
            resumed_spots,
            len(centers_px),
        )
    if not len(todo):
        return {"spots": len(centers_px), "resumed_spots": resumed_spots}
    data_path = predictor.data_path_for(slide)
    on_device = data_path == "device"
    batch_size = predictor.batch_for(len(todo))
    with timer.stage("plan"):
        plan = _plan(predictor, slide, centers_px[todo], on_device, batch_size)

    def write_batch(rows: np.ndarray, predictions: np.ndarray) -> None:
        check_finite(predictions, slide, predictor)
        sink.write(todo[rows], predictions)

    card, bar = predictor.card, None
    if predictor.progress and len(todo) > batch_size:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=slide.path.name, unit="spot", leave=False)
    args = (slide, plan, predictor.backend, card.pixel_mean, card.pixel_std, write_batch)
    progress = bar.update if bar else None
    memory = DeviceMemory(predictor.backend.device) if on_device else None
    try:
        if memory is not None:
            run_stream_on_device(*args, batch_size=batch_size, timer=timer, progress=progress, memory=memory)
        else:
            run_stream(
                *args,
                batch_size=batch_size,
                timer=timer,
                progress=progress,
                num_threads=predictor.num_threads,
            )
    finally:
        if bar is not None:
            bar.close()
    stats = {**plan.stats(), "resumed_spots": resumed_spots, "data_path": data_path}
    if memory is not None:
        stats["device_peak_mb"] = round(memory.peak_bytes / 2**20, 1)
    return stats


def _plan(predictor: Predictor, slide: Slide, centers_px: np.ndarray, on_device: bool, batch_size: int) -> ReadPlan:
    card = predictor.card
    reserved = None
    if on_device:
        reserved = functools.partial(
            reserved_bytes, batch_size=batch_size, kernel="auto", device=predictor.backend.device
        )
    return plan_slide_reads(
        slide,
        centers_px,
        card.level_mpp,
        card.patch_sizes_px,
        level_source=predictor.level_source,
        max_memory_mb=predictor.max_gpu_memory_mb if on_device else predictor.max_memory_mb,
        reserved_bytes=reserved,
        bound_option="--max-gpu-memory-mb" if on_device else "--max-memory-mb",
    )
