"""The tables beside the .h5ad: CSV (one row per spot) and GeoJSON (QuPath detections)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def write_csv_rows(
    path: Path, values: np.ndarray, spot_ids, genes: list[str], centers_px: np.ndarray, append: bool = False
) -> None:
    """The CSV: spot_id, x_px, y_px, then one column per gene; ``append`` adds rows (chunked writes)."""
    table = pd.DataFrame(values, index=pd.Index(spot_ids, name="spot_id"), columns=genes)
    table.insert(0, "y_px", centers_px[:, 1])
    table.insert(0, "x_px", centers_px[:, 0])
    table.to_csv(path, mode="a" if append else "w", header=not append, index_label="spot_id", float_format="%.6g")


# QuPath drops object ids that are not UUIDs: each spot's is derived from its slide and spot id,
# so that the same run writes the same file.
GEOJSON_ID_NAMESPACE = uuid.UUID("0f6d1b8e-6c35-5d0b-9a51-5e2f3c4b7a10")
GEOJSON_COORDINATE_DECIMALS = 2  # 0.01 level-0 px


def geojson_id(stem: str, spot_id: str) -> str:
    """A spot's GeoJSON feature id: a UUID (QuPath keeps only those), the same for the same slide and spot."""
    return str(uuid.uuid5(GEOJSON_ID_NAMESPACE, f"{stem}/{spot_id}"))


def write_geojson(
    path: Path,
    ids: Sequence[str],
    centers_px: np.ndarray,
    window_px: float,
    genes: Sequence[str],
    rows: np.ndarray,
    append: bool,
) -> None:
    """QuPath-ready GeoJSON: a FeatureCollection with one detection per spot, its geometry the
    model's square in level-0 px (rounded to 0.01 px), its predictions (N, G) float32 as QuPath
    measurements (a name -> number map, each number the float32's shortest exact text), the spot's
    id as its name and a UUID as its id. ``append`` adds the features of the next row chunk;
    :func:`close_geojson` ends the file."""
    half = window_px / 2
    with open(path, "a" if append else "w") as fh:
        if not append:
            fh.write('{"type":"FeatureCollection","features":[\n')
        for k, (spot_id, (x, y)) in enumerate(zip(ids, centers_px, strict=True)):
            ring = [
                [round(float(cx), GEOJSON_COORDINATE_DECIMALS), round(float(cy), GEOJSON_COORDINATE_DECIMALS)]
                for cx, cy in ((x - half, y - half), (x + half, y - half), (x + half, y + half), (x - half, y + half))
            ]
            feature = {
                "type": "Feature",
                "id": geojson_id(path.stem, str(spot_id)),
                "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
                "properties": {
                    "objectType": "detection",
                    "name": str(spot_id),
                    "classification": {"name": "M2ORT spot", "color": [64, 160, 96]},
                    "isLocked": True,
                    "measurements": {g: float(str(v)) for g, v in zip(genes, rows[k].astype(np.float32), strict=True)},
                },
            }
            text = json.dumps(feature, allow_nan=False, separators=(",", ":"))
            fh.write(("" if not append and k == 0 else ",\n") + text)


def close_geojson(path: Path) -> None:
    with open(path, "a") as fh:
        fh.write("\n]}\n")
