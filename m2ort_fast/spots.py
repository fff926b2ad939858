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
The pitch is the first source; a spot diameter in pixels (``spot_diameter_fullres``) is the second,
read under its writer's convention (Space Ranger: a 65 um spot; HEST: the technology's spot, 55 um
Visium or 100 um ST; m2ort-fast: the mpp it recorded), and checked against the pitch where both
exist (:func:`m2ort_fast.scale.mpps_agree`). ``Spots.mpp_source`` says which one gave the mpp.

:func:`as_spots` takes every form the API accepts: a :class:`Spots`, a Space Ranger folder, a table
or ``.h5ad`` path, an AnnData, a pandas DataFrame (x, y[, id]) or an (N, 2) array of level-0 px.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pandas as pd

from m2ort_fast.bounds import DEFAULT_MAX_SPOTS, NEUTRAL_OPTIONS, OptionNames, check_spot_count
from m2ort_fast.errors import SpotsError
from m2ort_fast.scale import MPP_AGREEMENT, mpp_ratio, mpps_agree

if TYPE_CHECKING:
    import anndata

VISIUM_PITCH_UM = 100.0  # centre to centre; same-row neighbours differ by 2 in array_col
# Microns per unit of (array_col, array_row) on Visium's hexagonal array.
VISIUM_STEP_UM = (VISIUM_PITCH_UM / 2, VISIUM_PITCH_UM * math.sqrt(3) / 2)
VISIUM_SPOT_DIAMETER_UM = 55.0
# Space Ranger's spot_diameter_fullres spans "a theoretical 65 um spot" (10x docs), not the 55 um one.
VISIUM_SCALEFACTOR_SPOT_UM = 65.0
ST_STEP_UM = 200.0  # legacy ST: one array step, centre to centre
ST_SPOT_DIAMETER_UM = 100.0
# HEST writes spot_diameter_fullres as the technology's own spot over its pixel size
# (hest.utils.register_downscale_img: spot_size / pixel_size; 55 um Visium, 100 um legacy ST).
HEST_SPOT_DIAMETER_UM = {"visium": VISIUM_SPOT_DIAMETER_UM, "st": ST_SPOT_DIAMETER_UM}
HEST_LIBRARY_ID = "ST"  # HEST keeps every sample's images and scale factors under uns["spatial"]["ST"]
ST_SPOT_ID = re.compile(r"^(\d+)x(\d+)$")  # legacy ST ids "{x}x{y}" (HEST zero-pads them: "010x013")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
VISIUM_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
VISIUM_POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")
CSV_COORDINATE_COLUMNS = (("pixel_x", "pixel_y"), ("x_px", "y_px"), ("x", "y"))
CSV_ID_COLUMNS = ("id", "spot_id", "barcode", "spot", "name")
FORMATS = ("auto", "visium", "st", "csv")
# The thumbnail grid_spots computes the tissue mask on when not given one.
GRID_THUMBNAIL_MAX_SIDE_PX = 2048
# Lattice points over the tissue's bounding box held at once while a grid is built (memory guard;
# the spots on tissue are bounded by max_spots, counted from the mask before building).
MAX_GRID_LATTICE_POINTS = 20_000_000
MAX_GRID_SPOTS = DEFAULT_MAX_SPOTS

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Spots:
    """Spot centres on one slide, with what the table says about them.

    ids: N names used as AnnData obs names. centers_px: (N, 2) float64 level-0 pixel (x, y).
    columns: per-spot extra columns for AnnData obs, index = ids; ``in_tissue`` among them where
    the table says which spots are under tissue (Space Ranger's in_tissue, legacy ST's selected).
    mpp_from_pitch: the level-0 microns per pixel the spots imply: their array pitch, else their
    spot diameter (None where they cannot tell); ``mpp_source`` says which, in words (e.g. "the
    array pitch of C2_selection.tsv (legacy ST, 200 um a step)"), for the run's log and metadata.
    mpp_from_diameter: what ``spot_diameter_fullres`` implies under its writer's convention, where
    there is one (equal to mpp_from_pitch when it is the only source).
    """

    ids: list[str]
    centers_px: np.ndarray
    source: str  # "visium" | "st" | "csv" | "grid" | "anndata" | "dataframe" | "array"
    columns: pd.DataFrame
    mpp_from_pitch: float | None = None
    spot_diameter_um: float | None = None
    path: Path | None = None
    mpp_source: str | None = None
    mpp_from_diameter: float | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def in_tissue(self) -> np.ndarray | None:
        """(N,) int64 1/0 where the table says which spots are under tissue, else None (then
        the writer decides from its tissue mask)."""
        if "in_tissue" not in self.columns.columns:
            return None
        return pd.to_numeric(self.columns["in_tissue"], errors="coerce").fillna(0).astype(np.int64).to_numpy()


