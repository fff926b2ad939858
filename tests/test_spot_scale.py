"""Issue 24: the scale the spots imply (pitch first, spot diameter under its writer's convention,
checked against each other), every form of spots the API takes, and the bounds checked before a
grid is built. Each case failed before (the comment says how)."""

from __future__ import annotations

import logging
import math

import anndata
import numpy as np
import pandas as pd
import pytest
from real_data import SQUIDPY_VISIUM, her2st_section, require
from test_spots import StubSlide, he_disc_thumbnail, write_visium

from m2ort_fast.bounds import API_OPTIONS, CLI_OPTIONS, BoundsError
from m2ort_fast.errors import M2ORTError, SpotsError
from m2ort_fast.predict import DEMO_SPOTS
from m2ort_fast.spots import as_spots, grid_spots, load_spots

ST_PITCH_PX = 290.0  # one 200 um ST step in the her2st images: ~0.69 um/px


def st_table(tmp_path, n=6, pitch_px=ST_PITCH_PX, unselected=(0, 1)):
    """A legacy ST table, n x n, one row not selected; returns its path."""
    rows = ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
    for j in range(n):
        for i in range(n):
            x, y = i + 2, j + 3
            selected = 0 if (i, j) == unselected else 1
            rows.append(f"{x}\t{y}\t{x}.0\t{y}.0\t{100 + i * pitch_px:.2f}\t{80 + j * pitch_px:.2f}\t{selected}")
    path = tmp_path / "S_selection.tsv"
    path.write_text("\n".join(rows) + "\n")
    return path


def hest_st_anndata(table, *, names=True):
    """An AnnData as HEST builds an ST sample (hest.utils.register_downscale_img, spot_size=100):
    obsm["spatial"] in full-res px, ids "{x:03d}x{y:03d}", uns["spatial"]["ST"] with
    spot_diameter_fullres = 100 um / pixel size, the pixel size from the array pitch."""
    pixel_size = table.mpp_from_pitch
    xy = table.columns[["x", "y"]].to_numpy()
    obs_names = [f"{x:03d}x{y:03d}" for x, y in xy] if names else [f"spot{i}" for i in range(len(xy))]
    obs = pd.DataFrame(
        {"in_tissue": True, "pxl_col_in_fullres": table.centers_px[:, 0], "pxl_row_in_fullres": table.centers_px[:, 1]},
        index=obs_names,
    )
    adata = anndata.AnnData(X=np.zeros((len(obs), 3), np.float32), obs=obs)
    adata.obsm["spatial"] = table.centers_px.copy()
    adata.uns["spatial"] = {
        "ST": {
            "images": {"downscaled_fullres": np.zeros((10, 10, 3), np.uint8)},
            "scalefactors": {"spot_diameter_fullres": 100 / pixel_size, "tissue_downscaled_fullres_scalef": 0.025},
        }
    }
    return adata


# ----------------------------------------------------------------------------- part 1: scale


@pytest.mark.parametrize("names", [True, False])
def test_hest_st_sample_gives_the_tables_mpp(tmp_path, names):
    """Before: 65 um / spot_diameter_fullres = 0.447 um/px for a 0.69 um/px ST sample (35% off)."""
    table = load_spots(st_table(tmp_path))
    spots = as_spots(hest_st_anndata(table, names=names))
    assert spots.mpp_from_pitch == pytest.approx(table.mpp_from_pitch, rel=0.02)
    assert spots.spot_diameter_um == 100
    if names:  # the ids carry the array positions: the pitch
        assert "array positions in the spot names" in spots.mpp_source
    else:  # no array positions: HEST's 100 um ST spot, the square lattice saying it is ST
        assert "HEST's 100 um ST spot" in spots.mpp_source


def test_hest_st_sample_of_a_real_section(tmp_path):
    path = next(her2st_section("C2").glob("*_selection.tsv"))
    table = load_spots(path)
    for names in (True, False):
        spots = as_spots(hest_st_anndata(table, names=names))
        assert spots.mpp_from_pitch == pytest.approx(table.mpp_from_pitch, rel=0.02)  # before: 0.447 vs 0.688


