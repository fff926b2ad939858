"""Cohorts: many slides over Ray workers on one or many machines, or one shard per job-array task.

    from m2ort_fast.cohort import predict_cohort
    run = predict_cohort(slides, model="model.safetensors", out_dir="results", ray_address="auto")

With Ray (``ray_address``), the slides go to long-lived Ray Core actors (:class:`CohortWorker`),
one per GPU (on a CPU-only cluster, one per ``cpus_per_worker`` cores), each loading the model and
its backend once. Slides are handed out one at a time, largest first, to whichever worker is free;
each worker opens the next slide it is given (slide, spots, thumbnail, tissue) while it predicts
the current one, as :func:`m2ort_fast.predict.predict_slides` does. Every slide is written as
``predict`` writes it (staged, renamed, ``.h5ad`` last) into one output folder that all workers
see. ``OUT/manifest.csv`` has one row per slide (status, error, spots, seconds per stage, worker
and host, outputs, checkpoint sha256), replaced atomically as slides finish, so a killed driver
leaves a valid manifest; the same call again skips done slides and retries failed ones only when
asked (``retry_failed``).

Faults: a slide's own error (bad file, no mpp) is recorded and the run goes on. A worker that dies
mid-slide (killed, out of memory, node lost) is restarted by Ray (``WORKER_RESTARTS``, placed where
Ray finds room) and its slide handed out again, to whichever worker is free, up to
``max_attempts`` times; its staging folder is removed first, so nothing half-written remains and
the retry starts clean. Ctrl-C (or SIGTERM through the CLI) kills the workers, removes their
staging folders and writes the manifest before the interrupt goes on.

Without Ray (``ray_address=None``) the same worker runs in this process, over every slide or, with
``shard=(i, n)``, over the i-th of n shards balanced by slide size (job arrays: Slurm, PBS, LSF),
with its own manifest (``manifest.shard-I-of-N.csv``). Ray is imported only on the Ray path.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import inspect
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from m2ort_fast.checkpoint import file_sha256
from m2ort_fast.errors import M2ORTError, OutputError, exception_detail
from m2ort_fast.options import DEFAULT_OUT_DIR
from m2ort_fast.outputs import STAGING_SUFFIX, StagedOutput, ensure_out_dir, h5ad_path, output_errors
from m2ort_fast.predict import DEFAULT_CHECKPOINT, Predictor, SlideResult, _close_when_opened, _OpenedSlide
from m2ort_fast.spots import Spots

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
DONE, FAILED, SKIPPED, PENDING, RUNNING = "done", "failed", "skipped", "pending", "running"
# The engine's stages (m2ort_fast.predict), one manifest column each; the streamed ones overlap.
STAGES = ("open", "plan", "read", "crop", "resize", "assemble", "model", "write")
DEFAULT_MAX_ATTEMPTS = 3  # dispatches of one slide whose worker died under it
WORKER_RESTARTS = 3  # Ray restarts of one worker (max_restarts) before it is given up
DEFAULT_CPUS_PER_WORKER = 8  # CPU-only clusters: decode threads + the model's intra-op threads
# The manifest is rewritten at most this often (plus at the end): a 10,000-row file is ~3 MB.
MANIFEST_MIN_INTERVAL_S = 0.5
WAIT_S = 0.5  # the driver's longest sleep: Ctrl-C and the manifest's next write are not held up
MAX_PROBES = 20  # a restarting worker that still does not answer is given up
STAGING_UNLOCK_WAIT_S = 10.0  # a dead worker's staging lock is released when its process is gone


# --------------------------------------------------------------------------------------------
# The manifest


@dataclass
class ManifestRow:
    """One slide of a cohort run. ``attempts``: dispatches in the run that last handled it;
    ``stage_s``: seconds per engine stage (overlapping when streamed); ``finished``: UTC."""

    slide: str
    stem: str
    status: str = PENDING
    error: str = ""
    attempts: int = 0
    spots: int | None = None
    mpp: float | None = None
    wall_s: float | None = None
    stage_s: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    host: str = ""
    h5ad: str = ""
    csv: str = ""
    heatmaps: str = ""
    checkpoint_sha256: str = ""
    size_bytes: int = 0
    finished: str = ""
    retried_because: str = ""

    def to_csv(self) -> dict[str, str]:
        row = {}
        for name in MANIFEST_COLUMNS:
            if name.endswith("_s") and name[:-2] in STAGES:
                value: Any = self.stage_s.get(name[:-2])
            else:
                value = getattr(self, name)
            row[name] = "" if value is None else str(value)
        return row

    @classmethod
    def from_csv(cls, row: dict[str, str]) -> ManifestRow:
        def number(name: str, kind: type) -> Any:
            text = row.get(name) or ""
            return kind(text) if text else None

        return cls(
            slide=row["slide"],
            stem=row["stem"],
            status=row.get("status") or PENDING,
            error=row.get("error") or "",
            attempts=number("attempts", int) or 0,
            spots=number("spots", int),
            mpp=number("mpp", float),
            wall_s=number("wall_s", float),
            stage_s={stage: float(row[f"{stage}_s"]) for stage in STAGES if row.get(f"{stage}_s")},
            worker=row.get("worker") or "",
            host=row.get("host") or "",
            h5ad=row.get("h5ad") or "",
            csv=row.get("csv") or "",
            heatmaps=row.get("heatmaps") or "",
            checkpoint_sha256=row.get("checkpoint_sha256") or "",
            size_bytes=number("size_bytes", int) or 0,
            finished=row.get("finished") or "",
            retried_because=row.get("retried_because") or "",
        )


MANIFEST_COLUMNS = [
    "slide",
    "stem",
    "status",
    "error",
    "attempts",
    "spots",
    "mpp",
    "wall_s",
    *[f"{stage}_s" for stage in STAGES],
    "worker",
    "host",
    "h5ad",
    "csv",
    "heatmaps",
    "checkpoint_sha256",
    "size_bytes",
    "finished",
    "retried_because",
]


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """The rows of a manifest (none when the file does not exist); M2ORTError (one line) when it
    is not one (this module replaces it atomically, so a killed run never leaves it cut)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"slide", "stem", "status"} <= set(reader.fieldnames):
                raise ValueError("no slide, stem and status columns")
            return [ManifestRow.from_csv(row) for row in reader]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, csv.Error) as exc:
        raise M2ORTError(
            f"not a readable run manifest ({exception_detail(exc)}): move it away to start the run afresh", path
        ) from None


