"""The run manifest: one row per slide (status, error, spots, seconds per stage, worker, outputs),
replaced atomically as slides finish, so a killed driver leaves a valid file."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from m2ort_fast.errors import M2ORTError, OutputError, exception_detail
from m2ort_fast.outputs import exclusive_lock, output_errors

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"


DONE, FAILED, SKIPPED, PENDING, RUNNING = "done", "failed", "skipped", "pending", "running"


# The engine's stages (m2ort_fast.predict), one manifest column each; the streamed ones overlap.
STAGES = ("open", "plan", "read", "crop", "resize", "assemble", "model", "write")


# The manifest is rewritten at most this often (plus at the end): a 10,000-row file is ~3 MB.
MANIFEST_MIN_INTERVAL_S = 0.5


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
def manifest_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside the manifest for the run (``.<name>.lock``, removed when the
    run ends); OutputError when another run has it."""
    lock_path = path.with_name(f".{path.name}.lock")
    fd = _lock_file(lock_path, path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()  # while still held: a run that opened it meanwhile sees it gone and retries
        os.close(fd)


def _lock_file(lock_path: Path, manifest: Path) -> int:
    with output_errors(lock_path.parent):
        fd = exclusive_lock(lock_path)
    if fd is None:
        raise OutputError(
            f"another cohort run is writing {manifest.name} in this folder (its lock {lock_path.name} is held): "
            f"wait for it, or use another --out",
            manifest.parent,
        )
    return fd


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


def finish_row(row: ManifestRow, fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        setattr(row, name, value)
    row.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")


def log_row(row: ManifestRow, done: int, total: int) -> None:
    where = f"{row.worker}@{row.host}" if row.worker else "?"
    if row.status == DONE:
        log.info("%s: done, %s spots in %.2f s on %s (%d of %d)", row.slide, row.spots, row.wall_s, where, done, total)
    elif row.status == SKIPPED:
        log.info("%s: skipped, its .h5ad exists (%d of %d)", row.slide, done, total)
    else:
        log.error("%s (on %s; %d of %d)", row.error, where, done, total)