def test_hest_visium_sample_is_read_as_a_55_um_spot(tmp_path):
    truth = write_visium(tmp_path, header=True)
    mpp = 0.5  # write_visium: 100 um pitch = 200 px
    adata = anndata.AnnData(obs=truth.set_index("barcode")[["in_tissue", "array_row", "array_col"]])
    adata.obsm["spatial"] = truth[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    adata.uns["spatial"] = {"ST": {"scalefactors": {"spot_diameter_fullres": 55 / mpp}}}
    spots = as_spots(adata)
    assert spots.mpp_from_pitch == pytest.approx(mpp, rel=0.01) and spots.mpp_from_diameter == pytest.approx(mpp)
    del adata.obs["array_row"], adata.obs["array_col"]  # the diameter alone, by HEST's Visium convention
    assert as_spots(adata).mpp_from_pitch == pytest.approx(mpp)  # before: 65 / 110 = 0.59


def test_space_ranger_folder_reports_which_source_gave_the_mpp(tmp_path):
    write_visium(tmp_path / "a", header=True, scalefactors={"spot_diameter_fullres": 130.0})
    spots = load_spots(tmp_path / "a")
    assert spots.mpp_from_pitch == pytest.approx(0.5, rel=0.01) and spots.mpp_from_diameter == pytest.approx(0.5)
    assert spots.mpp_source == "the array pitch of tissue_positions.csv (Visium, 100 um)"
    # one row: no pitch; the valid scale-factors file gives the mpp and is named (before: "array pitch")
    write_visium(tmp_path / "b", header=True, n_rows=1, scalefactors={"spot_diameter_fullres": 130.0})
    positions = tmp_path / "b" / "tissue_positions.csv"
    pd.read_csv(positions).assign(in_tissue=1).to_csv(positions, index=False)
    spots = load_spots(tmp_path / "b")
    assert spots.mpp_from_pitch == pytest.approx(0.5)
    assert "spot_diameter_fullres 130 px in scalefactors_json.json (Space Ranger's 65 um spot)" in spots.mpp_source


def test_real_space_ranger_folder_pitch_and_diameter_agree():
    spots = load_spots(require(SQUIDPY_VISIUM) / "spatial")
    assert spots.mpp_from_pitch == pytest.approx(spots.mpp_from_diameter, rel=0.01)
    assert spots.mpp_source.startswith("the array pitch")


def test_space_ranger_zero_diameter_blames_the_scalefactors_file(tmp_path, caplog):
    """Before: "no mpp metadata; pass --mpp", blaming the slide."""
    write_visium(tmp_path / "one_row", header=True, n_rows=1, scalefactors={"spot_diameter_fullres": 0})
    positions = tmp_path / "one_row" / "tissue_positions.csv"
    pd.read_csv(positions).assign(in_tissue=1).to_csv(positions, index=False)
    with pytest.raises(SpotsError, match=r"scalefactors_json.json: spot_diameter_fullres is 0, not a spot size") as e:
        load_spots(tmp_path / "one_row")
    assert "\n" not in str(e.value) and str(e.value).endswith("--mpp / mpp=")
    # where the array gives a pitch, the pitch stands in, with one line about the file
    write_visium(tmp_path / "full", header=True, scalefactors={"spot_diameter_fullres": 0})
    with caplog.at_level(logging.WARNING, logger="m2ort_fast.spots"):
        assert load_spots(tmp_path / "full").mpp_from_pitch == pytest.approx(0.5, rel=0.01)
    assert "scalefactors_json.json: spot_diameter_fullres is 0" in caplog.text


def test_anndata_zero_diameter_blames_its_scale_factors():
    """squidpy's layout with spot_diameter_fullres 0 and no array positions: the line names the key."""
    adata = anndata.AnnData(obs=pd.DataFrame(index=[f"AC{i}-1" for i in range(5)]))
    adata.obsm["spatial"] = np.arange(10, dtype=np.float64).reshape(5, 2) * 100
    adata.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 0.0}, "metadata": {}}}
    with pytest.raises(SpotsError, match=r"^AnnData spots: uns\['spatial'\]\['lib'\]\['scalefactors'\]\['spot_diam"):
        as_spots(adata, options=API_OPTIONS)


