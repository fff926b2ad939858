"""The `auto` backend: build every candidate backend available on the device, time them at the
run's batch size in interleaved rounds until the pick is stable, and use the pick.

How it decides (:mod:`m2ort_fast.backends.timing`): one batch of every candidate per round, in a
rotating order, until the last 3 rounds' decisions agree or the time budget (``budget_s``, 60 s)
ends; a candidate within the noise of the fastest (round-by-round ratios) and of higher precision
is picked over it. It says what it picked and why: ``backend.reason`` (also logged),
``backend.trials`` (one :class:`Trial` per candidate: spots/s per round, or why it was
unavailable) and ``backend.report()`` (what ``m2ort-fast info --backends`` prints).

With ``precision="auto"`` (``--precision auto``) the candidates are every (backend, precision) pair
the backend runs on the device, over :func:`m2ort_fast.precision.auto_precisions` (held the quality
bound there and give a spot the same prediction whatever its batch-mates: not int8); a pair whose
predictions on the trial batch stray from the fp32 eager model's by more than
:data:`~m2ort_fast.precision.GUARD_MAX_ABS` is not picked. The pick is remembered in the artifact
cache (``<cache>/auto/<key>.json``, keyed by checkpoint, device, threads, batch size, candidates,
toolkit versions and this decision rule's version) **only when it was made on a quiet machine**
(stable rounds, no load beyond the cores, rounds that agree); later runs build only the
remembered pair. ``retime=True`` times again (and remembers the new pick if quiet);
``remember=False`` neither reads nor writes the record.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import inspect
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from m2ort_fast.backends import backend_factory, backend_names, make_backend
from m2ort_fast.backends.timing import ProcStatLoad, Rounds, RoundsPolicy, quartiles, run_rounds
from m2ort_fast.backends.workers import engine_call, input_dtype, input_token_px
from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.errors import M2ORTError, exception_detail
from m2ort_fast.model import IMAGE_SIZES_PX, M2ORT
from m2ort_fast.precision import AUTO, BACKEND_PRECISIONS, GUARD_MAX_ABS, auto_precisions, check_precision

log = logging.getLogger(__name__)

CPU_CANDIDATES = ("torch", "onnxruntime", "aoti")
GPU_CANDIDATES = ("torch", "triton", "aoti", "tensorrt", "onnxruntime")
# part of the remembered record's key: picks made by an older rule are not reused. 3: timed as the
# host path calls them, near-ties to the earlier candidate; 4: the torch backend's bf16 fused on AMX;
# 5: an LDPE model's torch backend timed on tokens, as the host path now hands them; 6: the torch
# backend's bf16 LayerNorm on the extension's kernel (AVX-512 CPUs)
DECISION_VERSION = 6


@dataclasses.dataclass
class Trial:
    name: str  # the backend, or "backend:precision" when auto picks the precision too
    spots_per_s: float | None = None  # median over the rounds; None: unavailable
    build_s: float = 0.0
    error: str | None = None
    backend: str = ""  # default: name
    precision: str = "fp32"
    max_abs_vs_fp32: float | None = None  # precision auto: on the trial batch
    batch_s: list[float] = dataclasses.field(default_factory=list)  # seconds per round's batch
    batch_size: int = 0
    left_race: int | None = None  # out of the race after this round (clearly slower)

    def __post_init__(self) -> None:
        self.backend = self.backend or self.name

    def spots_per_s_quartiles(self) -> tuple[float, float, float] | None:
        """(q25, median, q75) of spots/s over the rounds, or None."""
        if not self.batch_s or not self.batch_size:
            return None
        fast_s, median_s, slow_s = quartiles(self.batch_s)
        return self.batch_size / slow_s, self.batch_size / median_s, self.batch_size / fast_s

    def describe(self) -> str:
        if self.spots_per_s is None:
            return f"{self.name}: unavailable ({self.error})"
        spread = self.spots_per_s_quartiles()
        if spread is None or len(self.batch_s) < 2:
            return f"{self.name}: {self.spots_per_s:.1f} spots/s"
        return (
            f"{self.name}: {self.spots_per_s:.1f} spots/s "
            f"(IQR {spread[0]:.1f}-{spread[2]:.1f}, {len(self.batch_s)} rounds)"
        )


def trial_inputs(batch_size: int) -> list[torch.Tensor]:
    """The fixed random levels every candidate is timed on."""
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(batch_size, 3, s, s, generator=generator) for s in IMAGE_SIZES_PX]


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
    precision of :func:`auto_precisions` on ``device_type`` that each backend runs there (backends
    not in the precision table: fp32 only)."""
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
        "decision": DECISION_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root(options.get("cache_dir")) / "auto" / f"{sha[:12]}-{digest}.json"