class Manifest:
    """The run's rows (this run's slides in order, then rows of earlier runs' other slides) and
    the file they are written to: replaced atomically (temporary file, fsync, rename), at most
    every ``MANIFEST_MIN_INTERVAL_S`` unless forced. The run holds an exclusive lock on a lock file
    beside it (``.<name>.lock``), so two drivers cannot run into one manifest."""

    def __init__(self, path: Path, rows: list[ManifestRow], others: list[ManifestRow]):
        self.path, self.rows, self.others = path, rows, others
        self._written_at = 0.0
        self.dirty = True

    def write(self, force: bool = False) -> None:
        if not self.dirty or (not force and time.monotonic() - self._written_at < MANIFEST_MIN_INTERVAL_S):
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with output_errors(self.path.parent):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
                writer.writeheader()
                writer.writerows(row.to_csv() for row in [*self.rows, *self.others])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        self._written_at, self.dirty = time.monotonic(), False

    def changed(self) -> None:
        self.dirty = True


@contextlib.contextmanager
def _manifest_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside the manifest for the run; OutputError when another run has it."""
    lock_path = path.with_name(f".{path.name}.lock")
    with output_errors(path.parent):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"another cohort run is writing {path.name} in this folder (its lock {lock_path.name} is held): "
                f"wait for it, or use another --out",
                path.parent,
            ) from None
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Shards (job arrays) and the order slides are handed out in


def slide_size(path: str | os.PathLike) -> int:
    """The slide file's size in bytes (0 when it cannot be read: its worker will say why)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def shard_members(slides: Sequence[str], sizes: Sequence[int], count: int) -> list[list[int]]:
    """Positions of ``slides`` in each of ``count`` shards, balanced by size: largest first (ties by
    path), each to the shard with the fewest bytes so far (ties: the lower shard). The shards
    partition the list, and the split depends only on the paths and sizes, not on the list's order,
    so every task of an array computes the same one. Within a shard: largest first."""
    if count < 1:
        raise M2ORTError(f"the shard count must be at least 1, got {count}")
    loads, members = [0] * count, [[] for _ in range(count)]  # type: list[int], list[list[int]]
    for position in sorted(range(len(slides)), key=lambda p: (-sizes[p], str(slides[p]), p)):
        shard = min(range(count), key=lambda s: (loads[s], s))
        members[shard].append(position)
        loads[shard] += sizes[position]
    return members


def parse_shard(text: str) -> tuple[int, int]:
    """ "I/N" -> (I, N), 0 <= I < N (I: the task's index from 0, e.g. $SLURM_ARRAY_TASK_ID)."""
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise M2ORTError(f"shard {text!r} is not I/N (e.g. 0/8: the first of 8 shards, I from 0)") from None
    if not 0 <= i < n:
        raise M2ORTError(f"shard {text!r}: I must be at least 0 and less than N (I counts from 0)")
    return i, n


