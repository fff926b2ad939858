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
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from m2ort_fast.errors import M2ORTError, OutputError, exception_detail

if TYPE_CHECKING:
    from m2ort_fast.slide import Slide

DEFAULT_HEATMAP_COUNT = 4
LOWRES_MAX_SIDE_PX = 600  # the images stored in the .h5ad, as Space Ranger's "lowres" and "hires"
HIRES_MAX_SIDE_PX = 2000
OVERVIEW_PNG = "overview.png"  # in <stem>_heatmaps/: every heatmap gene in one figure
FORMATS = ("csv", "geojson", "spatialdata")  # written beside the .h5ad (always written, and published last)
STAGING_SUFFIX = ".partial"
# Below this much free space, a write that failed in a library's own way is reported as a full disk.
DISK_FULL_BYTES = 16 * 2**20


@dataclass
class SlideOutputs:
    h5ad: Path
    csv: Path | None
    heatmaps: list[Path]
    geojson: Path | None = None
    spatialdata: Path | None = None  # a SpatialData zarr store (a folder)


@dataclass
class SlideView:
    """What the writers draw on and record about a slide beside its predictions.

    ``hires`` (h, w, 3) uint8: the slide at ``hires_downsample`` level-0 px per pixel, at most
    HIRES_MAX_SIDE_PX a side; ``tissue_mask`` (h', w') bool on ``thumbnail`` (at
    ``thumbnail_downsample``). ``window_px``: the side of the model's square (its three levels'
    field of view) in level-0 px. ``in_training``: whether the slide is one the model was trained
    on (None: the card does not say)."""

    library_id: str
    source_image: str
    mpp: float
    hires: np.ndarray
    hires_downsample: float
    thumbnail: np.ndarray
    thumbnail_downsample: float
    tissue_mask: np.ndarray
    spot_diameter_px: float
    window_px: float
    model_id: str
    in_training: bool | None = None
    trained: bool = True

    @property
    def window_um(self) -> float:
        return self.window_px * self.mpp

    def title(self, gene: str) -> str:
        """A heatmap's title: the gene, the slide, the model and whether it saw this slide."""
        seen = {True: "in its training data", False: "not in its training data", None: "training data unknown"}
        model = self.model_id if self.trained else f"{self.model_id}, UNTRAINED"
        return f"{gene} - {self.library_id} - model {model} (slide {seen[self.in_training]})"


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
    view: SlideView | None = None,
):
    """AnnData with X = predictions (n_spots, n_genes), obsm["spatial"] in level-0 px (x, y).

    Laid out as Space Ranger + scanpy make Visium data, so that ``sc.pl.spatial``,
    ``sq.pl.spatial_scatter`` and ``sc.concat`` work at their defaults: obs names
    ``<library_id>_<spot id>`` (unique across slides; the table's own id in ``obs["spot_id"]``),
    ``obs["library_id"]``, ``obs["in_tissue"]`` (the table's, else 1 where the spot's centre lies
    on the tissue mask), ``uns["spatial"][library_id]`` with ``hires`` and ``lowres`` images,
    their scale factors, ``spot_diameter_fullres`` and ``metadata`` (source image, mpp, the
    model's window in um and px), and ``uns["log1p"]`` (X is log1p CPM)."""
    import anndata

    ids = [str(s) for s in spot_ids]
    library_id = view.library_id if view is not None else None
    obs = pd.DataFrame(index=pd.Index([f"{library_id}_{i}" if library_id else i for i in ids]))
    obs["spot_id"] = ids
    obs["x_px"] = centers_px[:, 0].astype(np.float64)
    obs["y_px"] = centers_px[:, 1].astype(np.float64)
    if obs_columns is not None and len(obs_columns.columns):
        extra = obs_columns.reset_index(drop=True)
        for column in extra.columns:
            if column not in obs.columns:
                obs[str(column)] = extra[column].to_numpy()
    if view is not None:
        obs["library_id"] = pd.Categorical([view.library_id] * len(ids))
        if "in_tissue" not in obs.columns:
            obs["in_tissue"] = _on_mask(view.tissue_mask, centers_px / view.thumbnail_downsample).astype(np.int64)
    var = pd.DataFrame(index=pd.Index(genes, name="gene"))
    adata = anndata.AnnData(X=np.ascontiguousarray(predictions, dtype=np.float32), obs=obs, var=var)
    adata.obsm["spatial"] = np.ascontiguousarray(centers_px, dtype=np.float64)
    adata.uns["m2ort_fast"] = _jsonable(uns)
    adata.uns["log1p"] = {"base": None}  # natural log, as scanpy's pp.log1p records it
    if view is not None:
        lowres, lowres_downsample = _shrink(view.hires, view.hires_downsample, LOWRES_MAX_SIDE_PX)
        scalefactors = {
            "tissue_hires_scalef": 1.0 / view.hires_downsample,
            "tissue_lowres_scalef": 1.0 / lowres_downsample,
            "spot_diameter_fullres": float(view.spot_diameter_px),
        }
        metadata = {
            "source_image_path": view.source_image,
            "mpp": float(view.mpp),
            "model_id": view.model_id,
            "model_window_um": float(view.window_um),
            "model_window_px": float(view.window_px),
            "spot_diameter_um": float(view.spot_diameter_px * view.mpp),
            "software": "m2ort-fast",
        }
        adata.uns["spatial"] = {
            view.library_id: {
                "images": {"hires": view.hires, "lowres": lowres},
                "scalefactors": scalefactors,
                "metadata": metadata,
            }
        }
    return adata


