"""``--format spatialdata``: a slide's predictions as a SpatialData zarr store.

Elements, in two coordinate systems (``global``: level-0 px of the slide; ``microns``):

- ``images/slide``: the slide at full resolution and its 2x downsamples, read through our reader
  in chunks (never decoded whole; the store is written with dask's synchronous scheduler, as the
  readers are not all thread-safe);
- ``shapes/spots``: the spots as circles of their diameter; ``shapes/windows``: the model's
  squares (what its three levels see); ``shapes/tissue``: the tissue mask as polygons;
- ``tables/table``: the ``.h5ad``'s AnnData, annotating ``spots`` (``region`` / ``instance_id``),
  its ``uns["spatial"]`` holding the 600 px image as ``hires`` (squidpy and scanpy draw on the
  table at their defaults; the full image is ``images/slide``).

Size: the image is stored losslessly (zstd), as zarr readers decode at their defaults; H&E decoded
from a JPEG compresses ~1.1x that way, so the store is about the image's raw size (the demo: 20 MB
from a 1.7 MB JPEG-tiled TIFF, 31 MB when the table also held the 2000 px ``hires`` image).

Needs the ``[spatial]`` extra (spatialdata, geopandas, shapely, scikit-image, dask).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from m2ort_fast.errors import M2ORTError

if TYPE_CHECKING:
    from m2ort_fast.outputs.h5ad import SlideView
    from m2ort_fast.slide import Slide

CHUNK_PX = 2048  # image chunks read (and stored) at a time
SMALLEST_LEVEL_PX = 1024  # 2x downsamples are added until the longer side is below this


def write_spatialdata(path: Path, h5ad: Path, slide: Slide, view: SlideView) -> None:
    """Write the store ``path`` (a folder) from the complete ``h5ad`` and the open ``slide``."""
    try:
        import anndata
        import dask
        import dask.array  # noqa: F401  (needed by _lazy_slide_pixels: checked here with the rest)
        import geopandas as gpd
        import shapely
        from skimage.measure import find_contours
        from spatialdata import SpatialData
        from spatialdata.models import Image2DModel, ShapesModel, TableModel
        from spatialdata.transformations import Identity, Scale
    except ImportError as exc:
        raise M2ORTError(
            f"--format spatialdata needs spatialdata ({exc.name} is not installed: pip install 'm2ort-fast[spatial]')"
        ) from None

    transformations = {"global": Identity(), "microns": Scale([view.mpp, view.mpp], axes=("y", "x"))}

    pixels, scale_factors = _lazy_slide_pixels(slide)
    image = Image2DModel.parse(
        pixels,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=scale_factors or None,
        transformations=transformations,
        chunks=(3, CHUNK_PX, CHUNK_PX),
    )

    table = _with_small_images(anndata.read_h5ad(h5ad))
    centers = np.asarray(table.obsm["spatial"], dtype=np.float64)
    instance_ids = np.arange(table.n_obs)
    spots = ShapesModel.parse(
        centers,
        geometry=0,
        radius=np.full(table.n_obs, view.spot_diameter_px / 2),
        index=instance_ids,
        transformations=transformations,
    )
    half = view.window_px / 2
    windows = ShapesModel.parse(
        gpd.GeoDataFrame(
            geometry=shapely.box(
                centers[:, 0] - half, centers[:, 1] - half, centers[:, 0] + half, centers[:, 1] + half
            ),
            index=instance_ids,
        ),
        transformations=transformations,
    )
    tissue = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=_mask_polygons(view.tissue_mask, view.thumbnail_downsample, find_contours)),
        transformations=transformations,
    )
    table.obs["region"] = "spots"
    table.obs["region"] = table.obs["region"].astype("category")
    table.obs["instance_id"] = instance_ids
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="instance_id")
    store = SpatialData(
        images={"slide": image},
        shapes={"spots": spots, "windows": windows, "tissue": tissue},
        tables={"table": table},
    )
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding", category=UserWarning)  # zarr's notice
        store.write(path)


def _lazy_slide_pixels(slide: Slide):
    """The slide's level 0 as a dask array (3, H, W) uint8 read through our reader in CHUNK_PX
    squares (never decoded whole), and the 2x downsamples to add until the longer side is below
    SMALLEST_LEVEL_PX."""
    import dask
    import dask.array as da

    width_px, height_px = slide.level_dimensions[0]

    def read(x_px: int, y_px: int, w_px: int, h_px: int) -> np.ndarray:
        return np.ascontiguousarray(slide.read_region(x_px, y_px, 0, w_px, h_px)[..., :3].transpose(2, 0, 1))

    rows = []
    for y_px in range(0, height_px, CHUNK_PX):
        h_px = min(CHUNK_PX, height_px - y_px)
        row = []
        for x_px in range(0, width_px, CHUNK_PX):
            w_px = min(CHUNK_PX, width_px - x_px)
            row.append(da.from_delayed(dask.delayed(read)(x_px, y_px, w_px, h_px), (3, h_px, w_px), np.uint8))
        rows.append(row)
    scale_factors = []
    side = max(width_px, height_px)
    while side // 2 >= SMALLEST_LEVEL_PX:
        scale_factors.append(2)
        side //= 2
    return da.block(rows), scale_factors


def _with_small_images(table):
    """The table with its uns["spatial"] images cut to the 600 px lowres one, kept as ``hires``
    with its scale factor: the 2000 px hires image made the table 14 MB of the demo's 31 MB
    store, and the store holds the slide itself."""
    for library in (table.uns.get("spatial") or {}).values():
        images, scalefactors = library.get("images") or {}, library.get("scalefactors") or {}
        if "lowres" in images and "tissue_lowres_scalef" in scalefactors:
            images["hires"] = images.pop("lowres")  # stored once, under the key the tools look for first
            scalefactors["tissue_hires_scalef"] = scalefactors.pop("tissue_lowres_scalef")
    return table


def _mask_polygons(mask: np.ndarray, downsample: float, find_contours) -> list:
    """The tissue mask (h, w) bool as polygons in level-0 px (outer outlines; holes are filled)."""
    import shapely

    padded = np.pad(mask, 1).astype(np.float32)  # closed contours at the image's edges too
    polygons = []
    for contour in find_contours(padded, 0.5):
        if len(contour) < 4:
            continue
        xy = (contour[:, ::-1] - 1 + 0.5) * downsample  # (row, col) of the padded mask -> level-0 (x, y)
        polygon = shapely.make_valid(shapely.Polygon(xy))
        if not polygon.is_empty and polygon.area > 0:
            polygons.append(polygon)
    if not polygons:
        return []
    merged = shapely.unary_union(polygons)
    return list(getattr(merged, "geoms", [merged]))
