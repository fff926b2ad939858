"""Spot tables (m2ort_fast.spots) and the tissue mask (m2ort_fast.tissue)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from real_data import HER2ST_SECTIONS, her2st_section
from scipy.spatial import cKDTree

from m2ort_fast.bounds import API_OPTIONS
from m2ort_fast.errors import SpotsError
from m2ort_fast.spots import Spots, check_spots_inside, grid_spots, load_spots
from m2ort_fast.tissue import tissue_mask

# ----------------------------------------------------------------------------- real her2st tables


@pytest.mark.parametrize("section", HER2ST_SECTIONS)
def test_her2st_selection_table(section):
    path = next(her2st_section(section).glob("*_selection.tsv"))
    raw = pd.read_csv(path, sep="\t")
    selected = raw[raw["selected"] == 1]

    spots = load_spots(path)

    assert spots.source == "st" and spots.path == path and len(spots) == len(selected)
    assert spots.ids == [f"{x}x{y}" for x, y in zip(selected["x"], selected["y"], strict=True)]
    np.testing.assert_array_equal(spots.centers_px, selected[["pixel_x", "pixel_y"]].to_numpy())
    assert spots.centers_px.dtype == np.float64 and spots.centers_px.shape == (len(selected), 2)
    assert list(spots.columns.index) == spots.ids and {"x", "y", "new_x", "new_y"} <= set(spots.columns.columns)
    # The data README: one 200 um array step is about 290 px in these images, i.e. ~0.69 um/px.
    assert spots.mpp_from_pitch == pytest.approx(200 / 290, rel=0.03)
    assert spots.spot_diameter_um == 100


def test_her2st_ids_match_the_count_table(her2st_dir):
    spots = load_spots(her2st_dir / "C5" / "C5_selection.tsv")
    count_ids = pd.read_csv(her2st_dir / "C5" / "C5.tsv.gz", sep="\t", index_col=0, usecols=[0, 1]).index
    assert len(set(spots.ids) & set(count_ids.astype(str))) == 181  # README: 183 selected, 181 with counts


def test_st_table_keeps_selected_rows_only(tmp_path):
    path = tmp_path / "s_selection.tsv"
    path.write_text(
        "x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected\n"
        "1\t1\t1.0\t1.0\t100.0\t100.0\t1\n2\t1\t2.0\t1.0\t400.0\t100.0\t0\n"
        "1\t2\t1.0\t2.0\t100.0\t400.0\t1\n2\t2\t2.0\t2.0\t400.0\t400.0\t1\n3\t3\t3\t3\t700\t700\t1\n"
    )
    spots = load_spots(path)
    assert spots.ids == ["1x1", "1x2", "2x2", "3x3"]
    assert spots.mpp_from_pitch == pytest.approx(200 / 300)


def test_st_table_with_nothing_selected_is_an_error(tmp_path):
    path = tmp_path / "none_selection.tsv"
    path.write_text("x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected\n1\t1\t1\t1\t10\t10\t0\n")
    with pytest.raises(SpotsError, match=r"none_selection.tsv: no spots \(no rows with selected == 1\)"):
        load_spots(path)


# ----------------------------------------------------------------------------- Visium


VISIUM_MPP = 0.5  # written by the fixture: 100 um pitch = 200 px


def write_visium(
    folder: Path,
    *,
    header: bool,
    rotation_deg: float = 3.0,
    n_rows: int = 12,
    n_cols: int = 30,
    scalefactors: dict | None = None,
) -> pd.DataFrame:
    """A small Visium array in ``folder``: rotated, offset, non-square; returns the truth table."""
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    keep = (rows + cols) % 2 == 0  # Visium: array_col has the parity of array_row
    rows, cols = rows[keep], cols[keep]
    pitch_px = 100 / VISIUM_MPP
    u, v = cols * pitch_px / 2, rows * pitch_px * math.sqrt(3) / 2
    angle = math.radians(rotation_deg)
    x = 1500 + u * math.cos(angle) - v * math.sin(angle)
    y = 700 + u * math.sin(angle) + v * math.cos(angle)
    truth = pd.DataFrame(
        {
            "barcode": [f"AC{r:03d}{c:03d}-1" for r, c in zip(rows, cols, strict=True)],
            "in_tissue": ((rows > 2) & (cols < 20)).astype(int),
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": np.round(y).astype(int),
            "pxl_col_in_fullres": np.round(x).astype(int),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    name = "tissue_positions.csv" if header else "tissue_positions_list.csv"
    truth.to_csv(folder / name, index=False, header=header)
    if scalefactors is not None:
        (folder / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    return truth


@pytest.mark.parametrize("header", [True, False])
def test_visium_positions_file(tmp_path, header):
    truth = write_visium(tmp_path / "spatial", header=header)
    path = tmp_path / "spatial" / ("tissue_positions.csv" if header else "tissue_positions_list.csv")

    spots = load_spots(path)

    under = truth[truth["in_tissue"] == 1]
    assert spots.source == "visium" and spots.path == path
    assert spots.ids == under["barcode"].tolist()
    # x is the pxl_COL column, y the pxl_ROW one.
    np.testing.assert_array_equal(spots.centers_px[:, 0], under["pxl_col_in_fullres"])
    np.testing.assert_array_equal(spots.centers_px[:, 1], under["pxl_row_in_fullres"])
    assert spots.columns["array_row"].tolist() == under["array_row"].tolist()
    assert spots.columns["array_col"].tolist() == under["array_col"].tolist()
    assert spots.mpp_from_pitch == pytest.approx(VISIUM_MPP, rel=0.005)
    assert spots.spot_diameter_um == 55


@pytest.mark.parametrize("folder", ["outs", "outs/spatial"])
def test_visium_folder(tmp_path, folder):
    truth = write_visium(tmp_path / "outs" / "spatial", header=True)
    spots = load_spots(tmp_path / folder)
    assert spots.path == tmp_path / "outs" / "spatial" / "tissue_positions.csv"
    assert len(spots) == int(truth["in_tissue"].sum())


def test_visium_pitch_falls_back_to_scalefactors(tmp_path):
    # One array row only: the fit cannot see the second axis, so spot_diameter_fullres (65 um) is used.
    write_visium(tmp_path, header=True, n_rows=1, scalefactors={"spot_diameter_fullres": 130.0})
    positions = tmp_path / "tissue_positions.csv"
    pd.read_csv(positions).assign(in_tissue=1).to_csv(positions, index=False)
    spots = load_spots(tmp_path)
    assert spots.mpp_from_pitch == pytest.approx(65 / 130)


def test_visium_without_spots_under_tissue_is_an_error(tmp_path):
    truth = write_visium(tmp_path, header=True)
    truth.assign(in_tissue=0).to_csv(tmp_path / "tissue_positions.csv", index=False)
    with pytest.raises(SpotsError, match=r"tissue_positions.csv: none of the \d+ spots is under tissue"):
        load_spots(tmp_path)


def test_folder_without_positions_is_an_error(tmp_path):
    with pytest.raises(SpotsError, match="folder holds no tissue_positions.csv"):
        load_spots(tmp_path)


# ----------------------------------------------------------------------------- CSV of centres


@pytest.mark.parametrize("x_name, y_name", [("x", "y"), ("pixel_x", "pixel_y"), ("x_px", "y_px"), ("X", "Y")])
def test_csv_centres(tmp_path, x_name, y_name):
    path = tmp_path / "centres.csv"
    pd.DataFrame(
        {
            "barcode": ["a", "b", "c"],
            x_name: [10.5, 20, 30],
            y_name: [5, 6, 7.25],
            "region": ["tumour", "stroma", "tumour"],
            "score": [0.1, 0.2, 0.3],
        }
    ).to_csv(path, index=False)
    spots = load_spots(path)
    assert spots.source == "csv" and spots.ids == ["a", "b", "c"]
    np.testing.assert_array_equal(spots.centers_px, [[10.5, 5], [20, 6], [30, 7.25]])
    assert spots.columns["region"].tolist() == ["tumour", "stroma", "tumour"]
    assert spots.columns["score"].dtype == np.float64
    assert spots.mpp_from_pitch is None and spots.spot_diameter_um is None


def test_csv_without_id_column_uses_row_numbers_and_tabs_work(tmp_path):
    path = tmp_path / "centres.tsv"
    path.write_text("x\ty\n1\t2\n3\t4\n")
    spots = load_spots(path, format="csv")
    assert spots.ids == ["0", "1"]
    np.testing.assert_array_equal(spots.centers_px, [[1, 2], [3, 4]])


BAD_TABLES = [
    ("bad.csv", b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00binary", "csv", "bad.csv: cannot read the spot table"),
    ("cols.csv", b"a,b\n1,2\n", "auto", r"cols.csv: missing column\(s\) pixel_x,pixel_y or x_px,y_px or x,y"),
    ("empty.csv", b"x,y\n", "auto", "empty.csv: no spots in the table"),
    ("blank.csv", b"\n\n", "auto", "blank.csv: the spot table is empty"),
    ("text.csv", b"x,y\n1,2\nabc,3\n", "auto", r"text.csv: no numeric coordinate in column 'x' at data row 2 \('abc'"),
    ("nan.csv", b"x,y\n1,\n", "auto", "nan.csv: no numeric coordinate in column 'y'"),
    ("dup.csv", b"id,x,y\ns1,1,2\ns1,3,4\n", "auto", "dup.csv: duplicate spot ids: 's1' appears 2 times"),
    (
        "st.tsv",
        b"x\ty\tpixel_x\tpixel_y\tselected\n1.5\t1\t3\t4\t1\n",
        "st",
        "st.tsv: array positions x, y must be whole",
    ),
    ("v.csv", b"a,1,2\n", "visium", "v.csv: a headerless Visium positions file needs 6 columns"),
    ("fmt.csv", b"x,y\n1,2\n", "xlsx", "fmt.csv: unknown spot format 'xlsx'"),
]


@pytest.mark.parametrize("name, content, fmt, message", BAD_TABLES)
def test_bad_spot_tables_give_one_line_errors(tmp_path, name, content, fmt, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SpotsError, match=message) as caught:
        load_spots(path, format=fmt)
    assert "\n" not in str(caught.value) and str(tmp_path) in str(caught.value)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(SpotsError, match="nope.csv: no such file or folder"):
        load_spots(tmp_path / "nope.csv")


# ----------------------------------------------------------------------------- grid spots and tissue


class StubSlide:
    """The part of m2ort_fast.slide.Slide that grid_spots uses."""

    def __init__(self, thumbnail: np.ndarray, downsample: float, mpp: float | None, path="stub.svs"):
        self._thumbnail, self._downsample = thumbnail, downsample
        self.level_dimensions = [(int(thumbnail.shape[1] * downsample), int(thumbnail.shape[0] * downsample))]
        self.mpp, self.path = mpp, Path(path)

    def thumbnail(self, max_side_px: int):
        return self._thumbnail, self._downsample


def he_disc_thumbnail(height=400, width=500, centre=(250, 200), radius=150, seed=0) -> np.ndarray:
    """White glass with noise, a pink/purple tissue disc (with a pale hole) and dust specks."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(242, 4, (height, width, 3)), 0, 255)
    yy, xx = np.mgrid[:height, :width]
    disc = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 < radius**2
    image[disc] = np.clip(rng.normal((190, 110, 170), 20, (int(disc.sum()), 3)), 0, 255)
    hole = (xx - centre[0] - 40) ** 2 + (yy - centre[1]) ** 2 < 15**2  # a fat vacuole: inside the tissue
    image[hole] = 240
    for y, x in rng.integers(5, [height - 5, 60], (6, 2)):  # specks in the left margin, away from the disc
        image[y : y + 2, x : x + 2] = (120, 40, 120)
    return image.astype(np.uint8), disc


