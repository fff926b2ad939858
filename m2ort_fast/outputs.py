"""Writing a slide's predictions: AnnData ``.h5ad``, CSV, heatmap PNGs.

Everything is first written into the slide's staging folder beside the outputs
(``OUT/.<stem>.partial/``, :class:`StagedOutput`) and renamed into place at the end, the
``.h5ad`` last: a file named ``<stem>.h5ad`` is always complete. The staging folder is locked by
the run that writes it, so two runs cannot write one output; it is removed on every exit the
process sees (success, error, Ctrl-C, SIGTERM). A run killed outright (kill -9, out of memory)
leaves it unlocked: the next run takes it over, and the streamed writer
(:class:`ChunkedH5adWriter`) resumes from the rows it holds when the run settings match.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from m2ort_fast.errors import M2ORTError, OutputError, exception_detail

DEFAULT_HEATMAP_COUNT = 4
LOWRES_MAX_SIDE_PX = 600  # the image stored in the .h5ad, as Space Ranger's "lowres"
STAGING_SUFFIX = ".partial"
# Below this much free space, a write that failed in a library's own way is reported as a full disk.
DISK_FULL_BYTES = 16 * 2**20


@dataclass
class SlideOutputs:
    h5ad: Path
    csv: Path | None
    heatmaps: list[Path]


def check_heatmap_genes(genes: Sequence[str], requested: Sequence[str]) -> list[str]:
    """The genes asked for heatmaps; a name not in the model's panel is an error."""
    unknown = [g for g in requested if g not in genes]
    if unknown:
        raise M2ORTError(f"genes not in the model's panel: {', '.join(unknown[:5])}")
    return list(requested)


def genes_by_variance(variance: np.ndarray, genes: Sequence[str], count: int) -> list[str]:
    """The ``count`` genes whose predictions vary most (float64 variances, ties in panel order)."""
    order = np.argsort(-np.asarray(variance, dtype=np.float64), kind="stable")
    return [genes[i] for i in order[:count]]


def build_anndata(
    predictions: np.ndarray,
    genes: list[str],
    spot_ids: list[str],
    centers_px: np.ndarray,
    obs_columns: pd.DataFrame | None,
    uns: dict,
    thumbnail: np.ndarray | None = None,
    thumbnail_downsample: float | None = None,
    spot_diameter_px: float | None = None,
):
    """AnnData with X = predictions (n_spots, n_genes), obsm["spatial"] in level-0 px (x, y).

    ``uns["spatial"]`` follows the scanpy/squidpy layout (a low-resolution image and its scale
    factor), so ``scanpy.pl.spatial`` draws the predictions over the slide."""
    import anndata

    obs = pd.DataFrame(index=pd.Index([str(s) for s in spot_ids], name="spot_id"))
    obs["x_px"] = centers_px[:, 0].astype(np.float64)
    obs["y_px"] = centers_px[:, 1].astype(np.float64)
    if obs_columns is not None and len(obs_columns.columns):
        extra = obs_columns.reset_index(drop=True)
        for column in extra.columns:
            if column not in obs.columns:
                obs[str(column)] = extra[column].to_numpy()
    var = pd.DataFrame(index=pd.Index(genes, name="gene"))
    adata = anndata.AnnData(X=np.ascontiguousarray(predictions, dtype=np.float32), obs=obs, var=var)
    adata.obsm["spatial"] = np.ascontiguousarray(centers_px, dtype=np.float64)
    adata.uns["m2ort_fast"] = _jsonable(uns)
    if thumbnail is not None and thumbnail_downsample:
        lowres, lowres_downsample = _shrink(thumbnail, thumbnail_downsample, LOWRES_MAX_SIDE_PX)
        library = Path(str(uns.get("slide", "slide"))).stem or "slide"
        scalefactors = {"tissue_lowres_scalef": 1.0 / lowres_downsample}
        if spot_diameter_px:
            scalefactors["spot_diameter_fullres"] = float(spot_diameter_px)
        adata.uns["spatial"] = {library: {"images": {"lowres": lowres}, "scalefactors": scalefactors}}
    return adata


