"""Sample readers: real HER2ST sections; format-faithful Visium (10x HDF5) and HEST fixtures."""

import json

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from real_data import her2st_section

from m2ort_fast.datasets import read_10x_h5, read_sample
from m2ort_fast.errors import M2ORTError


def test_her2st_section_as_it_is():
    folder = her2st_section("C5")
    sample = read_sample(folder)
    assert sample.format == "st" and sample.name == "C5"
    assert sample.slide_path.name == "5714_HE_BT_E1.jpg"
    # README: C5 has 183 selected spots, 181 with counts
    assert sample.n_spots == 181 and sample.counts.shape == (181, len(sample.genes)) and len(sample.genes) > 10_000
    assert any("2 of 183 spots" in note for note in sample.notes)
    assert sample.centers_px.shape == (181, 2)
    assert 0.6 < sample.mpp < 0.8 and "pitch" in sample.mpp_source
    # a spot's counts are the row of the counts table with the same "{x}x{y}" key
    import pandas as pd

    table = pd.read_csv(next(folder.glob("*.tsv.gz")), sep="\t", index_col=0)
    spot = sample.spot_ids[7]
    gene = "ERBB2"
    assert sample.counts[7, sample.genes.index(gene)] == table.loc[spot, gene]


def _write_10x_h5(path, dense, barcodes, genes, extra_feature=None):
    """The 10x feature-barcode HDF5 layout: a features x barcodes CSC matrix."""
    matrix = sp.csc_matrix(dense.T)  # (features, barcodes)
    names = list(genes) + ([extra_feature] if extra_feature else [])
    types = ["Gene Expression"] * len(genes) + (["Antibody Capture"] if extra_feature else [])
    if extra_feature:
        matrix = sp.csc_matrix(sp.vstack([matrix, sp.csr_matrix(np.full((1, len(barcodes)), 9))]))
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"] = matrix.data.astype(np.int32)
        g["indices"] = matrix.indices.astype(np.int64)
        g["indptr"] = matrix.indptr.astype(np.int64)
        g["shape"] = np.array(matrix.shape, dtype=np.int32)
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        feats = g.create_group("features")
        feats["name"] = np.array([n.encode() for n in names])
        feats["id"] = np.array([f"ENSG{i:05d}".encode() for i in range(len(names))])
        feats["feature_type"] = np.array([t.encode() for t in types])
        feats["genome"] = np.array([b"GRCh38"] * len(names))


def _write_image(path, size=(64, 64)):
    import tifffile

    tifffile.imwrite(path, np.full((size[1], size[0], 3), 230, np.uint8))


def test_visium_space_ranger_folder(tmp_path):
    rng = np.random.default_rng(0)
    barcodes = [f"AAAC{i:04d}-1" for i in range(6)]
    genes = ["GENE_A", "GENE_B", "GENE_C"]
    dense = rng.integers(0, 20, size=(6, 3))
    _write_10x_h5(tmp_path / "filtered_feature_bc_matrix.h5", dense, barcodes, genes, extra_feature="CD3_TotalSeqB")
    spatial = tmp_path / "spatial"
    spatial.mkdir()
    # Space Ranger 2 layout: header row; barcode 0 is not under tissue; one in-tissue spot without counts.
    rows = ["barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"]
    positions = [(0, 0), (0, 2), (0, 4), (1, 1), (1, 3), (1, 5), (2, 0)]
    for i, (r, c) in enumerate(positions):
        code = barcodes[i] if i < 6 else "TTTT0000-1"
        rows.append(f"{code},{0 if i == 0 else 1},{r},{c},{1000 + r * 173.2:.1f},{2000 + c * 100.0:.1f}")
    (spatial / "tissue_positions.csv").write_text("\n".join(rows) + "\n")
    (spatial / "scalefactors_json.json").write_text(
        json.dumps({"spot_diameter_fullres": 130.0, "tissue_hires_scalef": 0.1})  # 65 um at 0.5 um/px
    )
    _write_image(spatial / "tissue_hires_image.png")
    _write_image(tmp_path / "slide.tif", (256, 256))

    counts, got_barcodes, got_genes = read_10x_h5(tmp_path / "filtered_feature_bc_matrix.h5")
    assert got_genes == genes and got_barcodes == barcodes  # antibody capture feature left out
    np.testing.assert_array_equal(counts.toarray(), dense)

    sample = read_sample(tmp_path)
    assert sample.format == "visium" and sample.slide_path.name == "slide.tif"
    assert sample.spot_ids == barcodes[1:]  # in tissue and with counts, in spot table order
    np.testing.assert_array_equal(sample.counts.toarray(), dense[1:])
    np.testing.assert_allclose(sample.centers_px[0], [2000 + 2 * 100.0, 1000.0])  # (x, y) = (col px, row px)
    # array columns are 50 um apart (half the 100 um pitch), here 100 px: 0.5 um/px, fitted by load_spots
    assert sample.mpp == pytest.approx(0.5, rel=0.01)
    assert any("1 of 6 spots" in n for n in sample.notes)


def test_hest_sample_folder(tmp_path):
    import anndata

    rng = np.random.default_rng(1)
    dense = rng.integers(0, 9, size=(5, 4)).astype(np.float32)
    adata = anndata.AnnData(X=sp.csr_matrix(dense))
    adata.obs_names = [f"spot{i}" for i in range(5)]
    adata.var_names = ["G1", "G2", "G3", "G4"]
    centers = rng.uniform(100, 900, size=(5, 2))
    adata.obsm["spatial"] = centers
    (tmp_path / "st").mkdir()
    (tmp_path / "wsis").mkdir()
    (tmp_path / "metadata").mkdir()
    adata.write_h5ad(tmp_path / "st" / "TENX99.h5ad")
    _write_image(tmp_path / "wsis" / "TENX99.tif", (1024, 1024))
    (tmp_path / "metadata" / "TENX99.json").write_text(
        json.dumps({"pixel_size_um_estimated": 0.2738, "pixel_size_um_embedded": 0.25})
    )
    sample = read_sample(tmp_path)
    assert sample.format == "hest" and sample.name == "TENX99"
    assert sample.slide_path == tmp_path / "wsis" / "TENX99.tif"
    assert sample.mpp == pytest.approx(0.2738) and "pixel_size_um_estimated" in sample.mpp_source
    np.testing.assert_allclose(sample.centers_px, centers)
    np.testing.assert_array_equal(sample.counts.toarray(), dense)
    assert sample.genes == ["G1", "G2", "G3", "G4"]


def test_bad_folders_give_one_line_errors(tmp_path):
    with pytest.raises(M2ORTError, match="not a sample folder"):
        read_sample(tmp_path)
    with pytest.raises(M2ORTError, match="no such sample folder"):
        read_sample(tmp_path / "missing")
    (tmp_path / "x_selection.tsv").write_text("x\ty\tpixel_x\tpixel_y\tselected\n1\t1\t10\t10\t1\n")
    with pytest.raises(M2ORTError, match="no counts table"):
        read_sample(tmp_path)
