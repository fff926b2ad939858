"""The host data path: crop, resize and batches on the CPU cores, the stages overlapped.

    plan = plan_slide_reads(slide, centers_px, card.level_mpp, card.patch_sizes_px)
    run_stream(slide, plan, backend, mean, std, on_batch=lambda spots, predictions: ...)

``run_stream`` (a :class:`HostStream`, one method per stage): threads joined by bounded queues,
each stage an NVTX range of its name: ``read`` (decode the planned rows:
``Slide.read_level_region``) -> ``crop`` + ``resize`` + ``assemble`` (patches cut from the decoded
windows by ``_core.crop_patches``, resized where the pyramid lacks the level, normalised into
contiguous (pinned on GPU) batches) -> ``model`` (the backend, on its own CUDA stream on a GPU) ->
``write`` (the caller's sink, e.g. the ``.h5ad`` writer).

The patches equal the naive path's bit for bit: the same squares (both take them from
``crop.spot_squares``), the same decoded pixels (white outside the slide), and the same resize
arithmetic on the same pixels (``_core.resize_patches`` is Pillow's, which the naive path calls,
with the weights computed once per batch and the patches split over threads).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from m2ort_fast import _core
from m2ort_fast.backends.workers import input_dtype, input_token_px, model_workers
from m2ort_fast.engine.plan import ReadPlan
from m2ort_fast.engine.stages import Pipe, Stages
from m2ort_fast.engine.windows import Window, advance_windows, stripe_windows
from m2ort_fast.profiling import StageTimer
from m2ort_fast.slide import Slide

log = logging.getLogger(__name__)


# Spots cut, resized and assembled together: a plan step (up to 256 spots, 38 MB of level-0
# squares) went through memory three times (crop, resize, assembly); pieces of 64 keep more of it
# in the caches (whole her2st C2, `tiny` bf16's data path alone: 5,050-5,480 -> 6,380-7,240
# spots/s on an AMX Xeon; pieces of 16 paid more per call than they saved).
CACHED_SPOTS = 64


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
    reuse: bool = False,
):
    """Yield (spot indices (n,), [patches (n, S_l, S_l, 3) uint8 per model input]) step by step, in
    pieces of at most ``CACHED_SPOTS`` spots, cropped from windows of decoded rows and resized by
    ``_core.resize_patches`` (bit for bit :func:`m2ort_fast.crop.resize_patches`, on
    ``num_threads`` threads, 0: one per core).
    ``reads``: an iterable of each step's decoded rows (the pipeline's reader thread); None reads
    them here. ``reuse``: the patches are views of buffers written again by the next step (valid
    until the next piece is asked for), which spares a fresh array, and its page faults, per piece."""
    timer = timer or StageTimer()
    if reads is None:
        reads = (read_step(slide, plan, step, timer) for step in range(plan.n_steps))
    out = StepBuffers(min(CACHED_SPOTS, int(np.diff(plan.step_offsets).max(initial=0))), enabled=reuse)
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
        step_spots = plan.step_spots(step)
        for first in range(0, len(step_spots), CACHED_SPOTS):
            spots = step_spots[first : first + CACHED_SPOTS]
            yield spots, spot_patches(plan, stripe, windows, spots, out, timer, num_threads)


def spot_patches(
    plan: ReadPlan,
    stripe: int,
    windows: list[Window],
    spots: np.ndarray,
    out: StepBuffers,
    timer: StageTimer,
    num_threads: int,
) -> list[np.ndarray]:
    """The patches (n, S_l, S_l, 3) uint8 per model input of ``spots`` (of the current step), cut
    from ``windows`` and resized."""
    with timer.stage("crop"):
        crops = {}  # inputs read at the same level and size (a 1,4,16 pyramid's first two) share a crop
        for source, squares in plan.inputs:
            if (source, squares.read_px) not in crops:
                x0 = plan.stripe_columns[stripe, source, 0]
                origins = squares.top_left_px[spots] - np.array([x0, windows[source].top], dtype=np.int64)
                crops[source, squares.read_px] = _core.crop_patches(
                    windows[source].region(),
                    origins,
                    squares.read_px,
                    out=out.get(("crop", source, squares.read_px), len(spots), squares.read_px),
                    num_threads=num_threads,
                )
        patches = [crops[source, squares.read_px] for source, squares in plan.inputs]
    with timer.stage("resize"):
        for i, (_, squares) in enumerate(plan.inputs):
            if squares.read_px != squares.size_px:
                resized = out.get(("resize", i), len(spots), squares.size_px)
                patches[i] = _core.resize_patches(patches[i], squares.size_px, out=resized, num_threads=num_threads)
        for size in plan.derived_sizes:
            derived = out.get(("derived", size), len(spots), size)
            patches.append(_core.resize_patches(patches[0], size, out=derived, num_threads=num_threads))
    return patches


class StepBuffers:
    """The patch arrays of ``iter_streamed_patches(reuse=True)``: one (max_spots, S, S, 3) uint8
    buffer per name, allocated on first use, its first n rows handed out each piece (None where not
    ``enabled``: the kernels then return fresh arrays)."""

    def __init__(self, max_spots: int, enabled: bool = True):
        self.max_spots, self.enabled = max_spots, enabled
        self.buffers: dict[tuple, np.ndarray] = {}

    def get(self, name: tuple, n: int, size_px: int) -> np.ndarray | None:
        if not self.enabled:
            return None
        buffer = self.buffers.get(name)
        if buffer is None:
            buffer = self.buffers[name] = np.empty((self.max_spots, size_px, size_px, 3), dtype=np.uint8)
        return buffer[:n]


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
    write; the model on the calling thread, and on ``backends.model_workers`` threads in all) joined by
    bounded queues; an exception in any stage stops them all and is raised here. ``num_threads``:
    the extension's threads per call (0: one per core, or one where the model has the cores)."""
    stream = HostStream(
        slide,
        plan,
        backend,
        mean,
        std,
        on_batch,
        batch_size=batch_size,
        timer=timer,
        num_threads=num_threads,
        progress=progress,
    )
    return stream.run()


