"""The command line: info, predict, convert, and one-line errors for every kind of bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from pyramids import write_test_pyramid
from real_data import her2st_section

from m2ort_fast.checkpoint import ModelCard, save_checkpoint
from m2ort_fast.cli import main
from m2ort_fast.model import build_model
from m2ort_fast.predict import DEMO_SLIDE, DEMO_SPOTS


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("m2ort-fast: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]


def test_info_model_prints_params_and_flops(capsys):
    code, out, _ = run_cli(capsys, "info", "--model", "small")
    assert code == 0
    assert "7,620,874" in out and "3.42 GFLOPs/spot" in out


def test_info_slide_lists_levels(capsys, tmp_path):
    path = write_test_pyramid(tmp_path / "s.svs", layout="svs", size_px=1024, mpp=0.25)
    code, out, _ = run_cli(capsys, "info", path)
    assert code == 0
    assert "level 0" in out and "level 1" in out and "0.25" in out


def test_console_script_runs_the_demo(tmp_path):
    exe = shutil.which("m2ort-fast")
    if exe is None:
        pytest.skip("the m2ort-fast console script is not on PATH (package not pip-installed)")
    proc = subprocess.run(
        [exe, "predict", "--quiet", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "demo_slide.h5ad").is_file()


def test_convert_then_predict(capsys, tmp_path):
    section = her2st_section("C5")
    image = next(section.glob("*.jpg"))
    table = next(section.glob("*_selection.tsv"))
    # Without an mpp the flat JPEG can still be predicted: the spot table's pitch gives it.
    code, out, err = run_cli(
        capsys, "predict", image, "--spots", table, "--out", tmp_path, "--quiet", "--heatmaps", "0"
    )
    assert code == 0, err
    assert "spot-table" in out
    code, _, err = run_cli(capsys, "convert", image, tmp_path / "c5.tiff", "--mpp", "0.6885")
    assert code == 0, err
    code, out, err = run_cli(
        capsys, "predict", tmp_path / "c5.tiff", "--spots", table, "--out", tmp_path / "p", "--quiet", "--heatmaps", "0"
    )
    assert code == 0, err
    assert "(metadata)" in out


# ---- bad input: one line naming the file and the problem -------------------------------------


def test_not_a_slide(capsys, tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("hello, I am text\n" * 100)
    code, _, err = run_cli(capsys, "predict", path, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, path)


def test_truncated_slide(capsys, tmp_path):
    whole = write_test_pyramid(tmp_path / "whole.svs", layout="svs", size_px=1024)
    data = whole.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "predict", cut, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, cut)
    assert not (tmp_path / "o" / "cut.h5ad").exists()


def test_no_mpp_asks_for_mpp(capsys, tmp_path):
    path = write_test_pyramid(tmp_path / "nompp.tiff", layout="generic", size_px=1024, mpp=None)
    code, _, err = run_cli(capsys, "predict", path, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, path, "--mpp")
    code, _, err = run_cli(
        capsys, "predict", path, "--mpp", "0.5", "--out", tmp_path / "o", "--quiet", "--heatmaps", "0"
    )
    assert code == 0, err


def test_spots_outside_the_slide(capsys, tmp_path):
    spots = tmp_path / "far.csv"
    spots.write_text("id,x,y\na,100,100\nb,50000,50000\n")
    code, _, err = run_cli(capsys, "predict", DEMO_SLIDE, "--spots", spots, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, spots, "outside")


def test_spots_off_the_tissue(capsys, tmp_path):
    # a spot table of the right size but for another slide: all its spots on the blank glass
    path = tmp_path / "blank_with_spot.tiff"
    from m2ort_fast.convert import write_pyramid

    image = np.full((1024, 1024, 3), 250, np.uint8)
    image[:200, :200] = (200, 120, 170)
    write_pyramid(image, path, mpp=0.5, layout="generic")
    spots = tmp_path / "spots.csv"
    spots.write_text("id,x,y\n" + "".join(f"s{i},{600 + 30 * i},{700}\n" for i in range(10)))
    code, _, err = run_cli(capsys, "predict", path, "--spots", spots, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, spots, "tissue")


def test_empty_tissue(capsys, tmp_path):
    from m2ort_fast.convert import write_pyramid

    path = write_pyramid(np.full((1024, 1024, 3), 248, np.uint8), tmp_path / "blank.tiff", mpp=0.5, layout="generic")
    code, _, err = run_cli(capsys, "predict", path, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, path, "tissue")


def test_checkpoint_for_another_gene_panel_or_broken(capsys, tmp_path):
    other = tmp_path / "other.safetensors"
    save_checkpoint(
        other, build_model("tiny", n_genes=3, seed=0), ModelCard.for_variant("tiny", ["A", "B", "C"], mpp=0.69)
    )
    code, _, err = run_cli(
        capsys, "predict", "--checkpoint", other, "--genes", "ERBB2", "--out", tmp_path / "o", "--quiet"
    )
    assert_one_line_error(code, err, "ERBB2", "panel")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    code, _, err = run_cli(capsys, "predict", "--checkpoint", broken, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, broken)


def test_missing_slide_and_unknown_backend(capsys, tmp_path):
    code, _, err = run_cli(capsys, "predict", tmp_path / "nope.svs", "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, "nope.svs")
    code, _, err = run_cli(
        capsys,
        "predict",
        DEMO_SLIDE,
        "--spots",
        DEMO_SPOTS,
        "--backend",
        "warp-drive",
        "--out",
        tmp_path / "o",
        "--quiet",
    )
    assert_one_line_error(code, err, "warp-drive")


def test_python_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "m2ort_fast.cli", "info", "--model", "tiny"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "tiny" in proc.stdout
