"""The `auto` backend: build every candidate backend that is available on the device, time a few
batches of each on the same random inputs, and keep the fastest.

It says what it picked and why: ``backend.reason`` (also logged), and ``backend.trials`` with one
:class:`Trial` per candidate (spots/s, or why it was unavailable). Compiled candidates (aoti,
tensorrt) build their artifact on first use, which is cached: the first `auto` run on a machine
pays the compile, later ones reuse it.

With ``precision="auto"`` (``--precision auto``) the candidates are every (backend, precision) pair
that the backend runs on the device, over the precisions that held the quality bound there
(:data:`m2ort_fast.precision.HELD_BOUND`); a pair whose predictions on the trial batch stray from
the fp32 eager model's by more than :data:`~m2ort_fast.precision.GUARD_MAX_ABS` is not picked. The
choice is remembered in the artifact cache (``<cache>/auto/<key>.json``, keyed by checkpoint,
device, batch size, candidates and toolkit versions): later runs build only the chosen pair
(``remember=False`` times them again).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from m2ort_fast.backends import backend_factory, backend_names, make_backend
from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.errors import M2ORTError, exception_detail
from m2ort_fast.model import IMAGE_SIZES_PX, M2ORT
from m2ort_fast.precision import AUTO, BACKEND_PRECISIONS, GUARD_MAX_ABS, auto_precisions, check_precision

log = logging.getLogger(__name__)

CPU_CANDIDATES = ("torch", "onnxruntime", "aoti")
GPU_CANDIDATES = ("torch", "triton", "aoti", "tensorrt", "onnxruntime")


@dataclasses.dataclass
class Trial:
    name: str  # the backend, or "backend:precision" when auto picks the precision too
    spots_per_s: float | None = None  # None: unavailable
    build_s: float = 0.0
    error: str | None = None
    backend: str = ""  # default: name
    precision: str = "fp32"
    max_abs_vs_fp32: float | None = None  # precision auto: on the trial batch

    def __post_init__(self) -> None:
        self.backend = self.backend or self.name

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


def trial_inputs(batch_size: int) -> list[torch.Tensor]:
    """The fixed random levels every candidate is timed on."""
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(batch_size, 3, s, s, generator=generator) for s in IMAGE_SIZES_PX]


def time_backend(
    backend, batch_size: int, repeats: int, device: torch.device, levels: Sequence[torch.Tensor] | None = None
) -> float:
    """Median spots/s over ``repeats`` batches after one warm-up, on fixed random inputs."""
    levels = list(levels) if levels is not None else trial_inputs(batch_size)
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


def candidate_pairs(names: Sequence[str], precision: str, device_type: str) -> list[tuple[str, str]]:
    """(backend, precision) to try: ``precision`` for each name, or with precision auto every
    precision that held the bound on ``device_type`` that each backend runs there (backends not in
    the precision table: fp32 only)."""
    if precision != AUTO:
        return [(name, precision) for name in names]
    pairs = []
    for p in auto_precisions(device_type):
        for name in names:
            table = BACKEND_PRECISIONS.get(name)
            if (table is None and p == "fp32") or (table is not None and p in table.get(device_type, ())):
                pairs.append((name, p))
    return pairs


def choice_path(
    model: M2ORT,
    card: ModelCard,
    device: torch.device,
    batch_size: int,
    pairs: Sequence[tuple[str, str]],
    options: dict,
) -> Path:
    """Where the choice of --precision auto is remembered: ``<cache>/auto/<digest>.json``."""
    from m2ort_fast.export.artifacts import checkpoint_hash
    from m2ort_fast.export.cache import cache_root, device_name

    versions = [f"torch {torch.__version__}"]
    try:
        import onnxruntime

        versions.append(f"onnxruntime {onnxruntime.__version__}")
    except ImportError:
        pass
    sha = checkpoint_hash(model, card, options.get("checkpoint_path"))
    key = {
        "checkpoint_sha256": sha,
        "device": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "batch_size": batch_size,
        "candidates": [list(pair) for pair in pairs],
        "toolkits": versions,
        "guard": GUARD_MAX_ABS,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root(options.get("cache_dir")) / "auto" / f"{sha[:12]}-{digest}.json"


class AutoBackend:
    """The fastest of ``candidates`` on ``device`` (default: all that can run there).

    backend(level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56)) -> (B, G)
    float32 on the CPU, through the chosen backend. Other options go to every candidate.
    ``precision="auto"``: pick the precision too (see the module's docstring); ``self.precision``
    is the one picked."""

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
        remember: bool = True,
        **options,
    ):
        self.device = torch.device(device)
        if precision != AUTO:
            check_precision(precision, "the auto backend")
        if candidates is None:
            candidates = GPU_CANDIDATES if self.device.type == "cuda" else CPU_CANDIDATES
        batch_size = self.trial_batch_size = trial_batch_size or (64 if self.device.type == "cuda" else 16)
        pairs = candidate_pairs(candidates, precision, self.device.type)
        self.picks_precision = precision == AUTO
        self.trials: list[Trial] = []
        self.remembered: Path | None = None
        path = choice_path(model, card, self.device, batch_size, pairs, options) if self.picks_precision else None
        if path is not None and remember and self._recall(path, model, card, options):
            return
        levels = trial_inputs(batch_size)
        reference = None
        if self.picks_precision:  # what every lower precision is checked against: the fp32 eager model
            with torch.inference_mode():
                reference = copy.deepcopy(model).float().to(self.device).eval()(*(x.to(self.device) for x in levels))
                reference = reference.float().cpu()
        backends = {}
        for name, p in pairs:
            trial = Trial(f"{name}:{p}" if self.picks_precision else name, backend=name, precision=p)
            start = time.perf_counter()
            try:
                # each candidate its own copy of the weights: some cast the model they are given in place
                backend = make_backend(
                    name,
                    copy.deepcopy(model),
                    card,
                    device=self.device,
                    precision=p,
                    **_accepted_options(name, options),
                )
                trial.build_s = time.perf_counter() - start
                if reference is not None:
                    trial.max_abs_vs_fp32 = float((backend(*levels) - reference).abs().max())
                    if not trial.max_abs_vs_fp32 <= GUARD_MAX_ABS:  # NaN fails too
                        raise M2ORTError(
                            f"predictions differ from fp32 by {trial.max_abs_vs_fp32:.3g} on the trial batch "
                            f"(more than {GUARD_MAX_ABS})"
                        )
                trial.spots_per_s = time_backend(backend, batch_size, trial_repeats, self.device, levels)
                backends[trial.name] = backend
            except (M2ORTError, ImportError, RuntimeError, NotImplementedError) as exc:
                # unavailable here (toolkit missing, no GPU, precision unsupported, ...): keep the reason
                trial.error = exception_detail(exc)
            self.trials.append(trial)
        best, self.reason = pick_fastest(self.trials)
        self._use(backends[best.name], best)
        log.info("auto backend on %s (batch %d): %s", self.device, batch_size, self.reason)
        if path is not None:
            self._remember(path, best)

    def _use(self, backend, trial: Trial) -> None:
        self.backend = backend
        self.chosen = trial.backend
        self.precision = trial.precision
        self.name = f"auto:{trial.name}"

    def _remember(self, path: Path, best: Trial) -> None:
        record = {
            "backend": best.backend,
            "precision": best.precision,
            "reason": self.reason,
            "trial_batch_size": self.trial_batch_size,
            "trials": [dataclasses.asdict(t) for t in self.trials],
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as exc:  # a read-only cache costs the trials next time, nothing else
            log.warning("auto: cannot remember the choice in %s (%s)", path, exc.strerror)

    def _recall(self, path: Path, model: M2ORT, card: ModelCard, options: dict) -> bool:
        """Build the pair remembered at ``path``; False (trials follow) when none or it fails."""
        try:
            record = json.loads(path.read_text())
            name, precision = record["backend"], record["precision"]
            backend = make_backend(
                name, model, card, device=self.device, precision=precision, **_accepted_options(name, options)
            )
        except (OSError, ValueError, KeyError, TypeError, M2ORTError, ImportError, RuntimeError) as exc:
            if path.exists():
                log.warning("auto: not using the remembered choice %s (%s); timing again", path, exception_detail(exc))
            return False
        self.trials = [Trial(**t) for t in record.get("trials", [])]
        self.remembered = path
        self.reason = f"remembered ({path}): {record.get('reason', '')}"
        self._use(backend, Trial(f"{name}:{precision}", backend=name, precision=precision))
        log.info("auto backend on %s (batch %d): %s", self.device, self.trial_batch_size, self.reason)
        return True

    def __call__(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        return self.backend(level1, level2, level3)

    @property
    def forward_on_device(self):
        """The chosen backend's forward that leaves predictions on the device (the device data
        path's), or None where it has none."""
        return getattr(self.backend, "forward_on_device", None)
