"""Issue 24: bounds checked before work (batch memory, flat-image decoding, evaluate's inputs) and
the one line when --mpp disagrees with the slide or the spots. Each case failed before."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from PIL import Image

import m2ort_fast.slide._flat as flat_module
from m2ort_fast.bounds import (
    API_OPTIONS,
    CLI_OPTIONS,
    BoundsError,
    fit_batch_size,
    input_bytes_per_spot,
    model_activation_bytes_per_spot,
)
from m2ort_fast.errors import M2ORTError, OutputError, SlideError
from m2ort_fast.model import get_config
from m2ort_fast.scale import ScaleError, resolve_mpp

# ----------------------------------------------------------------------------- batch memory


def tiny_costs():
    return input_bytes_per_spot((224, 112, 56)), model_activation_bytes_per_spot(get_config("tiny"))


def test_per_spot_costs_of_the_tiny_model():
    input_bytes, activation_bytes = tiny_costs()
    assert input_bytes == 3 * (224**2 + 112**2 + 56**2) * 4  # float32 RGB at three levels: 0.79 MB
    # measured: 1.85 MB a spot at the peak (the issue: 20.4 GB at batch 10,000); the estimate is above it
    assert 1.85e6 < activation_bytes < 4e6
    fused = model_activation_bytes_per_spot(get_config("tiny"), fused_attention=True)
    assert fused < activation_bytes


def test_batch_size_is_capped_at_the_spot_count():
    """Before: --batch-size 10000 on the 65-spot demo ran into the OOM killer (20.4 GB, exit 137)."""
    input_bytes, activation_bytes = tiny_costs()
    for asked in (10_000, 100_000_000):
        assert fit_batch_size(asked, 65, input_bytes=input_bytes, activation_bytes=activation_bytes,
                              limit_bytes=1024 * 2**20) == 65  # fmt: skip


def test_batch_over_the_memory_bound_is_one_line_naming_the_options():
    """Before: a RuntimeError traceback asking for 60 TB (--batch-size 100000000)."""
    input_bytes, activation_bytes = tiny_costs()
    limit = 2048 * 2**20  # a cap of our own, not the machine's
    with pytest.raises(BoundsError) as e:
        fit_batch_size(100_000_000, 10**9, input_bytes=input_bytes, activation_bytes=activation_bytes,
                       limit_bytes=limit, options=CLI_OPTIONS)  # fmt: skip
    message = str(e.value)
    assert "\n" not in message and isinstance(e.value, M2ORTError)
    assert message.startswith("--batch-size 100000000 needs about 3") and "TB" in message
    assert "over the memory bound of 2 GB (--max-memory-mb)" in message
    fits = int(limit // (input_bytes + activation_bytes))
    assert message.endswith(f"use --batch-size {fits} or less")
    assert fit_batch_size(fits, 10**6, input_bytes=input_bytes, activation_bytes=activation_bytes,
                          limit_bytes=limit) == fits  # fmt: skip
    with pytest.raises(BoundsError, match=r"^batch_size= 10000 .*\(--max-gpu-memory-mb\); use batch_size= "):
        fit_batch_size(10_000, 10**6, input_bytes=input_bytes, activation_bytes=activation_bytes,
                       limit_bytes=limit, limit_option="--max-gpu-memory-mb", options=API_OPTIONS)  # fmt: skip
    with pytest.raises(BoundsError, match="must be at least 1"):
        fit_batch_size(0, 10, input_bytes=1, activation_bytes=1, limit_bytes=10)


# ----------------------------------------------------------------------------- flat image decoding


def test_jpeg_header_claiming_30000_px_is_refused_before_a_full_size_buffer(tmp_path, monkeypatch):
    """Before: with --max-memory-mb 20000 the strict check decoded into a 2.7 GB buffer (3.0 GB
    peak, 17 s) before "premature end of data"; now a 1/8-scale decode (17 MB) refuses it."""
    monkeypatch.setattr(flat_module, "available_memory_bytes", lambda: 64 * 2**30)
    monkeypatch.setattr(flat_module, "verify_jpeg", lambda *a: pytest.fail("the full-size check ran"))
    rng = np.random.default_rng(0)
    small = tmp_path / "small.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(small, quality=90)
    data = bytearray(small.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(bytes(data[:632]))
    started = time.perf_counter()
    with pytest.raises(SlideError, match=r"bomb.jpg: corrupt JPEG data .* does not hold the 30000x30000 px"):
        flat_module.FlatSlide(bomb, max_decoded_mb=20000)
    assert time.perf_counter() - started < 5


def test_a_whole_jpeg_still_decodes(tmp_path):
    path = tmp_path / "ok.jpg"
    pixels = np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    slide = flat_module.FlatSlide(path, max_decoded_mb=10)
    assert slide.level_dimensions[0] == (48, 40)


# ----------------------------------------------------------------------------- evaluate's inputs


def test_evaluate_checks_its_inputs_before_loading_anything(tmp_path, monkeypatch):
    """Before: 19 s and 1.3 GB on the training sections before "no such sample folder"."""
    from m2ort_fast import checkpoint, evaluate

    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("loaded the checkpoint"))
    missing = tmp_path / "nope"
    with pytest.raises(M2ORTError, match=r"nope: no such sample folder"):
        evaluate.evaluate_sections("model.safetensors", [missing], out_dir=tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(M2ORTError, match=r"empty: not a sample folder"):
        evaluate.evaluate_sections("model.safetensors", [empty])
    with pytest.raises(M2ORTError, match=r"empty: not a sample folder"):
        evaluate.evaluate_sections("model.safetensors", [], baseline_sections=[empty])
    with pytest.raises(M2ORTError, match=r"sections= takes a list of section folders"):
        evaluate.evaluate_sections("model.safetensors", str(empty))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"out: cannot make the output folder: .*file is not a folder"):
        evaluate.check_inputs([], None, tmp_path / "file" / "out")
    assert not (tmp_path / "out").exists()


def test_evaluate_cli_on_a_missing_section_is_one_line(tmp_path, capfd):
    from m2ort_fast.cli import main
    from m2ort_fast.predict import DEFAULT_CHECKPOINT

    started = time.perf_counter()
    args = [
        "evaluate",
        str(tmp_path / "missing"),
        "--checkpoint",
        str(DEFAULT_CHECKPOINT),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    err = capfd.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing: no such sample folder" in err
    assert time.perf_counter() - started < 10


# ----------------------------------------------------------------------------- --mpp against the others


def test_user_mpp_disagreeing_with_the_spots_is_one_line_naming_both():
    """Before: --mpp 50 with spots whose pitch implies 0.688 um/px ran, predictions off by up to 6.7."""
    source = "the array pitch of C2_selection.tsv (legacy ST, 200 um a step)"
    with pytest.raises(ScaleError) as e:
        resolve_mpp(user_mpp=50, spots_mpp=0.688, spots_source=source, options=CLI_OPTIONS)
    message = str(e.value)
    assert "\n" not in message and message.startswith("--mpp 50 disagrees with the 0.688 um/px of the array pitch")
    assert message.endswith("add --mpp-force to use 50")
    assert resolve_mpp(user_mpp=50, spots_mpp=0.688, force=True) == (50, "user")
    assert resolve_mpp(user_mpp=0.69, spots_mpp=0.688) == (0.69, "user")  # within a few percent
    with pytest.raises(ScaleError, match=r"^mpp= 50 disagrees .* add mpp_force=True to use 50$"):
        resolve_mpp(user_mpp=50, spots_mpp=0.688, options=API_OPTIONS)


def test_user_mpp_disagreeing_with_the_slide_and_slide_with_spots():
    with pytest.raises(ScaleError, match=r"^--mpp 2 disagrees with the 0.25 um/px of the slide's metadata"):
        resolve_mpp(user_mpp=2, slide_mpp=0.25, options=CLI_OPTIONS)
    with pytest.raises(ScaleError, match=r"gives 0.25 um/px and the spots 0.5 um/px .* --mpp with --mpp-force$"):
        resolve_mpp(slide_mpp=0.25, spots_mpp=0.5, options=CLI_OPTIONS)
    assert resolve_mpp(slide_mpp=0.25, spots_mpp=0.251) == (0.25, "metadata")
    assert resolve_mpp(spots_mpp=0.5) == (0.5, "spots")
    assert resolve_mpp() == (None, None)


# The bounds as predict runs them (the CLI's messages name its flags).


def predict_cli(capsys, *argv: str) -> tuple[int, str]:
    from m2ort_fast.cli import main

    code = main(["predict", *argv, "--quiet", "--heatmaps", "0"])
    return code, capsys.readouterr().err.strip()


def test_predict_refuses_an_mpp_that_disagrees_with_the_spots_unless_forced(tmp_path, capsys):
    from m2ort_fast.predict import DEMO_SLIDE, DEMO_SPOTS

    out = tmp_path / "out"
    code, err = predict_cli(capsys, str(DEMO_SLIDE), "--spots", str(DEMO_SPOTS), "--mpp", "50", "--out", str(out))
    assert code == 2 and len(err.splitlines()) == 1
    assert "--mpp 50" in err and "0.68" in err and "--mpp-force" in err and not out.exists()


def test_predict_caps_the_batch_at_the_spots_and_refuses_one_that_cannot_fit(tmp_path, capsys):
    import anndata

    from m2ort_fast.predict import DEMO_SLIDE, DEMO_SPOTS

    common = [str(DEMO_SLIDE), "--spots", str(DEMO_SPOTS)]
    code, _ = predict_cli(capsys, *common, "--batch-size", "10000", "--out", str(tmp_path / "a"))
    assert code == 0  # 65 spots: a batch of 65, not of 10,000
    assert anndata.read_h5ad(tmp_path / "a" / "demo_slide.h5ad").n_obs == 65
    dense = [str(DEMO_SLIDE), "--spacing-um", "20", "--batch-size", "100000000", "--out", str(tmp_path / "b")]
    code, err = predict_cli(capsys, *dense)
    assert code == 2 and len(err.splitlines()) == 1 and "--batch-size" in err and "memory available" in err


def test_predict_refuses_a_grid_over_max_spots_before_building_it(tmp_path, capsys):
    from m2ort_fast.predict import DEMO_SLIDE

    code, err = predict_cli(capsys, str(DEMO_SLIDE), "--max-spots", "10", "--out", str(tmp_path / "o"))
    assert code == 2 and len(err.splitlines()) == 1 and "--max-spots" in err
