"""The device data path: decoded pixels stay on the model's device from the reader to the model.

    plan = plan_slide_reads(slide, centers_px, ..., max_memory_mb=max_gpu_memory_mb,
                            reserved_bytes=partial(reserved_bytes, batch_size=64, kernel="auto", device=device))
    run_stream_on_device(slide, plan, backend, mean, std, on_batch, batch_size=64)

The same read plan, windows and predictions as the host path (:func:`m2ort_fast.engine.host.run_stream`);
what differs is where the pixels live and who touches them (a :class:`DeviceStream`, one method per
stage):

1. ``read`` (reader thread): each step's planned rows, as tensors (``Slide.read_level_region_tensor``):
   in GPU memory where cuCIM decodes on the GPU (handed over through the CUDA array interface, no
   copy), else host rows, copied once into the device window (``upload``).
2. ``assemble`` (this thread, on the assemble stream): the windows are device buffers; for each
   model input ONE fused kernel (:mod:`m2ort_fast.kernels.assemble`: crop gather, Pillow's resize
   in its own integer arithmetic, normalisation, NCHW) writes the step's spots straight into rows
   of a preallocated device batch. Batches form a ring of ``BATCHES_IN_FLIGHT``, each refilled only
   after the model stream's event says the model has read it.
3. ``model`` (the model stream, after the batch's ready event): ``backend.forward_on_device``;
   the predictions are copied into pinned host memory without blocking (``d2h``), and an event
   marks them done.
4. ``write`` (writer thread): waits for that batch's event only, then ``on_batch``.

On a GPU no stage synchronises the host per batch: the host waits only when the pinned prediction
buffers are all in use (the writer is behind), or when a decoded step must outlive its copy.

On the CPU the same code runs on CPU tensors (tests, machines without a GPU): the assemble step
is the host path's own kernels (``_core``), or the Triton kernel in Triton's interpreter
(``kernel="triton"``, TRITON_INTERPRET=1), or its PyTorch reference (``kernel="torch"``); all
give the host path's predictions bit for bit. It is not meant to be faster there.

Device memory (``max_gpu_memory_mb``) covers what this path holds: windows and decoded steps in
flight (the plan's ``peak_bytes``) plus the batch ring and the CPU kernels' scratch.
:class:`DeviceMemory` counts every such buffer as it is allocated and freed; the model's own
weights and activations are not included.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch

from m2ort_fast import _core
from m2ort_fast.crop import SpotSquares
from m2ort_fast.engine.host import StreamStats, read_step
from m2ort_fast.engine.plan import ReadPlan, check_data_path
from m2ort_fast.engine.stages import QUEUE_DEPTH, Pipe, Stages
from m2ort_fast.engine.windows import Window, advance_windows, stripe_windows
from m2ort_fast.errors import M2ORTError
from m2ort_fast.kernels.assemble import assemble, normalization_table, reference_assemble
from m2ort_fast.profiling import StageTimer
from m2ort_fast.slide import Slide

log = logging.getLogger(__name__)

ASSEMBLE_KERNELS = ("auto", "triton", "host", "torch")
BATCHES_IN_FLIGHT = 2  # device batches: one being filled while the model reads the other
DECODED_STEPS_HELD = QUEUE_DEPTH + 1  # decoded steps kept alive until their copy has run


def resolve_data_path(data_path: str, slide: Slide, device: torch.device) -> str:
    """The data path ``data_path`` (one of DATA_PATHS) takes for ``slide`` on ``device``: "host" or
    "device". auto is the device path where the model runs on a GPU and the reader decodes there
    (cuCIM), else the host path."""
    if check_data_path(data_path) != "auto":
        return data_path
    decodes_on_gpu = bool(getattr(slide, "decodes_on_gpu", False))
    return "device" if device.type == "cuda" and decodes_on_gpu else "host"


def batch_bytes(batch_size: int, sizes_px: Sequence[int]) -> int:
    """Bytes of one device batch: (batch_size, 3, S, S) float32 per model input."""
    return batch_size * 3 * sum(int(s) ** 2 for s in sizes_px) * 4


def _scratch_shapes(
    kernel: str, inputs: Sequence[tuple[int, int]], derived_sizes: Sequence[int], batch_size: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The assemble step's scratch buffers, {name: (shape, dtype)}; inputs: (read_px, size_px) per
    plan input. The host kernels crop (and resize) each input into uint8 buffers; the device kernels
    need one only where the coarser inputs come from a resized first input."""
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if kernel == "host":
        for i, (read_px, size_px) in enumerate(inputs):
            shapes[f"crop{i}"] = ((batch_size, read_px, read_px, 3), torch.uint8)
            if read_px != size_px:
                shapes[f"resized{i}"] = ((batch_size, size_px, size_px, 3), torch.uint8)
        for j, size_px in enumerate(derived_sizes):
            shapes[f"derived{j}"] = ((batch_size, size_px, size_px, 3), torch.uint8)
    elif derived_sizes and inputs[0][0] != inputs[0][1]:
        size_px = inputs[0][1]
        shapes["first"] = ((batch_size, 3, size_px, size_px), torch.float32)
        shapes["first_rgb"] = ((batch_size, size_px, size_px, 3), torch.uint8)
    return shapes


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The assemble kernel for ``kernel`` (one of ASSEMBLE_KERNELS) on ``device``: auto is the
    Triton kernel on a GPU and the host kernels on the CPU."""
    if kernel not in ASSEMBLE_KERNELS:
        raise M2ORTError(f"unknown assemble kernel {kernel!r}; use one of {', '.join(ASSEMBLE_KERNELS)}")
    if kernel == "auto":
        return "triton" if device.type == "cuda" else "host"
    if kernel == "host" and device.type != "cpu":
        raise M2ORTError(f"the host assemble kernels run on CPU tensors, not on {device}")
    return kernel


def reserved_bytes(
    squares: Sequence[SpotSquares], derived_sizes: Sequence[int], *, batch_size: int, kernel: str, device: torch.device
) -> int:
    """Device bytes the path holds besides the plan's windows: the batch ring and the scratch.
    ``squares``: the plan's inputs (what plan_slide_reads passes)."""
    kernel = resolve_kernel(kernel, device)
    inputs = [(s.read_px, s.size_px) for s in squares]
    sizes_px = [size for _, size in inputs] + list(derived_sizes)
    scratch = sum(
        int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        for shape, dtype in _scratch_shapes(kernel, inputs, derived_sizes, batch_size).values()
    )
    return BATCHES_IN_FLIGHT * batch_bytes(batch_size, sizes_px) + scratch


