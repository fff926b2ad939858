"""Spot tables: where on the slide to predict expression.

Sources, all giving spot centres in level-0 pixels (x, y):

- ``visium``: a Space Ranger ``outs/`` or ``spatial/`` folder, or its ``tissue_positions.csv``
  (Space Ranger >= 2.0, with a header) / ``tissue_positions_list.csv`` (no header). Columns:
  barcode, in_tissue, array_row, array_col, pxl_row_in_fullres (y!), pxl_col_in_fullres (x!).
  Only spots under tissue (in_tissue == 1) are kept.
- ``st``: a legacy ST spot table (her2st ``*_selection.tsv``): x, y (array position), new_x, new_y
  (adjusted array position), pixel_x, pixel_y (centre in image px), selected. Only selected == 1 rows
  are kept; ids are ``"{x}x{y}"`` as in the count tables.
- ``csv``: centres in level-0 px in columns x,y / pixel_x,pixel_y / x_px,y_px, with an optional
  id / barcode column (else the row number is the id).
- ``grid``: :func:`grid_spots`, a Visium-like hexagonal lattice over the slide's tissue.

Array tables also give the slide's pixel size: the array pitch is known in microns (Visium 100 um
between neighbours, legacy ST 200 um per array step), so fitting the pixel centres against the
array coordinates gives microns per pixel (``Spots.mpp_from_pitch``) for slides that do not record it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import pandas as pd

from m2ort_fast.errors import SpotsError

if TYPE_CHECKING:
    import anndata

VISIUM_PITCH_UM = 100.0  # centre to centre; same-row neighbours differ by 2 in array_col
VISIUM_SPOT_DIAMETER_UM = 55.0
# Space Ranger's spot_diameter_fullres spans "a theoretical 65 um spot" (10x docs), not the 55 um one.
VISIUM_SCALEFACTOR_SPOT_UM = 65.0
ST_STEP_UM = 200.0  # legacy ST: one array step, centre to centre
ST_SPOT_DIAMETER_UM = 100.0
VISIUM_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
VISIUM_POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")
CSV_COORDINATE_COLUMNS = (("pixel_x", "pixel_y"), ("x_px", "y_px"), ("x", "y"))
CSV_ID_COLUMNS = ("id", "spot_id", "barcode", "spot", "name")
FORMATS = ("auto", "visium", "st", "csv")
# The thumbnail grid_spots computes the tissue mask on when not given one.
GRID_THUMBNAIL_MAX_SIDE_PX = 2048
MAX_GRID_SPOTS = 5_000_000  # more means spacing_um is far too small for the slide


@dataclasses.dataclass
class Spots:
    """Spot centres on one slide, with what the table says about them.

    ids: N names used as AnnData obs names. centers_px: (N, 2) float64 level-0 pixel (x, y).
    columns: per-spot extra columns for AnnData obs, index = ids. mpp_from_pitch: level-0 microns
    per pixel implied by the array pitch (None where the table cannot tell).
    """

    ids: list[str]
    centers_px: np.ndarray
    source: str  # "visium" | "st" | "csv" | "grid"
    columns: pd.DataFrame
    mpp_from_pitch: float | None = None
    spot_diameter_um: float | None = None
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.ids)


# What the API takes as spots: a Spots, a spot table's path, or an AnnData with obsm["spatial"].
SpotsLike: TypeAlias = "Spots | str | os.PathLike | anndata.AnnData"


# ----------------------------------------------------------------------------------- loading


def load_spots(path: str | os.PathLike, *, format: str = "auto") -> Spots:
    """Read a spot table (Visium folder or tissue_positions file, legacy ST table, CSV of centres)."""
    path = Path(path)
    if format not in FORMATS:
        raise SpotsError(f"unknown spot format {format!r}: use one of {', '.join(FORMATS)}", path)
    if not path.exists():
        raise SpotsError("no such file or folder", path)
    if path.is_dir():
        if format not in ("auto", "visium"):
            raise SpotsError(f"is a folder, but format {format!r} needs a file", path)
        return _load_visium(_find_visium_positions(path))
    if format == "auto":
        format = _detect_format(path)
    return {"visium": _load_visium, "st": _load_st, "csv": _load_csv}[format](path)


def as_spots(spots: SpotsLike, *, format: str = "auto") -> Spots:
    """Spots as the API takes them: a :class:`Spots`, an AnnData with ``obsm["spatial"]``
    (:func:`spots_from_anndata`), or a spot table's path (:func:`load_spots`)."""
    if isinstance(spots, Spots):
        return spots
    if hasattr(spots, "obsm") and hasattr(spots, "obs_names"):  # an AnnData (not imported for a path)
        return spots_from_anndata(spots)
    return load_spots(spots, format=format)