# --------------------------------------------------------------------------------------------
# The worker: one loaded model, many slides (a Ray actor, or a plain object in this process)


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
        open_options: dict[str, Any],
        run_options: dict[str, Any],
        out_dir: str,
        overwrite: bool,
        num_threads: int = 0,
    ):
        started = time.perf_counter()
        self.name, self.host, self.pid = name, socket.gethostname(), os.getpid()
        self.open_options, self.run_options = open_options, run_options
        self.out_dir, self.overwrite = Path(out_dir), overwrite
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
        self._next: tuple[str, Future[_OpenedSlide]] | None = None

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

    def _open(self, task: SlideTask) -> _OpenedSlide:
        assert self.predictor is not None
        return self.predictor._open_slide(task.slide, spots=task.spots, **self.open_options)

    def run(self, task: SlideTask, prefetch: SlideTask | None = None) -> dict[str, Any]:
        """Predict ``task``'s slide; open ``prefetch``'s meanwhile (the slide this worker is given next)."""
        if self.predictor is None:
            return {"status": FAILED, "error": self.error or "the model did not load"}
        opened = self._take(task)
        if prefetch is not None:
            self._next = (prefetch.stem, self._opener.submit(self._open, prefetch))
        fields: dict[str, Any] = {"worker": self.name, "host": self.host}
        try:
            result = self.predictor._predict_opened(
                opened.result(), out_dir=self.out_dir, overwrite=self.overwrite, **self.run_options
            )
        except M2ORTError as exc:  # the slide's own problem: the driver logs it, the worker goes on
            return {**fields, "status": FAILED, "error": str(exc)}
        except Exception as exc:  # a bug: recorded (traceback in this worker's log), the cohort goes on
            log.exception("%s: unexpected error", task.slide)
            return {**fields, "status": FAILED, "error": f"unexpected {type(exc).__name__}: {exception_detail(exc)}"}
        if result.skipped:  # finished by another run since the driver looked
            return {**fields, "status": SKIPPED, "h5ad": str(h5ad_path(self.out_dir, task.stem))}
        return {**fields, **_result_fields(result, self.predictor.checkpoint_sha256)}

    def _take(self, task: SlideTask) -> Future[_OpenedSlide]:
        """The open of ``task``: the prefetched one when it is this slide, else started now."""
        pending, self._next = self._next, None
        if pending is not None:
            if pending[0] == task.stem:
                return pending[1]
            _close_when_opened(pending[1])  # given to another worker meanwhile
        return self._opener.submit(self._open, task)

    def close(self) -> None:
        if self._next is not None:
            _close_when_opened(self._next[1])
            self._next = None
        self._opener.shutdown(wait=False)


def _result_fields(result: SlideResult, checkpoint_sha256: str) -> dict[str, Any]:
    outputs = result.outputs
    assert outputs is not None  # ok and not skipped: written
    return {
        "status": DONE,
        "spots": result.n_spots,
        "mpp": result.mpp,
        "wall_s": result.wall_seconds,
        "stage_s": {k: v for k, v in result.seconds.items() if k in STAGES},
        "h5ad": str(outputs.h5ad),
        "csv": str(outputs.csv) if outputs.csv else "",
        "heatmaps": str(outputs.heatmaps[0].parent) if outputs.heatmaps else "",
        "checkpoint_sha256": checkpoint_sha256,
    }


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class CohortRun:
    """What :func:`predict_cohort` did: the rows of its slides (in the order given), the manifest,
    the workers (name, host, pid, load_s: model + backend load, ready_s: from the run's start) and
    seconds: ``connect`` (Ray), ``start`` (to the first worker ready), ``total``."""

    rows: list[ManifestRow]
    manifest: Path
    workers: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(row.status == status for row in self.rows)


