"""Per-stage timing and NVTX ranges.

Every stage of the engine runs inside ``timer.stage(name)``: an NVTX range of that name (so that
``nsys profile m2ort-fast predict ...`` shows it) and a wall-clock accumulator (so that the CLI can
print where the time went without Nsight). NVTX calls cost nothing measurable when no profiler
is attached.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

try:
    import nvtx
except ImportError:  # nvtx is a dependency, but keep the engine usable without it
    nvtx = None

NVTX_DOMAIN = "m2ort-fast"


class StageTimer:
    """Accumulates wall time per stage name, in seconds (summed over the threads that run a stage:
    the host path's model workers run one each)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, name: str):
        range_ = nvtx.annotate(name, domain=NVTX_DOMAIN) if nvtx is not None else contextlib.nullcontext()
        start = time.perf_counter()
        with range_:
            try:
                yield
            finally:
                with self.lock:
                    self.seconds[name] += time.perf_counter() - start
                    self.calls[name] += 1

    def merge(self, other: StageTimer) -> None:
        for name, seconds in other.seconds.items():
            self.seconds[name] += seconds
            self.calls[name] += other.calls[name]

    def summary(self) -> dict[str, float]:
        return {name: round(seconds, 4) for name, seconds in self.seconds.items()}

    def format(self) -> str:
        total = sum(self.seconds.values()) or 1.0
        return ", ".join(f"{name} {s:.2f} s ({100 * s / total:.0f}%)" for name, s in self.seconds.items())