class DeviceMemory:
    """Counts the device bytes the path holds: every buffer it allocates or receives goes through
    :meth:`track` and is uncounted when the tensor is freed. ``peak_bytes`` is what the memory
    bound applies to."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0
        self.peak_bytes = 0
        self._lock = threading.Lock()

    def empty(self, shape: Sequence[int], dtype: torch.dtype, *, pin_memory: bool = False) -> torch.Tensor:
        return self.track(torch.empty(tuple(shape), dtype=dtype, device=self.device, pin_memory=pin_memory))

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        with self._lock:
            self.bytes += size
            self.peak_bytes = max(self.peak_bytes, self.bytes)
        weakref.finalize(tensor, self._release, size)
        return tensor

    def _release(self, size: int) -> None:
        with self._lock:
            self.bytes -= size


class _Assembler:
    """Writes rows of a device batch from the current windows, every model input at once."""

    def __init__(self, plan: ReadPlan, mean, std, device: torch.device, kernel: str, memory: DeviceMemory, batch_size):
        self.kernel = resolve_kernel(kernel, device)
        self.mean, self.std = tuple(mean), tuple(std)
        self.table = normalization_table(mean, std, device)
        self.identity = normalization_table((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), device)  # table[c, v] = v
        self.inputs = [(source, squares.read_px, squares.size_px) for source, squares in plan.inputs]
        self.derived_sizes = list(plan.derived_sizes)
        shapes = _scratch_shapes(self.kernel, [(r, s) for _, r, s in self.inputs], self.derived_sizes, batch_size)
        self.scratch = {name: memory.empty(shape, dtype) for name, (shape, dtype) in shapes.items()}

    def __call__(self, windows: list[Window], origins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        """origins: per plan input, (n, 2) int64 top-left in its window's px; outs: per model input
        (plan inputs, then derived), (n, 3, S, S) float32 rows of the batch."""
        if self.kernel == "host":
            self._host(windows, origins, outs)
            return
        run = assemble if self.kernel == "triton" else _reference_into
        for (source, read_px, size_px), at, out in zip(self.inputs, origins, outs, strict=False):
            run(windows[source].region(), at, read_px, size_px, self.table, out)
        if not self.derived_sizes:
            return
        source, read_px, size_px = self.inputs[0]
        region, at = windows[source].region(), origins[0]
        if read_px != size_px:  # the coarser inputs come from the resized first input, as on the host
            n = len(at)
            first = run(region, at, read_px, size_px, self.identity, self.scratch["first"][:n])
            first_rgb = self.scratch["first_rgb"][:n]
            first_rgb.copy_(first.permute(0, 2, 3, 1))  # whole numbers 0-255: exact
            region = first_rgb.view(n * size_px, size_px, 3)  # the patches stacked as one tall region
            steps = torch.arange(n, dtype=torch.int64, device=region.device) * size_px
            at = torch.stack([torch.zeros_like(steps), steps], 1)
            read_px = size_px
        for derived_px, out in zip(self.derived_sizes, outs[len(self.inputs) :], strict=True):
            run(region, at, read_px, derived_px, self.table, out)

    def _host(self, windows: list[Window], origins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        """The host path's kernels on CPU tensors (the same arithmetic: bit for bit)."""
        n = len(origins[0])
        first: np.ndarray | None = None  # the first input's patches: the coarser inputs come from them
        for i, ((source, read_px, size_px), at, out) in enumerate(zip(self.inputs, origins, outs, strict=False)):
            patches = _core.crop_patches(
                windows[source].region().numpy(), at.numpy(), read_px, out=self.scratch[f"crop{i}"][:n].numpy()
            )
            if read_px != size_px:
                patches = _core.resize_patches(patches, size_px, out=self.scratch[f"resized{i}"][:n].numpy())
            _core.assemble_batch(patches, self.mean, self.std, out=out.numpy())
            first = patches if first is None else first
        for j, (derived_px, out) in enumerate(zip(self.derived_sizes, outs[len(self.inputs) :], strict=True)):
            assert first is not None
            resized = _core.resize_patches(first, derived_px, out=self.scratch[f"derived{j}"][:n].numpy())
            _core.assemble_batch(resized, self.mean, self.std, out=out.numpy())