class HostStream:
    """One run of the host path (:func:`run_stream`): one method per stage (``reader``,
    ``assembler``, ``model`` on ``backends.model_workers`` threads, ``writer``), the state they share as
    attributes. A run is used once."""

    def __init__(
        self,
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
    ):
        import torch

        self.slide, self.plan, self.backend = slide, plan, backend
        self.mean, self.std, self.on_batch = mean, std, on_batch
        self.workers = model_workers(backend)
        # Where the model's calls hold every core, the extension's threads would only take turns with them.
        self.num_threads = num_threads or (1 if self.workers > 1 else 0)
        self.batch_size, self.progress = batch_size, progress
        self.timer = timer or StageTimer()
        self.stages = Stages("host")
        self.decoded_q, self.batch_q, self.write_q = self.stages.pipe(), self.stages.pipe(), self.stages.pipe()
        self.device = torch.device(getattr(backend, "device", "cpu"))
        self.input_dtype = input_dtype(backend)
        # per model input: the side of the tokens the backend takes it as, 0 for an image (_core's patch_px)
        self.patch_px = input_token_px(backend) or (0,) * (len(plan.inputs) + len(plan.derived_sizes))
        self.on_gpu = self.device.type == "cuda"
        self.stats = StreamStats(plan=plan.stats())
        # Input batches come back from the model thread and are refilled: fresh 50 MB arrays per batch
        # would cost a page fault per 4 KB (and pinning, on a GPU) every time.
        self.free_batches: queue.SimpleQueue = queue.SimpleQueue()
        self.batches_emitted = 0
        self.workers_left = self.workers
        self.workers_lock = threading.Lock()

    def run(self) -> StreamStats:
        """Start the reader, assembler, writer and all but one model thread, run a model worker
        here, join them all."""
        import torch

        threads_before = torch.get_num_threads()
        try:
            self.stages.start(self.reader, self.assembler, self.writer, *[self.model] * (self.workers - 1))
            self.stages.run_here(self.model)
        finally:  # the workers set their own threads to one, and torch keeps the last setting for new threads
            torch.set_num_threads(threads_before)
        return self.stats

    def reader(self) -> None:
        for step in range(self.plan.n_steps):
            self.decoded_q.put(read_step(self.slide, self.plan, step, self.timer))
        self.decoded_q.put(Pipe.DONE)

    def batch_buffers(self, sizes_px: list[tuple[int, int]]) -> list:
        """A batch to fill, a returned one if any: per model input (batch_size, 3, H, W), or its
        tokens (batch_size, T, p*p*3) where the backend takes them (``input_token_px``), in the
        backend's ``input_dtype`` (float32, or bfloat16 for a bf16 model that would cast them first)."""
        import torch

        try:
            return self.free_batches.get_nowait()
        except queue.Empty:  # Pinned host memory on a GPU: the copy to the device overlaps the next batch.
            shapes = [
                ((h // p) * (w // p), p * p * 3) if p else (3, h, w)
                for (h, w), p in zip(sizes_px, self.patch_px, strict=True)
            ]
            return [
                torch.empty((self.batch_size, *shape), dtype=self.input_dtype, pin_memory=self.on_gpu)
                for shape in shapes
            ]

    def assemble_into(self, patches: np.ndarray, buffer, patch_px: int) -> None:
        """Normalise patches (n, H, W, 3) uint8 into buffer, (n, 3, H, W) or its tokens for
        ``patch_px`` > 0: float32, or bfloat16 as torch's cast of the float32 values rounds them (the
        same bits the model would make)."""
        import torch

        threads = self.num_threads
        if buffer.dtype == torch.bfloat16:
            bits = buffer.view(torch.uint16).numpy()
            _core.assemble_batch_bf16(patches, self.mean, self.std, out=bits, num_threads=threads, patch_px=patch_px)
        else:
            _core.assemble_batch(
                patches, self.mean, self.std, out=buffer.numpy(), num_threads=threads, patch_px=patch_px
            )

    def assembler(self) -> None:
        """Normalise each piece's patches straight into batches, a batch emitted when full: a piece's
        patches are used up before the next piece is cut, so its arrays are reused (``reuse``)."""
        steps = iter_streamed_patches(
            self.slide,
            self.plan,
            timer=self.timer,
            num_threads=self.num_threads,
            reads=iter(self.decoded_q),
            reuse=True,
        )
        buffers: list | None = None
        batch_spots: list[np.ndarray] = []
        filled = 0
        for spots, patches in steps:
            taken = 0
            while taken < len(spots):
                if buffers is None:
                    buffers = self.batch_buffers([piece.shape[1:3] for piece in patches])
                take = min(self.batch_size - filled, len(spots) - taken)
                with self.timer.stage("assemble"):
                    for piece, buffer, patch_px in zip(patches, buffers, self.patch_px, strict=True):
                        self.assemble_into(piece[taken : taken + take], buffer[filled : filled + take], patch_px)
                batch_spots.append(spots[taken : taken + take])
                taken, filled = taken + take, filled + take
                if filled == self.batch_size:
                    self.emit(buffers, batch_spots, filled)
                    buffers, batch_spots, filled = None, [], 0
        if buffers is not None:  # the last batch, part-filled
            self.emit(buffers, batch_spots, filled)
        self.batch_q.put(Pipe.DONE)

    def emit(self, buffers: list, batch_spots: list[np.ndarray], n: int) -> None:
        """Hand a batch of n spots (the first n rows of ``buffers``) to the model workers."""
        self.batch_q.put((self.batches_emitted, np.concatenate(batch_spots), buffers, n))
        self.batches_emitted += 1

    def writer(self) -> None:
        """Hand the model workers' batches to ``on_batch`` in the order they were emitted."""
        arrived: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for seq, spots, predictions in self.write_q:
            arrived[seq] = (spots, predictions)
            while self.stats.batches in arrived:
                spots, predictions = arrived.pop(self.stats.batches)
                with self.timer.stage("write"):
                    self.on_batch(spots, predictions)
                self.stats.batches += 1
                if self.progress is not None:
                    self.progress(len(spots))
        self.stats.spots = self.plan.n_spots

    def model(self) -> None:
        import torch

        if self.workers > 1:
            torch.set_num_threads(1)  # this thread's calls: one intra-op thread (backends.workers)
        # Here, on its own CUDA stream on a GPU, so that the host-to-device copies and kernels of
        # one batch overlap the next batch's assembly.
        cuda_stream = torch.cuda.Stream(device=self.device) if self.on_gpu else None
        with torch.cuda.stream(cuda_stream) if self.on_gpu else contextlib.nullcontext():
            for seq, spots, buffers, n in self.batch_q:
                with self.timer.stage("model"):
                    predictions = self.backend(*[buffer[:n] for buffer in buffers])
                    predictions = predictions.numpy() if hasattr(predictions, "numpy") else np.asarray(predictions)
                self.free_batches.put(buffers)  # the backend has returned host predictions: the inputs are free
                self.write_q.put((seq, spots, predictions))
        self.batch_q.put(Pipe.DONE)  # for the next worker
        with self.workers_lock:
            self.workers_left -= 1
            last = self.workers_left == 0
        if last:
            self.write_q.put(Pipe.DONE)