# What the API takes as spots: a Spots, a Space Ranger folder, a table or .h5ad path, an AnnData
# with obsm["spatial"], a DataFrame with x, y (and id) columns, or an (N, 2) array of level-0 px.
SpotsLike: TypeAlias = "Spots | str | os.PathLike | anndata.AnnData | pd.DataFrame | np.ndarray"
ACCEPTED_SPOTS = (
    "a Spots, a Space Ranger outs/ or spatial/ folder, a spot table or .h5ad path, an AnnData with "
    "obsm['spatial'], a pandas DataFrame with x, y (and id) columns in level-0 px, or an (N, 2) array of "
    "level-0 px (x, y)"
)


# ----------------------------------------------------------------------------------- loading


def load_spots(
    path: str | os.PathLike, *, format: str = "auto", check_scale: bool = True, options: OptionNames = NEUTRAL_OPTIONS
) -> Spots:
    """Read a spot table (Visium folder or tissue_positions file, legacy ST table, CSV of centres)
    or an ``.h5ad`` holding spots (recognised by its content). ``check_scale``: a spot diameter
    that disagrees with the array pitch is a SpotsError naming both (pass False where the user
    gives the mpp: :func:`m2ort_fast.scale.resolve_mpp` then checks it against the pitch)."""
    path = Path(path)
    if format not in FORMATS:
        raise SpotsError(f"unknown spot format {format!r}: use one of {', '.join(FORMATS)}", path)
    if not path.exists():
        raise SpotsError("no such file or folder", path)
    if path.is_dir():
        if format not in ("auto", "visium"):
            raise SpotsError(f"is a folder, but format {format!r} needs a file", path)
        return _load_visium(_find_visium_positions(path), check_scale=check_scale, options=options)
    if format == "auto" and _is_hdf5(path):
        return _load_h5ad(path, check_scale=check_scale, options=options)
    if format == "auto":
        format = _detect_format(path)
    if format == "visium":
        return _load_visium(path, check_scale=check_scale, options=options)
    return {"st": _load_st, "csv": _load_csv}[format](path)


def as_spots(
    spots: Any,
    *,
    format: str = "auto",
    library_id: str | None = None,
    check_scale: bool = True,
    options: OptionNames = NEUTRAL_OPTIONS,
) -> Spots:
    """Spots in every form the API takes them (see ``ACCEPTED_SPOTS``): a :class:`Spots`, a path
    (:func:`load_spots`: folder, table, ``.h5ad``), an AnnData (:func:`spots_from_anndata`), a
    DataFrame (:func:`spots_from_dataframe`) or an (N, 2) array (:func:`spots_from_array`);
    anything else is a SpotsError naming the ``spots=`` argument and what it accepts."""
    if isinstance(spots, Spots):
        return spots
    if isinstance(spots, (str, os.PathLike)):
        return load_spots(spots, format=format, check_scale=check_scale, options=options)
    if hasattr(spots, "obsm") and hasattr(spots, "obs_names"):  # an AnnData (not imported for a path)
        return spots_from_anndata(spots, library_id, check_scale=check_scale, options=options)
    if isinstance(spots, pd.DataFrame):
        return spots_from_dataframe(spots)
    if isinstance(spots, np.ndarray) or (isinstance(spots, (list, tuple)) and spots and _is_pair(spots[0])):
        return spots_from_array(spots)
    raise SpotsError(f"spots= takes {ACCEPTED_SPOTS}; got {type(spots).__name__}")


def _is_pair(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray)) and len(value) == 2


def _is_hdf5(path: Path) -> bool:
    """An .h5ad (HDF5) by its first bytes, whatever its name: a table path is text."""
    try:
        with open(path, "rb") as f:
            return f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError:
        return False