def _shrink(image: np.ndarray, downsample: float, max_side_px: int) -> tuple[np.ndarray, float]:
    """Resize ``image`` (a view of level 0 at ``downsample``) to at most ``max_side_px``."""
    factor = max(image.shape[:2]) / max_side_px
    if factor <= 1:
        return image, float(downsample)
    from PIL import Image

    size = (max(1, round(image.shape[1] / factor)), max(1, round(image.shape[0] / factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)), float(downsample) * image.shape[
        1
    ] / size[0]


def _jsonable(value):
    """AnnData's uns takes nested dicts of plain values; drop Nones, stringify the rest."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def write_heatmap(
    path: Path,
    gene: str,
    values: np.ndarray,
    centers_px: np.ndarray,
    thumbnail: np.ndarray,
    downsample: float,
    spot_diameter_px: float,
    title_suffix: str = "",
    value_label: str = "predicted log1p CPM",
) -> None:
    """One PNG: the predicted value of ``gene`` at every spot, drawn as discs over the thumbnail."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = thumbnail.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 8 * h / max(w, 1) + 0.6), dpi=100)
    ax.imshow(thumbnail)
    xy = centers_px / downsample
    # scatter sizes are in points^2: convert the spot's diameter from thumbnail px to points
    axes_width_pt = ax.get_window_extent().width * 72.0 / fig.dpi
    diameter_pt = max(spot_diameter_px / downsample * axes_width_pt / max(w, 1), 2.0)
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=diameter_pt**2, cmap="viridis", alpha=0.85, edgecolors="none")
    fig.colorbar(scatter, ax=ax, fraction=0.035, pad=0.02, label=value_label)
    ax.set_title(f"{gene}{title_suffix}")
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_csv_rows(
    path: Path, values: np.ndarray, spot_ids, genes: list[str], centers_px: np.ndarray, append: bool = False
) -> None:
    """The CSV: spot_id, x_px, y_px, then one column per gene; ``append`` adds rows (chunked writes)."""
    table = pd.DataFrame(values, index=pd.Index(spot_ids, name="spot_id"), columns=genes)
    table.insert(0, "y_px", centers_px[:, 1])
    table.insert(0, "x_px", centers_px[:, 0])
    table.to_csv(path, mode="a" if append else "w", header=not append, index_label="spot_id", float_format="%.6g")


def write_heatmaps(
    folder: Path,
    genes: list[str],
    values: np.ndarray,
    centers_px: np.ndarray,
    thumbnail: np.ndarray,
    downsample: float,
    spot_diameter_px: float,
    title_suffix: str,
) -> None:
    """One PNG per gene into ``folder`` (created); ``values`` (N, len(genes))."""
    folder.mkdir()
    for k, gene in enumerate(genes):
        write_heatmap(
            folder / f"{_safe_name(gene)}.png",
            gene,
            values[:, k],
            centers_px,
            thumbnail,
            downsample,
            spot_diameter_px,
            title_suffix=title_suffix,
        )


def publish_staged(staging: Path, out_dir: Path, stem: str, heatmap_genes: list[str]) -> SlideOutputs:
    """Rename what ``staging`` holds of ``<stem>.csv``, ``<stem>_heatmaps/`` and ``<stem>.h5ad``
    into ``out_dir``, the ``.h5ad`` last: an ``.h5ad`` that exists is complete."""
    staged_maps, staged_csv = staging / f"{stem}_heatmaps", staging / f"{stem}.csv"
    heatmaps, csv_path = [], None
    if staged_maps.is_dir():
        final_maps = out_dir / f"{stem}_heatmaps"
        if final_maps.exists():
            shutil.rmtree(final_maps)
        os.replace(staged_maps, final_maps)
        heatmaps = [final_maps / f"{_safe_name(gene)}.png" for gene in heatmap_genes]
    if staged_csv.exists():
        csv_path = out_dir / f"{stem}.csv"
        os.replace(staged_csv, csv_path)
    h5ad_path = out_dir / f"{stem}.h5ad"
    os.replace(staging / f"{stem}.h5ad", h5ad_path)
    return SlideOutputs(h5ad=h5ad_path, csv=csv_path, heatmaps=heatmaps)


