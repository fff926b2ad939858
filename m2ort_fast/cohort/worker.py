"""The worker: one loaded model, many slides (a Ray actor, or a plain object in this process)."""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from m2ort_fast.cohort.manifest import (
    DONE,
    FAILED,
    PENDING,
    SKIPPED,
    STAGES,
)
from m2ort_fast.errors import M2ORTError, exception_detail
from m2ort_fast.outputs import StagingLocked, h5ad_path
from m2ort_fast.predict import OpenedSlide, OpenOptions, OutputOptions, Predictor, SlideResult, close_when_opened
from m2ort_fast.spots import Spots

log = logging.getLogger(__name__)

# A slide whose staging folder another process holds: how long its worker waits before leaving it pending.
STAGING_LOCK_WAIT_S = 90.0


@dataclass
class SlideTask:
    """One slide as handed to a worker: its path, spot source (None: a grid) and output stem."""

    slide: str
    spots: str | os.PathLike | Spots | None
    stem: str


class CohortWorker:
    """Loads the model and backend once and predicts the slides it is handed, writing each as
    ``predict`` does. ``run`` returns the manifest fields of the slide (a slide's own error is a
    ``failed`` row, not an exception); its ``prefetch`` slide is opened meanwhile. An M2ORTError
    while loading (checkpoint, backend, device) is kept and reported by ``info``, not raised, so
    the driver prints it as one line."""

    def __init__(
        self,
        name: str,
        checkpoint: str | None,
        predictor_options: dict[str, Any],
        open_options: OpenOptions,
        output: OutputOptions,
        num_threads: int = 0,
    ):
        started = time.perf_counter()
        self.name, self.host, self.pid = name, socket.gethostname(), os.getpid()
        self.open_options, self.output = open_options, output
        self.error: str | None = None
        self.predictor: Predictor | None = None
        if num_threads:  # the CPUs Ray gave this worker, not the host's (other workers share it)
            import torch

            torch.set_num_threads(num_threads)
            predictor_options = {"num_threads": num_threads, **predictor_options}
        try:
            self.predictor = Predictor(checkpoint, **predictor_options)
        except M2ORTError as exc:
            self.error = str(exc)
        self.load_seconds = round(time.perf_counter() - started, 4)
        self._opener = ThreadPoolExecutor(1, thread_name_prefix="m2ort-open")
        self._next: tuple[str, Future[OpenedSlide]] | None = None

    def info(self) -> dict[str, Any]:
        predictor = self.predictor
        return {
            "worker": self.name,
            "host": self.host,
            "pid": self.pid,
            "error": self.error,
            "load_s": self.load_seconds,
            "checkpoint_sha256": predictor.checkpoint_sha256 if predictor else "",
            "device": str(predictor.backend.device) if predictor else "",
        }

    def _open(self, task: SlideTask) -> OpenedSlide:
        assert self.predictor is not None
        return self.predictor.open(task.slide, task.spots, self.open_options)

    def run(self, task: SlideTask, prefetch: SlideTask | None = None) -> dict[str, Any]:
        """Predict ``task``'s slide; open ``prefetch``'s meanwhile (the slide this worker is given next)."""
        if self.predictor is None:
            return {"status": FAILED, "error": self.error or "the model did not load"}
        opened = self._take(task)
        if prefetch is not None:
            self._next = (prefetch.stem, self._opener.submit(self._open, prefetch))
        fields: dict[str, Any] = {"worker": self.name, "host": self.host}
        try:
            result = self._run_when_unlocked(opened)
        except StagingLocked as exc:  # still written by a run that outlived its driver: the next run's
            return {**fields, "status": PENDING, "error": str(exc)}
        except M2ORTError as exc:  # the slide's own problem: the driver logs it, the worker goes on
            return {**fields, "status": FAILED, "error": str(exc)}
        except Exception as exc:  # a bug: recorded (traceback in this worker's log), the cohort goes on
            log.exception("%s: unexpected error", task.slide)
            return {**fields, "status": FAILED, "error": f"unexpected {type(exc).__name__}: {exception_detail(exc)}"}
        if result.skipped:  # finished by another run since the driver looked
            return {**fields, "status": SKIPPED, "h5ad": h5ad_path("", task.stem).name}
        return {**fields, **_result_fields(result, self.predictor.checkpoint_sha256)}

    def _run_when_unlocked(self, opened: Future[OpenedSlide]) -> SlideResult:
        """Run the slide; while another process holds its staging folder (a worker of a killed
        driver, which Ray ends within about a minute), wait for it up to ``STAGING_LOCK_WAIT_S``."""
        assert self.predictor is not None
        deadline = time.monotonic() + STAGING_LOCK_WAIT_S
        while True:
            try:
                return self.predictor.run(opened.result(), self.output)
            except StagingLocked:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
                opened = self._opener.submit(self._reopen, opened)

    def _reopen(self, opened: Future[OpenedSlide]) -> OpenedSlide:
        """The slide ``opened`` held, opened again (a run closes the slide it is handed)."""
        first = opened.result()
        return self.predictor.open(first.path, first.spots, first.options)  # type: ignore[union-attr]

    def _take(self, task: SlideTask) -> Future[OpenedSlide]:
        """The open of ``task``: the prefetched one when it is this slide, else started now."""
        pending, self._next = self._next, None
        if pending is not None:
            if pending[0] == task.stem:
                return pending[1]
            close_when_opened(pending[1])  # given to another worker meanwhile
        return self._opener.submit(self._open, task)

    def close(self) -> None:
        if self._next is not None:
            close_when_opened(self._next[1])
            self._next = None
        self._opener.shutdown(wait=False)


def _result_fields(result: SlideResult, checkpoint_sha256: str) -> dict[str, Any]:
    """A done slide's manifest fields; its outputs named relative to the output folder, where the
    manifest is (so the folder can be moved, and read from any working directory)."""
    outputs = result.outputs
    assert outputs is not None  # ok and not skipped: written
    return {
        "status": DONE,
        "spots": result.n_spots,
        "mpp": result.mpp,
        "wall_s": result.wall_seconds,
        "stage_s": {k: v for k, v in result.seconds.items() if k in STAGES},
        "h5ad": outputs.h5ad.name,
        "csv": outputs.csv.name if outputs.csv else "",
        "heatmaps": outputs.heatmaps[0].parent.name if outputs.heatmaps else "",
        "checkpoint_sha256": checkpoint_sha256,
    }
