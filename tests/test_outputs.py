"""What a slide's outputs hold: the .h5ad laid out as Space Ranger + scanpy make Visium data, the
QuPath GeoJSON, the heatmaps; reruns that respect the settings an output was made with."""

from __future__ import annotations

import json
import math
import uuid

import anndata
import numpy as np
import pandas as pd
import pytest

from m2ort_fast.cli import main
from m2ort_fast.outputs import HIRES_MAX_SIDE_PX, LOWRES_MAX_SIDE_PX
from m2ort_fast.predict import DEMO_SLIDE, DEMO_SPOTS, Predictor
from m2ort_fast.predict.opening import slide_view
from m2ort_fast.predict.record import DERIVED_SETTINGS, VALUE_SETTINGS
from m2ort_fast.slide import open_slide


@pytest.fixture(scope="module")
def predictor():
    return Predictor(progress=False, device="cpu")


@pytest.fixture(scope="module")
def demo_run(predictor, tmp_path_factory):
    """The demo with its spot table, every format, two heatmaps."""
    out = tmp_path_factory.mktemp("demo")
    result = predictor.predict_slide(
        DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=out, formats=("csv", "geojson"), n_heatmaps=2
    )
    return result, anndata.read_h5ad(result.outputs.h5ad)


def test_h5ad_is_laid_out_as_space_ranger_and_scanpy_expect(demo_run, predictor):
    result, adata = demo_run
    table = pd.read_csv(DEMO_SPOTS, sep="\t")
    assert list(adata.obs["library_id"].unique()) == ["demo_slide"]
    assert adata.obs_names.is_unique and all(name.startswith("demo_slide_") for name in adata.obs_names)
    assert set(adata.obs["in_tissue"]) <= {0, 1} and adata.obs["in_tissue"].mean() > 0.9  # a spot table on tissue
    assert adata.uns["log1p"] == {} or adata.uns["log1p"].get("base") is None  # natural log, as scanpy writes it
    library = adata.uns["spatial"]["demo_slide"]
    hires, lowres = library["images"]["hires"], library["images"]["lowres"]
    assert max(hires.shape[:2]) <= HIRES_MAX_SIDE_PX and max(lowres.shape[:2]) == LOWRES_MAX_SIDE_PX
    assert hires.dtype == lowres.dtype == np.uint8 and hires.shape[2] == 3
    scale = library["scalefactors"]
    with open_slide(DEMO_SLIDE) as slide:
        width_px, height_px = slide.level_dimensions[0]
        mpp = slide.mpp
    for image, key in ((hires, "tissue_hires_scalef"), (lowres, "tissue_lowres_scalef")):
        # each image covers the whole slide at its scale factor (to within a pixel of rounding)
        assert abs(image.shape[1] - width_px * scale[key]) <= 1 and abs(image.shape[0] - height_px * scale[key]) <= 1
    assert scale["spot_diameter_fullres"] == pytest.approx(100 / mpp)  # legacy ST: 100 um spots
    meta = library["metadata"]
    assert meta["source_image_path"] == str(DEMO_SLIDE) and meta["mpp"] == pytest.approx(mpp)
    assert meta["model_window_um"] == pytest.approx(predictor.card.field_of_view_um)
    assert meta["model_window_px"] == pytest.approx(predictor.card.field_of_view_um / mpp)
    assert len(table) == adata.n_obs
    record = json.loads(adata.uns["m2ort_fast"]["run_record"])
    assert set(VALUE_SETTINGS) | set(DERIVED_SETTINGS) <= set(record)
    assert record["formats"] == ["csv", "geojson"] and record["heatmaps"] == "the 2 that vary most"


