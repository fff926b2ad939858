"""The streamed engine: a slide's spots read tile by tile, once, in bounded memory.

    plan = plan_slide_reads(slide, centers_px, card.level_mpp, card.patch_sizes_px)
    run_stream(slide, plan, backend, mean, std, on_batch=lambda spots, predictions: ...)

Whole-slide inference is bound by decoding, not by the model. The naive path
(:func:`m2ort_fast.crop.read_spot_patches`) reads one square per spot per model input, so
neighbouring spots decode the same tiles again and again. Here:

1. ``plan_slide_reads``: the C++ read plan (``_core.plan_reads``, csrc/read_plan.hpp) orders the
   spots in row-major bands and says, step by step, which tile-aligned rows of which pyramid
   levels to decode and which rows to drop; each tile is decoded once (per stripe, where the
   memory budget forces vertical stripes) and held only while spots still need it. Tiles are
   the file's own (``Slide.level_tile_sizes_px``, from the reader's parse).
2. ``run_stream``: threads joined by bounded queues, each stage an NVTX range of its name:
   ``read`` (decode the planned rows: ``Slide.read_level_region``) -> ``crop`` + ``resize`` +
   ``assemble`` (patches cut from the decoded windows by ``_core.crop_patches``, resized where
   the pyramid lacks the level, normalised into contiguous (pinned on GPU) batches) -> ``model``
   (the backend, on its own CUDA stream on a GPU) -> ``write`` (the caller's sink, e.g.
   :class:`ChunkedH5adWriter`, rows straight into the ``.h5ad``).

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
from m2ort_fast.crop import SpotSquares, check_model_inputs, spot_squares
from m2ort_fast.errors import M2ORTError
from m2ort_fast.profiling import StageTimer
from m2ort_fast.slide import Slide

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_MB = 1024
# Where pixels live between the reader and the model (m2ort_fast.stream_device for "device").
DATA_PATHS = ("host", "device", "auto")
DEFAULT_MAX_GPU_MEMORY_MB = 2048
STEP_SPOTS = 256  # most spots per plan step
QUEUE_DEPTH = 2  # items in flight between two stages


def check_data_path(data_path: str) -> str:
    """``data_path`` when it is one of DATA_PATHS, else M2ORTError (one line)."""
    if data_path not in DATA_PATHS:
        raise M2ORTError(f"unknown data path {data_path!r}; use one of {', '.join(DATA_PATHS)}")
    return data_path


# --------------------------------------------------------------------------------------------
# Geometry and plan


@dataclass
class ReadPlan:
    """The C++ plan (see ``_core.plan_reads``) with the slide geometry it was made for.

    sources: pyramid levels read (one window each). inputs: per model input, (index into
    sources, SpotSquares). Arrays as returned by ``_core.plan_reads``."""

    sources: list[int]
    inputs: list[tuple[int, SpotSquares]]
    derived_sizes: list[int]  # level_source == "resize": sizes of inputs 2.., resized from input 1
    order: np.ndarray
    stripe_columns: np.ndarray
    stripe_rows: np.ndarray
    step_stripe: np.ndarray
    step_offsets: np.ndarray
    step_rows: np.ndarray
    tiles_decoded: int
    tiles_needed: int
    naive_tile_reads: int
    peak_bytes: int

    @property
    def n_steps(self) -> int:
        return len(self.step_stripe)

    @property
    def n_spots(self) -> int:
        return len(self.order)

    def step_spots(self, step: int) -> np.ndarray:
        """Indices (into the centres) of the spots whose patches are ready after ``step``."""
        return self.order[self.step_offsets[step] : self.step_offsets[step + 1]]

    def step_reads(self, step: int) -> list[tuple[int, int, int, int, int]]:
        """What to decode before ``step``: (source index, x0, y0, width, height) in level px."""
        reads = []
        stripe = self.step_stripe[step]
        for source, (_, y0, y1) in enumerate(self.step_rows[step]):
            x0, x1 = self.stripe_columns[stripe, source]
            if y1 > y0:
                reads.append((source, int(x0), int(y0), int(x1 - x0), int(y1 - y0)))
        return reads

    def stats(self) -> dict:
        n = max(self.n_spots, 1)
        return {
            "spots": self.n_spots,
            "steps": self.n_steps,
            "stripes": len(self.stripe_rows),
            "tiles_decoded": self.tiles_decoded,
            "tiles_needed": self.tiles_needed,
            "tiles_decoded_per_spot": round(self.tiles_decoded / n, 4),
            "naive_tiles_per_spot": round(self.naive_tile_reads / n, 4),
            "plan_peak_mb": round(self.peak_bytes / 2**20, 1),
        }


def plan_slide_reads(
    slide: Slide,
    centers_px: np.ndarray,
    level_mpp: Sequence[float],
    sizes_px: Sequence[int] = (224, 112, 56),
    *,
    level_source: str = "pyramid",
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
    step_spots: int = STEP_SPOTS,
    reads_in_flight: int = QUEUE_DEPTH + 2,
    reserved_bytes: Callable[[list[SpotSquares], list[int]], int] | None = None,
    bound_option: str = "--max-memory-mb",
) -> ReadPlan:
    """Plan the streamed reads of the model inputs of spots ``centers_px`` ((N, 2) level-0 px).

    ``max_memory_mb`` bounds the decoded pixels the engine holds: windows plus ``reads_in_flight``
    steps' reads (the one being decoded, QUEUE_DEPTH queued and the one being appended), less
    ``reserved_bytes(squares read, derived sizes)`` where the same bound covers other buffers (the
    device path's batches). M2ORTError naming ``bound_option`` when even the narrowest plan needs
    more."""
    check_model_inputs(level_mpp, sizes_px, level_source)
    centers_px = np.asarray(centers_px, dtype=np.float64).reshape(-1, 2)
    read_inputs = range(len(sizes_px)) if level_source == "pyramid" else range(1)
    squares = [spot_squares(slide, centers_px, level_mpp[i], sizes_px[i]) for i in read_inputs]
    derived_sizes = [int(size) for size in sizes_px[1:]] if level_source == "resize" else []
    max_bytes = int(max_memory_mb * 2**20)
    if reserved_bytes is not None:
        reserved = reserved_bytes(squares, derived_sizes)
        if reserved >= max_bytes:
            raise M2ORTError(
                f"{slide.path.name}: {bound_option} {max_memory_mb:g} leaves nothing for decoded tiles: the batches "
                f"and buffers take {reserved / 2**20:.0f} MB (raise {bound_option} or lower --batch-size)"
            )
        max_bytes -= reserved
    sources = sorted({s.level for s in squares})
    tiles = slide.level_tile_sizes_px
    source_specs = [(*slide.level_dimensions[level], *tiles[level]) for level in sources]
    inputs = [(sources.index(s.level), s) for s in squares]
    patch_sets = [(source, s.read_px, s.top_left_px) for source, s in inputs]
    try:
        raw = _core.plan_reads(
            centers_px,
            source_specs,
            patch_sets,
            max_bytes=max_bytes,
            max_step_spots=step_spots,
            reads_in_flight=reads_in_flight,
        )
    except RuntimeError as exc:
        raise M2ORTError(f"{slide.path.name}: {exc} (raise {bound_option})") from None
    return ReadPlan(sources=sources, inputs=inputs, derived_sizes=derived_sizes, **raw)


# --------------------------------------------------------------------------------------------
# Windows: the decoded rows of one source that the current step needs


class _Window:
    """Rows [top, top + live) of one source over the stripe's columns, in a buffer of twice the
    plan's most rows: when appending reaches the end, the live rows move to the front, and they
    never overlap their new place (so no temporary copy; see csrc/read_plan.cpp)."""

    def __init__(self, max_rows: int, width_px: int, empty: Callable[[tuple[int, int, int]], Any] | None = None):
        shape = (2 * max(max_rows, 1), width_px, 3)
        # empty(shape) -> a uint8 buffer: a numpy array here, a device tensor on the device path.
        self.buffer = empty(shape) if empty is not None else np.empty(shape, dtype=np.uint8)
        self.start = 0  # buffer row of source row `top`
        self.top = 0
        self.live = 0

    def drop_above(self, row: int) -> None:
        dropped = min(max(row - self.top, 0), self.live)
        self.start += dropped
        self.live -= dropped
        self.top = row if self.live == 0 else self.top + dropped

    def append(self, first_row: int, rows: np.ndarray) -> None:
        if self.live == 0:
            self.top, self.start = first_row, 0
        elif first_row != self.top + self.live:
            raise AssertionError(f"read plan out of order: appending row {first_row} after {self.top + self.live}")
        n = len(rows)
        if self.start + self.live + n > len(self.buffer):
            self.buffer[: self.live] = self.buffer[self.start : self.start + self.live]
            self.start = 0
        self.buffer[self.start + self.live : self.start + self.live + n] = rows
        self.live += n

    def region(self):
        """The live rows, (live, width, 3): a view of the buffer."""
        return self.buffer[self.start : self.start + self.live]


def stripe_windows(plan: ReadPlan, stripe: int, empty: Callable[[tuple[int, int, int]], Any] | None = None):
    """One empty window per source for ``stripe`` (``empty``: the buffers' allocator, see _Window)."""
    return [
        _Window(int(rows), int(x1 - x0), empty)
        for rows, (x0, x1) in zip(plan.stripe_rows[stripe], plan.stripe_columns[stripe], strict=True)
    ]


def advance_windows(windows: list[_Window], plan: ReadPlan, step: int, decoded: list[tuple[int, int, Any]]) -> None:
    """Drop the rows no spot from ``step`` on needs, then append the rows ``step`` decoded."""
    for source, window in enumerate(windows):
        window.drop_above(int(plan.step_rows[step, source, 0]))
    for source, y0, rows in decoded:
        windows[source].append(y0, rows)


# --------------------------------------------------------------------------------------------
# The pipeline


class _Stop(Exception):
    pass


class _Pipe:
    """A bounded queue whose producers and consumers give up when any stage failed."""

    DONE = object()

    def __init__(self, failed: threading.Event, depth: int = QUEUE_DEPTH):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.failed = failed

    def put(self, item) -> None:
        while True:
            if self.failed.is_set():
                raise _Stop
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self):
        """The next item (DONE included), waiting for it."""
        while True:
            if self.failed.is_set():
                raise _Stop
            try:
                return self.queue.get(timeout=0.1)
            except queue.Empty:
                continue

    def __iter__(self):
        while (item := self.get()) is not self.DONE:
            yield item


class _Stages:
    """The threads of one streamed run, joined by bounded queues (:meth:`pipe`): the first
    exception in any stage stops them all and is raised on the calling thread."""

    def __init__(self, name: str):
        self.name = name
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def pipe(self, depth: int = QUEUE_DEPTH) -> _Pipe:
        return _Pipe(self.failed, depth)

    def start(self, *stages: Callable[[], None]) -> None:
        """Run each stage on its own thread."""
        for stage in stages:
            thread = threading.Thread(
                target=self._guarded, args=(stage,), name=f"m2ort-{self.name}-{stage.__name__}", daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def _guarded(self, stage: Callable[[], None]) -> None:
        try:
            stage()
        except _Stop:
            pass
        except BaseException as exc:  # handed to the calling thread
            self.errors.append(exc)
            self.failed.set()

    def run_here(self, stage: Callable[[], None]) -> None:
        """Run the calling thread's own stage, join the others, raise the first exception of any."""
        try:
            self._guarded(stage)
        finally:
            for thread in self.threads:
                thread.join()
        if self.errors:
            raise self.errors[0]


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
    windows: list[_Window] = []
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
    stages = _Stages("host")
    decoded_q, batch_q, write_q = stages.pipe(), stages.pipe(), stages.pipe()
    device = torch.device(getattr(backend, "device", "cpu"))
    on_gpu = device.type == "cuda"
    stats = StreamStats(plan=plan.stats())

    def reader():
        for step in range(plan.n_steps):
            decoded_q.put(read_step(slide, plan, step, timer))
        decoded_q.put(_Pipe.DONE)

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
        batch_q.put(_Pipe.DONE)

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
        write_q.put(_Pipe.DONE)

    stages.start(reader, assembler, writer)
    stages.run_here(model)
    return stats
