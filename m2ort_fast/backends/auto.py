"""The `auto` backend: build every candidate backend that is available on the device, time a few
batches of each on the same random inputs, and keep the fastest.

It says what it picked and why: ``backend.reason`` (also logged), and ``backend.trials`` with one
:class:`Trial` per candidate (spots/s, or why it was unavailable). Compiled candidates (aoti,
tensorrt) build their artifact on first use, which is cached: the first `auto` run on a machine
pays the compile, later ones reuse it.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import statistics
import time
from collections.abc import Sequence

import torch

from m2ort_fast.backends import backend_factory, backend_names, make_backend
from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.errors import M2ORTError, exception_detail
from m2ort_fast.model import IMAGE_SIZES_PX, M2ORT

log = logging.getLogger(__name__)

CPU_CANDIDATES = ("torch", "onnxruntime", "aoti")
GPU_CANDIDATES = ("torch", "triton", "aoti", "tensorrt", "onnxruntime")


@dataclasses.dataclass
class Trial:
    name: str
    spots_per_s: float | None = None  # None: unavailable
    build_s: float = 0.0
    error: str | None = None

    def describe(self) -> str:
        if self.spots_per_s is None:
            return f"{self.name}: unavailable ({self.error})"
        return f"{self.name}: {self.spots_per_s:.1f} spots/s"


def pick_fastest(trials: Sequence[Trial]) -> tuple[Trial, str]:
    """The fastest available trial and a one-line reason naming the runner-up."""
    ranked = sorted(((t.spots_per_s, t) for t in trials if t.spots_per_s is not None), key=lambda pair: -pair[0])
    if not ranked:
        raise M2ORTError("no backend is available: " + "; ".join(t.describe() for t in trials))
    best_speed, best = ranked[0]
    if len(ranked) > 1:
        next_speed, runner_up = ranked[1]
        reason = (
            f"picked {best.name}: {best_speed:.1f} spots/s, "
            f"{best_speed / next_speed:.2f}x the next ({runner_up.describe()})"
        )
    else:
        reason = f"picked {best.name}: the only available backend ({best_speed:.1f} spots/s)"
    unavailable = [t.describe() for t in trials if t.spots_per_s is None]
    if unavailable:
        reason += "; " + "; ".join(unavailable)
    return best, reason


def time_backend(backend, batch_size: int, repeats: int, device: torch.device) -> float:
    """Median spots/s over ``repeats`` batches after one warm-up, on fixed random inputs."""
    generator = torch.Generator().manual_seed(0)
    levels = [torch.rand(batch_size, 3, s, s, generator=generator) for s in IMAGE_SIZES_PX]
    backend(*levels)  # warm-up: lazy init, autotuning, caches
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        backend(*levels)  # returns a CPU tensor: the device work is finished
        seconds.append(time.perf_counter() - start)
    return batch_size / statistics.median(seconds)


def _accepted_options(name: str, options: dict) -> dict:
    """The options that backend ``name``'s factory takes (e.g. checkpoint_path is meaningless to
    the torch backend); unknown names are left to make_backend to refuse."""
    if name not in backend_names():
        return options
    try:
        parameters = inspect.signature(backend_factory(name)).parameters
    except ImportError:
        return options  # make_backend will report the missing toolkit
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return options
    return {k: v for k, v in options.items() if k in parameters}


class AutoBackend:
    """The fastest of ``candidates`` on ``device`` (default: all that can run there).

    backend(level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56)) -> (B, G)
    float32 on the CPU, through the chosen backend. Other options go to every candidate."""

    def __init__(
        self,
        model: M2ORT,
        card: ModelCard,
        *,
        device: torch.device,
        precision: str = "fp32",
        candidates: Sequence[str] | None = None,
        trial_batch_size: int | None = None,
        trial_repeats: int = 3,
        **options,
    ):
        self.device = torch.device(device)
        if candidates is None:
            candidates = GPU_CANDIDATES if self.device.type == "cuda" else CPU_CANDIDATES
        batch_size = self.trial_batch_size = trial_batch_size or (64 if self.device.type == "cuda" else 16)
        self.trials: list[Trial] = []
        backends = {}
        for name in candidates:
            trial = Trial(name)
            start = time.perf_counter()
            try:
                backend = make_backend(
                    name, model, card, device=self.device, precision=precision, **_accepted_options(name, options)
                )
                trial.build_s = time.perf_counter() - start
                trial.spots_per_s = time_backend(backend, batch_size, trial_repeats, self.device)
                backends[name] = backend
            except (M2ORTError, ImportError, RuntimeError, NotImplementedError) as exc:
                # unavailable here (toolkit missing, no GPU, precision unsupported, ...): keep the reason
                trial.error = exception_detail(exc)
            self.trials.append(trial)
        best, self.reason = pick_fastest(self.trials)
        self.backend = backends[best.name]
        self.chosen = best.name
        self.name = f"auto:{best.name}"
        log.info("auto backend on %s (batch %d): %s", self.device, batch_size, self.reason)

    def __call__(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        return self.backend(level1, level2, level3)