class AutoBackend:
    """The pick among ``candidates`` on ``device`` (default: all that can run there).

    backend(level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56)) -> (B, G)
    float32 on the CPU, through the chosen backend. ``trial_batch_size``: the run's batch size (what
    the candidates are timed at; default 64). ``trial_repeats``: rounds before the first decision.
    ``budget_s``: the most seconds of timing. ``precision="auto"``: pick the precision too (see the
    module); ``self.precision`` is the one picked. Other options go to every candidate."""

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
        budget_s: float = 60.0,
        remember: bool = True,
        retime: bool = False,
        **options: Any,
    ):
        self.device = torch.device(device)
        if precision != AUTO:
            check_precision(precision, "the auto backend")
        if candidates is None:
            candidates = GPU_CANDIDATES if self.device.type == "cuda" else CPU_CANDIDATES
        batch_size = self.trial_batch_size = trial_batch_size or 64
        pairs = candidate_pairs(candidates, precision, self.device.type)
        self.picks_precision = precision == AUTO
        self.policy = RoundsPolicy(min_rounds=trial_repeats, budget_s=budget_s)
        self.trials: list[Trial] = []
        self.remembered: Path | None = None  # the record this pick was read from
        self.saved_to: Path | None = None  # where this run's pick was remembered
        self.timed_now = False
        self.record: dict[str, Any] = {}  # what was (or would have been) remembered
        path = choice_path(model, card, self.device, batch_size, pairs, options) if self.picks_precision else None
        if path is not None and remember and not retime and self._recall(path, model, card, options):
            return
        levels = trial_inputs(batch_size)
        backends = self._build(pairs, model, card, levels, options)
        if not backends:
            raise M2ORTError("no backend is available: " + "; ".join(t.describe() for t in self.trials))
        # each timed as the host path calls it: a backend whose calls may overlap, one call per thread,
        # on batches in the dtype it asks for (the torch backend in bf16 takes bf16 batches)
        calls = {name: engine_call(backend, levels) for name, backend in backends.items()}
        rounds = run_rounds(
            {name: call for name, (call, _) in calls.items()},
            {t.name: t.precision for t in self.trials},
            self.policy,
            load=ProcStatLoad(torch.get_num_threads()) if self.device.type == "cpu" else None,
            batches_per_call={name: batches for name, (_, batches) in calls.items()},
        )
        best = self._record_rounds(rounds)
        self._use(backends[best.name], best)
        log.info("auto backend on %s (batch %d): %s", self.device, batch_size, self.reason)
        if path is not None and remember:
            if rounds.remember:
                self._remember(path)
            else:
                kept = f"; the pick remembered in {path} stays" if path.exists() else ""
                why = "; ".join(rounds.busy)
                log.warning("auto: using %s for this run, not remembering it (%s)%s", best.name, why, kept)

    def _build(self, pairs, model: M2ORT, card: ModelCard, levels: list[torch.Tensor], options: dict) -> dict:
        """Each pair's backend, warmed up (and with precision auto checked against fp32 eager) on
        ``levels``; a Trial per pair in ``self.trials``, with why where it is unavailable."""
        reference = None
        if self.picks_precision:  # what every lower precision is checked against: the fp32 eager model
            with torch.inference_mode():
                reference = copy.deepcopy(model).float().to(self.device).eval()(*(x.to(self.device) for x in levels))
                reference = reference.float().cpu()
        backends = {}
        for name, p in pairs:
            trial = Trial(f"{name}:{p}" if self.picks_precision else name, backend=name, precision=p)
            trial.batch_size = levels[0].shape[0]
            start = time.perf_counter()
            try:
                # each candidate its own copy of the weights: some cast the model they are given in place
                accepted = _accepted_options(name, options)
                backend = make_backend(name, copy.deepcopy(model), card, device=self.device, precision=p, **accepted)
                trial.build_s = time.perf_counter() - start
                out = backend(*levels)  # warm-up: lazy init, autotuning, caches
                if reference is not None:
                    trial.max_abs_vs_fp32 = float((out - reference).abs().max())
                    if not trial.max_abs_vs_fp32 <= GUARD_MAX_ABS:  # NaN fails too
                        raise M2ORTError(
                            f"predictions differ from fp32 by {trial.max_abs_vs_fp32:.3g} on the trial batch "
                            f"(more than {GUARD_MAX_ABS})"
                        )
                backends[trial.name] = backend
            except (M2ORTError, ImportError, RuntimeError, NotImplementedError) as exc:
                # unavailable here (toolkit missing, no GPU, precision unsupported, ...): keep the reason
                trial.error = exception_detail(exc)
            self.trials.append(trial)
        return backends

    def _record_rounds(self, rounds: Rounds) -> Trial:
        """Fill the trials with ``rounds``' figures, set the reason and the record; the picked trial."""
        self.timed_now = True
        by_name = {t.name: t for t in self.trials}
        for name, seconds in rounds.samples.items():
            trial = by_name[name]
            trial.batch_s = seconds
            trial.spots_per_s = trial.batch_size / statistics.median(seconds)
            trial.left_race = rounds.left_race.get(name)
        best = by_name[rounds.pick.name]
        ranked = [by_name[name].describe() for name in rounds.pick.ranking]
        unavailable = [t.describe() for t in self.trials if t.spots_per_s is None]
        self.reason = (
            f"picked {best.name} ({rounds.pick.why}); {rounds.stopped}; ranking: {', '.join(ranked)}"
            + (f"; {'; '.join(unavailable)}" if unavailable else "")
            + (f"; not remembered: {'; '.join(rounds.busy)}" if rounds.busy else "")
        )
        self.record = {
            "backend": best.backend,
            "precision": best.precision,
            "reason": self.reason,
            "trial_batch_size": self.trial_batch_size,
            "decided_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "stopped": rounds.stopped,
            "rounds": rounds.rounds,
            "busy": rounds.busy,
            "load": dataclasses.asdict(rounds.load) if rounds.load else None,
            "trials": [dataclasses.asdict(t) for t in self.trials],
        }
        return best

    def _use(self, backend, trial: Trial) -> None:
        self.backend = backend
        self.chosen = trial.backend
        self.precision = trial.precision
        self.name = f"auto:{trial.name}"

    def _remember(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
            tmp.write_text(json.dumps(self.record, indent=2) + "\n")
            os.replace(tmp, path)
            self.saved_to = path
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
            self.trials = [Trial(**t) for t in record.get("trials", [])]
        except (OSError, ValueError, KeyError, TypeError, M2ORTError, ImportError, RuntimeError) as exc:
            if path.exists():
                log.warning("auto: not using the remembered choice %s (%s); timing again", path, exception_detail(exc))
            return False
        self.remembered, self.record = path, record
        self.reason = f"remembered ({path}, decided {record.get('decided_at', '?')}): {record.get('reason', '')}"
        self._use(backend, Trial(f"{name}:{precision}", backend=name, precision=precision))
        log.info("auto backend on %s (batch %d): %s", self.device, self.trial_batch_size, self.reason)
        return True

    def report(self) -> dict[str, Any]:
        """What auto picked, from where (timed now or remembered), why, and every candidate's figures."""
        return {
            "pick": self.name.removeprefix("auto:"),
            "backend": self.chosen,
            "precision": self.precision,
            "batch_size": self.trial_batch_size,
            "source": "timed now" if self.timed_now else "remembered",
            "record": str(self.remembered or self.saved_to or "") or None,
            "reason": self.reason,
            **{k: self.record.get(k) for k in ("decided_at", "stopped", "rounds", "busy", "load")},
            "trials": self.trials,
        }

    def __call__(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        return self.backend(level1, level2, level3)

    @property
    def concurrent_calls(self) -> bool:
        """Whether the chosen backend's calls may overlap (see backends.workers)."""
        return bool(getattr(self.backend, "concurrent_calls", False))

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the chosen backend takes its batches in (float32 unless it says otherwise)."""
        return input_dtype(self.backend)

    @property
    def input_token_px(self) -> tuple[int, ...] | None:
        """Where the chosen backend takes its levels as tokens: their sides (see backends.workers)."""
        return input_token_px(self.backend)

    @property
    def forward_on_device(self):
        """The chosen backend's forward that leaves predictions on the device (the device data
        path's), or None where it has none."""
        return getattr(self.backend, "forward_on_device", None)