def _find_visium_positions(folder: Path) -> Path:
    for sub in (folder, folder / "spatial"):
        for name in VISIUM_POSITION_FILES:
            if (sub / name).is_file():
                return sub / name
    raise SpotsError(
        f"folder holds no {' or '.join(VISIUM_POSITION_FILES)} (expected a Visium spatial/ or "
        f"Space Ranger outs/ folder)",
        folder,
    )


def _detect_format(path: Path) -> str:
    if path.name.startswith("tissue_positions"):
        return "visium"
    header = {c.strip().lower() for c in _first_line(path).split(_separator(path))}
    if "pxl_row_in_fullres" in header:
        return "visium"
    if {"x", "y", "pixel_x", "pixel_y"} <= header and header & {"selected", "new_x"}:
        return "st"
    return "csv"


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _first_line(path: Path) -> str:
    try:
        with _open_text(path) as f:
            for line in f:
                if line.strip():
                    return line.rstrip("\r\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise SpotsError(f"cannot read the spot table: {e}", path) from None
    raise SpotsError("the spot table is empty", path)


def _separator(path: Path) -> str:
    line = _first_line(path)
    for sep in ("\t", ",", ";"):
        if sep in line:
            return sep
    return r"\s+"


def _read_table(path: Path, *, header: int | None = 0) -> pd.DataFrame:
    sep = _separator(path)
    try:
        table = pd.read_csv(path, sep=sep, header=header, dtype=str, keep_default_na=False, skip_blank_lines=True)
    except (OSError, UnicodeDecodeError, EOFError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise SpotsError(f"cannot read the spot table: {e}", path) from None
    if header is not None:
        table.columns = _header(table.columns, path)
    return table


def _header(names, path: Path) -> pd.Index:
    """Column names stripped of spaces; a name that appears twice is refused (which one is meant?)."""
    header = pd.Index([str(c).strip() for c in names])
    repeated = header[header.duplicated()]
    if len(repeated):
        raise SpotsError(f"column {repeated[0]!r} appears more than once in the header", path)
    return header


def _require_columns(table: pd.DataFrame, needed, path: Path, what: str) -> None:
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise _missing_columns(table, missing, path, what)


def _missing_columns(table: pd.DataFrame, missing, path: Path, what: str) -> SpotsError:
    found = ", ".join(map(str, table.columns[:12])) + (", ..." if len(table.columns) > 12 else "")
    return SpotsError(f"missing column(s) {', '.join(missing)} for a {what} (found: {found})", path)


def _numeric(table: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """Column as float64; a SpotsError naming the first bad value if any is not a finite number."""
    values = pd.to_numeric(table[column].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise SpotsError(
            f"no numeric coordinate in column {column!r} at data row {i + 1} "
            f"({table[column].iloc[i]!r}; {int(bad.sum())} such rows)",
            path,
        )
    return values


def _check_ids(ids: list[str], path: Path) -> None:
    counts = pd.Series(ids).value_counts()
    duplicated = counts[counts > 1]
    if len(duplicated):
        raise SpotsError(
            f"duplicate spot ids: {duplicated.index[0]!r} appears {int(duplicated.iloc[0])} times "
            f"({len(duplicated)} ids repeated)",
            path,
        )


def _make_spots(ids, centers_px, source, columns: pd.DataFrame, mpp, diameter_um, path) -> Spots:
    ids = [str(i) for i in ids]
    _check_ids(ids, path)
    columns = columns.reset_index(drop=True)
    columns.index = pd.Index(ids, name="spot_id")
    return Spots(
        ids=ids,
        centers_px=np.ascontiguousarray(centers_px, dtype=np.float64),
        source=source,
        columns=columns,
        mpp_from_pitch=mpp,
        spot_diameter_um=diameter_um,
        path=path,
    )


def _load_visium(path: Path) -> Spots:
    raw = _read_table(path, header=None)
    has_header = raw.shape[0] > 0 and str(raw.iloc[0, 0]).strip().lower() == "barcode"
    if has_header:
        raw.columns = _header(raw.iloc[0], path)
        raw = raw.iloc[1:].reset_index(drop=True)
    elif raw.shape[1] == len(VISIUM_COLUMNS):
        raw.columns = VISIUM_COLUMNS
    else:
        raise SpotsError(
            f"a headerless Visium positions file needs {len(VISIUM_COLUMNS)} columns "
            f"({', '.join(VISIUM_COLUMNS)}), found {raw.shape[1]}",
            path,
        )
    _require_columns(raw, VISIUM_COLUMNS, path, "Visium positions file")
    if raw.empty:
        raise SpotsError("no spots in the Visium positions file", path)
    array_row, array_col = _numeric(raw, "array_row", path), _numeric(raw, "array_col", path)
    # Space Ranger names the image axes by row/column: the x centre is pxl_COL, the y centre pxl_ROW.
    centers = np.stack([_numeric(raw, "pxl_col_in_fullres", path), _numeric(raw, "pxl_row_in_fullres", path)], 1)
    # Fit on every spot (under tissue or not): more spots, better pitch.
    mpp = _mpp_from_array_fit(
        np.stack([array_col, array_row], 1), centers, step_um=(VISIUM_PITCH_UM / 2, VISIUM_PITCH_UM * math.sqrt(3) / 2)
    )
    if mpp is None:
        mpp = _mpp_from_scalefactors(path.parent / "scalefactors_json.json")
    keep = _numeric(raw, "in_tissue", path) == 1
    if not keep.any():
        raise SpotsError(f"none of the {len(raw)} spots is under tissue (in_tissue == 1)", path)
    columns = pd.DataFrame(
        {"array_row": array_row[keep].astype(np.int64), "array_col": array_col[keep].astype(np.int64)}
    )
    barcodes = raw["barcode"].str.strip()[keep].tolist()
    return _make_spots(barcodes, centers[keep], "visium", columns, mpp, VISIUM_SPOT_DIAMETER_UM, path)


def spots_from_anndata(adata, library_id: str | None = None) -> Spots:
    """Spots from an AnnData as scanpy/squidpy hold Visium data (``sc.read_visium``, HEST samples):
    centres from ``obsm["spatial"]`` (x, y in level-0 px of the slide they are predicted on), ids
    from ``obs_names``, ``obs`` kept as columns. Where ``uns["spatial"][library_id]`` has Space
    Ranger's ``spot_diameter_fullres``, it gives the mpp (a Visium spot spans 65 um there) and the
    spots are Visium's 55 um ones; ``library_id`` picks one of several libraries."""
    where = "AnnData spots"
    if "spatial" not in getattr(adata, "obsm", {}):
        raise SpotsError('has no obsm["spatial"] (spot centres in pixels)', where)
    centers = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if centers.ndim != 2 or centers.shape[1] != 2 or len(centers) != adata.n_obs:
        raise SpotsError(f'obsm["spatial"] must be (n_obs, 2) x, y pixels, got shape {centers.shape}', where)
    if not len(centers):
        raise SpotsError("has no spots", where)
    if not np.isfinite(centers).all():
        bad = adata.obs_names[int(np.argmax(~np.isfinite(centers).all(1)))]
        raise SpotsError(f'obsm["spatial"] holds a non-finite centre (spot {bad!r})', where)
    libraries = dict(adata.uns.get("spatial", {}) or {})
    if library_id is not None and library_id not in libraries:
        raise SpotsError(f"no library {library_id!r} in uns['spatial'] (has: {', '.join(libraries) or 'none'})", where)
    if library_id is None and len(libraries) > 1:
        raise SpotsError(f"uns['spatial'] holds {len(libraries)} libraries ({', '.join(libraries)}): name one", where)
    library = libraries.get(library_id) if library_id else next(iter(libraries.values()), None)
    diameter_px = (library or {}).get("scalefactors", {}).get("spot_diameter_fullres")
    mpp = diameter = None
    if diameter_px is not None and math.isfinite(float(diameter_px)) and float(diameter_px) > 0:
        mpp, diameter = VISIUM_SCALEFACTOR_SPOT_UM / float(diameter_px), VISIUM_SPOT_DIAMETER_UM
    columns = adata.obs.copy()
    for name in columns.columns:  # categories (leiden, ...) as plain values: obs is rebuilt per slide
        if isinstance(columns[name].dtype, pd.CategoricalDtype):
            columns[name] = columns[name].astype(columns[name].cat.categories.dtype)
    return _make_spots(list(adata.obs_names), centers, "anndata", columns, mpp, diameter, None)


def _mpp_from_scalefactors(path: Path) -> float | None:
    if not path.is_file():
        return None
    try:
        diameter_px = float(json.loads(path.read_text())["spot_diameter_fullres"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpotsError(f"cannot read spot_diameter_fullres: {e}", path) from None
    return VISIUM_SCALEFACTOR_SPOT_UM / diameter_px if math.isfinite(diameter_px) and diameter_px > 0 else None


def _load_st(path: Path) -> Spots:
    table = _read_table(path)
    table.columns = _header([c.lower() for c in table.columns], path)
    _require_columns(table, ["x", "y", "pixel_x", "pixel_y"], path, "legacy ST spot table")
    if "selected" in table.columns:
        table = table[pd.to_numeric(table["selected"].str.strip(), errors="coerce") == 1].reset_index(drop=True)
    if table.empty:
        raise SpotsError("no spots (no rows with selected == 1)", path)
    array_x, array_y = _numeric(table, "x", path), _numeric(table, "y", path)
    if not (np.all(array_x == np.round(array_x)) and np.all(array_y == np.round(array_y))):
        raise SpotsError("array positions x, y must be whole numbers in a legacy ST spot table", path)
    centers = np.stack([_numeric(table, "pixel_x", path), _numeric(table, "pixel_y", path)], 1)
    # new_x, new_y are the array positions corrected for print distortion: the better fit.
    if {"new_x", "new_y"} <= set(table.columns):
        fit_xy = np.stack([_numeric(table, "new_x", path), _numeric(table, "new_y", path)], 1)
    else:
        fit_xy = np.stack([array_x, array_y], 1)
    mpp = _mpp_from_array_fit(fit_xy, centers, step_um=(ST_STEP_UM, ST_STEP_UM))
    ids = [f"{int(x)}x{int(y)}" for x, y in zip(array_x, array_y, strict=True)]
    columns = pd.DataFrame({"x": array_x.astype(np.int64), "y": array_y.astype(np.int64)})
    for c in ("new_x", "new_y"):
        if c in table.columns:
            columns[c] = _numeric(table, c, path)
    return _make_spots(ids, centers, "st", columns, mpp, ST_SPOT_DIAMETER_UM, path)


def _load_csv(path: Path) -> Spots:
    table = _read_table(path)
    by_lower = {c.lower(): c for c in table.columns}
    pair = next(
        ((by_lower[x], by_lower[y]) for x, y in CSV_COORDINATE_COLUMNS if x in by_lower and y in by_lower), None
    )
    if pair is None:
        options = " or ".join(f"{x},{y}" for x, y in CSV_COORDINATE_COLUMNS)
        raise _missing_columns(table, [f"{options} (level-0 px)"], path, "CSV of spot centres")
    id_column = next((by_lower[c] for c in CSV_ID_COLUMNS if c in by_lower), None)
    if id_column is None and table.columns[0] in ("", "Unnamed: 0"):  # a pandas index written by to_csv
        id_column = table.columns[0]
    _require_columns(table, [*pair, *([id_column] if id_column else [])], path, "CSV of spot centres")
    if table.empty:
        raise SpotsError("no spots in the table", path)
    centers = np.stack([_numeric(table, pair[0], path), _numeric(table, pair[1], path)], 1)
    ids = table[id_column].str.strip().tolist() if id_column else [str(i) for i in range(len(table))]
    extra = [c for c in table.columns if c not in (*pair, id_column)]
    columns = pd.DataFrame({c: _maybe_numeric(table[c]) for c in extra})
    return _make_spots(ids, centers, "csv", columns, None, None, path)


def _maybe_numeric(column: pd.Series) -> pd.Series:
    """Numbers as numbers for AnnData obs; text stays text."""
    converted = pd.to_numeric(column, errors="coerce")
    return converted if converted.notna().all() else column


def _mpp_from_array_fit(array_xy: np.ndarray, pixel_xy: np.ndarray, step_um: tuple[float, float]) -> float | None:
    """Microns per pixel from an affine least-squares fit pixel (x, y) ~ array (a, b).

    array_xy, pixel_xy: (N, 2). step_um: microns per unit of array a and of array b. Each array axis
    maps to a pixel vector whose length is that step in pixels; the fit absorbs rotation and flips.
    None where the spots cannot determine both axes, the two axes disagree, or the fit is poor
    (coordinates that are not a regular array).
    """
    design = np.column_stack([array_xy, np.ones(len(array_xy))])
    if len(array_xy) < 4 or np.linalg.matrix_rank(design) < 3:
        return None
    coef, *_ = np.linalg.lstsq(design, pixel_xy, rcond=None)
    px_per_step = np.linalg.norm(coef[:2], axis=1)
    if not np.all(px_per_step > 0):
        return None
    mpp_per_axis = np.asarray(step_um) / px_per_step
    residual_px = np.sqrt(np.mean(np.sum((design @ coef - pixel_xy) ** 2, axis=1)))
    if abs(mpp_per_axis[0] / mpp_per_axis[1] - 1) > 0.1 or residual_px > 0.25 * px_per_step.min():
        return None
    return float(mpp_per_axis.mean())


# ----------------------------------------------------------------------------------- grid


def grid_spots(
    slide,
    *,
    spacing_um: float = VISIUM_PITCH_UM,
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
    mask: np.ndarray | None = None,
) -> Spots:
    """Visium-like spots over the tissue: a hexagonal lattice, ``spacing_um`` centre to centre.

    slide: needs ``mpp``, ``level_dimensions[0]`` (width, height), ``path``, and
    ``thumbnail(max_side_px) -> (image (h, w, 3) uint8, downsample)`` where no mask is given.
    mask: (h, w) bool tissue mask covering the whole slide (any h, w), e.g. from
    :func:`m2ort_fast.tissue.tissue_mask`. Ids ``"r{array_row}_c{array_col}"`` use Visium's array
    convention (same-row neighbours differ by 2 in array_col; odd rows are shifted by half a pitch).
    """
    slide_path = Path(slide.path) if getattr(slide, "path", None) is not None else None
    mpp = getattr(slide, "mpp", None)
    if mpp is None or not math.isfinite(mpp) or mpp <= 0:
        raise SpotsError("no mpp: pass --mpp (the slide records no pixel size, needed to place grid spots)", slide_path)
    if not (spacing_um > 0 and spot_diameter_um > 0):
        raise SpotsError(
            f"grid spacing ({spacing_um} um) and spot diameter ({spot_diameter_um} um) must be > 0", slide_path
        )
    if mask is None:
        from m2ort_fast.tissue import tissue_mask

        thumbnail, _ = slide.thumbnail(GRID_THUMBNAIL_MAX_SIDE_PX)
        mask = tissue_mask(thumbnail)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"grid_spots: mask must be 2-D (h, w), got shape {mask.shape}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise SpotsError(f"no tissue found in {slide_path}", slide_path)

    width_px, height_px = (int(v) for v in slide.level_dimensions[0])
    # Mask pixel -> level-0 px, from the extents (the thumbnail covers the whole slide).
    scale_x, scale_y = width_px / mask.shape[1], height_px / mask.shape[0]
    rows_on, cols_on = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    x_lo, x_hi = cols_on[0] * scale_x, (cols_on[-1] + 1) * scale_x
    y_lo, y_hi = rows_on[0] * scale_y, (rows_on[-1] + 1) * scale_y

    spacing_px = spacing_um / mpp
    row_pitch_px = spacing_px * math.sqrt(3) / 2
    # Lattice anchored at the slide origin, so a spot's id does not depend on the tissue's extent:
    # array_row r lies at y = (r + 1/2) row pitches, array_col c at x = (c + 1) half-pitches.
    rows = np.arange(max(0, math.floor(y_lo / row_pitch_px - 0.5)), math.ceil(y_hi / row_pitch_px) + 1)
    half_cols = np.arange(max(0, math.floor(2 * x_lo / spacing_px) - 2), math.ceil(2 * x_hi / spacing_px) + 1)
    if len(rows) * len(half_cols) / 2 > MAX_GRID_SPOTS:
        raise SpotsError(
            f"grid spacing {spacing_um} um is too small for this slide (~{len(rows) * len(half_cols) // 2} spots)",
            slide_path,
        )
    array_row, array_col = (a.ravel() for a in np.meshgrid(rows, half_cols, indexing="ij"))
    on_lattice = (array_row + array_col) % 2 == 0  # Visium: array_col has the parity of array_row
    array_row, array_col = array_row[on_lattice], array_col[on_lattice]
    x = (array_col + 1) * spacing_px / 2
    y = (array_row + 0.5) * row_pitch_px
    inside = (x >= 0) & (x < width_px) & (y >= 0) & (y < height_px)
    array_row, array_col, x, y = array_row[inside], array_col[inside], x[inside], y[inside]
    mask_r = np.minimum((y / scale_y).astype(np.int64), mask.shape[0] - 1)
    mask_c = np.minimum((x / scale_x).astype(np.int64), mask.shape[1] - 1)
    on_tissue = mask[mask_r, mask_c]
    if not on_tissue.any():
        raise SpotsError(
            f"no grid spot falls on the tissue found in {slide_path} (spacing {spacing_um} um): "
            f"the tissue is smaller than the grid",
            slide_path,
        )
    array_row, array_col = array_row[on_tissue], array_col[on_tissue]
    ids = [f"r{r}_c{c}" for r, c in zip(array_row.tolist(), array_col.tolist(), strict=True)]
    columns = pd.DataFrame({"array_row": array_row, "array_col": array_col})
    return _make_spots(
        ids, np.stack([x[on_tissue], y[on_tissue]], 1), "grid", columns, None, float(spot_diameter_um), None
    )


# ----------------------------------------------------------------------------------- checks


def check_spots_inside(spots: Spots, width_px: int, height_px: int, slide_path) -> None:
    """SpotsError naming the spot file and the slide when any spot centre lies outside the slide."""
    centers = np.asarray(spots.centers_px, dtype=np.float64)
    outside = (centers[:, 0] < 0) | (centers[:, 0] >= width_px) | (centers[:, 1] < 0) | (centers[:, 1] >= height_px)
    if outside.any():
        i = int(np.argmax(outside))
        where = spots.path if spots.path is not None else f"{spots.source} spots"
        raise SpotsError(
            f"{int(outside.sum())} of {len(centers)} spot centres lie outside the slide {slide_path} "
            f"({width_px} x {height_px} px), e.g. spot {spots.ids[i]!r} at "
            f"({centers[i, 0]:.0f}, {centers[i, 1]:.0f}) px: a spot table for another slide, "
            f"or for another resolution of it?",
            where,
        )
