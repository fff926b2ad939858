"""`m2ort-fast convert`: flat image -> tiled pyramidal TIFF that cuCIM, OpenSlide and tiffslide read."""

from __future__ import annotations

import argparse
import logging
import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image
from pyramids import assert_within_jpeg_error, tissue_pixels
from readers import reader_installed

from m2ort_fast.convert import add_subcommands, convert_to_pyramid, pyramid_downsamples, write_pyramid
from m2ort_fast.crop import resize_rgb
from m2ort_fast.errors import M2ORTError, SlideError
from m2ort_fast.slide import open_slide

# The readers of pyramidal TIFFs installed here (cuCIM is optional).
PYRAMID_READERS = tuple(r for r in ("cucim", "openslide", "tiffslide") if reader_installed(r))
AUTO_READER = next(r for r in ("cucim", "tiffslide", "openslide") if reader_installed(r))  # open_slide's order


@pytest.mark.parametrize(
    "layout, vendor, downsamples", [("svs", "aperio", [1, 4, 16]), ("generic", "generic-tiff", [1, 2, 4, 8])]
)
def test_write_pyramid_readable_everywhere(tmp_path, layout, vendor, downsamples):
    image = tissue_pixels(1000)  # not a multiple of the tile size: partial edge tiles
    path = write_pyramid(image, tmp_path / f"out.{layout}.tiff", mpp=0.5, layout=layout, tile_px=128, quality=90)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].keyframe
        assert page.is_tiled and page.tilewidth == 128 and page.compression == 7  # JPEG
        reference = [level.asarray() for level in tif.series[0].levels]
    assert_within_jpeg_error(reference[0], image, quality=90)
    expected_level1 = resize_rgb(image, 1000 // downsamples[1], 1000 // downsamples[1], exact_factor=downsamples[1])
    assert_within_jpeg_error(reference[1], expected_level1, quality=90)
    for reader in PYRAMID_READERS:
        with open_slide(path, reader=reader) as slide:
            assert slide.vendor == vendor, reader
            assert slide.level_downsamples == downsamples, reader
            assert slide.mpp == pytest.approx(0.5) and slide.mpp_source == "metadata", reader
            for level, expected in enumerate(reference):
                h, w = expected.shape[:2]
                np.testing.assert_array_equal(slide.read_region(0, 0, level, w, h), expected, err_msg=reader)


def test_pyramid_downsamples():
    assert pyramid_downsamples(9274, 9911, tile_px=256, layout="svs") == [1, 4, 16, 64]
    assert pyramid_downsamples(9274, 9911, tile_px=256, layout="generic") == [1, 2, 4, 8, 16, 32, 64]
    assert pyramid_downsamples(200, 100, tile_px=256) == [1]


def test_convert_flat_jpeg_with_and_without_mpp(tmp_path, caplog):
    src = tmp_path / "section.jpg"
    Image.fromarray(tissue_pixels(600)).save(src, quality=95)
    decoded = np.asarray(Image.open(src).convert("RGB"))

    out = convert_to_pyramid(src, tmp_path / "with_mpp.tiff", mpp=0.69)
    with open_slide(out) as slide:
        assert (slide.reader_name, slide.vendor, slide.mpp) == (AUTO_READER, "aperio", pytest.approx(0.69))
        assert_within_jpeg_error(slide.read_region(0, 0, 0, 600, 600), decoded, quality=90)

    with caplog.at_level(logging.WARNING, logger="m2ort_fast.convert"):
        out = convert_to_pyramid(src, tmp_path / "no_mpp.tiff", layout="generic")
    assert "no mpp" in caplog.text
    with open_slide(out) as slide:
        assert slide.mpp is None and slide.mpp_source == "none" and slide.vendor == "generic-tiff"


def test_convert_keeps_the_source_mpp(tmp_path):
    src = write_pyramid(tissue_pixels(512), tmp_path / "src.tiff", mpp=0.25, layout="generic")
    out = convert_to_pyramid(src, tmp_path / "out.svs", layout="svs")
    with open_slide(out) as slide:
        assert slide.vendor == "aperio" and slide.mpp == pytest.approx(0.25)


def test_convert_cli(tmp_path, capsys):
    src = tmp_path / "image.png"
    Image.fromarray(tissue_pixels(300)).save(src)
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command"))
    dst = tmp_path / "image.tiff"
    args = parser.parse_args(
        ["convert", str(src), str(dst), "--mpp", "0.5", "--tile-px", "64", "--quality", "80", "--layout", "generic"]
    )
    assert args.func(args) == 0
    assert "image.tiff: 4 levels" in capsys.readouterr().out
    with open_slide(dst, reader="openslide") as slide:
        assert slide.level_dimensions == [(300, 300), (150, 150), (75, 75), (37, 37)]
        assert slide.mpp == pytest.approx(0.5)


def test_convert_bad_input(tmp_path):
    text = tmp_path / "notes.csv"
    text.write_text("a,b\n1,2\n")
    with pytest.raises(SlideError, match="notes.csv"):
        convert_to_pyramid(text, tmp_path / "out.tiff")
    src = tmp_path / "image.png"
    Image.fromarray(tissue_pixels(64, real=False)).save(src)
    with pytest.raises(M2ORTError, match=r"out\.png.*must end in \.tiff"):
        convert_to_pyramid(src, tmp_path / "out.png")
    with pytest.raises(M2ORTError, match="output folder does not exist"):
        convert_to_pyramid(src, tmp_path / "missing" / "out.tiff")
    with pytest.raises(M2ORTError, match="quality"):
        convert_to_pyramid(src, tmp_path / "out.tiff", quality=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "notes.csv"]


def test_real_section_converted_reads_in_cucim_and_openslide(her2st_c2_pyramids):
    """The real C2 JPEG (no mpp of its own) as pyramids, at the spot-table mpp."""
    data = her2st_c2_pyramids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a ~92 Mpx real section
        with Image.open(data["jpeg"]) as jpeg:
            width_px, height_px = jpeg.size
    for layout, vendor in (("svs", "aperio"), ("generic", "generic-tiff")):
        for reader in [r for r in ("cucim", "openslide") if r in PYRAMID_READERS]:
            with open_slide(data[layout], reader=reader) as slide:
                assert slide.vendor == vendor
                assert slide.level_dimensions[0] == (width_px, height_px)
                assert slide.level_count >= 4
                assert slide.mpp == pytest.approx(data["mpp"], rel=1e-5)
                assert 0.6 < slide.mpp < 0.8  # legacy ST: ~290 px per 200 um step
                x, y = np.floor(data["centers_px"][0] - 112 + 0.5).astype(int)
                patch = slide.read_region(x, y, 0, 224, 224)
                preview = data["preview_patches"][0][0]
                assert_within_jpeg_error(patch, preview, quality=90)  # the same spot, up to JPEG re-encoding
