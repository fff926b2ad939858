"""Slide reading: every reader against tifffile, reader choice, level choice by mpp, white edge
padding, flat images, pyramid vs resize on a real section, and bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from pyramids import LAYOUT_DOWNSAMPLES, TEST_MPP, tissue_pixels, write_test_pyramid
from readers import installed_readers, reader_installed

import m2ort_fast
from m2ort_fast.crop import best_level_for_mpp, read_spot_patches, resize_patches, resize_rgb
from m2ort_fast.errors import SlideError
from m2ort_fast.slide import _open as open_module
from m2ort_fast.slide import open_slide, require_mpp

PYRAMID_READERS = installed_readers("cucim", "tiffslide", "openslide")  # parameters, missing ones skipped
AUTO_READER = next(r for r in ("cucim", "tiffslide", "openslide") if reader_installed(r))  # open_slide's order


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("pyramids")
    return {layout: write_test_pyramid(folder / f"{layout}.tiff", layout) for layout in ("svs", "generic", "subifd")}


@pytest.fixture(scope="module")
def reference_levels(pyramids) -> dict:
    """tifffile's decode of every level of every layout: the independent reference."""
    out = {}
    for layout, path in pyramids.items():
        with tifffile.TiffFile(path) as tif:
            out[layout] = [level.asarray() for level in tif.series[0].levels]
    return out


def _top_left(centers_px: np.ndarray, downsample: float, size_px: int) -> np.ndarray:
    """Where a size_px square centred on level-0 centers_px starts, in pixels of a level."""
    return np.floor(centers_px / downsample - size_px / 2 + 0.5).astype(int)


def _crop(level_pixels: np.ndarray, x: int, y: int, size_px: int) -> np.ndarray:
    return level_pixels[y : y + size_px, x : x + size_px]


# -------------------------------------------------------------------------------------------
# Readers return the same pixels as tifffile