def _load_h5ad(path: Path, *, check_scale: bool, options: OptionNames) -> Spots:
    import anndata

    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as exc:  # h5py/anndata raise many types for a damaged or foreign HDF5 file
        raise SpotsError(f"cannot read the .h5ad: {' '.join(str(exc).split())[:200]}", path) from None
    try:
        return spots_from_anndata(adata, check_scale=check_scale, options=options, path=path)
    finally:
        adata.file.close()


def spots_from_dataframe(table: pd.DataFrame) -> Spots:
    """Spots from a DataFrame of centres in level-0 px: columns x, y (or pixel_x, pixel_y / x_px,
    y_px), ids from an id / spot_id / barcode column, else from a named index, else the row number;
    other columns are kept for obs. The DataFrame says nothing of the pixel size (pass mpp=)."""
    where = "spots= DataFrame"
    by_lower = {str(c).lower(): c for c in table.columns}
    pairs = ((by_lower[x], by_lower[y]) for x, y in CSV_COORDINATE_COLUMNS if x in by_lower and y in by_lower)
    pair = next(pairs, None)
    if pair is None:
        options = " or ".join(f"{x}, {y}" for x, y in CSV_COORDINATE_COLUMNS)
        found = ", ".join(map(str, table.columns[:12]))
        raise SpotsError(f"needs columns {options} (level-0 px); found: {found or 'no columns'}", where)
    if table.empty:
        raise SpotsError("has no rows", where)
    centers = np.stack([_finite_column(table[c], str(c), where) for c in pair], 1)
    id_column = next((by_lower[c] for c in CSV_ID_COLUMNS if c in by_lower), None)
    if id_column is not None:
        ids = table[id_column].astype(str).str.strip().tolist()
    elif not isinstance(table.index, pd.RangeIndex):
        ids = [str(i) for i in table.index]
    else:
        ids = [str(i) for i in range(len(table))]
    extra = table[[c for c in table.columns if c not in (*pair, id_column)]]
    return _make_spots(ids, centers, "dataframe", extra, None, None, None, where=where)


def spots_from_array(centers_px) -> Spots:
    """Spots from an (N, 2) array of level-0 px (x, y); ids are the row numbers. An array says
    nothing of the pixel size: the slide's metadata or mpp= gives it."""
    where = "spots= array"
    try:
        centers = np.asarray(centers_px, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SpotsError(f"is not an array of numbers: {exc}", where) from None
    if centers.ndim != 2 or centers.shape[1] != 2:
        raise SpotsError(f"must be (N, 2) level-0 px (x, y), got shape {centers.shape}", where)
    if not len(centers):
        raise SpotsError("has no spots", where)
    if not np.isfinite(centers).all():
        raise SpotsError(f"row {int(np.argmax(~np.isfinite(centers).all(1)))} is not finite", where)
    ids = [str(i) for i in range(len(centers))]
    return _make_spots(ids, centers, "array", pd.DataFrame(index=range(len(centers))), None, None, None, where=where)


def _finite_column(values: pd.Series, name: str, where) -> np.ndarray:
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(numbers)
    if bad.any():
        i = int(np.argmax(bad))
        raise SpotsError(f"column {name!r} holds a non-number at row {i} ({values.iloc[i]!r})", where)
    return numbers


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


def _make_spots(
    ids,
    centers_px,
    source,
    columns: pd.DataFrame,
    mpp,
    diameter_um,
    path,
    *,
    where=None,
    mpp_source: str | None = None,
    mpp_from_diameter: float | None = None,
) -> Spots:
    ids = [str(i) for i in ids]
    _check_ids(ids, path if where is None else where)
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
        mpp_source=mpp_source,
        mpp_from_diameter=mpp_from_diameter,
    )


