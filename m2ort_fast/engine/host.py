"""The host data path: crop, resize and batches on the CPU cores, the stages overlapped.

    plan = plan_slide_reads(slide, centers_px, card.level_mpp, card.patch_sizes_px)
    run_stream(slide, plan, backend, mean, std, on_batch=lambda spots, predictions: ...)

``run_stream``: threads joined by bounded queues, each stage an NVTX range of its name: ``read``
(decode the planned rows: ``Slide.read_level_region``) -> ``crop`` + ``resize`` + ``assemble``
(patches cut from the decoded windows by ``_core.crop_patches``, resized where the pyramid lacks
the level, normalised into contiguous (pinned on GPU) batches) -> ``model`` (the backend, on its
own CUDA stream on a GPU) -> ``write`` (the caller's sink, e.g. the ``.h5ad`` writer).

The patches equal the naive path's bit for bit: the same squares (both take them from
``crop.spot_squares``), the same decoded pixels (white outside the slide), and the same resize
arithmetic on the same pixels (``_core.resize_patches`` is Pillow's, which the naive path calls,
with the weights computed once per batch and the patches split over threads).
"""

from __future__ import annotations

import contextlib
import logging
import queue
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from m2ort_fast import _core
from m2ort_fast.engine.plan import ReadPlan
from m2ort_fast.engine.stages import Pipe, Stages
from m2ort_fast.engine.windows import Window, advance_windows, stripe_windows
from m2ort_fast.profiling import StageTimer
from m2ort_fast.slide import Slide

log = logging.getLogger(__name__)


@dataclass
class StreamStats:
    spots: int = 0
    batches: int = 0
    plan: dict = field(default_factory=dict)


def iter_streamed_patches(
    slide: Slide,
    plan: ReadPlan,
    *,
    timer: StageTimer | None = None,
    num_threads: int = 0,
    reads: Iterable[list[tuple[int, int, np.ndarray]]] | None = None,
):
    """Yield (spot indices (n,), [patches (n, S_l, S_l, 3) uint8 per model input]) step by step,
    cropped from windows of decoded rows and resized by ``_core.resize_patches`` (bit for bit
    :func:`m2ort_fast.crop.resize_patches`, on ``num_threads`` threads, 0: one per core).
    ``reads``: an iterable of each step's decoded rows (the pipeline's reader thread); None reads
    them here."""
    timer = timer or StageTimer()
    if reads is None:
        reads = (read_step(slide, plan, step, timer) for step in range(plan.n_steps))
    windows: list[Window] = []
    current_stripe = -1
    for step, decoded in enumerate(reads):
        stripe = int(plan.step_stripe[step])
        with timer.stage("crop"):
            if stripe != current_stripe:
                windows = stripe_windows(plan, stripe)
                current_stripe = stripe
            advance_windows(windows, plan, step, decoded)
            del decoded
            spots = plan.step_spots(step)
            crops = {}  # inputs read at the same level and size (a 1,4,16 pyramid's first two) share a crop
            for source, squares in plan.inputs:
                if (source, squares.read_px) not in crops:
                    x0 = plan.stripe_columns[stripe, source, 0]
                    origins = squares.top_left_px[spots] - np.array([x0, windows[source].top], dtype=np.int64)
                    crops[source, squares.read_px] = _core.crop_patches(
                        windows[source].region(), origins, squares.read_px, num_threads=num_threads
                    )
            patches = [crops[source, squares.read_px] for source, squares in plan.inputs]
        with timer.stage("resize"):
            for i, (_, squares) in enumerate(plan.inputs):
                if squares.read_px != squares.size_px:
                    patches[i] = _core.resize_patches(patches[i], squares.size_px, num_threads=num_threads)
            if plan.derived_sizes:
                patches += [
                    _core.resize_patches(patches[0], size, num_threads=num_threads) for size in plan.derived_sizes
                ]
        yield spots, patches


def read_step(
    slide: Slide, plan: ReadPlan, step: int, timer: StageTimer, *, as_tensors: bool = False
) -> list[tuple[int, int, Any]]:
    """Decode the rows ``step`` appends: [(source index, first row, (rows, width, 3) uint8)], numpy
    arrays, or with ``as_tensors`` torch tensors (on the GPU where the reader decodes there: the
    device path's, ``Slide.read_level_region_tensor``)."""
    read = slide.read_level_region_tensor if as_tensors else slide.read_level_region
    out = []
    with timer.stage("read"):
        for source, x0, y0, width, height in plan.step_reads(step):
            out.append((source, y0, read(plan.sources[source], x0, y0, width, height)))
    return out