@pytest.mark.parametrize("layout", ["svs", "generic"])
@pytest.mark.parametrize("reader", PYRAMID_READERS)
def test_reader_matches_tifffile(pyramids, reference_levels, layout, reader):
    reference = reference_levels[layout]
    with open_slide(pyramids[layout], reader=reader) as slide:
        assert slide.reader_name == reader
        assert slide.level_count == len(LAYOUT_DOWNSAMPLES[layout]) == len(reference)
        assert slide.level_downsamples == pytest.approx(LAYOUT_DOWNSAMPLES[layout])
        assert slide.mpp == pytest.approx(TEST_MPP) and slide.mpp_source == "metadata"
        assert slide.vendor == ("aperio" if layout == "svs" else "generic-tiff")
        for level, expected in enumerate(reference):
            h, w = expected.shape[:2]
            assert slide.level_dimensions[level] == (w, h)
            np.testing.assert_array_equal(slide.read_region(0, 0, level, w, h), expected)
            # an interior window, placed in level-0 coordinates (OpenSlide's convention)
            ds = LAYOUT_DOWNSAMPLES[layout][level]
            x, y = w // 3, h // 5
            region = slide.read_region(x * ds, y * ds, level, w // 4 + 1, h // 4 + 3)
            np.testing.assert_array_equal(region, expected[y : y + h // 4 + 3, x : x + w // 4 + 1])


@pytest.mark.gpu
def test_cucim_decodes_on_the_gpu(pyramids, reference_levels, monkeypatch):
    """Where there is a GPU, cuCIM reads into GPU memory (nvJPEG) and the pixels match the CPU
    decode up to the decoders' rounding; no silent fall back to the CPU."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (cuCIM decodes on the GPU only there; its CPU reads are tested above)")
    if not reader_installed("cucim"):
        pytest.skip("cuCIM is not installed")
    monkeypatch.delenv("M2ORT_CUCIM_DEVICE", raising=False)
    centers = np.array([[300.0, 400.0], [1500.5, 900.5], [10.0, 2040.0]])
    with open_slide(pyramids["svs"], reader="cucim") as slide:
        assert slide._device == "cuda"
        (patches,) = read_spot_patches(slide, centers, (TEST_MPP,), (224,))
        assert slide._device == "cuda", "the GPU read failed and fell back to the CPU"
    reference = reference_levels["svs"][0]
    padded = np.pad(reference, ((224, 224), (224, 224), (0, 0)), constant_values=255)
    for patch, (x, y) in zip(patches, _top_left(centers, 1, 224), strict=True):
        expected = _crop(padded, x + 224, y + 224, 224)
        assert np.abs(patch.astype(np.int16) - expected).mean() < 1.5


def test_auto_picks_cucim_first_and_falls_back(pyramids, reference_levels, monkeypatch):
    with open_slide(pyramids["svs"]) as slide:
        assert slide.reader_name == AUTO_READER
    # SubIFD pyramids: cuCIM (and OpenSlide) see only level 0, so tiffslide is used
    with open_slide(pyramids["subifd"]) as slide:
        assert slide.reader_name == "tiffslide" and slide.level_count == 3
        for level, expected in enumerate(reference_levels["subifd"]):
            h, w = expected.shape[:2]
            np.testing.assert_array_equal(slide.read_region(0, 0, level, w, h), expected)

    def cucim_fails(path, **options):
        raise RuntimeError("simulated cuCIM failure")

    monkeypatch.setitem(open_module._OPENERS, "cucim", cucim_fails)
    with open_slide(pyramids["generic"]) as slide:
        assert slide.reader_name == "tiffslide"


def test_mpp_override_and_info(pyramids):
    with open_slide(pyramids["generic"], mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.mpp_source == "user"
        assert slide.level_mpp(2) == pytest.approx(1.0)
        info = slide.info()
        assert info["reader"] == AUTO_READER and info["mpp_source"] == "user"
        assert info["levels"][1] == (1024, 1024, 2.0, 0.5)


# -------------------------------------------------------------------------------------------
# The one TIFF parse on open, and the file's tile sizes


@pytest.mark.parametrize("reader", ["auto", *PYRAMID_READERS])
def test_a_tiff_is_parsed_once_on_open(pyramids, monkeypatch, reader):
    """open_slide parses a TIFF with tifffile once (truncation checks, metadata, tile sizes, the
    tile check's tables), whichever reader opens it and however many it tries; the reader
    library's own open (tiffslide's tifffile) aside."""
    package = str(Path(m2ort_fast.__file__).parent)
    parses = []
    original = tifffile.TiffFile.__init__

    def counting(self, *args, **kwargs):
        if sys._getframe(1).f_code.co_filename.startswith(package):
            parses.append(args[0] if args else kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffFile, "__init__", counting)
    for layout in ("svs", "subifd"):  # subifd: auto tries cuCIM first, then tiffslide
        parses.clear()
        with open_slide(pyramids[layout], reader=reader) as slide:
            assert len(slide.level_tile_sizes_px) == slide.level_count
            slide.read_region(0, 0, 0, 300, 300)  # the tile check reads with the parsed tables
        assert len(parses) == 1, parses


@pytest.mark.parametrize("reader", PYRAMID_READERS)
def test_level_tile_sizes_are_the_files(tmp_path, reader):
    path = write_test_pyramid(tmp_path / "tiles.tiff", "generic", size_px=1024, tile_px=128)
    with open_slide(path, reader=reader) as slide:
        assert slide.level_tile_sizes_px == ((128, 128),) * 3
    # a stripped TIFF's "tile" is a full-width strip of RowsPerStrip rows
    stripped = tmp_path / "stripped.tiff"
    tifffile.imwrite(
        stripped, tissue_pixels(300, real=False), rowsperstrip=64, resolution=(2e4, 2e4), resolutionunit="CENTIMETER"
    )
    with open_slide(stripped) as slide:
        assert slide.level_tile_sizes_px == ((300, 64),)


def test_flat_images_tile_on_the_default_grid(tmp_path):
    path = tmp_path / "section.png"
    Image.fromarray(tissue_pixels(300, real=False)).save(path)
    with open_slide(path) as slide:
        assert slide.level_tile_sizes_px == ((256, 256),)


# -------------------------------------------------------------------------------------------
# Level choice by physical resolution


def test_best_level_for_mpp(pyramids):
    with open_slide(pyramids["svs"]) as slide:  # levels at 0.5, 2.0, 8.0 um/px
        assert [best_level_for_mpp(slide, m) for m in (0.25, 0.5, 1.0, 1.99, 2.0, 4.0, 8.0, 100.0)] == [
            0,
            0,
            0,
            1,
            1,
            1,
            2,
            2,
        ]
    with open_slide(pyramids["generic"]) as slide:  # 0.5, 1.0, 2.0
        assert [best_level_for_mpp(slide, m) for m in (0.5, 0.995, 1.0, 1.5, 2.0, 3.0)] == [0, 1, 1, 1, 2, 2]


def _spot_centers(size_px: int, n: int = 12, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(300, size_px - 300, (n, 2)).round(1)


def test_levels_read_from_the_pyramid_by_mpp(pyramids, reference_levels):
    """Inputs at 0.5/1/2 um/px. SVS (1,4,16 -> 0.5, 2, 8 um/px): the 1 um/px input has no level,
    so level 0 is read (224 px) and resized; the 2 um/px one is level 1 read directly.
    Generic (1,2,4): all three are read directly from levels 0, 1, 2."""
    centers = _spot_centers(2048)
    level_mpp = (TEST_MPP, 2 * TEST_MPP, 4 * TEST_MPP)
    for layout in ("svs", "generic"):
        ref = reference_levels[layout]
        with open_slide(pyramids[layout]) as slide:
            l1, l2, l3 = read_spot_patches(slide, centers, level_mpp)
        assert (l1.shape, l2.shape, l3.shape) == ((12, 224, 224, 3), (12, 112, 112, 3), (12, 56, 56, 3))
        for i, center in enumerate(centers):
            x, y = _top_left(center, 1, 224)
            np.testing.assert_array_equal(l1[i], _crop(ref[0], x, y, 224))
            if layout == "svs":
                np.testing.assert_array_equal(l2[i], resize_rgb(_crop(ref[0], x, y, 224), 112, 112))
                x3, y3 = _top_left(center, 4, 56)
                np.testing.assert_array_equal(l3[i], _crop(ref[1], x3, y3, 56))
            else:
                x2, y2 = _top_left(center, 2, 112)
                np.testing.assert_array_equal(l2[i], _crop(ref[1], x2, y2, 112))
                x3, y3 = _top_left(center, 4, 56)
                np.testing.assert_array_equal(l3[i], _crop(ref[2], x3, y3, 56))


def test_resize_level_source_is_the_preview_codes_way(pyramids, reference_levels):
    centers = _spot_centers(2048, n=5)
    with open_slide(pyramids["generic"]) as slide:
        l1, l2, l3 = read_spot_patches(slide, centers, (0.5, 1.0, 2.0), level_source="resize")
    for i, center in enumerate(centers):
        x, y = _top_left(center, 1, 224)
        crop = _crop(reference_levels["generic"][0], x, y, 224)
        np.testing.assert_array_equal(l1[i], crop)
        np.testing.assert_array_equal(l2[i], resize_rgb(crop, 112, 112))
        np.testing.assert_array_equal(l3[i], resize_rgb(crop, 56, 56))


def test_coarser_slide_than_model_is_upsampled(pyramids):
    """A model at 0.25 um/px on a 0.5 um/px slide: 112 px of level 0 resized up to 224."""
    with open_slide(pyramids["generic"]) as slide:
        (l1,) = read_spot_patches(slide, np.array([[1000.0, 1000.0]]), (0.25,), (224,))
        expected = resize_rgb(slide.read_level_region(0, 944, 944, 112, 112), 224, 224)
    np.testing.assert_array_equal(l1[0], expected)


# -------------------------------------------------------------------------------------------
# Edges


@pytest.mark.parametrize("reader", PYRAMID_READERS)
def test_edge_spots_are_padded_white(pyramids, reference_levels, reader):
    ref = reference_levels["generic"]
    centers = np.array([[10.0, 20.0], [2040.0, 1000.0], [1000.0, 2047.0], [-200.0, -200.0]])
    with open_slide(pyramids["generic"], reader=reader) as slide:
        l1, l2, l3 = read_spot_patches(slide, centers, (0.5, 1.0, 2.0))
    # spot 0: top-left (-102, -92): outside rows/columns white, the rest is the slide
    assert (l1[0, :92] == 255).all() and (l1[0, :, :102] == 255).all()
    np.testing.assert_array_equal(l1[0, 92:, 102:], ref[0][:132, :122])
    # spot 1: right edge; level 2 (1 um/px, read from level 1 of 1024 px): x from 964, 60 px inside
    assert (l1[1, :, 2048 - 1928 :] == 255).all()
    np.testing.assert_array_equal(l1[1, :, :120], ref[0][888:1112, 1928:2048])
    assert (l2[1, :, 60:] == 255).all()
    np.testing.assert_array_equal(l2[1, :, :60], ref[1][444:556, 964:1024])
    # spot 2: bottom edge at level 3 (2 um/px, 512 px): rows from 484, 28 inside
    assert (l3[2, 28:] == 255).all()
    np.testing.assert_array_equal(l3[2, :28], ref[2][484:512, 222:278])
    # spot 3: wholly outside
    assert (l1[3] == 255).all() and (l3[3] == 255).all()


def test_read_region_outside_is_white(pyramids, reference_levels):
    with open_slide(pyramids["svs"]) as slide:
        region = slide.read_region(-40, 2000, 0, 100, 100)
    assert (region[:, :40] == 255).all() and (region[48:] == 255).all()
    np.testing.assert_array_equal(region[:48, 40:], reference_levels["svs"][0][2000:, :60])


# -------------------------------------------------------------------------------------------
# Flat images


def test_flat_jpeg_equals_pil(tmp_path):
    path = tmp_path / "section.jpg"
    Image.fromarray(tissue_pixels(1024)).save(path, quality=90)
    expected = np.asarray(Image.open(path).convert("RGB"))
    with open_slide(path) as slide:
        assert (slide.reader_name, slide.vendor, slide.level_count) == ("flat", "jpeg", 1)
        assert slide.mpp is None and slide.mpp_source == "none"
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 1024, 1024), expected)
        slide.set_mpp(0.5, "spot-table")
        centers = np.array([[300.5, 400.2], [5.0, 1020.0]])
        l1, l2, _ = read_spot_patches(slide, centers, (0.5, 1.0, 2.0))
        thumbnail, downsample = slide.thumbnail(256)
    np.testing.assert_array_equal(l1[0], expected[288:512, 189:413])
    # flat: one level, so level 2 is the same 224 px crop resized
    np.testing.assert_array_equal(l2[0], resize_rgb(expected[288:512, 189:413], 112, 112))
    assert (l1[1, :, :107] == 255).all() and (l1[1, 116:] == 255).all()
    np.testing.assert_array_equal(l1[1, :116, 107:], expected[908:, :117])
    assert thumbnail.shape == (256, 256, 3) and downsample == 4.0
    box_mean = expected.reshape(256, 4, 256, 4, 3).mean(axis=(1, 3))  # a 4x box-reduction
    assert np.abs(thumbnail - box_mean).max() <= 0.5 + 1e-9


def test_flat_png_with_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((64, 80, 4), np.uint8)
    rgba[..., :3] = (200, 40, 90)
    rgba[:, 40:, 3] = 255  # left half transparent
    path = tmp_path / "image.png"
    Image.fromarray(rgba).save(path)
    with open_slide(path) as slide:
        assert slide.vendor == "png" and slide.level_dimensions == [(80, 64)]
        pixels = slide.read_region(0, 0, 0, 80, 64)
    assert (pixels[:, :40] == 255).all() and (pixels[:, 40:] == (200, 40, 90)).all()


def test_thumbnail_of_pyramid(pyramids, reference_levels):
    with open_slide(pyramids["svs"]) as slide:
        thumbnail, downsample = slide.thumbnail(512)
    assert thumbnail.shape == (512, 512, 3) and downsample == 4.0
    np.testing.assert_array_equal(thumbnail, reference_levels["svs"][1])  # level 1 is exactly 512 px


# -------------------------------------------------------------------------------------------
# Real section: pyramid levels vs resized level 1


@pytest.mark.parametrize("reader", installed_readers("cucim", "flat"))
def test_real_section_spots_same_in_jpeg_and_pyramid(her2st_c2_pyramids, reader):
    """Level-1 patches of the converted section equal the JPEG's up to JPEG re-encoding."""
    data = her2st_c2_pyramids
    path = data["jpeg"] if reader == "flat" else data["generic"]
    centers = data["centers_px"][:40]
    with open_slide(path, mpp=data["mpp"]) as slide:
        assert slide.reader_name == reader
        (l1,) = read_spot_patches(slide, centers, (data["mpp"],), (224,))
    assert l1.shape == (40, 224, 224, 3)
    tissue_fraction = (l1.mean(axis=3) < 200).mean()
    assert tissue_fraction > 0.5, f"spots should lie on tissue, got {tissue_fraction:.2f}"


def test_pyramid_vs_resize_on_real_section(her2st_c2_pyramids):
    """How much reading levels 2 and 3 from the pyramid changes the model's inputs, against
    resizing level 1 (the preview code's way), on the real C2 section at its own resolution.
    Mean absolute difference per level, 0-255 units."""
    data = her2st_c2_pyramids
    level_mpp = (data["mpp"], 2 * data["mpp"], 4 * data["mpp"])
    n = len(data["centers_px"])

    def mad(a, b) -> list[float]:
        return [float(np.abs(x.astype(np.int16) - y).mean()) for x, y in zip(a, b, strict=True)]

    def line(diffs) -> str:
        return ", ".join(f"level {i + 1} {d:.2f}" for i, d in enumerate(diffs))

    print(f"\nC2, {n} spots at {data['mpp']:.4f} um/px: mean |difference| per level, 0-255 units")
    same_file, vs_preview = {}, {}
    for layout in ("generic", "svs"):
        with open_slide(data[layout]) as slide:
            assert slide.mpp == pytest.approx(data["mpp"])
            from_pyramid = read_spot_patches(slide, data["centers_px"], level_mpp, level_source="pyramid")
            from_resize = read_spot_patches(slide, data["centers_px"], level_mpp, level_source="resize")
        same_file[layout] = mad(from_pyramid, from_resize)
        vs_preview[layout] = mad(from_pyramid, data["preview_patches"])
        print(f"  {layout:>7} pyramid, pyramid vs resize levels: {line(same_file[layout])}")
        print(
            f"  {layout:>7} pyramid vs the original JPEG read the preview way: {line(vs_preview[layout])}"
            f" (resize-mode vs JPEG: {line(mad(from_resize, data['preview_patches']))})"
        )
    generic, svs = same_file["generic"], same_file["svs"]
    assert generic[0] == 0 and svs[0] == 0  # level 1 is the same read both ways
    # 1,2,4 pyramid: levels 2 and 3 come from pyramid levels 1 and 2 (own JPEG tiles, pixel grid)
    assert 0 < generic[1] < 12 and 0 < generic[2] < 12
    assert svs[1] == 0  # no 2x level in 1,4,16: level 0 is read and resized, as the preview does
    assert 0 < svs[2] < 12  # the 4x level exists
    # against the original JPEG, the pyramid's re-encoded tiles add a little more, not much more
    for diffs in vs_preview.values():
        assert all(0 < d < 15 for d in diffs)


# -------------------------------------------------------------------------------------------
# Bad input: one line, naming the file


def _assert_one_line_naming(exc_info, path, *fragments):
    message = str(exc_info.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_not_a_slide(tmp_path):
    for name, content in (
        ("spots.csv", b"x,y\n1,2\n3,4\n"),
        ("notes.txt", b"hello, this is not a slide\n"),
        ("fake.svs", b"not really an svs\n" * 20),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(SlideError) as exc_info:
            open_slide(path)
        _assert_one_line_naming(exc_info, path, "not a slide")


def test_nonexistent_and_directory(tmp_path):
    with pytest.raises(SlideError) as exc_info:
        open_slide(tmp_path / "missing.svs")
    _assert_one_line_naming(exc_info, tmp_path / "missing.svs", "no such file")
    with pytest.raises(SlideError) as exc_info:
        open_slide(tmp_path)
    _assert_one_line_naming(exc_info, tmp_path, "directory")


def test_truncated_tiff(pyramids, tmp_path):
    data = pyramids["svs"].read_bytes()
    path = tmp_path / "half.svs"
    path.write_bytes(data[: len(data) // 2])
    for reader in ("auto", *[r for r in ("cucim", "tiffslide", "openslide") if reader_installed(r)]):
        with pytest.raises(SlideError) as exc_info:
            open_slide(path, reader=reader)
        _assert_one_line_naming(exc_info, path, "truncated")


def test_truncated_jpeg(tmp_path):
    full = tmp_path / "full.jpg"
    Image.fromarray(tissue_pixels(1024)).save(full, quality=90)
    path = tmp_path / "half.jpg"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(SlideError) as exc_info:
        open_slide(path)
    _assert_one_line_naming(exc_info, path, "truncated")


def test_no_mpp_only_when_needed(tmp_path):
    path = tmp_path / "section.jpg"
    Image.fromarray(tissue_pixels(512)).save(path)
    with open_slide(path) as slide:
        slide.read_region(0, 0, 0, 10, 10)  # reading pixels needs no mpp
        for needs_mpp in (
            lambda: require_mpp(slide),
            lambda: slide.level_mpp(0),
            lambda: read_spot_patches(slide, np.array([[100.0, 100.0]]), (0.5, 1.0, 2.0)),
        ):
            with pytest.raises(SlideError) as exc_info:
                needs_mpp()
            _assert_one_line_naming(exc_info, path, "no mpp metadata; pass --mpp")


def test_missing_and_unreadable_level(pyramids, tmp_path):
    with open_slide(pyramids["svs"]) as slide:
        with pytest.raises(SlideError) as exc_info:
            slide.read_region(0, 0, 3, 10, 10)
        _assert_one_line_naming(exc_info, pyramids["svs"], "no level 3")
    # Damage level 1's tiles: every reader says so in one line, before decoding (the tile check;
    # cuCIM alone would print libjpeg's errors and return made-up pixels), and the readers that
    # report decode errors themselves still do when the check is off.
    data = bytearray(pyramids["svs"].read_bytes())
    with tifffile.TiffFile(pyramids["svs"]) as tif:
        page = tif.series[0].levels[1].keyframe
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
            data[offset : offset + count] = bytes(count)
    path = tmp_path / "damaged.svs"
    path.write_bytes(bytes(data))
    for reader in [r for r in ("cucim", "tiffslide", "openslide") if reader_installed(r)]:
        with open_slide(path, reader=reader) as slide:
            assert slide.read_region(0, 0, 0, 64, 64).shape == (64, 64, 3)  # level 0 is intact
            with pytest.raises(SlideError) as exc_info:
                slide.read_region(0, 0, 1, 64, 64)
            _assert_one_line_naming(exc_info, path, "corrupt JPEG data in level 1, tile 0")
    for reader in ("tiffslide", "openslide"):
        with open_slide(path, reader=reader, verify_tiles=False) as slide:
            with pytest.raises(SlideError) as exc_info:
                slide.read_region(0, 0, 1, 64, 64)
            _assert_one_line_naming(exc_info, path, "cannot read level 1")


def test_bad_reader_name(pyramids):
    with pytest.raises(SlideError) as exc_info:
        open_slide(pyramids["svs"], reader="vips")
    _assert_one_line_naming(exc_info, pyramids["svs"], "unknown reader")


def test_resize_patches_is_resize_rgb():
    patches = np.stack([tissue_pixels(224, real=False), 255 - tissue_pixels(224, real=False)])
    resized = resize_patches(patches, 56)
    assert resized.shape == (2, 56, 56, 3)
    np.testing.assert_array_equal(resized[1], resize_rgb(patches[1], 56, 56))
    # antialiased: the mean colour survives a 4x reduction
    assert np.abs(resized.mean(axis=(1, 2)) - patches.mean(axis=(1, 2))).max() < 2