# --------------------------------------------------------------------------------------------
# The output folder, its errors, and the per-slide staging folder


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """OutputError (one line) when ``out_dir`` names something that is not a folder; checked
    before any work, so a wrong ``--out`` costs nothing."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("exists and is not a folder (the output must be a folder)", out_dir)
    return out_dir


def ensure_out_dir(out_dir: str | os.PathLike) -> Path:
    """The output folder, created if needed; OutputError (one line) when it cannot be."""
    out_dir = check_out_dir(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, out_dir) from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError("the output folder is not writable", out_dir)
    return out_dir


def output_error(exc: BaseException, path: str | os.PathLike) -> OutputError:
    """A failed write as one line naming the path (the file the OS names, else ``path``)."""
    code = exc.errno if isinstance(exc, OSError) else _errno_in_message(exc)
    where = (exc.filename if isinstance(exc, OSError) else None) or path
    if code == errno.ENOSPC:
        reason = "no space left on the device"
    elif code == errno.EFBIG:
        reason = "file too large for this filesystem or the process's file size limit"
    elif code:
        reason = os.strerror(code)
    else:
        reason = exception_detail(exc)
    return OutputError(f"cannot write: {reason}", where)


def _errno_in_message(exc: BaseException) -> int | None:
    """The OS error number a library put in its own exception's text (h5py: "errno = 27")."""
    match = re.search(r"errno\s*=\s*(\d+)", str(exc))
    return int(match.group(1)) if match else None


def _disk_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < DISK_FULL_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def output_errors(path: str | os.PathLike):
    """OS errors of the writes inside become one-line OutputErrors naming ``path``, also where a
    library wraps them in its own type (h5py: ``RuntimeError: ... errno = 27``), and so does any
    failure on a full disk (PIL's PNG writer once answered one with ``'_idat' object has no
    attribute 'fileno'``)."""
    try:
        yield
    except M2ORTError:
        raise
    except OSError as exc:
        raise output_error(exc, path) from None
    except Exception as exc:
        if _errno_in_message(exc):
            raise output_error(exc, path) from None
        if _disk_full(Path(path)):
            raise OutputError("cannot write: no space left on the device", path) from None
        raise


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
                    self._empty()
                    key_file.write_text(run_key)
            except BaseException:
                self.discard()
                raise

    @property
    def h5ad(self) -> Path:
        return self.out_dir / f"{self.stem}.h5ad"

    def _lock(self) -> int:
        for _ in range(5):
            self.folder.mkdir(exist_ok=True)
            try:
                fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # removed by a run finishing just now: make it again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(
                    f"another m2ort-fast run is writing {self.stem}'s outputs here (its staging "
                    f"folder {self.folder.name} is locked); wait for it, or use another --out",
                    self.out_dir,
                ) from None
            try:  # the run that held it may have finished and removed the folder meanwhile
                if os.fstat(fd).st_ino == os.stat(self.folder / "lock").st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise OutputError(f"could not lock the staging folder {self.folder.name}", self.out_dir)

    def _empty(self) -> None:
        for entry in self.folder.iterdir():
            if entry.name == "lock":
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


def run_key(settings: dict) -> str:
    """A short stable hash of the settings that decide a slide's outputs."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def heatmap_title_suffix(stem: str, trained: bool) -> str:
    """What a heatmap's title adds to the gene: the slide, and a warning for an untrained model."""
    return f" ({stem}{'' if trained else ', UNTRAINED model'})"


def _safe_name(gene: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in gene)


# --------------------------------------------------------------------------------------------
# The streamed engine's writer: predictions straight into the .h5ad, in row chunks