def test_pitch_and_diameter_disagreeing_is_one_line_naming_both(tmp_path, caplog):
    write_visium(tmp_path, header=True, scalefactors={"spot_diameter_fullres": 65 / 0.8})  # says 0.8, pitch 0.5
    with pytest.raises(SpotsError) as e:
        load_spots(tmp_path, options=CLI_OPTIONS)
    message = str(e.value)
    assert "0.5 um/px" in message and "0.8 um/px" in message and "--mpp" in message and "--mpp-force" in message
    with caplog.at_level(logging.WARNING, logger="m2ort_fast.spots"):  # the user gives the mpp: not fatal
        assert load_spots(tmp_path, check_scale=False).mpp_from_pitch == pytest.approx(0.5, rel=0.01)
    assert "0.8 um/px" in caplog.text


def test_st_selected_is_kept_as_in_tissue(tmp_path):
    """Before: the selected column was dropped and in_tissue recomputed from our tissue mask."""
    spots = load_spots(st_table(tmp_path))
    assert "in_tissue" in spots.columns and spots.in_tissue.tolist() == [1] * len(spots)
    assert len(spots) == 35  # the unselected row is not predicted


def test_real_st_table_keeps_every_selected_spot_in_tissue():
    spots = load_spots(next(her2st_section("C2").glob("*_selection.tsv")))
    assert len(spots) == 187 and spots.in_tissue.sum() == 187  # before: 4 set to 0 by our mask


def test_our_own_h5ad_fed_back_as_spots(tmp_path):
    """Before: 0.859 um/px instead of 0.727 and ids prefixed twice (demo_slide_demo_slide_...)."""
    from m2ort_fast.predict import DEMO_SLIDE, Predictor

    predictor = Predictor(progress=False, device="cpu")
    table = load_spots(DEMO_SPOTS)
    for stem, kwargs in (("t", {"spots": DEMO_SPOTS}), ("g", {"spacing_um": 150})):
        predictor.predict(DEMO_SLIDE, write=True, out_dir=tmp_path, stem=stem, n_heatmaps=0, **kwargs)
        written = anndata.read_h5ad(tmp_path / f"{stem}.h5ad")
        spots = as_spots(tmp_path / f"{stem}.h5ad")
        assert spots.mpp_from_pitch == pytest.approx(table.mpp_from_pitch, rel=0.02)
        assert spots.ids == list(written.obs["spot_id"]) and not spots.ids[0].startswith(stem)
        assert "spot_id" not in spots.columns and "library_id" not in spots.columns
        again = predictor.predict(DEMO_SLIDE, spots=spots)
        assert list(again.obs_names) == [f"demo_slide_{i}" for i in written.obs["spot_id"]]  # prefixed once
        np.testing.assert_array_equal(again.X, written.X)
    assert spots.mpp_source.startswith("the array pitch of obs array_row, array_col (hexagonal, 150 um)")


def test_cli_takes_an_h5ad_as_spots(tmp_path, capfd):
    """Before: "'utf-8' codec can't decode byte 0x89" (AnnData spots worked only from Python)."""
    from m2ort_fast.cli import main
    from m2ort_fast.predict import DEMO_SLIDE

    quiet = ["--heatmaps", "0", "--no-csv", "--quiet"]
    assert main(["predict", str(DEMO_SLIDE), "--spots", str(DEMO_SPOTS), "--out", str(tmp_path / "a"), *quiet]) == 0
    spots = tmp_path / "a" / "demo_slide.h5ad"
    assert main(["predict", str(DEMO_SLIDE), "--spots", str(spots), "--out", str(tmp_path / "b"), *quiet]) == 0
    first, again = (anndata.read_h5ad(tmp_path / d / "demo_slide.h5ad") for d in ("a", "b"))
    np.testing.assert_array_equal(again.X, first.X)
    assert list(again.obs_names) == list(first.obs_names) and (again.obs["in_tissue"] == 1).all()


# ----------------------------------------------------------------------------- part 3: every input form