def _reference_into(region, origins, read_px, size_px, table, out):
    return out.copy_(reference_assemble(region, origins, read_px, size_px, table))


def run_stream_on_device(
    slide: Slide,
    plan: ReadPlan,
    backend,
    mean: Sequence[float],
    std: Sequence[float],
    on_batch: Callable[[np.ndarray, np.ndarray], None],
    *,
    batch_size: int = 64,
    timer: StageTimer | None = None,
    progress: Callable[[int], None] | None = None,
    kernel: str = "auto",
    memory: DeviceMemory | None = None,
) -> StreamStats:
    """Predict every planned spot on ``backend.device``; ``on_batch(spot indices (B,), predictions
    (B, G) float32)`` runs on the writer thread, in plan order (as :func:`m2ort_fast.engine.host.run_stream`).
    Threads: reader, this one (assemble), model, writer, joined by bounded queues; an exception in
    any stops them all and is raised here. ``memory``: the ledger of the device bytes held."""
    stream = DeviceStream(
        slide,
        plan,
        backend,
        mean,
        std,
        on_batch,
        batch_size=batch_size,
        timer=timer,
        progress=progress,
        kernel=kernel,
        memory=memory,
    )
    return stream.run()


def _on_stream(stream: torch.cuda.Stream | None):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _event(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    """An event recorded on ``stream`` now (None on the CPU, where every step is synchronous)."""
    if stream is None:
        return None
    recorded = torch.cuda.Event()
    recorded.record(stream)
    return recorded


class DeviceStream:
    """One run of the device path (:func:`run_stream_on_device`): one method per stage
    (``reader``, ``fill_batches``, ``model``, ``writer``), the state they share as attributes: the
    batch ring (``batches``, per batch k a list of (batch_size, 3, S, S) float32 device tensors, one
    per model input), its events and queues. A run is used once."""

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
        progress: Callable[[int], None] | None = None,
        kernel: str = "auto",
        memory: DeviceMemory | None = None,
    ):
        self.slide, self.plan, self.backend, self.on_batch = slide, plan, backend, on_batch
        self.batch_size, self.progress = batch_size, progress
        self.timer = timer or StageTimer()
        self.device = torch.device(getattr(backend, "device", "cpu"))
        self.on_gpu = self.device.type == "cuda"
        self.memory = memory or DeviceMemory(self.device)
        self.assembler = _Assembler(plan, mean, std, self.device, kernel, self.memory, batch_size)
        self.forward = getattr(backend, "forward_on_device", None)
        if self.forward is None:
            name = getattr(backend, "name", "?")
            log.debug("backend %s returns host predictions: one synchronisation per batch", name)
        sizes_px = [s for _, _, s in self.assembler.inputs] + self.assembler.derived_sizes
        self.batches = [
            [self.memory.empty((batch_size, 3, s, s), torch.float32) for s in sizes_px]
            for _ in range(BATCHES_IN_FLIGHT)
        ]
        self.consumed: list[torch.cuda.Event | None] = [None] * BATCHES_IN_FLIGHT  # the model has read batch k
        self.stats = StreamStats(plan=plan.stats())
        self.stages = Stages("device")
        self.decoded_q, self.batch_q, self.write_q = self.stages.pipe(), self.stages.pipe(), self.stages.pipe()
        self.free_batches = self.stages.pipe(BATCHES_IN_FLIGHT)  # batch k may be refilled once the model took it
        for k in range(BATCHES_IN_FLIGHT):
            self.free_batches.put(k)
        # Pinned host buffers for the predictions (allocated on first use: the gene count comes with them).
        self.free_predictions = self.stages.pipe(BATCHES_IN_FLIGHT + QUEUE_DEPTH + 1)
        for _ in range(BATCHES_IN_FLIGHT + QUEUE_DEPTH + 1):
            self.free_predictions.put(None)
        self.assemble_stream = torch.cuda.Stream(device=self.device) if self.on_gpu else None
        self.model_stream = torch.cuda.Stream(device=self.device) if self.on_gpu else None
        # fill_batches' state: the current stripe's windows, decoded steps held until their copy
        # has run (as (event, decoded step)), the batch being filled (-1: none yet), its rows filled
        # and the spots in them.
        self.windows: list[Window] = []
        self.current_stripe = -1
        self.held: collections.deque = collections.deque()
        self.k, self.filled = -1, 0
        self.batch_spots: list[np.ndarray] = []

    def run(self) -> StreamStats:
        """Start the reader, model and writer threads, fill the batches here, join them all."""
        self.stages.start(self.reader, self.model, self.writer)
        self.stages.run_here(self.fill_batches)
        return self.stats

    def reader(self) -> None:
        for step in range(self.plan.n_steps):
            decoded = read_step(self.slide, self.plan, step, self.timer, as_tensors=True)
            for _, _, rows in decoded:
                if rows.device.type == self.device.type:  # device memory the path holds until it is copied
                    self.memory.track(rows)
            self.decoded_q.put(decoded)
        self.decoded_q.put(Pipe.DONE)

    def model(self) -> None:
        with _on_stream(self.model_stream):
            for k, spots, n, ready in self.batch_q:
                predictions = self.free_predictions.get()  # waits only when the writer is behind
                with self.timer.stage("model"):
                    if ready is not None and self.model_stream is not None:  # ready: only on a GPU
                        self.model_stream.wait_event(ready)
                    levels = [buffer[:n] for buffer in self.batches[k]]
                    out = self.forward(*levels) if self.forward is not None else self.backend(*levels)
                    self.consumed[k] = _event(self.model_stream)
                self.free_batches.put(k)
                with self.timer.stage("d2h"):
                    if predictions is None:
                        predictions = torch.empty(
                            (self.batch_size, out.shape[1]), dtype=torch.float32, pin_memory=self.on_gpu
                        )
                    predictions[:n].copy_(out, non_blocking=self.on_gpu)
                self.write_q.put((spots, predictions, n, _event(self.model_stream)))
                self.stats.batches += 1
        self.write_q.put(Pipe.DONE)

    def writer(self) -> None:
        for spots, predictions, n, copied in self.write_q:
            with self.timer.stage("write"):
                if copied is not None:
                    copied.synchronize()  # this batch's copy to the host, nothing else
                self.on_batch(spots, predictions[:n].numpy())
            self.free_predictions.put(predictions)
            if self.progress is not None:
                self.progress(len(spots))
        self.stats.spots = self.plan.n_spots

    def fill_batches(self) -> None:
        plan = self.plan
        with _on_stream(self.assemble_stream):
            # The squares' corners and the plan's spot order go to the device once (copies from
            # pageable host memory would wait for the stream at every step).
            order = torch.from_numpy(plan.order).to(self.device)
            top_lefts = [torch.from_numpy(squares.top_left_px).to(self.device) for _, squares in plan.inputs]
            for step, decoded in enumerate(self.decoded_q):
                stripe = int(plan.step_stripe[step])
                self.upload(step, stripe, decoded)
                del decoded  # held only as long as its copy needs it (self.held)
                step_order = order[int(plan.step_offsets[step]) : int(plan.step_offsets[step + 1])]
                origins = []  # each input's squares in its window's px, computed where they are used
                for (source, _), top_left in zip(plan.inputs, top_lefts, strict=True):
                    at = top_left[step_order]
                    at[:, 0] -= int(plan.stripe_columns[stripe, source, 0])
                    at[:, 1] -= self.windows[source].top
                    origins.append(at)
                self.fill(plan.step_spots(step), origins)
            if self.filled:
                self.emit()
        self.batch_q.put(Pipe.DONE)

    def upload(self, step: int, stripe: int, decoded: list) -> None:
        """Append ``step``'s decoded rows to the windows (new ones where a stripe begins)."""
        with self.timer.stage("upload"):  # host rows are copied to the device here
            if stripe != self.current_stripe:
                self.windows = stripe_windows(self.plan, stripe, self.empty_window)
                self.current_stripe = stripe
            advance_windows(self.windows, self.plan, step, decoded)
            if self.on_gpu:  # decoded rows must outlive their copy on the assemble stream
                held = self.held
                held.append((_event(self.assemble_stream), decoded))
                while len(held) > DECODED_STEPS_HELD or (held and held[0][0].query()):
                    held.popleft()[0].synchronize()

    def empty_window(self, shape: tuple[int, int, int]) -> torch.Tensor:
        return self.memory.empty(shape, torch.uint8)

    def fill(self, spots: np.ndarray, origins: list[torch.Tensor]) -> None:
        """Assemble one step's spots into rows of the batch ring, emitting each batch as it fills.
        origins: per plan input, (n, 2) int64 top-left in its window's px."""
        start = 0
        while start < len(spots):
            if self.k < 0:
                self.k = self.free_batches.get()
                consumed = self.consumed[self.k]
                if self.assemble_stream is not None and consumed is not None:
                    self.assemble_stream.wait_event(consumed)  # on the GPU, not the host
            take = min(len(spots) - start, self.batch_size - self.filled)
            with self.timer.stage("assemble"):
                self.assembler(
                    self.windows,
                    [at[start : start + take] for at in origins],
                    [buffer[self.filled : self.filled + take] for buffer in self.batches[self.k]],
                )
            self.batch_spots.append(spots[start : start + take])
            self.filled += take
            start += take
            if self.filled == self.batch_size:
                self.emit()

    def emit(self) -> None:
        """Hand the batch being filled to the model, with the event that says its rows are written."""
        self.batch_q.put((self.k, np.concatenate(self.batch_spots), self.filled, _event(self.assemble_stream)))
        self.k, self.filled, self.batch_spots = -1, 0, []