def predict_cohort(
    slides: Iterable[str | os.PathLike],
    *,
    model: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = DEFAULT_OUT_DIR,
    spots: Sequence[str | os.PathLike | Spots | None] | None = None,
    ray_address: str | None = "auto",
    workers: int | None = None,
    cpus_per_worker: int = DEFAULT_CPUS_PER_WORKER,
    shard: tuple[int, int] | None = None,
    retry_failed: bool = False,
    overwrite: bool = False,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    **options: Any,
) -> CohortRun:
    """Predict a cohort into ``out_dir`` with a run manifest; see the module's docstring.

    ``ray_address``: "auto" (a running cluster: $RAY_ADDRESS or the one ``ray start`` made here,
    else a new local one), an address ("host:6379", "ray://host:10001"), or None: no Ray, this
    process. A Ray already initialised by the caller is used as it is. ``workers``: how many
    (default: one per GPU; without GPUs, one per ``cpus_per_worker`` cores of each node).
    ``shard``: (i, n): only the i-th of n size-balanced shards (0 <= i < n), with its own manifest.
    ``retry_failed``: redo slides the manifest records as failed (default: keep them as they are).
    ``overwrite``: redo every slide. ``options``: as :func:`m2ort_fast.predict.predict_slides`
    (backend, device, precision, batch_size, spacing_um, mpp, heatmap_genes, n_heatmaps, ...).
    """
    started = time.perf_counter()
    paths = [str(s) for s in slides]
    spot_sources = list(spots) if spots is not None else [None] * len(paths)
    if len(spot_sources) != len(paths):
        raise M2ORTError(f"{len(spot_sources)} spot files given for {len(paths)} slides")
    if max_attempts < 1:
        raise M2ORTError(f"max_attempts must be at least 1, got {max_attempts}")
    predictor_options, open_options, run_options = split_options(options)
    stems = [Path(p).stem for p in paths]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise M2ORTError(
            f"several slides would write {repeated[0]}.h5ad into {out_dir}: slides need distinct file names"
        )
    sizes = [slide_size(p) for p in paths]
    positions = list(range(len(paths)))
    manifest_name = MANIFEST_NAME
    if shard is not None:
        index, count = shard
        if not 0 <= index < count:
            raise M2ORTError(f"shard {index}/{count}: I must be at least 0 and less than N")
        positions = sorted(shard_members(paths, sizes, count)[index])
        manifest_name = f"manifest.shard-{index}-of-{count}.csv"
    out = ensure_out_dir(out_dir)
    checkpoint = str(model) if model is not None else None
    try:
        sha = file_sha256(checkpoint or DEFAULT_CHECKPOINT)
    except OSError as exc:
        raise M2ORTError(f"cannot read the checkpoint: {exception_detail(exc)}", checkpoint) from None

    manifest_path = out / manifest_name
    with _manifest_lock(manifest_path):
        manifest, todo = _plan(manifest_path, paths, stems, sizes, positions, out, sha, retry_failed, overwrite)
        tasks = {i: SlideTask(slide=paths[i], spots=spot_sources[i], stem=stems[i]) for i in positions}
        rows = {i: row for i, row in zip(positions, manifest.rows, strict=True)}
        run = CohortRun(rows=manifest.rows, manifest=manifest_path)
        done_before = sum(row.status == DONE for row in manifest.rows)
        log.info(
            "%d slides%s: %d to do, %d done earlier (manifest %s)",
            len(positions),
            f" in shard {shard[0]}/{shard[1]}" if shard else "",
            len(todo),
            done_before,
            manifest_path,
        )
        worker_args = dict(
            checkpoint=checkpoint,
            predictor_options=predictor_options,
            open_options=open_options,
            run_options=run_options,
            out_dir=str(out),
            overwrite=overwrite,
        )
        try:
            # (nothing to do: no worker is started, nor Ray connected to)
            if todo and ray_address is None:
                _run_here(run, manifest, tasks, rows, todo, worker_args, sha)
            elif todo and ray_address is not None:
                driver = _RayDriver(run, manifest, tasks, rows, todo, worker_args, sha, max_attempts, out)
                driver.run(ray_address, workers, cpus_per_worker, predictor_options)
        finally:
            manifest.write(force=True)
    run.seconds["total"] = round(time.perf_counter() - started, 4)
    log.info(
        "%d done, %d failed, %d skipped (manifest %s)",
        run.count(DONE),
        run.count(FAILED),
        run.count(SKIPPED),
        manifest_path,
    )
    return run


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``options`` as predict_slides takes them -> (Predictor's, the open stage's, the rest of
    predict_slide's with its defaults); read from the signatures, so they stay in step."""
    predictor_keys = set(inspect.signature(Predictor.__init__).parameters) - {"self", "checkpoint"}
    slide_parameters = inspect.signature(Predictor.predict_slide).parameters
    slide_keys = set(slide_parameters) - {"self", "slide_path", "spots", "out_dir", "overwrite"}
    unknown = sorted(set(options) - predictor_keys - slide_keys)
    if unknown:
        raise M2ORTError(f"unknown option {unknown[0]!r} for a cohort run")
    if options.get("stem"):
        raise M2ORTError("stem names one slide's outputs; a cohort's are named after each slide's file")
    open_keys = set(inspect.signature(Predictor._open_slide).parameters) & slide_keys
    run_keys = set(inspect.signature(Predictor._predict_opened).parameters) & slide_keys
    return (
        {k: v for k, v in options.items() if k in predictor_keys},
        {k: v for k, v in options.items() if k in open_keys},
        {k: options.get(k, slide_parameters[k].default) for k in run_keys},
    )


def _plan(
    path: Path,
    paths: list[str],
    stems: list[str],
    sizes: list[int],
    positions: list[int],
    out: Path,
    sha: str,
    retry_failed: bool,
    overwrite: bool,
) -> tuple[Manifest, deque[int]]:
    """The manifest's rows for this run (kept from the last run where done, or failed and not
    retried) and the queue of slides to do, largest first. A slide whose ``.h5ad`` exists with no
    row (another run made it) is queued: its worker skips it, or refuses it when made otherwise,
    as ``predict`` does."""
    earlier = {row.stem: row for row in read_manifest(path)}
    rows, todo = [], []
    for i in positions:
        row = earlier.pop(stems[i], None)
        fresh = ManifestRow(slide=paths[i], stem=stems[i], size_bytes=sizes[i])
        h5ad = h5ad_path(out, stems[i])
        if overwrite or row is None or row.status not in (DONE, FAILED, SKIPPED):
            row = fresh
        elif row.status == DONE and row.checkpoint_sha256 and row.checkpoint_sha256 != sha and h5ad.exists():
            raise M2ORTError(
                f"{stems[i]} was done with another checkpoint (sha256 {row.checkpoint_sha256[:12]}, this run's "
                f"is {sha[:12]}): use another --out, or --overwrite to redo the cohort",
                path,
            )
        elif (row.status in (DONE, SKIPPED) and not h5ad.exists()) or (row.status == FAILED and retry_failed):
            row = fresh  # outputs removed since, or a failure to retry
        if row is fresh:
            todo.append(i)
        rows.append(row)
    todo.sort(key=lambda i: (-sizes[i], paths[i]))
    return Manifest(path, rows, list(earlier.values())), deque(todo)


def _finish_row(row: ManifestRow, fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        setattr(row, name, value)
    row.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")


def _log_row(row: ManifestRow, done: int, total: int) -> None:
    where = f"{row.worker}@{row.host}" if row.worker else "?"
    if row.status == DONE:
        log.info("%s: done, %s spots in %.2f s on %s (%d of %d)", row.slide, row.spots, row.wall_s, where, done, total)
    elif row.status == SKIPPED:
        log.info("%s: skipped, its .h5ad exists (%d of %d)", row.slide, done, total)
    else:
        log.error("%s (on %s; %d of %d)", row.error, where, done, total)


def _run_here(
    run: CohortRun,
    manifest: Manifest,
    tasks: dict[int, SlideTask],
    rows: dict[int, ManifestRow],
    todo: deque[int],
    worker_args: dict[str, Any],
    sha: str,
) -> None:
    """Every slide of ``todo`` in this process, with one worker (no Ray)."""
    started = time.perf_counter()
    worker = CohortWorker(f"pid-{os.getpid()}", **worker_args)
    if worker.error:
        raise M2ORTError(worker.error)
    run.workers.append({**worker.info(), "ready_s": round(time.perf_counter() - started, 4)})
    run.seconds["start"] = run.workers[0]["ready_s"]
    order, total = list(todo), len(todo)
    current: int | None = None
    try:
        for k, i in enumerate(order):
            current = i
            row = rows[i]
            row.status, row.attempts, row.worker, row.host = RUNNING, row.attempts + 1, worker.name, worker.host
            manifest.changed()
            manifest.write()
            prefetch = tasks[order[k + 1]] if k + 1 < len(order) else None
            _finish_row(row, worker.run(tasks[i], prefetch))
            current = None
            manifest.changed()
            manifest.write()
            _log_row(row, k + 1, total)
    except BaseException:
        if current is not None:  # interrupted: its staging folder went with the exception
            rows[current].status = PENDING
            manifest.changed()
        raise
    finally:
        worker.close()


# --------------------------------------------------------------------------------------------
# Ray


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise M2ORTError(
            'Ray is not installed: pip install "m2ort-fast[ray]" (or run shards without Ray: --shard I/N)'
        ) from None
    return ray


def worker_layout(
    nodes: Sequence[dict[str, float]], workers: int | None, cpus_per_worker: int, use_gpu: bool
) -> tuple[int, float, float]:
    """(workers, CPUs each, GPUs each) for a cluster whose alive nodes have ``nodes``' resources
    ({"CPU": .., "GPU": ..}): one worker per GPU with the CPUs that come with it (``workers`` more
    than the GPUs: k = ceil(workers / GPUs) share each GPU, 1/k of it and of its CPUs each, so the
    CPU-side stages of k slides overlap on one GPU), or on CPUs alone ``cpus_per_worker`` each
    (``workers`` given: as many CPUs each as lets them all fit, node by node, so that none waits
    for a node with room that never comes)."""
    if use_gpu:
        gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= 1]
        gpus = sum(int(n["GPU"]) for n in gpu_nodes)
        count = workers or gpus
        share = -(-count // gpus)  # workers per GPU
        cpus = min(max(1, int(n.get("CPU", 1) // (int(n["GPU"]) * share))) for n in gpu_nodes)
        return count, float(cpus), 1.0 / share
    node_cpus = [int(n.get("CPU", 0)) for n in nodes]
    if workers is None:
        each = min(cpus_per_worker, max(node_cpus, default=1)) or 1
        return max(1, sum(c // each for c in node_cpus)), float(each), 0.0
    for each in range(max(node_cpus, default=1), 0, -1):
        if sum(c // each for c in node_cpus) >= workers:
            return workers, float(each), 0.0
    return workers, max(sum(node_cpus), 1) / workers, 0.0  # more workers than CPUs: they share them


def _death_reason(exc: BaseException) -> str:
    """A Ray error about a dead worker as one short line (Ray's text spans many)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith("The actor") and "because" in line), None)
    return exception_detail(Exception(reason or (lines[0] if lines else type(exc).__name__)))


def _discard_staging(out: Path, stem: str) -> None:
    """Remove a dead worker's staging folder once its lock is free (its process is gone)."""
    if not (out / f".{stem}{STAGING_SUFFIX}").exists():
        return
    deadline = time.monotonic() + STAGING_UNLOCK_WAIT_S
    while True:
        try:
            StagedOutput(out, stem).discard()
            return
        except OutputError as exc:
            if time.monotonic() > deadline:
                log.warning("%s (left in place)", exc)
                return
            time.sleep(0.2)


@dataclass
class _Slot:
    """One actor as the driver sees it: idle, busy (``running``), restarting or dead."""

    name: str
    handle: Any
    state: str = "starting"
    host: str = ""
    running: int | None = None
    reserved: int | None = None  # the slide it opens meanwhile: given to it next
    probes: int = 0  # "are you back?" asked since it last died


class _RayDriver:
    """Hands the slides of ``todo`` to Ray actors and records what comes back."""

    def __init__(
        self,
        run: CohortRun,
        manifest: Manifest,
        tasks: dict[int, SlideTask],
        rows: dict[int, ManifestRow],
        todo: deque[int],
        worker_args: dict[str, Any],
        sha: str,
        max_attempts: int,
        out: Path,
    ):
        self.run_, self.manifest, self.tasks, self.rows, self.queue = run, manifest, tasks, rows, todo
        self.worker_args, self.sha, self.max_attempts, self.out = worker_args, sha, max_attempts, out
        self.total, self.finished = len(todo), 0
        self.slots: list[_Slot] = []
        self.refs: dict[Any, tuple[_Slot, str]] = {}  # in flight: ObjectRef -> (slot, "ready" | "run")
        self.started = time.perf_counter()
        self.last_death = ""

    def run(self, address: str, workers: int | None, cpus_per_worker: int, predictor_options: dict[str, Any]) -> None:
        ray = _import_ray()
        self.ray = ray
        ours = not ray.is_initialized()
        if ours:
            try:
                ray.init(address=None if address == "auto" else address, logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise M2ORTError(f"cannot connect to the Ray cluster at {address}: {exception_detail(exc)}") from None
        self.run_.seconds["connect"] = round(time.perf_counter() - self.started, 4)
        try:
            nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
            device = str(predictor_options.get("device", "auto"))
            use_gpu = device != "cpu" and any(n.get("GPU", 0) >= 1 for n in nodes)
            if device.startswith("cuda") and not use_gpu:
                raise M2ORTError(f"--device {device}, but the Ray cluster has no GPUs")
            count, cpus, gpus = worker_layout(nodes, workers, cpus_per_worker, use_gpu)
            count = min(count, len(self.queue))
            # no progress bars unless asked: many workers' bars would interleave in the driver's log
            worker_options = {"progress": False, **predictor_options}
            if gpus:  # each worker sees its own GPU as cuda:0 (Ray sets CUDA_VISIBLE_DEVICES)
                worker_options["device"] = "cuda"
            self.worker_args["predictor_options"] = worker_options
            log.info(
                "%d Ray worker%s for %d slides, each with %g CPU%s%s",
                count,
                "" if count == 1 else "s",
                self.total,
                cpus,
                "" if cpus == 1 else "s",
                f" and {gpus:g} GPU" if gpus else "",
            )
            self._start(count, cpus, gpus, pilot=predictor_options.get("backend", "torch") != "torch")
            self._loop()
        except BaseException:
            self._stop(interrupted=True)
            raise
        else:
            self._stop(interrupted=False)
        finally:
            if ours:
                ray.shutdown()

    def _start(self, count: int, cpus: float, gpus: float, pilot: bool) -> None:
        """Start the actors. A compiled backend's artifact is built by the first worker alone and
        then loaded by the others from the artifact cache (point $M2ORT_FAST_CACHE at a shared
        folder for one build per GPU model across nodes), not built by each at once."""
        env = {k: os.environ[k] for k in ("M2ORT_FAST_CACHE",) if k in os.environ}
        actor = self.ray.remote(CohortWorker)
        options: dict[str, Any] = dict(
            num_cpus=cpus,
            num_gpus=gpus,
            max_restarts=WORKER_RESTARTS,
            max_task_retries=0,  # a slide whose worker died goes back to the queue (below), to any worker
        )
        if env:
            options["runtime_env"] = {"env_vars": env}
        run_id = uuid.uuid4().hex[:6]
        threads = max(1, int(cpus))
        for k in range(count):
            name = f"m2ort-fast-{run_id}-{k}"
            handle = actor.options(name=name, **options).remote(name, num_threads=threads, **self.worker_args)
            slot = _Slot(name=name, handle=handle)
            self.slots.append(slot)
            self.refs[handle.info.remote()] = (slot, "ready")
            if pilot and k == 0 and count > 1:
                log.info("starting one worker first: it builds the backend's artifact for the others")
                self._wait_for(slot)

    def _wait_for(self, slot: _Slot) -> None:
        while slot.state == "starting":
            self._handle(self._wait())

    def _wait(self) -> list[Any]:
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=WAIT_S)
        return ready

    def _loop(self) -> None:
        while self.finished < self.total:
            for slot in self.slots:
                if slot.state == "idle":
                    self._assign(slot)
            if all(slot.state == "dead" for slot in self.slots):
                left = self.total - self.finished
                raise M2ORTError(
                    f"every Ray worker died ({self.last_death}); {left} slides not done: rerun to resume them"
                )
            if not self.refs:
                raise RuntimeError("the cohort driver has slides left but nothing in flight")
            self._handle(self._wait())
            self.manifest.write()

    def _assign(self, slot: _Slot) -> None:
        """Give ``slot`` its reserved slide, else the queue's head, else (the queue empty) the
        largest slide another worker reserved, so that no worker idles at the end while a busy one
        holds one. Then reserve the queue's next slide for it to open meanwhile, when every other
        worker is busy too: one starting, restarting or idle takes that slide itself instead,
        largest first."""
        if slot.reserved is not None:
            i, slot.reserved = slot.reserved, None
        elif self.queue:
            i = self.queue.popleft()
        else:
            reserved = [s for s in self.slots if s.reserved is not None]
            if not reserved:
                return
            other = min(reserved, key=lambda s: self._largest_first(s.reserved))
            i, other.reserved = other.reserved, None  # type: ignore[assignment]
        others_busy = all(s.state in ("busy", "dead") for s in self.slots if s is not slot)
        slot.reserved = self.queue.popleft() if self.queue and others_busy else None
        prefetch = self.tasks[slot.reserved] if slot.reserved is not None else None
        slot.running, slot.state = i, "busy"
        row = self.rows[i]
        row.status, row.attempts, row.worker, row.host = RUNNING, row.attempts + 1, slot.name, slot.host
        self.manifest.changed()
        self.refs[slot.handle.run.remote(self.tasks[i], prefetch)] = (slot, "run")

    def _largest_first(self, i: int | None) -> tuple[int, str]:
        row = self.rows[i] if i is not None else None
        return (-row.size_bytes, row.slide) if row else (0, "")

    def _handle(self, ready: list[Any]) -> None:
        ray = self.ray
        for ref in ready:
            slot, kind = self.refs.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # raised past the worker's own handling: a bug
                if kind == "ready":
                    raise M2ORTError(f"worker {slot.name} did not start: {exception_detail(exc)}") from None
                self._record(slot, {"status": FAILED, "error": f"unexpected error: {exception_detail(exc)}"})
            except ray.exceptions.RayError as exc:  # the worker is gone (killed, out of memory, node lost)
                if kind == "ready":
                    self._probe_failed(slot, exc)
                else:
                    self._worker_died(slot, exc)
            else:
                if kind == "ready":
                    self._ready(slot, value)
                else:
                    self._record(slot, value)

    def _ready(self, slot: _Slot, info: dict[str, Any]) -> None:
        if info["error"]:
            raise M2ORTError(f"worker {slot.name} on {info['host']}: {info['error']}")
        if info["checkpoint_sha256"] != self.sha:
            raise M2ORTError(
                f"worker {slot.name} on {info['host']} loaded a checkpoint with sha256 "
                f"{info['checkpoint_sha256'][:12]}, not {self.sha[:12]}: give a path that names the same file "
                f"on every node"
            )
        first = slot.state == "starting"
        slot.state, slot.host = "idle", info["host"]
        ready_s = round(time.perf_counter() - self.started, 4)
        if first:
            self.run_.workers.append({**info, "ready_s": ready_s})
            self.run_.seconds.setdefault("start", ready_s)
        log.info(
            "worker %s %s on %s (%s, model loaded in %.1f s)",
            slot.name,
            "ready" if first else "restarted",
            info["host"],
            info["device"],
            info["load_s"],
        )

    def _record(self, slot: _Slot, fields: dict[str, Any]) -> None:
        i, slot.running, slot.state = slot.running, None, "idle"
        assert i is not None
        row = self.rows[i]
        _finish_row(row, fields)
        self.finished += 1
        self.manifest.changed()
        _log_row(row, self.finished, self.total)

    def _worker_died(self, slot: _Slot, exc: BaseException) -> None:
        """Re-queue what the dead worker held (its running slide counts an attempt, its staging
        folder is removed) and ask Ray whether the worker comes back (restarted) or not."""
        reason = f"worker {slot.name} on {slot.host or '?'} died: {_death_reason(exc)}"
        log.warning("%s", reason)
        if slot.reserved is not None:
            self.queue.appendleft(slot.reserved)
            slot.reserved = None
        i, slot.running = slot.running, None
        if i is not None:
            row = self.rows[i]
            _discard_staging(self.out, row.stem)
            row.retried_because = reason
            if row.attempts >= self.max_attempts:
                self._record_failure(i, f"{reason} (gave up after {row.attempts} attempts)")
            else:
                row.status = PENDING
                self.queue.appendleft(i)  # the largest left, or near it: first again
            self.manifest.changed()
        slot.state, slot.probes = "restarting", 0
        self.refs[slot.handle.info.remote()] = (slot, "ready")

    def _probe_failed(self, slot: _Slot, exc: BaseException) -> None:
        """A worker that did not answer: gone for good (killed without restart, restarts used up,
        or it could not start), or still restarting (asked again)."""
        slot.probes += 1
        if isinstance(exc, self.ray.exceptions.ActorDiedError) or slot.probes > MAX_PROBES:
            self.last_death = f"worker {slot.name} on {slot.host or '?'}: {_death_reason(exc)}"
            log.warning("%s; it is not restarted", self.last_death)
            slot.state = "dead"
            return
        self.refs[slot.handle.info.remote()] = (slot, "ready")

    def _record_failure(self, i: int, error: str) -> None:
        row = self.rows[i]
        _finish_row(row, {"status": FAILED, "error": error})
        self.finished += 1
        _log_row(row, self.finished, self.total)

    def _stop(self, interrupted: bool) -> None:
        """Kill the actors (Ray would at the job's end; now frees their GPUs at once). When
        interrupted: wait until they are gone, record the slides they finished before (their
        results came back but were not read yet), then remove the staging folders of the slides
        they still held and put those back to pending, so the manifest says what a rerun will do."""
        ray = self.ray
        for slot in self.slots:
            with contextlib.suppress(Exception):
                ray.kill(slot.handle, no_restart=True)
        if not interrupted:
            return
        runs = {ref: slot for ref, (slot, kind) in self.refs.items() if kind == "run"}
        with contextlib.suppress(Exception):
            ray.wait(list(runs), num_returns=len(runs), timeout=STAGING_UNLOCK_WAIT_S)
        for ref, slot in runs.items():
            try:
                fields = ray.get(ref, timeout=0)
            except Exception:  # killed under it: handled below
                continue
            self._record(slot, fields)
        for slot in self.slots:
            if slot.running is not None:
                _discard_staging(self.out, self.rows[slot.running].stem)
                self.rows[slot.running].status = PENDING
                slot.running = None
        self.manifest.changed()