def test_geojson_is_one_qupath_detection_per_spot(demo_run, predictor):
    """RFC 7946 and QuPath's conventions: a FeatureCollection; each feature a closed, counter-
    clockwise square (the model's window, level-0 px) with the predictions as measurements."""
    result, adata = demo_run
    collection = json.loads(result.outputs.geojson.read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == adata.n_obs
    window_px = adata.uns["spatial"]["demo_slide"]["metadata"]["model_window_px"]
    for feature, spot_id, (x, y), values in zip(
        features, adata.obs["spot_id"], adata.obsm["spatial"], adata.X, strict=True
    ):
        assert feature["type"] == "Feature" and uuid.UUID(feature["id"]).version == 5  # QuPath keeps UUID ids
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1
        ring = np.asarray(geometry["coordinates"][0])
        assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
        area = 0.5 * np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1])
        assert area == pytest.approx(window_px**2, rel=1e-4)  # positive: counter-clockwise (x right, y up)
        np.testing.assert_allclose(ring[:-1].mean(0), (x, y), atol=0.01)  # level-0 px, to 0.01 px
        assert all(round(c, 2) == c for c in ring.ravel())
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["name"] == spot_id
        assert props["classification"]["name"] and len(props["classification"]["color"]) == 3
        measurements = props["measurements"]
        assert list(measurements) == predictor.genes
        assert all(isinstance(v, float) and math.isfinite(v) for v in measurements.values())
        np.testing.assert_array_equal(np.float32(list(measurements.values())), values)
    assert len({f["id"] for f in features}) == len(features)
    # the float32's shortest text, no padding: a spot's 250 measurements in well under 5 KB
    assert result.outputs.geojson.stat().st_size / len(features) < 5000


def test_heatmaps_and_overview_name_the_model_and_why_these_genes(demo_run):
    result, _ = demo_run
    names = sorted(p.name for p in result.outputs.heatmaps)
    assert "overview.png" in names and len(names) == 3
    from PIL import Image

    for path in result.outputs.heatmaps:
        with Image.open(path) as image:
            assert image.size[0] >= 700 and image.size[1] >= 300


def test_heatmap_title_says_whether_the_slide_was_in_training(predictor):
    opened = predictor.open(DEMO_SLIDE, DEMO_SPOTS)
    with opened.slide:
        view = slide_view(opened, predictor.card, "demo_slide")
    assert view.in_training is True  # the demo slide is a crop of her2st C3, a training section
    title = view.title("ERBB2")
    assert "ERBB2" in title and predictor.card.model_id in title and "in its training data" in title


def test_a_rerun_skips_only_what_was_made_with_the_same_settings(tmp_path, capsys):
    out = str(tmp_path / "out")
    common = [str(DEMO_SLIDE), "--out", out, "--heatmaps", "0", "--quiet"]
    assert main(["predict", *common, "--spots", str(DEMO_SPOTS)]) == 0
    h5ad = tmp_path / "out" / "demo_slide.h5ad"
    made = h5ad.stat().st_mtime_ns
    capsys.readouterr()

    assert main(["predict", *common, "--spots", str(DEMO_SPOTS)]) == 0  # the same run: skipped
    assert "skipped" in capsys.readouterr().out and h5ad.stat().st_mtime_ns == made

    assert main(["predict", *common, "--spacing-um", "55"]) == 2  # other spots: refused, naming the setting
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "spots" in err[0] and "grid every 55 um" in err[0] and "--overwrite" in err[0]
    assert h5ad.stat().st_mtime_ns == made

    assert main(["predict", *common, "--spots", str(DEMO_SPOTS), "--precision", "bf16"]) == 2  # another precision
    assert "precision" in capsys.readouterr().err

    assert main(["predict", *common, "--spacing-um", "55", "--overwrite"]) == 0
    assert h5ad.stat().st_mtime_ns != made
    assert "grid every 55 um" in json.loads(anndata.read_h5ad(h5ad).uns["m2ort_fast"]["run_record"])["spots"]


def test_an_output_without_recorded_settings_is_not_silently_kept(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    anndata.AnnData(np.zeros((2, 2), np.float32)).write_h5ad(out / "demo_slide.h5ad")  # an older version's
    assert main(["predict", str(DEMO_SLIDE), "--out", str(out), "--heatmaps", "0", "--quiet"]) == 2
    assert "did not record its settings" in capsys.readouterr().err


def test_unknown_format_is_one_line(tmp_path, capsys):
    assert main(["predict", str(DEMO_SLIDE), "--out", str(tmp_path / "o"), "--format", "parquet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parquet" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_copy_of_the_demo_is_known_as_a_training_section(predictor, tmp_path):
    copy = tmp_path / "slide.tiff"
    copy.write_bytes(DEMO_SLIDE.read_bytes())
    opened = predictor.open(copy, DEMO_SPOTS)
    with opened.slide:
        assert slide_view(opened, predictor.card, "slide").in_training is True