def _on_mask(mask: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(N,) bool: whether each (x, y) in mask pixels lies on the mask (clipped to its edges)."""
    h, w = mask.shape
    cols = np.floor(xy[:, 0]).astype(np.int64).clip(0, w - 1)
    rows = np.floor(xy[:, 1]).astype(np.int64).clip(0, h - 1)
    return mask[rows, cols]


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


SCALE_BAR_UM = (10, 20, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000, 20000)


def _tissue_frame(view: SlideView, centers_px: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in thumbnail px: the tissue and the spots, with a margin of one model window."""
    h, w = view.thumbnail.shape[:2]
    xy = centers_px / view.thumbnail_downsample
    rows, cols = np.nonzero(view.tissue_mask)
    xs = np.concatenate([cols, xy[:, 0]]) if len(cols) else xy[:, 0]
    ys = np.concatenate([rows, xy[:, 1]]) if len(rows) else xy[:, 1]
    margin = view.window_px / view.thumbnail_downsample
    x0, x1 = max(0, int(xs.min() - margin)), min(w, int(np.ceil(xs.max() + margin)) + 1)
    y0, y1 = max(0, int(ys.min() - margin)), min(h, int(np.ceil(ys.max() + margin)) + 1)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else (0, 0, w, h)


def _draw_spots(fig, ax, values: np.ndarray, centers_px: np.ndarray, view: SlideView, frame, value_label: str):
    """The frame of the thumbnail, the spots as discs of their diameter coloured by ``values``, a
    colour bar and a scale bar in um."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    x0, y0, x1, y1 = frame
    ax.imshow(view.thumbnail[y0:y1, x0:x1])
    xy = centers_px / view.thumbnail_downsample - (x0, y0)
    fig.canvas.draw()  # the axes' final size, to convert the spot diameter from px to points
    axes_width_pt = ax.get_window_extent().width * 72.0 / fig.dpi
    diameter_pt = max(view.spot_diameter_px / view.thumbnail_downsample * axes_width_pt / max(x1 - x0, 1), 2.0)
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=diameter_pt**2, cmap="viridis", alpha=0.85, edgecolors="none")
    fig.colorbar(scatter, ax=ax, fraction=0.035, pad=0.02, label=value_label)
    um_per_px = view.mpp * view.thumbnail_downsample
    bar_um = max([b for b in SCALE_BAR_UM if b <= (x1 - x0) * um_per_px / 4] or [SCALE_BAR_UM[0]])
    label = f"{bar_um // 1000} mm" if bar_um >= 1000 else f"{bar_um} um"
    ax.add_artist(
        AnchoredSizeBar(
            ax.transData,
            bar_um / um_per_px,
            label,
            "lower right",
            pad=0.4,
            frameon=True,
            size_vertical=max(1.0, (y1 - y0) / 150),
        )
    )
    ax.set_axis_off()


def write_heatmap(
    path: Path,
    gene: str,
    values: np.ndarray,
    centers_px: np.ndarray,
    view: SlideView,
    caption: str,
    value_label: str = "predicted log1p CPM",
) -> None:
    """One PNG: the predicted value of ``gene`` at every spot, over the slide cropped to its tissue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = _tissue_frame(view, centers_px)
    width, height = frame[2] - frame[0], frame[3] - frame[1]
    fig, ax = plt.subplots(figsize=(8, 8 * height / max(width, 1) + 1.0), dpi=100)
    _draw_spots(fig, ax, values, centers_px, view, frame, value_label)
    ax.set_title(view.title(gene), fontsize=10)
    fig.text(0.01, 0.005, caption, fontsize=7, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)


def write_overview(
    path: Path, genes: list[str], values: np.ndarray, centers_px: np.ndarray, view: SlideView, caption: str
) -> None:
    """One PNG with a panel per gene (``values`` (N, len(genes))), for a first look at a slide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = _tissue_frame(view, centers_px)
    width, height = frame[2] - frame[0], frame[3] - frame[1]
    cols = min(4, len(genes))
    rows = -(-len(genes) // cols)
    panel = 4.0
    fig, axes = plt.subplots(
        rows, cols, figsize=(panel * cols, panel * rows * height / max(width, 1) + 1.2), dpi=100, squeeze=False
    )
    for k, ax in enumerate(axes.flat):
        if k >= len(genes):
            ax.set_axis_off()
            continue
        _draw_spots(fig, ax, values[:, k], centers_px, view, frame, "log1p CPM")
        ax.set_title(genes[k], fontsize=10)
    fig.suptitle(view.title(f"{len(genes)} genes"), fontsize=10)
    fig.text(0.01, 0.005, caption, fontsize=7, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, bbox_inches="tight", pad_inches=0.15)
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
    folder: Path, genes: list[str], values: np.ndarray, centers_px: np.ndarray, view: SlideView, caption: str
) -> None:
    """One PNG per gene and ``overview.png`` into ``folder`` (created); ``values`` (N, len(genes))."""
    folder.mkdir()
    for k, gene in enumerate(genes):
        write_heatmap(folder / f"{_safe_name(gene)}.png", gene, values[:, k], centers_px, view, caption)
    write_overview(folder / OVERVIEW_PNG, genes, values, centers_px, view, caption)


def heatmap_caption(genes: Sequence[str], requested: bool, n_panel: int, n_spots: int, view: SlideView) -> str:
    """Why these genes, and how to read the picture."""
    why = (
        "the genes asked for"
        if requested
        else f"the {len(genes)} of the model's {n_panel} genes whose predictions vary most across this slide's spots"
    )
    return (
        f"Genes: {why}. {n_spots} spots, drawn as discs of the spot's diameter "
        f"({view.spot_diameter_px * view.mpp:.0f} um); the model sees a {view.window_um:.0f} um square around each. "
        f"Values: predicted log1p CPM."
    )


def write_geojson(
    path: Path,
    ids: Sequence[str],
    centers_px: np.ndarray,
    window_px: float,
    genes: Sequence[str],
    rows,
    append: bool,
) -> None:
    """QuPath-ready GeoJSON: a FeatureCollection with one detection per spot, its geometry the
    model's square in level-0 px, its predictions as QuPath measurements (a name -> number map).
    ``append`` adds the features of the next row chunk; :func:`close_geojson` ends the file."""
    half = window_px / 2
    with open(path, "a" if append else "w") as fh:
        if not append:
            fh.write('{"type": "FeatureCollection", "features": [\n')
        for k, (spot_id, (x, y)) in enumerate(zip(ids, centers_px, strict=True)):
            ring = [[x - half, y - half], [x + half, y - half], [x + half, y + half], [x - half, y + half]]
            feature = {
                "type": "Feature",
                "id": str(spot_id),
                "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
                "properties": {
                    "objectType": "detection",
                    "name": str(spot_id),
                    "classification": {"name": "M2ORT spot", "color": [64, 160, 96]},
                    "isLocked": True,
                    "measurements": {g: float(v) for g, v in zip(genes, rows[k], strict=True)},
                },
            }
            fh.write(("" if not append and k == 0 else ",\n") + json.dumps(feature, allow_nan=False))


def close_geojson(path: Path) -> None:
    with open(path, "a") as fh:
        fh.write("\n]}\n")


def h5ad_path(folder: str | os.PathLike, stem: str) -> Path:
    """A slide's ``.h5ad`` in ``folder`` (the output folder, or its staging folder): ``folder/<stem>.h5ad``."""
    return Path(folder) / f"{stem}.h5ad"


def publish_staged(staging: Path, out_dir: Path, stem: str, heatmap_genes: list[str]) -> SlideOutputs:
    """Rename what ``staging`` holds of ``<stem>.csv``, ``<stem>.geojson``, ``<stem>_heatmaps/``
    and ``<stem>.h5ad`` into ``out_dir``, the ``.h5ad`` last: an ``.h5ad`` that exists is complete."""
    staged_maps = staging / f"{stem}_heatmaps"
    heatmaps = []
    if staged_maps.is_dir():
        final_maps = out_dir / f"{stem}_heatmaps"
        if final_maps.exists():
            shutil.rmtree(final_maps)
        os.replace(staged_maps, final_maps)
        heatmaps = [final_maps / f"{_safe_name(gene)}.png" for gene in heatmap_genes] + [final_maps / OVERVIEW_PNG]
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
        return h5ad_path(self.out_dir, self.stem)

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


def existing_run_settings(h5ad: Path) -> dict | None:
    """The run settings an existing ``.h5ad`` records (``uns["m2ort_fast"]["run_settings"]``), or
    None when it records none (an earlier version's output); OutputError when it cannot be read."""
    import h5py

    try:
        with h5py.File(h5ad, "r") as f:
            node = f.get("uns/m2ort_fast/run_settings")
            if node is None:
                return None
            value = node[()]
            return json.loads(value.decode() if isinstance(value, bytes) else str(value))
    except (OSError, ValueError) as exc:
        raise OutputError(
            f"exists but cannot be read ({exception_detail(exc)}): --overwrite to replace it", h5ad
        ) from None


def run_key(settings: dict) -> str:
    """A short stable hash of the settings that decide a slide's outputs."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


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
        # the CSV and GeoJSON name spots as their table does (one file per slide: no clash)
        self.ids = [str(i) for i in (skeleton.obs["spot_id"] if "spot_id" in skeleton.obs else skeleton.obs_names)]
        self.h5ad = h5ad_path(staged.folder, self.stem)
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
        formats: Sequence[str] = ("csv",),
        heatmap_genes: Sequence[str] | None,
        n_heatmaps: int,
        view: SlideView | None,
        slide: Slide | None = None,
    ) -> SlideOutputs:
        """Write the other formats (``FORMATS``) and heatmaps from the file in row chunks, then
        publish everything, the ``.h5ad`` last. ``slide``: the open slide, for the SpatialData
        store's image."""
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
            folder = self.staged.folder
            geojson_window_px = view.window_px if "geojson" in formats and view is not None else None
            for start, rows in self._row_chunks():
                chunk = slice(start, start + len(rows))
                heat_values[chunk] = rows[:, columns]
                if "csv" in formats:
                    write_csv_rows(
                        folder / f"{self.stem}.csv", rows, self.ids[chunk], self.genes, centers[chunk], append=start > 0
                    )
                if geojson_window_px is not None:
                    write_geojson(
                        folder / f"{self.stem}.geojson",
                        self.ids[chunk],
                        centers[chunk],
                        geojson_window_px,
                        self.genes,
                        rows,
                        append=start > 0,
                    )
            if geojson_window_px is not None:
                close_geojson(folder / f"{self.stem}.geojson")
            self.file.close()
            self.progress_path.unlink(missing_ok=True)
            if "spatialdata" in formats and view is not None and slide is not None:
                from m2ort_fast.outputs_spatialdata import write_spatialdata

                write_spatialdata(folder / f"{self.stem}.zarr", self.h5ad, slide, view)
            if genes and view is not None:
                caption = heatmap_caption(genes, bool(heatmap_genes), len(self.genes), self.n_spots, view)
                write_heatmaps(folder / f"{self.stem}_heatmaps", genes, heat_values, centers, view, caption)
        return self.staged.publish(genes if view is not None else [])

    def abort(self) -> None:
        """Close the file and remove the staging folder (an interrupted slide leaves no output)."""
        with contextlib.suppress(Exception):
            if self.file is not None:
                self.file.close()
        self.staged.discard()
