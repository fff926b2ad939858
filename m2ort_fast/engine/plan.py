"""The read plan: which tile-aligned rows of which levels each step decodes, each tile once.

The C++ read plan (``_core.plan_reads``, csrc/read_plan.hpp) orders the spots in row-major bands
and says, step by step, which rows to decode and which to drop; vertical stripes where the memory
bound forces them. Tiles are the file's own (``Slide.level_tile_sizes_px``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from m2ort_fast import _core
from m2ort_fast.crop import SpotSquares, check_model_inputs, spot_squares
from m2ort_fast.engine.stages import QUEUE_DEPTH
from m2ort_fast.errors import M2ORTError
from m2ort_fast.slide import Slide

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_MB = 1024


# Where pixels live between the reader and the model (m2ort_fast.engine.device for "device").
DATA_PATHS = ("host", "device", "auto")


DEFAULT_MAX_GPU_MEMORY_MB = 2048


STEP_SPOTS = 256  # most spots per plan step


def check_data_path(data_path: str) -> str:
    """``data_path`` when it is one of DATA_PATHS, else M2ORTError (one line)."""
    if data_path not in DATA_PATHS:
        raise M2ORTError(f"unknown data path {data_path!r}; use one of {', '.join(DATA_PATHS)}")
    return data_path


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
