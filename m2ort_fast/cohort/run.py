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

import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m2ort_fast.bounds import API_OPTIONS
from m2ort_fast.checkpoint import ModelCard, file_sha256, read_card
from m2ort_fast.cohort.manifest import (
    DONE,
    FAILED,
    MANIFEST_NAME,
    PENDING,
    RUNNING,
    SKIPPED,
    CohortRun,
    Manifest,
    ManifestRow,
    finish_row,
    log_row,
    manifest_lock,
    read_manifest,
)
from m2ort_fast.cohort.ray_driver import (
    DEFAULT_CPUS_PER_WORKER,
    RayDriver,
)
from m2ort_fast.cohort.shards import shard_members, slide_size
from m2ort_fast.cohort.worker import CohortWorker, SlideTask
from m2ort_fast.errors import M2ORTError, exception_detail
from m2ort_fast.options import DEFAULT_OUT_DIR
from m2ort_fast.outputs import ensure_out_dir, h5ad_path
from m2ort_fast.predict import (
    OpenOptions,
    OutputOptions,
    RunRecord,
    build_record,
    checkpoint_path,
    decide_before_opening,
    split_options,
)
from m2ort_fast.spots import Spots, as_spots

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 3  # dispatches of one slide whose worker died under it


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
    Slides whose outputs exist are decided by their run record before any worker starts, as
    ``predict`` decides them: skipped, formats added, or the whole run refused (one line naming
    the setting).
    """
    started = time.perf_counter()
    if max_attempts < 1:
        raise M2ORTError(f"max_attempts must be at least 1, got {max_attempts}")
    predictor_options, open_options, output = split_options({**options, "out_dir": out_dir, "overwrite": overwrite})
    if output.stem:
        raise M2ORTError("stem names one slide's outputs; a cohort's are named after each slide's file")
    cohort = CohortSlides.of(slides, spots, shard, output.out_dir)
    out = ensure_out_dir(out_dir)
    checkpoint = str(model) if model is not None else None
    records = RecordMaker.of(checkpoint, predictor_options, open_options, output)
    manifest_path = out / cohort.manifest_name
    with manifest_lock(manifest_path):
        manifest, todo = plan_rows(manifest_path, cohort, records, retry_failed)
        run = CohortRun(rows=manifest.rows, manifest=manifest_path)
        _log_plan(cohort, manifest, todo, shard)
        worker_args = dict(
            checkpoint=checkpoint, predictor_options=predictor_options, open_options=open_options, output=output
        )
        tasks = {
            i: SlideTask(slide=cohort.paths[i], spots=cohort.spots[i], stem=cohort.stems[i]) for i in cohort.positions
        }
        rows = dict(zip(cohort.positions, manifest.rows, strict=True))
        try:
            # (nothing to do: no worker is started, nor Ray connected to)
            if todo and ray_address is None:
                run_here(run, manifest, tasks, rows, todo, worker_args)
            elif todo and ray_address is not None:
                driver = RayDriver(run, manifest, tasks, rows, todo, worker_args, records.sha, max_attempts, out)
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


@dataclass
class CohortSlides:
    """The slides of a cohort (or of its shard: ``positions``), their spot sources, stems and sizes."""

    paths: list[str]
    spots: list[str | os.PathLike | Spots | None]
    stems: list[str]
    sizes: list[int]
    positions: list[int]
    manifest_name: str

    @classmethod
    def of(
        cls,
        slides: Iterable[str | os.PathLike],
        spots: Sequence[str | os.PathLike | Spots | None] | None,
        shard: tuple[int, int] | None,
        out_dir: Path,
    ) -> CohortSlides:
        paths = [str(s) for s in slides]
        sources: list[str | os.PathLike | Spots | None] = list(spots) if spots is not None else [None] * len(paths)
        if len(sources) != len(paths):
            raise M2ORTError(f"{len(sources)} spot files given for {len(paths)} slides")
        stems = [Path(p).stem for p in paths]
        repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
        if repeated:
            raise M2ORTError(
                f"several slides would write {repeated[0]}.h5ad into {out_dir}: slides need distinct file names"
            )
        sizes = [slide_size(p) for p in paths]
        if shard is None:
            return cls(paths, sources, stems, sizes, list(range(len(paths))), MANIFEST_NAME)
        index, count = shard
        if not 0 <= index < count:
            raise M2ORTError(f"shard {index}/{count}: I must be at least 0 and less than N")
        positions = sorted(shard_members(paths, sizes, count)[index])
        return cls(paths, sources, stems, sizes, positions, f"manifest.shard-{index}-of-{count}.csv")


@dataclass
class RecordMaker:
    """The run record this cohort's workers would make for a slide, known to the driver without
    loading the model (the checkpoint's card and hash, the options)."""

    sha: str
    card: ModelCard
    predictor_options: dict[str, Any]
    open_options: OpenOptions
    output: OutputOptions

    @classmethod
    def of(
        cls, checkpoint: str | None, predictor_options: dict[str, Any], open_options: OpenOptions, output: OutputOptions
    ) -> RecordMaker:
        path = checkpoint_path(checkpoint)
        try:
            sha = file_sha256(path)
        except OSError as exc:
            raise M2ORTError(f"cannot read the checkpoint: {exception_detail(exc)}", checkpoint) from None
        return cls(sha, read_card(path), predictor_options, open_options, output)

    def __call__(self, slide: str, spots: str | os.PathLike | Spots | None) -> RunRecord:
        table = None
        if spots is not None:
            table = as_spots(spots, format=self.open_options.spot_format, check_scale=self.open_options.mpp is None)
        return build_record(
            self.card,
            self.sha,
            Path(slide),
            table,
            self.open_options,
            self.output,
            level_source=self.predictor_options.get("level_source") or self.card.level_source,
            precision=self.predictor_options.get("precision", "fp32"),
            backend=self.predictor_options.get("backend", "torch"),
        )


def _log_plan(cohort: CohortSlides, manifest: Manifest, todo: deque[int], shard: tuple[int, int] | None) -> None:
    log.info(
        "%d slides%s: %d to do, %d done earlier (manifest %s)",
        len(cohort.positions),
        f" in shard {shard[0]}/{shard[1]}" if shard else "",
        len(todo),
        sum(row.status in (DONE, SKIPPED) for row in manifest.rows),
        manifest.path,
    )


def plan_rows(
    path: Path, cohort: CohortSlides, records: RecordMaker, retry_failed: bool
) -> tuple[Manifest, deque[int]]:
    """The manifest's rows for this run and the queue of slides to do, largest first. A slide whose
    ``.h5ad`` exists is decided by its run record, as ``predict`` decides it (skipped, queued to
    add formats, or the run refused with one line naming the setting); a row kept from the last
    run is trusted only as far as its outputs still exist; failed rows are redone when asked."""
    earlier = {row.stem: row for row in read_manifest(path)}
    output = records.output
    rows, todo = [], []
    for i in cohort.positions:
        stem = cohort.stems[i]
        row = earlier.pop(stem, None)
        fresh = ManifestRow(slide=cohort.paths[i], stem=stem, size_bytes=cohort.sizes[i])
        if not output.overwrite and h5ad_path(output.out_dir, stem).exists():
            action = _decide(records, cohort, i)
            if action == "skip":
                rows.append(row if row is not None and row.status == DONE else _skipped(fresh))
                continue
        elif row is not None and row.status == FAILED and not retry_failed and not output.overwrite:
            rows.append(row)
            continue
        todo.append(i)
        rows.append(fresh)
    todo.sort(key=lambda i: (-cohort.sizes[i], cohort.paths[i]))
    return Manifest(path, rows, list(earlier.values())), deque(todo)


def _decide(records: RecordMaker, cohort: CohortSlides, i: int) -> str:
    """ "skip", "add" or "run" for a slide with outputs; M2ORTError (the whole run) when refused.
    A spot table that cannot be read is the slide's own error: its worker reports it."""
    try:
        wanted = records(cohort.paths[i], cohort.spots[i])
    except M2ORTError:
        return "run"
    names = records.predictor_options.get("option_names", API_OPTIONS)
    return decide_before_opening(lambda: wanted, records.output, cohort.stems[i], names)


def _skipped(row: ManifestRow) -> ManifestRow:
    row.status, row.h5ad = SKIPPED, h5ad_path("", row.stem).name
    return row


def run_here(
    run: CohortRun,
    manifest: Manifest,
    tasks: dict[int, SlideTask],
    rows: dict[int, ManifestRow],
    todo: deque[int],
    worker_args: dict[str, Any],
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
            finish_row(row, worker.run(tasks[i], prefetch))
            current = None
            manifest.changed()
            manifest.write()
            log_row(row, k + 1, total)
    except BaseException:
        if current is not None:  # interrupted: its staging folder went with the exception
            rows[current].status = PENDING
            manifest.changed()
        raise
    finally:
        worker.close()