def run_stream(
    slide: Slide,
    plan: ReadPlan,
    backend,
    mean: Sequence[float],
    std: Sequence[float],
    on_batch: Callable[[np.ndarray, np.ndarray], None],
    *,
    batch_size: int = 64,
    timer: StageTimer | None = None,
    num_threads: int = 0,
    progress: Callable[[int], None] | None = None,
) -> StreamStats:
    """Predict every planned spot; ``on_batch(spot indices (B,), predictions (B, G) float32)``
    runs on the writer thread, in plan order. Stages run on their own threads (read, assemble,
    write; the model on the calling thread) joined by bounded queues; an exception in any stage
    stops them all and is raised here."""
    import torch

    timer = timer or StageTimer()
    stages = Stages("host")
    decoded_q, batch_q, write_q = stages.pipe(), stages.pipe(), stages.pipe()
    device = torch.device(getattr(backend, "device", "cpu"))
    on_gpu = device.type == "cuda"
    stats = StreamStats(plan=plan.stats())

    def reader():
        for step in range(plan.n_steps):
            decoded_q.put(read_step(slide, plan, step, timer))
        decoded_q.put(Pipe.DONE)

    # Input batches come back from the model thread and are refilled: fresh 50 MB arrays per batch
    # would cost a page fault per 4 KB (and pinning, on a GPU) every time.
    free_batches: queue.SimpleQueue = queue.SimpleQueue()

    def batch_buffers(sizes_px: list[tuple[int, int]]) -> list:
        try:
            return free_batches.get_nowait()
        except queue.Empty:  # Pinned host memory on a GPU: the copy to the device overlaps the next batch.
            return [torch.empty((batch_size, 3, h, w), dtype=torch.float32, pin_memory=on_gpu) for h, w in sizes_px]

    def assembler():
        pending: list[tuple[np.ndarray, list[np.ndarray]]] = []  # (spots, patches per input) not yet batched
        n_pending = 0

        def emit(n: int) -> None:
            """Normalise the first n pending spots straight into one batch (no concatenation)."""
            nonlocal n_pending
            with timer.stage("assemble"):
                buffers = batch_buffers([patches.shape[1:3] for patches in pending[0][1]])
                spots, filled = [], 0
                while filled < n:
                    piece_spots, piece = pending[0]
                    take = min(n - filled, len(piece_spots))
                    for patches, buffer in zip(piece, buffers, strict=True):
                        _core.assemble_batch(
                            patches[:take],
                            mean,
                            std,
                            out=buffer.numpy()[filled : filled + take],
                            num_threads=num_threads,
                        )
                    spots.append(piece_spots[:take])
                    if take == len(piece_spots):
                        pending.pop(0)
                    else:
                        pending[0] = (piece_spots[take:], [patches[take:] for patches in piece])
                    filled += take
                n_pending -= n
            batch_q.put((np.concatenate(spots), buffers, n))

        for spots, patches in iter_streamed_patches(
            slide, plan, timer=timer, num_threads=num_threads, reads=iter(decoded_q)
        ):
            if len(spots):
                pending.append((spots, patches))
                n_pending += len(spots)
            while n_pending >= batch_size:
                emit(batch_size)
        if n_pending:
            emit(n_pending)
        batch_q.put(Pipe.DONE)

    def writer():
        for spots, predictions in write_q:
            with timer.stage("write"):
                on_batch(spots, predictions)
        stats.spots = plan.n_spots

    def model():
        # Here, on its own CUDA stream on a GPU, so that the host-to-device copies and kernels of
        # one batch overlap the next batch's assembly.
        cuda_stream = torch.cuda.Stream(device=device) if on_gpu else None
        with torch.cuda.stream(cuda_stream) if on_gpu else contextlib.nullcontext():
            for spots, buffers, n in batch_q:
                with timer.stage("model"):
                    predictions = backend(*[buffer[:n] for buffer in buffers])
                    predictions = predictions.numpy() if hasattr(predictions, "numpy") else np.asarray(predictions)
                free_batches.put(buffers)  # the backend has returned host predictions: the inputs are free
                write_q.put((spots, predictions))
                stats.batches += 1
                if progress is not None:
                    progress(len(spots))
        write_q.put(Pipe.DONE)

    stages.start(reader, assembler, writer)
    stages.run_here(model)
    return stats