def test_every_form_of_spots(tmp_path):
    table = load_spots(DEMO_SPOTS)
    frame = pd.DataFrame({"x": table.centers_px[:, 0], "y": table.centers_px[:, 1], "id": table.ids, "c": 1})
    for spots in (
        as_spots(frame),
        as_spots(table.centers_px),
        as_spots(table.centers_px.tolist()),
        as_spots(frame.set_index("id")),
    ):
        np.testing.assert_array_equal(spots.centers_px, table.centers_px)
        assert spots.mpp_from_pitch is None  # centres alone say nothing of the scale
    assert as_spots(frame).ids == table.ids and as_spots(frame).columns["c"].tolist() == [1] * len(table)
    assert as_spots(table.centers_px).ids == [str(i) for i in range(len(table))]
    assert as_spots(frame.set_index("id")).ids == table.ids


def test_h5ad_spots_by_path_and_by_content(tmp_path):
    """Before: "'utf-8' codec can't decode byte 0x89" (an .h5ad read as a CSV)."""
    adata = anndata.AnnData(obs=pd.DataFrame(index=["a", "b", "c"]))
    adata.obsm["spatial"] = np.array([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    adata.write_h5ad(tmp_path / "spots.h5ad")
    (tmp_path / "spots.csv").write_bytes((tmp_path / "spots.h5ad").read_bytes())  # misnamed
    for path in (tmp_path / "spots.h5ad", str(tmp_path / "spots.csv")):
        spots = as_spots(path)
        assert spots.ids == ["a", "b", "c"] and spots.centers_px[2].tolist() == [50, 60]
    (tmp_path / "bad.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(SpotsError, match=r"bad.h5ad: cannot read the .h5ad"):
        as_spots(tmp_path / "bad.h5ad")


@pytest.mark.parametrize("value", [3, {"x": [1]}, np.zeros((3, 3)), [[1, 2, 3]], object()])
def test_wrong_spots_name_the_argument_and_what_it_takes(value):
    """Before: a raw pathlib TypeError naming neither."""
    with pytest.raises(SpotsError, match=r"spots=") as e:
        as_spots(value)
    assert "\n" not in str(e.value) and isinstance(e.value, M2ORTError)


def test_dataframe_without_coordinates_or_with_text_is_one_line():
    with pytest.raises(SpotsError, match=r"spots= DataFrame: needs columns pixel_x, pixel_y or x_px, y_px or x, y"):
        as_spots(pd.DataFrame({"a": [1]}))
    with pytest.raises(SpotsError, match=r"column 'y' holds a non-number at row 1"):
        as_spots(pd.DataFrame({"x": [1, 2], "y": [1, "b"]}))


# ----------------------------------------------------------------------------- part 4: grid bound


def test_grid_spot_count_is_checked_before_the_grid_is_built(monkeypatch):
    """The issue's 3000 px JPEG at --mpp 50 (a 150 mm "slide"): 987,290 spots, still running after
    5 minutes; now refused from the mask's area, before any lattice is made."""
    import m2ort_fast.spots as spots_module

    image, _ = he_disc_thumbnail()
    slide = StubSlide(image, 3000 / 500, 50.0)
    monkeypatch.setattr(spots_module, "_lattice_over", lambda *a: pytest.fail("built the grid"))
    with pytest.raises(BoundsError, match=r"stub.svs: a grid every 100 um .* over the limit of 500,000") as e:
        grid_spots(slide, options=CLI_OPTIONS)
    assert "--max-spots" in str(e.value)
    with pytest.raises(BoundsError, match=r"max_spots="):
        grid_spots(slide, options=API_OPTIONS)
    monkeypatch.undo()
    small = grid_spots(StubSlide(image, 20.0, 0.5), spacing_um=100, max_spots=10**6)
    expected = math.pi * (150 * 20) ** 2 / (200**2 * math.sqrt(3) / 2)  # the disc over a spot's share
    assert len(small) == pytest.approx(expected, rel=0.1)
    with pytest.raises(BoundsError, match="over the limit of 10"):
        grid_spots(StubSlide(image, 20.0, 0.5), max_spots=10)