class ChunkedH5adWriter:
    """Writes a slide's ``.h5ad`` in its staging folder while its predictions arrive, in bounded
    memory, and keeps what it has written across a killed run.

    The file is first written by anndata with everything but X (obs, obsm, uns: from
    ``build_anndata`` with an empty gene axis), then X (n_spots, n_genes) float32 is created in
    row chunks and filled as batches arrive (in any row order). After each batch the file is
    flushed and the mask of written rows saved (``written.npy``, replaced atomically), so a run
    killed outright leaves rows that the next run with the same settings keeps (``written``).
    ``finish`` writes the CSV and heatmaps from the file in row chunks and publishes everything,
    the ``.h5ad`` last. Both engines write through it: the naive one in a single batch.
    """

    ROWS_PER_CHUNK = 4096

    def __init__(self, staged: StagedOutput, skeleton, genes: Sequence[str]):
        self.staged = staged
        self.stem = staged.stem
        self.genes = list(genes)
        self.n_spots = skeleton.n_obs
        self.ids = [str(name) for name in skeleton.obs_names]
        self.h5ad = staged.folder / f"{self.stem}.h5ad"
        self.progress_path = staged.folder / "written.npy"
        self.file: Any = None  # the open h5py.File
        with output_errors(staged.folder):
            if not (staged.resumed and self._reopen()):
                self._create(skeleton)

    def _create(self, skeleton) -> None:
        import h5py
        from anndata.io import write_elem

        self.progress_path.unlink(missing_ok=True)
        skeleton.write_h5ad(self.h5ad)
        self.file = h5py.File(self.h5ad, "r+")
        del self.file["X"], self.file["var"]
        write_elem(self.file, "var", pd.DataFrame(index=pd.Index(self.genes, name="gene")))
        chunk_rows = max(1, min(self.n_spots, max(1, 2**20 // (4 * max(len(self.genes), 1)))))
        self.X = self.file.create_dataset(
            "X",
            (self.n_spots, len(self.genes)),
            dtype=np.float32,
            chunks=(chunk_rows, max(len(self.genes), 1)) if self.n_spots else None,
        )
        self.X.attrs["encoding-type"] = "array"
        self.X.attrs["encoding-version"] = "0.2.0"
        self.written = np.zeros(self.n_spots, dtype=bool)

    def _reopen(self) -> bool:
        """Continue a killed run's file; False (start afresh) when anything about it is off."""
        import h5py

        try:
            written = np.load(self.progress_path)
            self.file = h5py.File(self.h5ad, "r+")
            self.X = self.file["X"]
            if (
                self.X.shape != (self.n_spots, len(self.genes))
                or written.shape != (self.n_spots,)
                or written.dtype != bool
            ):
                raise ValueError("shape")
        except Exception:  # a file cut mid-write, a mask from another run...: redo the slide
            with contextlib.suppress(Exception):
                if self.file is not None:
                    self.file.close()
            self.file = None
            return False
        self.written = written
        return True

    def write(self, spots: np.ndarray, predictions: np.ndarray) -> None:
        order = np.argsort(spots, kind="stable")  # h5py writes rows in increasing order
        with output_errors(self.staged.folder):
            self.X[spots[order]] = predictions[order]
            self.written[spots] = True
            self.file.flush()
            tmp = self.progress_path.with_name("written.tmp.npy")
            np.save(tmp, self.written)
            os.replace(tmp, self.progress_path)

    def _row_chunks(self):
        for start in range(0, self.n_spots, self.ROWS_PER_CHUNK):
            yield start, self.X[start : start + self.ROWS_PER_CHUNK]

    def gene_variance(self) -> np.ndarray:
        """Per-gene variance of the written predictions, float64, two passes over row chunks."""
        n = max(self.n_spots, 1)
        mean = sum((rows.sum(axis=0, dtype=np.float64) for _, rows in self._row_chunks()), np.zeros(len(self.genes)))
        mean /= n
        squares = sum((((rows - mean) ** 2).sum(axis=0) for _, rows in self._row_chunks()), np.zeros(len(self.genes)))
        return squares / n

    def finish(
        self,
        *,
        write_csv: bool,
        heatmap_genes: Sequence[str] | None,
        n_heatmaps: int,
        thumbnail: np.ndarray | None,
        thumbnail_downsample: float,
        spot_diameter_px: float,
        title_suffix: str,
    ) -> SlideOutputs:
        if not self.written.all():
            raise RuntimeError(f"{int((~self.written).sum())} spots have no prediction")
        with output_errors(self.staged.folder):
            if heatmap_genes:
                genes = check_heatmap_genes(self.genes, heatmap_genes)
            else:
                genes = genes_by_variance(self.gene_variance(), self.genes, n_heatmaps)
            columns = [self.genes.index(g) for g in genes]
            heat_values = np.empty((self.n_spots, len(columns)), dtype=np.float32)
            centers = self.file["obsm"]["spatial"][:]
            csv_path = self.staged.folder / f"{self.stem}.csv"
            for start, rows in self._row_chunks():
                heat_values[start : start + len(rows)] = rows[:, columns]
                if write_csv:
                    write_csv_rows(
                        csv_path,
                        rows,
                        self.ids[start : start + len(rows)],
                        self.genes,
                        centers[start : start + len(rows)],
                        append=start > 0,
                    )
            self.file.close()
            self.progress_path.unlink(missing_ok=True)
            if genes and thumbnail is not None:
                write_heatmaps(
                    self.staged.folder / f"{self.stem}_heatmaps",
                    genes,
                    heat_values,
                    centers,
                    thumbnail,
                    thumbnail_downsample,
                    spot_diameter_px,
                    title_suffix,
                )
        return self.staged.publish(genes)

    def abort(self) -> None:
        """Close the file and remove the staging folder (an interrupted slide leaves no output)."""
        with contextlib.suppress(Exception):
            if self.file is not None:
                self.file.close()
        self.staged.discard()