def _scale(
    pitch: tuple[float, str] | None,
    diameter: tuple[float, str] | None,
    where,
    *,
    check: bool,
    options: OptionNames,
) -> tuple[float | None, str | None]:
    """(mpp, what gave it) from the pitch (first) and the spot diameter, each (mpp, in words);
    SpotsError naming both when they disagree beyond MPP_AGREEMENT and ``check``."""
    if pitch and diameter and not mpps_agree(pitch[0], diameter[0]):
        message = (
            f"{pitch[1]} gives {pitch[0]:.4g} um/px but {diameter[1]} gives {diameter[0]:.4g} um/px "
            f"({mpp_ratio(pitch[0], diameter[0]) + 1:.3g}x apart, over {MPP_AGREEMENT:.0%}); pass the right one "
            f"as {options.mpp} (with {options.mpp_force} if it is not the pitch's)"
        )
        if check:
            raise SpotsError(message, where)
        log.warning("%s: %s", where, message)
    chosen = pitch or diameter
    return (chosen[0], chosen[1]) if chosen else (None, None)


def _load_visium(path: Path, *, check_scale: bool = True, options: OptionNames = NEUTRAL_OPTIONS) -> Spots:
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
    pitch_mpp = _mpp_from_array_fit(np.stack([array_col, array_row], 1), centers, step_um=VISIUM_STEP_UM)
    pitch = (pitch_mpp, f"the array pitch of {path.name} (Visium, 100 um)") if pitch_mpp else None
    diameter = _scalefactors_scale(path.parent / "scalefactors_json.json", needed=pitch is None, options=options)
    mpp, mpp_source = _scale(pitch, diameter, path, check=check_scale, options=options)
    in_tissue = _numeric(raw, "in_tissue", path)
    keep = in_tissue == 1
    if not keep.any():
        raise SpotsError(f"none of the {len(raw)} spots is under tissue (in_tissue == 1)", path)
    columns = pd.DataFrame(
        {
            "in_tissue": in_tissue[keep].astype(np.int64),
            "array_row": array_row[keep].astype(np.int64),
            "array_col": array_col[keep].astype(np.int64),
        }
    )
    barcodes = raw["barcode"].str.strip()[keep].tolist()
    return _make_spots(
        barcodes,
        centers[keep],
        "visium",
        columns,
        mpp,
        VISIUM_SPOT_DIAMETER_UM,
        path,
        mpp_source=mpp_source,
        mpp_from_diameter=diameter[0] if diameter else None,
    )


