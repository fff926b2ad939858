"""The .h5ad a slide's predictions are written to, laid out as Space Ranger + scanpy make Visium data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

LOWRES_MAX_SIDE_PX = 600  # the images stored in the .h5ad, as Space Ranger's "lowres" and "hires"


HIRES_MAX_SIDE_PX = 2000


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
