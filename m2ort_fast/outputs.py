"""Writing a slide's predictions: AnnData ``.h5ad``, CSV, heatmap PNGs.

Everything is first written into a hidden staging folder beside the outputs and renamed into
place at the end, the ``.h5ad`` last: a file named ``<stem>.h5ad`` is always complete, and an
interrupted run leaves only a ``.<stem>.partial-*`` folder behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_HEATMAP_COUNT = 4
LOWRES_MAX_SIDE_PX = 600  # the image stored in the .h5ad, as Space Ranger's "lowres"


@dataclass
class SlideOutputs:
    h5ad: Path
    csv: Path | None
    heatmaps: list[Path]


def pick_heatmap_genes(predictions: np.ndarray, genes: list[str], requested: list[str] | None,
                       count: int = DEFAULT_HEATMAP_COUNT) -> list[str]:
    """The genes asked for (unknown names are an error), else the ``count`` genes whose
    predictions vary most across the slide's spots."""
    if requested:
        unknown = [g for g in requested if g not in genes]
        if unknown:
            from .errors import M2ORTError

            raise M2ORTError(f"genes not in the model's panel: {', '.join(unknown[:5])}")
        return list(requested)
    if predictions.shape[0] < 2:
        return list(genes[:count])
    order = np.argsort(-predictions.var(axis=0), kind="stable")
    return [genes[i] for i in order[:count]]


def build_anndata(predictions: np.ndarray, genes: list[str], spot_ids: list[str], centers_px: np.ndarray,
                  obs_columns: pd.DataFrame | None, uns: dict, thumbnail: np.ndarray | None = None,
                  thumbnail_downsample: float | None = None, spot_diameter_px: float | None = None):
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
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)), float(downsample) * image.shape[1] / size[0]


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


def write_heatmap(path: Path, gene: str, values: np.ndarray, centers_px: np.ndarray, thumbnail: np.ndarray,
                  downsample: float, spot_diameter_px: float, title_suffix: str = "",
                  value_label: str = "predicted log1p CPM") -> None:
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
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=diameter_pt**2, cmap="viridis", alpha=0.85,
                         edgecolors="none")
    fig.colorbar(scatter, ax=ax, fraction=0.035, pad=0.02, label=value_label)
    ax.set_title(f"{gene}{title_suffix}")
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_slide_outputs(out_dir: Path, stem: str, adata, *, write_csv: bool = True,
                        heatmap_genes: list[str] = (), thumbnail: np.ndarray | None = None,
                        thumbnail_downsample: float = 1.0, spot_diameter_px: float = 0.0) -> SlideOutputs:
    """Write ``<stem>.h5ad``, ``<stem>.csv`` and ``<stem>_heatmaps/<gene>.png`` into ``out_dir``
    through a staging folder; the ``.h5ad`` is renamed into place last."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}.partial-", dir=out_dir))
    try:
        adata.write_h5ad(staging / f"{stem}.h5ad")
        if write_csv:
            write_csv_rows(staging / f"{stem}.csv", adata.X, adata.obs_names, list(adata.var_names),
                           adata.obsm["spatial"])
        if heatmap_genes and thumbnail is not None:
            columns = [adata.var_names.get_loc(gene) for gene in heatmap_genes]
            suffix = heatmap_title_suffix(stem, trained=bool(adata.uns.get("m2ort_fast", {}).get("trained", True)))
            write_heatmaps(staging / f"{stem}_heatmaps", list(heatmap_genes), np.asarray(adata.X[:, columns]),
                           adata.obsm["spatial"], thumbnail, thumbnail_downsample, spot_diameter_px, suffix)
        return publish_staged(staging, out_dir, stem, list(heatmap_genes))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_csv_rows(path: Path, values: np.ndarray, spot_ids, genes: list[str], centers_px: np.ndarray,
                   append: bool = False) -> None:
    """The CSV: spot_id, x_px, y_px, then one column per gene; ``append`` adds rows (chunked writes)."""
    table = pd.DataFrame(values, index=pd.Index(spot_ids, name="spot_id"), columns=genes)
    table.insert(0, "y_px", centers_px[:, 1])
    table.insert(0, "x_px", centers_px[:, 0])
    table.to_csv(path, mode="a" if append else "w", header=not append, index_label="spot_id", float_format="%.6g")


def write_heatmaps(folder: Path, genes: list[str], values: np.ndarray, centers_px: np.ndarray,
                   thumbnail: np.ndarray, downsample: float, spot_diameter_px: float, title_suffix: str) -> None:
    """One PNG per gene into ``folder`` (created); ``values`` (N, len(genes))."""
    folder.mkdir()
    for k, gene in enumerate(genes):
        write_heatmap(folder / f"{_safe_name(gene)}.png", gene, values[:, k], centers_px, thumbnail, downsample,
                      spot_diameter_px, title_suffix=title_suffix)


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


def heatmap_title_suffix(stem: str, trained: bool) -> str:
    """What a heatmap's title adds to the gene: the slide, and a warning for an untrained model."""
    return f" ({stem}{'' if trained else ', UNTRAINED model'})"


def _safe_name(gene: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in gene)