def _scalefactors_scale(path: Path, *, needed: bool, options: OptionNames) -> tuple[float, str] | None:
    """(mpp, in words) from Space Ranger's spot_diameter_fullres (a 65 um spot), None where the
    file is absent. A value that is no spot size (0, negative, not a number) is the file's fault:
    a SpotsError naming it where the pitch cannot stand in (``needed``), else a warning."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())["spot_diameter_fullres"]
        diameter_px = float(value)
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"cannot read spot_diameter_fullres: {type(e).__name__} {e}"
    else:
        if math.isfinite(diameter_px) and diameter_px > 0:
            return VISIUM_SCALEFACTOR_SPOT_UM / diameter_px, (
                f"spot_diameter_fullres {diameter_px:.4g} px in {path.name} (Space Ranger's 65 um spot)"
            )
        problem = f"spot_diameter_fullres is {value!r}, not a spot size in pixels"
    if needed:
        raise SpotsError(
            f"{problem}: the spots' pixel size cannot be read from this scale-factors file and their array "
            f"gives no pitch; fix the file or give the pixel size with {options.mpp}",
            path,
        )
    log.warning("%s: %s; the pixel size comes from the array pitch", path, problem)
    return None


def spots_from_anndata(
    adata,
    library_id: str | None = None,
    *,
    check_scale: bool = True,
    options: OptionNames = NEUTRAL_OPTIONS,
    path: Path | None = None,
) -> Spots:
    """Spots from an AnnData as scanpy/squidpy hold Visium data (``sc.read_visium``), as HEST
    writes its samples, or as m2ort-fast writes its ``.h5ad``: centres from ``obsm["spatial"]``
    (x, y in level-0 px of the slide they are predicted on), ids from ``obs_names`` (m2ort-fast's
    own: ``obs["spot_id"]``, so they are not prefixed twice), ``obs`` kept as columns.

    The mpp: the array pitch where obs or the ids give array positions (array_row/array_col:
    Visium; x/y, new_x/new_y or "{x}x{y}" ids: legacy ST), else ``spot_diameter_fullres`` in
    ``uns["spatial"][library_id]["scalefactors"]`` under its writer's convention (m2ort-fast: the
    mpp it recorded; HEST, library "ST": 55 um Visium / 100 um ST by the spots' lattice; otherwise
    Space Ranger's 65 um), the two checked against each other. ``library_id`` picks one of
    several libraries; ``path``: the file it was read from (for messages)."""
    where = path if path is not None else "AnnData spots"
    centers = _anndata_centers(adata, where)
    library_name, library = _anndata_library(adata, library_id, where)
    writer = _anndata_writer(adata, library_name, library)
    ours = dict(adata.uns.get("m2ort_fast", {}) or {}) if writer == "m2ort-fast" else {}
    use_spot_id = writer == "m2ort-fast" and "spot_id" in adata.obs.columns
    ids = [str(i) for i in (adata.obs["spot_id"] if use_spot_id else adata.obs_names)]
    grid_pitch_um = float(ours.get("spacing_um") or VISIUM_PITCH_UM) if ours.get("spots_source") == "grid" else None
    lattice = _obs_lattice(adata.obs, ids, centers, grid_pitch_um)
    technology = lattice[0] if lattice else _lattice_kind(centers)
    diameter = _anndata_diameter(
        writer, library_name, library, ours, technology, needed=lattice is None, where=where, options=options
    )
    pitch = (lattice[1], lattice[2]) if lattice else None
    mpp, mpp_source = _scale(pitch, diameter[:2] if diameter else None, where, check=check_scale, options=options)
    spot_um = diameter[2] if diameter else None  # the AnnData does not say its spots' size
    return _make_spots(
        ids,
        centers,
        "anndata",
        _anndata_columns(adata.obs, ours=writer == "m2ort-fast"),
        mpp,
        spot_um,
        path,
        where=where,
        mpp_source=mpp_source,
        mpp_from_diameter=diameter[0] if diameter else None,
    )


def _anndata_columns(obs: pd.DataFrame, *, ours: bool) -> pd.DataFrame:
    columns = obs.copy()
    if ours:  # what our writer derives again: the spot id, library, centres
        columns = columns.drop(columns=[c for c in ("spot_id", "library_id", "x_px", "y_px") if c in columns])
    for name in columns.columns:  # categories (leiden, ...) as plain values: obs is rebuilt per slide
        if isinstance(columns[name].dtype, pd.CategoricalDtype):
            columns[name] = columns[name].astype(columns[name].cat.categories.dtype)
    return columns


def _anndata_centers(adata, where) -> np.ndarray:
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
    return centers


def _anndata_library(adata, library_id: str | None, where) -> tuple[str | None, dict]:
    libraries = dict(adata.uns.get("spatial", {}) or {})
    if library_id is not None and library_id not in libraries:
        raise SpotsError(f"no library {library_id!r} in uns['spatial'] (has: {', '.join(libraries) or 'none'})", where)
    if library_id is None and len(libraries) > 1:
        raise SpotsError(f"uns['spatial'] holds {len(libraries)} libraries ({', '.join(libraries)}): name one", where)
    name = library_id if library_id is not None else next(iter(libraries), None)
    return name, (dict(libraries.get(name) or {}) if name is not None else {})


def _anndata_writer(adata, library_name: str | None, library: dict) -> str:
    """Who wrote the AnnData, for the meaning of its spot_diameter_fullres."""
    metadata = library.get("metadata") or {}
    if "m2ort_fast" in adata.uns or metadata.get("software") == "m2ort-fast":
        return "m2ort-fast"
    scalefactors = library.get("scalefactors") or {}
    if library_name == HEST_LIBRARY_ID or "tissue_downscaled_fullres_scalef" in scalefactors:
        return "hest"
    return "spaceranger"  # scanpy's layout is Space Ranger's (sc.read_visium)


def _anndata_diameter(writer, library_name, library, ours, technology, *, needed, where, options):
    """(mpp, in words, the physical spot diameter in um) from the writer's own record, or None."""
    if writer == "m2ort-fast":
        mpp = _positive(ours.get("slide_mpp"))
        spot_um = _positive((library.get("metadata") or {}).get("spot_diameter_um"))
        if mpp is not None:
            return mpp, "the mpp m2ort-fast recorded in uns['m2ort_fast']['slide_mpp']", spot_um
    value = (library.get("scalefactors") or {}).get("spot_diameter_fullres")
    if value is None:
        return None
    diameter_px = _positive(value)
    key = f"uns['spatial'][{library_name!r}]['scalefactors']['spot_diameter_fullres']"
    if diameter_px is None:
        message = f"{key} is {value!r}, not a spot size in pixels"
        if needed:
            raise SpotsError(f"{message}: fix the scale factors or give the pixel size with {options.mpp}", where)
        log.warning("%s: %s; the pixel size comes from the array pitch", where, message)
        return None
    if writer == "hest":
        kind = technology if technology in HEST_SPOT_DIAMETER_UM else "visium"
        spot_um = HEST_SPOT_DIAMETER_UM[kind]
        words = f"{key} {diameter_px:.4g} px (HEST's {spot_um:g} um {'ST' if kind == 'st' else 'Visium'} spot)"
        return spot_um / diameter_px, words, spot_um
    words = f"{key} {diameter_px:.4g} px (Space Ranger's 65 um spot)"
    return VISIUM_SCALEFACTOR_SPOT_UM / diameter_px, words, VISIUM_SPOT_DIAMETER_UM


