"""How the host path calls a backend: how many calls run at once on the CPU, on batches of which
dtype, and one "call" made that way (for ``--backend auto``'s timing and the benches).

An eager torch model on the CPU splits each op over torch's threads with a barrier per op, so a
data-path thread that preempts one of its threads stalls the others at the next barrier, and two
threads on `tiny` bf16 ran only ~1.1-1.5x one. Independent calls, one per thread of torch's budget
on one intra-op thread each, have no barriers (whole her2st C2, bf16: the model alone ran 1.3-1.6x
faster called this way than one call at a time; bench/slide.py). A backend says its calls may
overlap with ``concurrent_calls = True`` (the torch backend on the CPU); the host path
(:func:`m2ort_fast.engine.run_stream`) and ``--backend auto``'s timing call it so.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

import torch

from m2ort_fast.model import patchify


def model_workers(backend) -> int:
    """Calls of ``backend`` to run at once: ``torch.get_num_threads()`` where the backend has
    ``concurrent_calls``, else 1."""
    if not getattr(backend, "concurrent_calls", False):
        return 1
    return max(1, torch.get_num_threads())


def input_dtype(backend) -> torch.dtype:
    """The dtype ``backend`` takes its batches in: its ``input_dtype``, else float32."""
    return getattr(backend, "input_dtype", torch.float32)


def input_token_px(backend) -> tuple[int, ...] | None:
    """Where ``backend`` takes each level as tokens (model.patchify's layout) rather than an
    image: their side per level, its ``input_token_px``; else None."""
    return getattr(backend, "input_token_px", None)


def backend_inputs(backend, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Images (B, 3, H, W) per level as the host path hands them to ``backend``: in its
    :func:`input_dtype`, as tokens (B, T, p*p*3) where it has :func:`input_token_px`."""
    token_px = input_token_px(backend)
    given = [x.to(input_dtype(backend)) for x in levels]
    if token_px is None:
        return given
    return [patchify(x, p).contiguous() for x, p in zip(given, token_px, strict=True)]


def engine_call(backend, levels: Sequence[torch.Tensor]) -> tuple[Callable[[], object], int]:
    """``backend`` on ``levels`` (images) as the host path calls it: a callable running
    ``model_workers`` batches at once (:func:`calls_at_once`) or one call, on the levels as
    :func:`backend_inputs` gives them; and the number of batches that callable runs."""
    workers = model_workers(backend)
    given = backend_inputs(backend, levels)
    if workers > 1:
        return calls_at_once(backend, [given] * workers), workers
    return functools.partial(backend, *given), 1


def calls_at_once(backend, batches: Sequence[Sequence[torch.Tensor]]) -> Callable[[], None]:
    """A callable that runs ``backend`` on every batch of ``batches`` (each: the three levels) at
    once, each on its own thread with one intra-op thread, as the host path does; torch's thread
    setting of the calling thread is left as it was."""

    def call() -> None:
        threads_before = torch.get_num_threads()
        errors: list[BaseException] = []

        def one(levels: Sequence[torch.Tensor]) -> None:
            torch.set_num_threads(1)
            try:
                backend(*levels)
            except BaseException as exc:  # raised on the calling thread
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(levels,)) for levels in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        torch.set_num_threads(threads_before)  # torch keeps the last setting for new threads
        if errors:
            raise errors[0]

    return call
