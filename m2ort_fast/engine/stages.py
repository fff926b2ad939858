"""The threads of a streamed run, joined by bounded queues that give up when any stage failed."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

QUEUE_DEPTH = 2  # items in flight between two stages


class Stop(Exception):
    pass


class Pipe:
    """A bounded queue whose producers and consumers give up when any stage failed."""

    DONE = object()

    def __init__(self, failed: threading.Event, depth: int = QUEUE_DEPTH):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.failed = failed

    def put(self, item) -> None:
        while True:
            if self.failed.is_set():
                raise Stop
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self):
        """The next item (DONE included), waiting for it."""
        while True:
            if self.failed.is_set():
                raise Stop
            try:
                return self.queue.get(timeout=0.1)
            except queue.Empty:
                continue

    def __iter__(self):
        while (item := self.get()) is not self.DONE:
            yield item


class Stages:
    """The threads of one streamed run, joined by bounded queues (:meth:`pipe`): the first
    exception in any stage stops them all and is raised on the calling thread."""

    def __init__(self, name: str):
        self.name = name
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def pipe(self, depth: int = QUEUE_DEPTH) -> Pipe:
        return Pipe(self.failed, depth)

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
        except Stop:
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