def _positive(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _obs_lattice(obs: pd.DataFrame, ids: list[str], centers: np.ndarray, grid_pitch_um: float | None):
    """(technology, mpp, in words) from array positions in obs or in the ids, None where there are
    none or they do not fit the centres as a regular array (the HEST rule: pitch over the fit)."""
    names = {str(c) for c in obs.columns}
    if {"array_row", "array_col"} <= names:
        array = _number_columns(obs, ("array_col", "array_row"))
        pitch_um = grid_pitch_um or VISIUM_PITCH_UM
        steps = (pitch_um / 2, pitch_um * math.sqrt(3) / 2)
        mpp = _plausible(None if array is None else _mpp_from_array_fit(array, centers, step_um=steps))
        if mpp:
            return "visium", mpp, f"the array pitch of obs array_row, array_col (hexagonal, {pitch_um:g} um)"
    for pair in (("new_x", "new_y"), ("x", "y")):
        if set(pair) <= names:
            array = _number_columns(obs, pair)
            mpp = _plausible(None if array is None else _mpp_from_array_fit(array, centers, (ST_STEP_UM, ST_STEP_UM)))
            if mpp:
                return "st", mpp, f"the array pitch of obs {pair[0]}, {pair[1]} (legacy ST, 200 um a step)"
    matches = [ST_SPOT_ID.match(i) for i in ids]
    if all(matches):
        array = np.array([[int(m.group(1)), int(m.group(2))] for m in matches if m], dtype=np.float64)
        mpp = _plausible(_mpp_from_array_fit(array, centers, (ST_STEP_UM, ST_STEP_UM)))
        if mpp:
            return "st", mpp, f"the array positions in the spot names ({ids[0]!r}: legacy ST, 200 um a step)"
    return None


def _number_columns(obs: pd.DataFrame, names) -> np.ndarray | None:
    values = np.stack([pd.to_numeric(obs[n], errors="coerce").to_numpy(dtype=np.float64) for n in names], 1)
    return values if np.isfinite(values).all() else None


def _plausible(mpp: float | None) -> float | None:
    """An mpp a microscope image can have; pixel coordinates taken for array positions give ~100+."""
    from m2ort_fast.slide import MPP_RANGE

    return mpp if mpp is not None and MPP_RANGE[0] <= mpp <= MPP_RANGE[1] / 10 else None


def _lattice_kind(centers: np.ndarray) -> str | None:
    """ "visium" (hexagonal: 6 nearest neighbours) or "st" (square: 4), from the centres alone;
    None where they are too few or form no regular lattice."""
    if len(centers) < 9:
        return None
    from scipy.spatial import cKDTree

    distances, _ = cKDTree(centers).query(centers, k=7)
    nearest = float(np.median(distances[:, 1]))
    if not nearest > 0:
        return None
    neighbours = np.percentile((distances[:, 1:] <= 1.15 * nearest).sum(1), 90)
    return "visium" if neighbours >= 5.5 else "st" if 3.5 <= neighbours < 4.5 else None


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
    if "selected" in table.columns:  # the table's own call of which spots are under tissue
        columns["in_tissue"] = np.ones(len(table), dtype=np.int64)
    source = f"the array pitch of {path.name} (legacy ST, 200 um a step)" if mpp else None
    return _make_spots(ids, centers, "st", columns, mpp, ST_SPOT_DIAMETER_UM, path, mpp_source=source)


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
    max_spots: int = MAX_GRID_SPOTS,
    options: OptionNames = NEUTRAL_OPTIONS,
) -> Spots:
    """Visium-like spots over the tissue: a hexagonal lattice, ``spacing_um`` centre to centre.

    slide: needs ``mpp``, ``level_dimensions[0]`` (width, height), ``path``, and
    ``thumbnail(max_side_px) -> (image (h, w, 3) uint8, downsample)`` where no mask is given.
    mask: (h, w) bool tissue mask covering the whole slide (any h, w), e.g. from
    :func:`m2ort_fast.tissue.tissue_mask`. Ids ``"r{array_row}_c{array_col}"`` use Visium's array
    convention (same-row neighbours differ by 2 in array_col; odd rows are shifted by half a pitch).
    max_spots: the spots on tissue are counted from the mask before the grid is built; more is a
    BoundsError naming ``options.max_spots`` (a wrong mpp or spacing, or a slide that needs it raised).
    """
    slide_path = Path(slide.path) if getattr(slide, "path", None) is not None else None
    mpp = getattr(slide, "mpp", None)
    if mpp is None or not math.isfinite(mpp) or mpp <= 0:
        raise SpotsError(
            f"no mpp: the slide records no pixel size, needed to place grid spots; give it with {options.mpp}",
            slide_path,
        )
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
    spacing_px = spacing_um / mpp
    # Tissue area over one spot's share of a hexagonal lattice: the count, before anything is built.
    tissue_px2 = mask.sum() * (width_px / mask.shape[1]) * (height_px / mask.shape[0])
    expected = int(tissue_px2 / (spacing_px**2 * math.sqrt(3) / 2))
    check_spot_count(
        expected,
        max_spots,
        what=f"a grid every {spacing_um:g} um over {tissue_px2 * mpp**2 / 1e6:.4g} mm2 of tissue (at {mpp:.4g} um/px "
        f"the slide is {width_px * mpp / 1000:.3g} x {height_px * mpp / 1000:.3g} mm)",
        path=slide_path,
        options=options,
    )
    array_row, array_col, x, y = _lattice_over(mask, width_px, height_px, spacing_px, spacing_um, slide_path)
    if not len(x):
        raise SpotsError(
            f"no grid spot falls on the tissue found in {slide_path} (spacing {spacing_um} um): "
            f"the tissue is smaller than the grid",
            slide_path,
        )
    ids = [f"r{r}_c{c}" for r, c in zip(array_row.tolist(), array_col.tolist(), strict=True)]
    columns = pd.DataFrame({"array_row": array_row, "array_col": array_col})
    return _make_spots(ids, np.stack([x, y], 1), "grid", columns, None, float(spot_diameter_um), None)


