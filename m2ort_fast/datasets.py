"""Readers for spatial-transcriptomics samples: whatever the format, one :class:`STSample` comes out.

Formats (``read_sample`` tells them apart by the files in the folder):

* ``st`` -- HER2ST / ST-Net style, the paper's datasets: a counts table ``*.tsv[.gz]`` (one row per
  spot keyed ``"{x}x{y}"``, one column per gene), a spot table ``*_selection.tsv`` (or any table
  ``load_spots`` reads) and the H&E image. The image has no pixel size; it comes from the spot
  table's array pitch (200 um for legacy ST).
* ``visium`` -- a 10x Space Ranger output folder: ``filtered_feature_bc_matrix.h5`` (10x HDF5:
  ``matrix/{data,indices,indptr,shape,barcodes,features/name}``) and ``spatial/``, plus the
  full-resolution image the run was made from (any ``.tif/.tiff/.svs/.btf/.jpg/.png`` in the folder
  or its parent, outside ``spatial/``).
* ``hest`` -- HEST-1k style: an ``.h5ad`` with ``obsm["spatial"]`` (spot centres, full-resolution
  px, x then y), a pyramidal TIFF, and a metadata JSON with the pixel size
  (``pixel_size_um_estimated`` or ``pixel_size_um_embedded``); either side by side in one folder or
  in HEST-1k's ``st/``, ``wsis/``, ``metadata/`` sub-folders.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from m2ort_fast.errors import M2ORTError, SpotsError

IMAGE_SUFFIXES = (".svs", ".tif", ".tiff", ".btf", ".ndpi", ".mrxs", ".jpg", ".jpeg", ".png")
HEST_MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded", "pixel_size_um", "mpp")


@dataclasses.dataclass
class STSample:
    """One section: its slide, spots and counts.

    centers_px: (N, 2) float64 spot centres in level-0 pixels of the slide, (x, y).
    counts: (N, G) spot x gene counts (scipy.sparse CSR or integer numpy array), rows in the
    order of ``spot_ids``. mpp: level-0 microns per pixel where the sample's files say it (the
    spot table's pitch, the metadata), else None (the slide's own is used)."""

    name: str
    slide_path: Path
    centers_px: np.ndarray
    counts: sp.csr_matrix | np.ndarray
    genes: list[str]
    spot_ids: list[str]
    mpp: float | None
    mpp_source: str
    format: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. spots dropped and why

    @property
    def n_spots(self) -> int:
        return len(self.spot_ids)

    def subset(self, keep: np.ndarray) -> STSample:
        """The same sample with only the spots where ``keep`` (N,) bool is true."""
        keep = np.asarray(keep, dtype=bool)
        return dataclasses.replace(
            self,
            centers_px=self.centers_px[keep],
            counts=self.counts[keep],
            spot_ids=[s for s, k in zip(self.spot_ids, keep, strict=True) if k],
            notes=list(self.notes),
        )


# ----------------------------------------------------------------------------------------------
# Format detection


def detect_format(folder: Path) -> str:
    folder = Path(folder)
    if _find(folder, ["filtered_feature_bc_matrix.h5", "outs/filtered_feature_bc_matrix.h5"]):
        return "visium"
    if _find(folder, ["*.h5ad", "st/*.h5ad"]):
        return "hest"
    if _find(folder, ["*_selection.tsv", "*selection*.tsv*", "*spots*.tsv*"]):
        return "st"
    raise M2ORTError(
        "not a sample folder: no filtered_feature_bc_matrix.h5 (Visium), .h5ad (HEST) or "
        "*_selection.tsv spot table with a counts .tsv (ST)",
        folder,
    )


def read_sample(folder, format: str = "auto", *, name: str | None = None) -> STSample:
    """Read one sample folder (see the module's docstring for the layouts) into an STSample."""
    folder = Path(folder)
    if not folder.is_dir():
        raise M2ORTError("no such sample folder", folder)
    fmt = detect_format(folder) if format == "auto" else format
    readers = {"st": read_st_folder, "visium": read_visium_folder, "hest": read_hest_folder}
    if fmt not in readers:
        raise M2ORTError(f"unknown sample format {fmt!r}; known: auto, {', '.join(readers)}", folder)
    sample = readers[fmt](folder)
    if name:
        sample.name = name
    if sample.n_spots == 0:
        raise SpotsError("no spot has both a position and counts", folder)
    return sample


def _find(folder: Path, patterns: list[str]) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        found.extend(p for p in sorted(folder.glob(pattern)) if p.is_file() and p not in found)
    return found


def _find_image(folders: list[Path], exclude: tuple[str, ...] = ()) -> Path | None:
    for folder in folders:
        images = [
            p
            for p in sorted(folder.iterdir())
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(word in p.name.lower() for word in exclude)
        ]
        if images:
            # The biggest file is the full-resolution image (not a thumbnail or a mask).
            return max(images, key=lambda p: p.stat().st_size)
    return None


def _match(spot_ids: list[str], count_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into spot_ids, into count_ids) of the ids both have, in spot table order."""
    position = {cid: i for i, cid in enumerate(count_ids)}
    pairs = [(i, position[s]) for i, s in enumerate(spot_ids) if s in position]
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    spot_idx, count_idx = zip(*pairs, strict=True)
    return np.asarray(spot_idx), np.asarray(count_idx)


def _assemble(name, fmt, slide_path, spots, counts, genes, count_ids, mpp, mpp_source, folder) -> STSample:
    spot_ids = [str(s) for s in spots.ids]
    spot_idx, count_idx = _match(spot_ids, list(count_ids))
    notes = []
    if len(spot_idx) < len(spot_ids):
        notes.append(f"{len(spot_ids) - len(spot_idx)} of {len(spot_ids)} spots of the spot table have no counts")
    if len(count_idx) < len(count_ids):
        notes.append(f"{len(count_ids) - len(count_idx)} of {len(count_ids)} count rows have no spot under tissue")
    counts = sp.csr_matrix(counts)[count_idx]
    return STSample(
        name=name,
        slide_path=Path(slide_path),
        centers_px=np.asarray(spots.centers_px, dtype=np.float64)[spot_idx],
        counts=counts,
        genes=[str(g) for g in genes],
        spot_ids=[spot_ids[i] for i in spot_idx],
        mpp=mpp,
        mpp_source=mpp_source,
        format=fmt,
        notes=notes,
    )


# ----------------------------------------------------------------------------------------------
# HER2ST / ST-Net


def read_st_counts(path: Path) -> tuple[sp.csr_matrix, list[str], list[str]]:
    """Counts TSV(.gz): rows = spots (first column, e.g. ``"10x21"``), columns = genes.

    Returns ((N, G) int32 CSR, spot ids, gene names)."""
    try:
        table = pd.read_csv(path, sep="\t", index_col=0)
    except (OSError, ValueError, UnicodeDecodeError, EOFError) as exc:
        raise M2ORTError(f"cannot read counts table ({str(exc).splitlines()[0]})", path) from None
    if table.shape[1] == 0 or table.shape[0] == 0:
        raise M2ORTError("counts table has no genes or no spots", path)
    try:
        values = table.to_numpy(dtype=np.float64)
    except ValueError:
        raise M2ORTError("counts table holds non-numeric values", path) from None
    if not np.isfinite(values).all() or (values < 0).any():
        raise M2ORTError("counts table holds negative or missing values", path)
    counts = sp.csr_matrix(np.rint(values).astype(np.int32))
    return counts, [str(i) for i in table.index], [str(c) for c in table.columns]


def read_st_folder(folder: Path) -> STSample:
    from m2ort_fast.spots import load_spots

    spot_files = _find(folder, ["*_selection.tsv", "*selection*.tsv*", "*spots*.tsv*"])
    spot_file = spot_files[0]
    count_files = [p for p in _find(folder, ["*.tsv.gz", "*.tsv", "*.csv.gz"]) if p not in spot_files]
    if not count_files:
        raise M2ORTError(f"no counts table (*.tsv.gz) beside the spot table {spot_file.name}", folder)
    # The counts table is the big one (thousands of gene columns).
    count_file = max(count_files, key=lambda p: p.stat().st_size)
    image = _find_image([folder])
    if image is None:
        raise M2ORTError("no H&E image (.jpg/.tif/.svs...) in the sample folder", folder)
    spots = load_spots(spot_file)
    counts, count_ids, genes = read_st_counts(count_file)
    mpp = spots.mpp_from_pitch
    name = spot_file.name.split("_selection")[0] if "_selection" in spot_file.name else folder.name
    return _assemble(
        name,
        "st",
        image,
        spots,
        counts,
        genes,
        count_ids,
        mpp,
        f"spot-table pitch ({spot_file.name})" if mpp else "slide",
        folder,
    )


# ----------------------------------------------------------------------------------------------
# 10x Visium (Space Ranger)


def read_10x_h5(path: Path) -> tuple[sp.csr_matrix, list[str], list[str]]:
    """10x feature-barcode matrix HDF5 -> ((N barcodes, G) int32 CSR, barcodes, gene names).

    The file stores a features x barcodes CSC matrix: ``matrix/data``, ``indices`` (feature
    index), ``indptr`` (one entry per barcode + 1), ``shape`` = (features, barcodes). Gene names
    are ``matrix/features/name`` (Space Ranger >= 3) or ``<genome>/gene_names`` (version 2)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            group = f["matrix"] if "matrix" in f else f[next(iter(f.keys()))]
            data = group["data"][:]
            indices = group["indices"][:]
            indptr = group["indptr"][:]
            shape = tuple(int(v) for v in group["shape"][:])
            barcodes = [b.decode() if isinstance(b, bytes) else str(b) for b in group["barcodes"][:]]
            if "features" in group:
                names = group["features"]["name"][:]
                if "feature_type" in group["features"]:
                    types = [
                        t.decode() if isinstance(t, bytes) else str(t) for t in group["features"]["feature_type"][:]
                    ]
                else:
                    types = ["Gene Expression"] * len(names)
            else:
                names = group["gene_names"][:]
                types = ["Gene Expression"] * len(names)
    except (OSError, KeyError, StopIteration) as exc:
        raise M2ORTError(
            f"not a 10x feature-barcode HDF5 matrix ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
            path,
        ) from None
    genes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if shape != (len(genes), len(barcodes)) or len(indptr) != len(barcodes) + 1:
        raise M2ORTError(
            f"inconsistent 10x matrix: shape {shape}, {len(genes)} features, {len(barcodes)} barcodes", path
        )
    matrix = sp.csc_matrix((data, indices, indptr), shape=shape).T.tocsr().astype(np.int32)
    expression = np.asarray([t == "Gene Expression" for t in types])
    if not expression.all():  # antibody capture etc. are not genes
        matrix = matrix[:, np.flatnonzero(expression)]
        genes = [g for g, e in zip(genes, expression, strict=True) if e]
    return matrix, barcodes, genes


def read_visium_folder(folder: Path) -> STSample:
    from m2ort_fast.spots import load_spots

    root = folder / "outs" if (folder / "outs" / "filtered_feature_bc_matrix.h5").is_file() else folder
    h5 = root / "filtered_feature_bc_matrix.h5"
    spatial = root / "spatial"
    if not spatial.is_dir():
        raise M2ORTError("Visium folder has no spatial/ folder (tissue positions and scale factors)", root)
    image = _find_image([root, folder, folder.parent], exclude=("tissue_", "aligned_fiducials", "detected_tissue"))
    if image is None:
        raise M2ORTError("no full-resolution H&E image (.tif/.svs/.jpg) beside the Space Ranger outputs", folder)
    spots = load_spots(spatial, format="visium")
    counts, barcodes, genes = read_10x_h5(h5)
    mpp = spots.mpp_from_pitch
    return _assemble(
        folder.name,
        "visium",
        image,
        spots,
        counts,
        genes,
        barcodes,
        mpp,
        "spot-table pitch (spatial/)" if mpp else "slide",
        folder,
    )


# ----------------------------------------------------------------------------------------------
# HEST-1k


class _HestSpots:
    def __init__(self, ids, centers_px):
        self.ids = ids
        self.centers_px = centers_px


def read_hest_folder(folder: Path) -> STSample:
    import anndata

    h5ads = _find(folder, ["*.h5ad", "st/*.h5ad"])
    h5ad = h5ads[0]
    sample_id = h5ad.stem
    images = _find(folder, [f"{sample_id}.tif", f"{sample_id}.tiff", f"wsis/{sample_id}.tif", f"wsis/{sample_id}.tiff"])
    image = images[0] if images else _find_image([folder, folder / "wsis"] if (folder / "wsis").is_dir() else [folder])
    if image is None:
        raise M2ORTError(
            f"no whole-slide image for {h5ad.name} (expected {sample_id}.tif or wsis/{sample_id}.tif)", folder
        )
    metas = _find(folder, [f"{sample_id}.json", f"metadata/{sample_id}.json", "*.json", "metadata/*.json"])
    mpp, mpp_source = None, "slide"
    if metas:
        try:
            meta = json.loads(metas[0].read_text())
        except (OSError, ValueError):
            raise M2ORTError("metadata is not valid JSON", metas[0]) from None
        for key in HEST_MPP_KEYS:
            value = meta.get(key)
            if isinstance(value, (int, float)) and value > 0:
                mpp, mpp_source = float(value), f"metadata {key} ({metas[0].name})"
                break
    try:
        adata = anndata.read_h5ad(h5ad)
    except Exception as exc:  # anndata raises many types for a bad file
        raise M2ORTError(
            f"cannot read AnnData ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})", h5ad
        ) from None
    if "spatial" not in adata.obsm:
        raise SpotsError('AnnData has no obsm["spatial"] (spot centres in pixels)', h5ad)
    centers = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    ids = [str(i) for i in adata.obs_names]
    counts = adata.X if sp.issparse(adata.X) else np.asarray(adata.X)
    spots = _HestSpots(ids, centers)
    return _assemble(sample_id, "hest", image, spots, counts, list(adata.var_names), ids, mpp, mpp_source, folder)
