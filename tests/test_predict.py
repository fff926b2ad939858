"""`predict` end to end: the demo, the real her2st sections (flat and converted), grids, outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from pyramids import write_test_pyramid
from real_data import HER2ST_SECTIONS, SQUIDPY_VISIUM, her2st_section, require

from m2ort_fast.checkpoint import load_checkpoint
from m2ort_fast.convert import convert_to_pyramid
from m2ort_fast.crop import read_spot_patches
from m2ort_fast.errors import M2ORTError
from m2ort_fast.outputs import heatmaps as heatmaps_module
from m2ort_fast.predict import DEFAULT_CHECKPOINT, DEMO_SLIDE, DEMO_SPOTS, Predictor, predict_slides
from m2ort_fast.slide import open_slide
from m2ort_fast.spots import load_spots


@pytest.fixture(scope="module")
def predictor():
    return Predictor(progress=False, device="cpu")


def read_h5ad(path):
    import anndata

    return anndata.read_h5ad(path)


def expected_predictions(slide_path, centers_px, mpp=None):
    """The reference computed without the engine: read patches, normalise in NumPy, eager model."""
    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    with open_slide(slide_path, mpp=mpp) as slide:
        patches = read_spot_patches(
            slide, centers_px, card.level_mpp, card.patch_sizes_px, level_source=card.level_source
        )
    mean, std = np.array(card.pixel_mean), np.array(card.pixel_std)
    levels = [torch.from_numpy(((p / 255.0 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)) for p in patches]
    with torch.no_grad():
        return model(*levels).numpy()


def test_demo_predict_matches_the_reference_path(predictor, tmp_path):
    result = predictor.predict_slide(DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=tmp_path)
    table = pd.read_csv(DEMO_SPOTS, sep="\t")
    adata = read_h5ad(result.outputs.h5ad)
    assert adata.n_obs == len(table) == result.n_spots
    table_ids = [f"{x}x{y}" for x, y in zip(table["x"], table["y"], strict=True)]
    assert list(adata.obs["spot_id"]) == table_ids
    assert list(adata.obs_names) == [f"demo_slide_{i}" for i in table_ids]  # unique across slides
    np.testing.assert_allclose(adata.obsm["spatial"], table[["pixel_x", "pixel_y"]].to_numpy())
    assert list(adata.var_names) == predictor.genes
    np.testing.assert_allclose(adata.X, expected_predictions(DEMO_SLIDE, adata.obsm["spatial"]), rtol=1e-4, atol=1e-4)
    assert adata.uns["m2ort_fast"]["slide_mpp_source"] == "metadata"
    assert bool(adata.uns["m2ort_fast"]["trained"]) == predictor.card.trained
    csv = pd.read_csv(result.outputs.csv, index_col="spot_id")
    assert list(csv.index) == table_ids
    np.testing.assert_allclose(csv[predictor.genes].to_numpy(), adata.X, rtol=1e-5, atol=1e-5)
    # four genes and the overview
    assert len(result.outputs.heatmaps) == 5 and all(p.stat().st_size > 10_000 for p in result.outputs.heatmaps)
    assert {"open", "read", "assemble", "model", "write"} <= set(result.seconds)
    assert not list(tmp_path.glob(".*partial*")), "staging folder left behind"


@pytest.mark.parametrize("section", HER2ST_SECTIONS)
def test_real_section_flat_jpeg_and_converted_pyramid(predictor, section, tmp_path):
    folder = her2st_section(section)
    image = next(folder.glob("*.jpg"))
    table_path = next(folder.glob("*_selection.tsv"))
    table = pd.read_csv(table_path, sep="\t")
    table = table[table["selected"] == 1]
    flat = predictor.predict_slide(
        image,
        spots=table_path,
        out_dir=tmp_path / "flat",
        heatmap_genes=["ERBB2"] if "ERBB2" in predictor.genes else None,
        n_heatmaps=1,
    )
    assert flat.mpp_source == "spot-table" and flat.mpp == pytest.approx(200 / 290, rel=0.03)
    adata = read_h5ad(flat.outputs.h5ad)
    assert adata.n_obs == len(table)
    np.testing.assert_allclose(adata.obsm["spatial"], table[["pixel_x", "pixel_y"]].to_numpy())

    pyramid = convert_to_pyramid(image, tmp_path / f"{section}.tiff", mpp=flat.mpp)
    converted = predictor.predict_slide(pyramid, spots=table_path, out_dir=tmp_path / "pyramid", n_heatmaps=0)
    assert converted.mpp_source == "metadata" and converted.mpp == pytest.approx(flat.mpp, rel=1e-4)
    adata_pyr = read_h5ad(converted.outputs.h5ad)
    assert list(adata_pyr.obs["spot_id"]) == list(adata.obs["spot_id"])
    np.testing.assert_allclose(adata_pyr.obsm["spatial"], adata.obsm["spatial"])
    # Same spots, same model: only JPEG re-encoding and the pyramid's own levels 2/3 differ.
    spread = adata.X.std(axis=0).mean()
    assert np.abs(adata_pyr.X - adata.X).mean() < spread


def test_grid_over_tissue_and_spacing(predictor, tmp_path):
    slide_path = write_test_pyramid(tmp_path / "grid.svs", layout="svs", size_px=2048, mpp=0.5)
    coarse = predictor.predict_slide(slide_path, out_dir=tmp_path / "a", n_heatmaps=1)
    dense = predictor.predict_slide(slide_path, spacing_um=50, out_dir=tmp_path / "b", n_heatmaps=0)
    assert coarse.n_spots > 5
    assert 3.0 < dense.n_spots / coarse.n_spots < 5.0  # half the spacing: ~4x the spots
    adata = read_h5ad(dense.outputs.h5ad)
    assert adata.uns["m2ort_fast"]["spots_source"] == "grid"
    xy = adata.obsm["spatial"]
    nearest = np.sort(np.linalg.norm(xy[:50, None] - xy[None], axis=-1), axis=1)[:, 1]
    np.testing.assert_allclose(nearest, 50 / 0.5, rtol=0.02)


def test_failed_write_leaves_no_complete_looking_output(predictor, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(heatmaps_module, "write_heatmap", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        predictor.predict_slide(DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_predict_slides_goes_on_after_a_bad_slide(predictor, tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_text("not a slide")
    results = predict_slides(
        [bad, DEMO_SLIDE], model=predictor, spots=[None, DEMO_SPOTS], out_dir=tmp_path / "out", n_heatmaps=0
    )
    assert not results[0].ok and "bad.svs" in results[0].error
    assert results[1].ok and results[1].outputs.h5ad.exists()


def test_level_source_follows_the_checkpoint_unless_asked(tmp_path):
    spots = load_spots(DEMO_SPOTS)
    assert Predictor(progress=False).level_source == load_checkpoint(DEFAULT_CHECKPOINT)[1].level_source
    with open_slide(DEMO_SLIDE) as slide:
        resized = Predictor(progress=False, level_source="resize").predict_centers(slide, spots.centers_px[:8])
        pyramid = Predictor(progress=False, level_source="pyramid").predict_centers(slide, spots.centers_px[:8])
    assert resized.shape == pyramid.shape
    assert not np.allclose(resized, pyramid)  # level 2/3 pixels differ, and the model sees it


def test_spots_from_an_anndata_give_the_table_predictions(predictor, tmp_path):
    """An AnnData holding the spot table's centres in obsm["spatial"] (as scanpy holds Visium data)
    is the same spots: the same predictions, its obs kept; and ``predict`` returns the AnnData in
    memory, equal to the written one, writing nothing."""
    import anndata

    table = load_spots(DEMO_SPOTS)
    spots = anndata.AnnData(obs=pd.DataFrame({"cluster": ["a", "b"] * 32 + ["a"]}, index=table.ids))
    spots.obsm["spatial"] = table.centers_px.copy()
    written = predictor.predict_slide(DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=tmp_path / "table", n_heatmaps=0)
    expected = read_h5ad(written.outputs.h5ad)
    in_memory = predictor.predict(DEMO_SLIDE, spots=spots)
    assert list(tmp_path.iterdir()) == [tmp_path / "table"]  # nothing else written
    np.testing.assert_array_equal(in_memory.X, expected.X)
    assert list(in_memory.obs["spot_id"]) == table.ids and list(in_memory.obs["cluster"][:3]) == ["a", "b", "a"]
    assert list(in_memory.obs_names) == list(expected.obs_names)
    got, want = (a.uns["spatial"]["demo_slide"]["scalefactors"] for a in (in_memory, expected))
    assert got["tissue_hires_scalef"] == want["tissue_hires_scalef"]
    # an AnnData without Space Ranger's scale factors does not say its spots' size: Visium's 55 um
    mpp = expected.uns["m2ort_fast"]["slide_mpp"]
    assert got["spot_diameter_fullres"] == pytest.approx(55 / mpp) and want["spot_diameter_fullres"] == pytest.approx(
        100 / mpp
    )


def test_predict_with_write_returns_what_it_published(predictor, tmp_path):
    """``predict(write=True)`` writes as ``predict_slide`` does (here under another stem) and returns
    that .h5ad read back: the in-memory predictions, the stem's file and nothing under the slide's."""
    in_memory = predictor.predict(DEMO_SLIDE, spots=DEMO_SPOTS)
    written = predictor.predict(
        DEMO_SLIDE, spots=DEMO_SPOTS, write=True, out_dir=tmp_path, stem="renamed", n_heatmaps=0, write_csv=False
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["renamed.h5ad"]
    np.testing.assert_array_equal(written.X, in_memory.X)
    np.testing.assert_array_equal(written.X, read_h5ad(tmp_path / "renamed.h5ad").X)
    with pytest.raises(TypeError, match="out_dir"):
        predictor.predict(DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=tmp_path)


def test_visium_anndata_as_scanpy_reads_it(predictor, tmp_path):
    """squidpy's real Visium sample (49 spots on its H&E crop, ``uns["spatial"]`` from Space
    Ranger): the mpp comes from spot_diameter_fullres (a 65 um spot there), obs kept."""
    import anndata

    folder = require(SQUIDPY_VISIUM)
    adata = anndata.read_h5ad(folder / "test_data.h5ad")
    scalefactors = adata.uns["spatial"]["V1_Adult_Mouse_Brain"]["scalefactors"]
    result = predictor.predict(folder / "test_img.jpg", spots=adata)
    assert result.n_obs == 49 and list(result.obs["spot_id"]) == list(adata.obs_names)
    assert list(result.obs["leiden"]) == list(adata.obs["leiden"].astype(str))
    assert result.uns["m2ort_fast"]["slide_mpp_source"] == "spot-table"
    assert result.uns["m2ort_fast"]["slide_mpp"] == pytest.approx(65 / scalefactors["spot_diameter_fullres"])
    np.testing.assert_array_equal(result.obsm["spatial"], adata.obsm["spatial"])
    assert np.isfinite(result.X).all()


def test_predict_takes_one_slide_or_many(predictor, tmp_path):
    """One path: an AnnData. A list (or any iterable) of paths: one AnnData per slide, in order,
    each predicted when asked for; spots= then one source per slide."""
    one = predictor.predict(DEMO_SLIDE, spots=DEMO_SPOTS)
    many = predictor.predict([DEMO_SLIDE, DEMO_SLIDE], spots=[DEMO_SPOTS, None], spacing_um=200)
    assert not isinstance(many, list) and hasattr(many, "__next__")  # lazy: nothing predicted yet
    first, second = list(many)
    assert np.array_equal(first.X, one.X) and first.obs_names.equals(one.obs_names)
    assert second.n_obs != one.n_obs and "grid every 200 um" in second.uns["m2ort_fast"]["run_record"]
    with pytest.raises(M2ORTError, match="one per slide"):
        predictor.predict([DEMO_SLIDE, DEMO_SLIDE], spots=[DEMO_SPOTS])  # at once, before any slide
