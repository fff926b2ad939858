"""Windows: the decoded rows of one source that the current step needs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from m2ort_fast.engine.plan import ReadPlan

log = logging.getLogger(__name__)


class Window:
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
    """One empty window per source for ``stripe`` (``empty``: the buffers' allocator, see Window)."""
    return [
        Window(int(rows), int(x1 - x0), empty)
        for rows, (x0, x1) in zip(plan.stripe_rows[stripe], plan.stripe_columns[stripe], strict=True)
    ]


def advance_windows(windows: list[Window], plan: ReadPlan, step: int, decoded: list[tuple[int, int, Any]]) -> None:
    """Drop the rows no spot from ``step`` on needs, then append the rows ``step`` decoded."""
    for source, window in enumerate(windows):
        window.drop_above(int(plan.step_rows[step, source, 0]))
    for source, y0, rows in decoded:
        windows[source].append(y0, rows)
