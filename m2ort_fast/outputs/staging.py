"""A slide's staging folder (OUT/.<stem>.partial/): locked while written, renamed into place when complete."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from m2ort_fast.errors import OutputError
from m2ort_fast.outputs.folders import ensure_out_dir, output_errors
from m2ort_fast.outputs.h5ad import SlideOutputs
from m2ort_fast.outputs.heatmaps import (
    OVERVIEW_PNG,
    heatmap_file_name,
)

STAGING_SUFFIX = ".partial"
# A slide's outputs beside its .h5ad: (suffix, is a folder).
OUTPUT_TARGETS = ((".h5ad", False), (".csv", False), (".geojson", False), (".zarr", True), ("_heatmaps", True))


class StagingLocked(OutputError):
    """Another run holds the slide's staging folder (it is writing the same outputs now)."""


def h5ad_path(folder: str | os.PathLike, stem: str) -> Path:
    """A slide's ``.h5ad`` in ``folder`` (the output folder, or its staging folder): ``folder/<stem>.h5ad``."""
    return Path(folder) / f"{stem}.h5ad"


def check_targets(out_dir: str | os.PathLike, stem: str) -> None:
    """OutputError (one line naming the user's path) when something of the other kind stands
    where a slide's output goes (a folder named ``<stem>.h5ad``): checked before any work, and
    again before anything is renamed into place."""
    for suffix, is_folder in OUTPUT_TARGETS:
        target = Path(out_dir) / f"{stem}{suffix}"
        if target.exists() and target.is_dir() != is_folder:
            kind = "a folder, not a file" if target.is_dir() else "a file, not a folder"
            raise OutputError(f"exists and is {kind}: move it away, or use another --out", target)


def publish_staged(staging: Path, out_dir: Path, stem: str, heatmap_genes: list[str]) -> SlideOutputs:
    """Rename what ``staging`` holds of ``<stem>.csv``, ``<stem>.geojson``, ``<stem>_heatmaps/``
    and ``<stem>.h5ad`` into ``out_dir``, the ``.h5ad`` last: an ``.h5ad`` that exists is complete.
    Nothing is renamed when any target is of the wrong kind."""
    check_targets(out_dir, stem)
    staged_maps = staging / f"{stem}_heatmaps"
    heatmaps = []
    if staged_maps.is_dir():
        final_maps = out_dir / f"{stem}_heatmaps"
        if final_maps.exists():
            shutil.rmtree(final_maps)
        os.replace(staged_maps, final_maps)
        heatmaps = [final_maps / heatmap_file_name(gene) for gene in heatmap_genes] + [final_maps / OVERVIEW_PNG]
    published = {}
    for suffix in (".csv", ".geojson", ".zarr"):
        if (staging / f"{stem}{suffix}").exists():
            published[suffix] = out_dir / f"{stem}{suffix}"
            if published[suffix].is_dir():  # a store from an earlier run (--overwrite)
                shutil.rmtree(published[suffix])
            os.replace(staging / f"{stem}{suffix}", published[suffix])
    published_h5ad = h5ad_path(out_dir, stem)
    os.replace(h5ad_path(staging, stem), published_h5ad)
    return SlideOutputs(
        h5ad=published_h5ad,
        csv=published.get(".csv"),
        heatmaps=heatmaps,
        geojson=published.get(".geojson"),
        spatialdata=published.get(".zarr"),
    )


def exclusive_lock(lock_path: Path, before: Callable[[], None] | None = None) -> int | None:
    """An exclusive flock on ``lock_path`` (created), held by the returned descriptor until it is
    closed (the OS releases it when the process dies, however it dies); None when another process
    holds it. The file locked is the one at ``lock_path`` now: a run that ended meanwhile may have
    removed it (then it is made and locked again). ``before``: run before each try (make its folder)."""
    for _ in range(5):
        if before is not None:
            before()
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # its folder removed by a run finishing just now: again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OutputError(f"could not lock {lock_path.name}", lock_path.parent)


class StagedOutput:
    """One slide's outputs while they are written: ``OUT/.<stem>.partial/``.

    The run holds an exclusive lock (flock) on the folder's ``lock`` file, which the OS releases
    when the process dies however it dies: a second run on the same output fails at once with
    OutputError, and a folder whose lock is free was left by a killed run. ``run_key`` names the
    settings the outputs are made with: a left-over folder made with the same key is kept
    (``resumed``: the writer may continue from it), any other is emptied. ``publish`` renames the
    outputs into place and removes the folder; ``discard`` removes it.
    """

    def __init__(self, out_dir: str | os.PathLike, stem: str, run_key: str = ""):
        self.out_dir = ensure_out_dir(out_dir)
        self.stem = stem
        self.folder = self.out_dir / f".{stem}{STAGING_SUFFIX}"
        with output_errors(self.out_dir):
            self._lock_fd = self._lock()
            try:
                for legacy in self.out_dir.glob(f".{stem}{STAGING_SUFFIX}-*"):  # random names of older versions
                    shutil.rmtree(legacy, ignore_errors=True)
                key_file = self.folder / "run_key"
                self.resumed = bool(run_key) and key_file.is_file() and key_file.read_text() == run_key
                if not self.resumed:
                    self.clear()
                    key_file.write_text(run_key)
            except BaseException:
                self.discard()
                raise

    @property
    def h5ad(self) -> Path:
        return h5ad_path(self.out_dir, self.stem)

    def _lock(self) -> int:
        fd = exclusive_lock(self.folder / "lock", before=lambda: self.folder.mkdir(exist_ok=True))
        if fd is None:
            raise StagingLocked(
                f"another m2ort-fast run is writing {self.stem}'s outputs here (its staging "
                f"folder {self.folder.name} is locked); wait for it, or use another --out",
                self.out_dir,
            )
        return fd

    def clear(self) -> None:
        """Remove what the folder holds but its lock and run key (a fresh start of the slide)."""
        for entry in self.folder.iterdir():
            if entry.name in ("lock", "run_key"):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def publish(self, heatmap_genes: list[str]) -> SlideOutputs:
        with output_errors(self.out_dir):
            outputs = publish_staged(self.folder, self.out_dir, self.stem, heatmap_genes)
        self.discard()
        return outputs

    def discard(self) -> None:
        """Remove the staging folder and release the lock (safe to call twice)."""
        if self._lock_fd < 0:
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = -1


def remove_stale_staging(out_dir: str | os.PathLike, stem: str) -> None:
    """Remove the staging folder a killed run left for ``stem`` (kept when a run holds it now)."""
    if (Path(out_dir) / f".{stem}{STAGING_SUFFIX}").exists():
        with contextlib.suppress(StagingLocked):
            StagedOutput(out_dir, stem).discard()


def run_key(settings: dict) -> str:
    """A short stable hash of the settings that decide a slide's outputs."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]