def test_tissue_mask_on_a_synthetic_disc():
    image, disc = he_disc_thumbnail()
    mask = tissue_mask(image)
    assert mask.dtype == bool and mask.shape == disc.shape
    assert (mask == disc).mean() > 0.995  # specks dropped, hole filled
    assert not mask[:, :60].any()


def test_tissue_mask_of_blank_glass_is_empty():
    glass = np.clip(np.random.default_rng(0).normal(240, 3, (200, 300, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()
    assert not tissue_mask(np.zeros((50, 50, 3), np.uint8)).any()  # black scanner padding


def test_tissue_mask_of_a_crop_that_is_tissue_throughout():
    """The demo slide (a crop inside a her2st section) shows no glass: all of it is tissue, and
    every spot of its spot table (the spots the authors kept under tissue) lies on the mask.
    Otsu alone splits pale stroma from nuclei there (a fifth of the crop was "tissue")."""
    from m2ort_fast.predict import DEMO_SLIDE, DEMO_SPOTS
    from m2ort_fast.slide import open_slide

    with open_slide(DEMO_SLIDE) as slide:
        thumbnail, downsample = slide.thumbnail(1600)
    mask = tissue_mask(thumbnail)
    assert mask.mean() > 0.95
    xy = (load_spots(DEMO_SPOTS).centers_px / downsample).astype(int)
    assert mask[xy[:, 1], xy[:, 0]].all()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("section", HER2ST_SECTIONS)
def test_tissue_mask_covers_the_her2st_spots(section):
    from PIL import Image

    folder = her2st_section(section)
    spots = load_spots(next(folder.glob("*_selection.tsv")))
    with Image.open(next(folder.glob("*.jpg"))) as image:
        width = image.size[0]
        image.draft("RGB", (image.size[0] // 8, image.size[1] // 8))  # JPEG decodes at 1/8 directly
        thumbnail = np.asarray(image.convert("RGB"))
    mask = tissue_mask(thumbnail)
    xy = (spots.centers_px / (width / thumbnail.shape[1])).astype(int)
    on_tissue = mask[xy[:, 1], xy[:, 0]]
    assert on_tissue.mean() > 0.95  # the selected spots are the ones under tissue
    assert 0.05 < mask.mean() < 0.5


def test_grid_spots_form_a_hexagonal_lattice_over_the_tissue():
    mpp, downsample, spacing_um = 0.5, 20.0, 100.0
    image, disc = he_disc_thumbnail()
    slide = StubSlide(image, downsample, mpp)

    spots = grid_spots(slide, spacing_um=spacing_um)

    assert spots.source == "grid" and spots.spot_diameter_um == 55 and spots.path is None
    disc_area_um2 = disc.sum() * (downsample * mpp) ** 2
    expected = disc_area_um2 / (spacing_um**2 * math.sqrt(3) / 2)
    assert len(spots) == pytest.approx(expected, rel=0.03)
    # Every spot's nearest neighbour is exactly one pitch away; inner spots have 6 such neighbours.
    pitch_px = spacing_um / mpp
    tree = cKDTree(spots.centers_px)
    nearest, _ = tree.query(spots.centers_px, k=2)
    np.testing.assert_allclose(nearest[:, 1], pitch_px, rtol=1e-9)
    neighbours = np.array([len(n) - 1 for n in tree.query_ball_point(spots.centers_px, pitch_px * 1.01)])
    assert neighbours.max() == 6 and (neighbours == 6).mean() > 0.8
    # All spots on the tissue disc (to within a thumbnail pixel).
    cx, cy, radius = 250 * downsample, 200 * downsample, 150 * downsample
    assert np.hypot(spots.centers_px[:, 0] - cx, spots.centers_px[:, 1] - cy).max() < radius + downsample
    # Visium array convention in the ids and columns.
    rows, cols = spots.columns["array_row"].to_numpy(), spots.columns["array_col"].to_numpy()
    assert ((rows + cols) % 2 == 0).all()
    assert spots.ids == [f"r{r}_c{c}" for r, c in zip(rows, cols, strict=True)] and len(set(spots.ids)) == len(spots)
    same_row = tree.query_pairs(pitch_px * 1.01, output_type="ndarray")
    same_row = same_row[rows[same_row[:, 0]] == rows[same_row[:, 1]]]
    assert (np.abs(cols[same_row[:, 0]] - cols[same_row[:, 1]]) == 2).all()


def test_grid_spots_with_a_given_mask_and_spacing():
    mask = np.zeros((100, 100), bool)
    mask[20:80, 30:70] = True  # 60 x 40 mask px of 10 px at 1 um/px: 600 x 400 um
    slide = StubSlide(np.zeros((100, 100, 3), np.uint8), 10.0, 1.0)  # an all-black thumbnail: not used
    spots = grid_spots(slide, spacing_um=50.0, mask=mask)
    assert len(spots) == pytest.approx(600 * 400 / (50**2 * math.sqrt(3) / 2), rel=0.1)
    x, y = spots.centers_px.T
    assert x.min() >= 300 and x.max() < 700 and y.min() >= 200 and y.max() < 800


def test_grid_spots_errors():
    glass = np.full((100, 120, 3), 245, np.uint8)
    with pytest.raises(SpotsError, match=r"stub.svs: no tissue found in stub.svs"):
        grid_spots(StubSlide(glass, 10.0, 0.5))
    image, _ = he_disc_thumbnail()
    with pytest.raises(SpotsError, match=r"stub.svs: no mpp: .* give it with --mpp / mpp=$"):
        grid_spots(StubSlide(image, 20.0, None))
    with pytest.raises(SpotsError, match=r"give it with mpp=$"):  # the API's message names its keyword
        grid_spots(StubSlide(image, 20.0, None), options=API_OPTIONS)
    with pytest.raises(SpotsError, match="no grid spot falls on the tissue"):
        grid_spots(StubSlide(image, 20.0, 0.5), spacing_um=50_000)


# ----------------------------------------------------------------------------- spots inside the slide


def test_check_spots_inside(tmp_path):
    path = tmp_path / "centres.csv"
    pd.DataFrame({"id": ["a", "b", "c", "d"], "x": [0, 99.5, 120, 5], "y": [0, 49.9, 10, 55]}).to_csv(path, index=False)
    spots = load_spots(path)
    check_spots_inside(spots, 200, 60, "slide.svs")  # all inside a larger slide
    with pytest.raises(SpotsError) as caught:
        check_spots_inside(spots, 100, 50, "slide.svs")
    message = str(caught.value)
    assert message.startswith(f"{path}: 2 of 4 spot centres lie outside the slide slide.svs (100 x 50 px)")
    assert "e.g. spot 'c' at (120, 10) px" in message


def test_spots_is_the_documented_dataclass():
    spots = Spots(
        ids=["a"],
        centers_px=np.zeros((1, 2)),
        source="csv",
        columns=pd.DataFrame(index=["a"]),
        mpp_from_pitch=None,
        spot_diameter_um=None,
        path=None,
    )
    assert len(spots) == 1