def _lattice_over(mask: np.ndarray, width_px: int, height_px: int, spacing_px: float, spacing_um: float, slide_path):
    """(array_row, array_col, x, y) of the hexagonal lattice's points on the mask's tissue."""
    # Mask pixel -> level-0 px, from the extents (the thumbnail covers the whole slide).
    scale_x, scale_y = width_px / mask.shape[1], height_px / mask.shape[0]
    rows_on, cols_on = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    x_lo, x_hi = cols_on[0] * scale_x, (cols_on[-1] + 1) * scale_x
    y_lo, y_hi = rows_on[0] * scale_y, (rows_on[-1] + 1) * scale_y
    row_pitch_px = spacing_px * math.sqrt(3) / 2
    # Lattice anchored at the slide origin, so a spot's id does not depend on the tissue's extent:
    # array_row r lies at y = (r + 1/2) row pitches, array_col c at x = (c + 1) half-pitches.
    rows = np.arange(max(0, math.floor(y_lo / row_pitch_px - 0.5)), math.ceil(y_hi / row_pitch_px) + 1)
    half_cols = np.arange(max(0, math.floor(2 * x_lo / spacing_px) - 2), math.ceil(2 * x_hi / spacing_px) + 1)
    if len(rows) * len(half_cols) / 2 > MAX_GRID_LATTICE_POINTS:
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
    return array_row[on_tissue], array_col[on_tissue], x[on_tissue], y[on_tissue]


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
