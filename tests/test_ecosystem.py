"""Outputs opened in the tools users open them with: scanpy, squidpy (and SpatialData), at their
defaults. Each test skips, saying so, where its package is not installed (``pip install
"m2ort-fast[spatial]"``; CI installs it)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import anndata
import matplotlib
import numpy as np
import pandas as pd
import pytest

from m2ort_fast.predict import DEMO_SLIDE, DEMO_SPOTS, Predictor

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory):
    """The demo predicted twice as two libraries: with its spot table, and on a 55 um grid."""
    out = tmp_path_factory.mktemp("eco")
    predictor = Predictor(progress=False, device="cpu")
    table = predictor.predict_slide(DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=out, n_heatmaps=0)
    grid = predictor.predict_slide(DEMO_SLIDE, spacing_um=55, out_dir=out, stem="demo_grid", n_heatmaps=0)
    return anndata.read_h5ad(table.outputs.h5ad), anndata.read_h5ad(grid.outputs.h5ad)


def test_squidpy_spatial_scatter_and_morans_i_at_their_defaults(two_slides, tmp_path):
    sq = pytest.importorskip("squidpy", reason="squidpy is not installed (pip install 'm2ort-fast[spatial]')")
    import matplotlib.pyplot as plt

    adata = two_slides[1]
    gene = adata.var_names[0]
    sq.pl.spatial_scatter(adata, color=gene)  # failed before: "No scale_factor ... img_res_key: hires"
    plt.savefig(tmp_path / "scatter.png")
    plt.close("all")
    assert (tmp_path / "scatter.png").stat().st_size > 10_000
    getattr(sq.gr, "spatial_neighbors_knn", sq.gr.spatial_neighbors)(adata)  # squidpy >= 1.8 names it so
    sq.gr.spatial_autocorr(adata, mode="moran", genes=list(adata.var_names[:5]), n_perms=None)
    morans = adata.uns["moranI"]["I"]
    assert len(morans) == 5 and np.isfinite(morans).all()


def test_scanpy_spatial_and_concat_without_extra_arguments(two_slides, tmp_path):
    sc = pytest.importorskip("scanpy", reason="scanpy is not installed (pip install 'm2ort-fast[spatial]')")
    import matplotlib.pyplot as plt

    table, grid = two_slides
    sc.pl.spatial(table, color=table.var_names[0], show=False)
    plt.savefig(tmp_path / "spatial.png")
    plt.close("all")
    both = sc.concat([table, grid])
    assert both.n_obs == table.n_obs + grid.n_obs and both.obs_names.is_unique
    assert set(both.obs["library_id"]) == {"demo_slide", "demo_grid"}
    assert list(both.var_names) == list(table.var_names)
    # what a user then does: scanpy's own pipeline on the predictions (already log1p)
    sc.pp.pca(both, n_comps=5)
    assert both.obsm["X_pca"].shape == (both.n_obs, 5)


def test_spatialdata_store_read_back_and_drawn(tmp_path):
    sd = pytest.importorskip("spatialdata", reason="spatialdata is not installed (pip install 'm2ort-fast[spatial]')")
    from spatialdata.transformations import get_transformation

    from m2ort_fast.slide import open_slide

    predictor = Predictor(progress=False, device="cpu")
    result = predictor.predict_slide(
        DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=tmp_path, formats=("spatialdata",), write_csv=False, n_heatmaps=0
    )
    assert result.outputs.csv is None and result.outputs.spatialdata == tmp_path / "demo_slide.zarr"
    store = sd.read_zarr(result.outputs.spatialdata)
    adata = anndata.read_h5ad(result.outputs.h5ad)
    assert set(store.images) == {"slide"} and set(store.shapes) == {"spots", "windows", "tissue"}
    assert set(store.coordinate_systems) == {"global", "microns"}
    with open_slide(DEMO_SLIDE) as slide:
        mpp = slide.mpp
        full = store.images["slide"]["scale0"]["image"]
        assert full.shape == (3, slide.level_dimensions[0][1], slide.level_dimensions[0][0])
        region = slide.read_region(512, 256, 0, 300, 200)
    np.testing.assert_array_equal(full[:, 256:456, 512:812].values.transpose(1, 2, 0), region)  # our reader's pixels
    microns = get_transformation(store.shapes["spots"], "microns")
    np.testing.assert_allclose(microns.to_affine_matrix(("x", "y"), ("x", "y"))[[0, 1], [0, 1]], [mpp, mpp])
    table = store.tables["table"]
    np.testing.assert_array_equal(table.X, adata.X)
    assert (table.obs["region"] == "spots").all()
    spots = store.shapes["spots"]
    np.testing.assert_allclose(np.c_[spots.geometry.x, spots.geometry.y], adata.obsm["spatial"])
    np.testing.assert_allclose(store.shapes["windows"].geometry.area, (predictor.card.field_of_view_um / mpp) ** 2)
    assert store.shapes["tissue"].geometry.area.sum() > 0.9 * full.shape[1] * full.shape[2]  # the demo is all tissue

    # issue 24: the store was 19x its 1.7 MB source (31 MB), 14 MB of it the table's 2000 px image
    store_bytes = sum(p.stat().st_size for p in result.outputs.spatialdata.rglob("*") if p.is_file())
    image_raw_bytes = full.size * 1.25  # the full image and its 2x downsample, uncompressed
    assert store_bytes < 1.1 * image_raw_bytes and store_bytes < 22e6
    library = table.uns["spatial"]["demo_slide"]
    assert set(library["images"]) == {"hires"} and max(library["images"]["hires"].shape) <= 600
    sq = pytest.importorskip("squidpy", reason="squidpy is not installed")
    import matplotlib.pyplot as plt

    sq.pl.spatial_scatter(table, color=adata.var_names[0])  # the store's own table, at squidpy's defaults
    plt.close("all")

    pytest.importorskip("spatialdata_plot", reason="spatialdata-plot is not installed")
    gene = adata.var_names[0]
    store.pl.render_images("slide").pl.render_shapes("spots", color=gene, table_name="table").pl.show(
        coordinate_systems="global"
    )
    plt.savefig(tmp_path / "sdata.png")
    plt.close("all")
    assert (tmp_path / "sdata.png").stat().st_size > 10_000


def test_leiden_at_scanpys_defaults(two_slides):
    """Issue 24: sc.tl.leiden failed at its defaults with the [spatial] extra installed (igraph and
    leidenalg were not in it)."""
    sc = pytest.importorskip("scanpy", reason="scanpy is not installed (pip install 'm2ort-fast[spatial]')")
    adata = two_slides[1].copy()
    sc.pp.pca(adata, n_comps=10)
    sc.pp.neighbors(adata)
    sc.tl.leiden(adata)
    assert adata.obs["leiden"].nunique() >= 1 and adata.obs["leiden"].notna().all()


def test_scverse_walkthrough_runs_end_to_end(tmp_path, monkeypatch):
    """docs/scverse_walkthrough.py: predict the demo -> neighbours -> Leiden -> Moran's I -> spatial_scatter."""
    for package in ("scanpy", "squidpy", "leidenalg", "igraph"):
        pytest.importorskip(package, reason=f"{package} is not installed (pip install 'm2ort-fast[spatial]')")
    script = Path(__file__).resolve().parents[1] / "docs" / "scverse_walkthrough.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "spatial_scatter.png").stat().st_size > 10_000
    morans = pd.read_csv(tmp_path / "morans_i.csv", index_col=0)
    adata = anndata.read_h5ad(tmp_path / "walkthrough.h5ad")
    assert len(morans) == adata.n_vars and np.isfinite(morans["I"]).all()  # one row per predicted gene
    assert "leiden" in adata.obs
