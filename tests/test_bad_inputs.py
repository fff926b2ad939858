"""The bad-input corpus: every damaged file, bad option and failing output seen so far, each
checked for its exit status (2), its one line naming the file and the problem, and the state of
the output folder (nothing half-written, nothing left behind). A wrong answer with exit 0 is the
worst outcome, so the damaged-data cases also check that no output exists."""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from pyramids import tissue_pixels, write_test_pyramid
from readers import installed_readers

from m2ort_fast import slide as slide_module
from m2ort_fast.checkpoint import load_checkpoint
from m2ort_fast.cli import main
from m2ort_fast.outputs import StagedOutput
from m2ort_fast.outputs import folders as output_folders
from m2ort_fast.outputs import heatmaps as heatmaps_module
from m2ort_fast.predict import DEFAULT_CHECKPOINT, DEMO_SLIDE, DEMO_SPOTS
from m2ort_fast.slide import _flat as flat_module

PYTHON = sys.executable
REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(capfd, *argv):
    """Run the CLI in this process; (exit code, stdout, stderr) as the file descriptors saw them
    (so a C library printing to stdout is caught too)."""
    code = main([str(a) for a in argv])
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, out, err, *fragments):
    assert code == 2, (code, err)
    lines = [line for line in err.strip().splitlines() if line.startswith("m2ort-fast: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Traceback" not in out
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]
    return lines[0]


def assert_no_output(out_dir: Path):
    """Nothing written, nothing left behind: no folder at all, or (when it existed) no new entry."""
    assert not out_dir.exists() or list(out_dir.iterdir()) == [], sorted(p.name for p in out_dir.iterdir())


def tile_ranges(path: Path, level: int = 0) -> list[tuple[int, int]]:
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].keyframe
        return list(zip(page.dataoffsets, page.databytecounts, strict=True))


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    return write_test_pyramid(tmp_path_factory.mktemp("bad") / "good.svs", layout="svs", size_px=1024)


def demo_copy(tmp_path: Path, name: str = "slide.tiff") -> Path:
    path = tmp_path / name
    path.write_bytes(DEMO_SLIDE.read_bytes())
    return path


# ---- damaged tile data: an error naming the tile, never pixels made up by a decoder -----------


def overwrite_tile_data(path: Path) -> Path:
    """The issue's case: 300 KB of the demo's tile data overwritten in place (same size)."""
    data = bytearray(path.read_bytes())
    data[300_000:600_000] = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def end_tiles_early(path: Path, tiles=range(10, 20)) -> Path:
    """A subtler damage: an end-of-image marker in the middle of some tiles' entropy data.
    libjpeg only warns ("premature end of data") and fills the rest with grey, and every reader
    returns those pixels without a word."""
    data = bytearray(path.read_bytes())
    for offset, count in [tile_ranges(path)[i] for i in tiles]:
        data[offset + count // 2 : offset + count // 2 + 2] = b"\xff\xd9"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("damage", [overwrite_tile_data, end_tiles_early])
@pytest.mark.parametrize("reader", installed_readers("cucim", "tiffslide", "openslide"))
def test_damaged_tiles_are_an_error_on_every_reader(capfd, tmp_path, damage, reader):
    slide = damage(demo_copy(tmp_path))
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capfd, "predict", slide, "--spots", DEMO_SPOTS, "--reader", reader, "--out", out, "--quiet", "--heatmaps", "0"
    )
    assert_one_line_error(code, stdout, err, slide, "corrupt JPEG data in level 0, tile")
    assert "ERROR" not in stdout, "a decoder's messages reached stdout"
    assert_no_output(out)


def test_damaged_tiles_are_found_by_both_engines_and_the_thumbnail(tmp_path, pyramid):
    from m2ort_fast.errors import SlideError
    from m2ort_fast.slide import open_slide

    damaged = end_tiles_early(demo_copy(tmp_path))
    for engine in ("naive", "streamed"):
        code = main(
            [
                "predict",
                str(damaged),
                "--spots",
                str(DEMO_SPOTS),
                "--engine",
                engine,
                "--quiet",
                "--out",
                str(tmp_path / engine),
                "--heatmaps",
                "0",
            ]
        )
        assert code == 2 and not (tmp_path / engine).exists()
    # the coarsest level is what the thumbnail reads: damage there is found as well
    coarse = tmp_path / "coarse.svs"
    data = bytearray(pyramid.read_bytes())
    offset, count = tile_ranges(pyramid, level=2)[0]
    data[offset + count // 2 : offset + count // 2 + 2] = b"\xff\xd9"
    coarse.write_bytes(bytes(data))
    with open_slide(coarse) as slide, pytest.raises(SlideError, match="level 2, tile 0"):
        slide.thumbnail(64)  # read from level 2 (64 px)
    with open_slide(pyramid) as slide:  # the undamaged file reads as before
        assert slide.thumbnail(64)[0].shape[:2] == (64, 64)


def test_verification_is_skipped_only_when_asked(tmp_path):
    from m2ort_fast.slide import open_slide

    damaged = end_tiles_early(demo_copy(tmp_path))
    with open_slide(damaged, reader="tiffslide", verify_tiles=False) as slide:
        assert slide.tile_verifier is None
        slide.read_region(0, 256, 0, 2304, 256)  # tile row 1: the reader's own made-up pixels, no error
    with open_slide(damaged, reader="tiffslide") as slide:
        with pytest.raises(slide_module.SlideError, match="corrupt"):
            slide.read_region(0, 256, 0, 2304, 256)


def test_damaged_flat_tiff_and_jpeg(capfd, tmp_path):
    pixels = tissue_pixels(512)
    flat_tiff = tmp_path / "flat.tif"
    tifffile.imwrite(flat_tiff, pixels, tile=(128, 128), compression="jpeg")
    end_tiles_early(flat_tiff, tiles=range(3, 5))
    jpeg = tmp_path / "flat.jpg"
    Image.fromarray(pixels).save(jpeg, quality=90)
    data = bytearray(jpeg.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 2] = b"\xff\xd9"
    jpeg.write_bytes(bytes(data))
    for path in (flat_tiff, jpeg):
        code, out, err = run_cli(capfd, "predict", path, "--mpp", "0.5", "--out", tmp_path / "o", "--quiet")
        assert_one_line_error(code, out, err, path, "corrupt JPEG data")
        assert_no_output(tmp_path / "o")


def test_huge_header_on_a_tiny_jpeg_is_refused_at_once(capfd, tmp_path, monkeypatch):
    """The issue's 632-byte JPEG whose header claims 30000 x 30000 px: 36 s and 12.6 GB before."""
    monkeypatch.setattr(flat_module, "available_memory_bytes", lambda: 64 * 2**30)  # any machine: 64 GiB free
    small = tmp_path / "small.jpg"
    Image.fromarray(tissue_pixels(64, real=False)).save(small, quality=90)
    data = bytearray(small.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(bytes(data[:632]))
    started = time.perf_counter()
    code, out, err = run_cli(capfd, "predict", bomb, "--mpp", "0.5", "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, out, err, bomb, "2575 MB, over the memory bound")  # by its claimed size
    # with room for its claimed size, the data check (a strict 1/8-scale decode) refuses it
    code, out, err = run_cli(
        capfd, "predict", bomb, "--mpp", "0.5", "--out", tmp_path / "o", "--quiet", "--max-memory-mb", "100000"
    )
    assert_one_line_error(code, out, err, bomb, "Premature end of JPEG file")
    assert time.perf_counter() - started < 30
    assert_no_output(tmp_path / "o")


def test_flat_image_larger_than_memory_is_refused_before_decoding(capfd, tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(tissue_pixels(512, real=False)).save(path)
    monkeypatch.setattr(flat_module, "available_memory_bytes", lambda: 1_000_000)
    decoded = []
    monkeypatch.setattr(flat_module, "_pil_to_rgb", lambda image: decoded.append(1))
    code, out, err = run_cli(capfd, "predict", path, "--mpp", "0.5", "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, out, err, path, "GiB of memory is available")
    assert decoded == [], "decoded before the check"


def test_flat_image_over_the_memory_bound_is_refused(capfd, tmp_path):
    path = tmp_path / "section.png"
    Image.fromarray(tissue_pixels(1024, real=False)).save(path)  # 3 MB of pixels
    code, out, err = run_cli(
        capfd, "predict", path, "--mpp", "0.5", "--max-memory-mb", "2", "--out", tmp_path / "o", "--quiet"
    )
    assert_one_line_error(code, out, err, path, "--max-memory-mb", "m2ort-fast convert")
    code, out, err = run_cli(
        capfd,
        "predict",
        path,
        "--mpp",
        "0.5",
        "--max-memory-mb",
        "64",
        "--out",
        tmp_path / "o",
        "--quiet",
        "--heatmaps",
        "0",
        "--spacing-um",
        "100",
    )
    assert code == 0, err


@pytest.mark.parametrize("mode, dtype", [("L", np.uint8), ("I;16", np.uint16)])
def test_grayscale_images_are_refused_by_name(capfd, tmp_path, mode, dtype):
    grey = tissue_pixels(256, real=False).mean(axis=2).astype(dtype) * (257 if dtype == np.uint16 else 1)
    png = tmp_path / "grey.png"
    Image.fromarray(grey).save(png)
    assert Image.open(png).mode.startswith(mode[0])
    code, out, err = run_cli(capfd, "predict", png, "--mpp", "0.5", "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, out, err, png, "grayscale")


def test_grayscale_pyramid_is_refused_by_name(capfd, tmp_path):
    path = tmp_path / "grey.tiff"
    tifffile.imwrite(path, tissue_pixels(512, real=False)[..., 0], tile=(256, 256), compression="jpeg")
    code, out, err = run_cli(capfd, "predict", path, "--mpp", "0.5", "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, out, err, path, "grayscale")


# ---- broken models: refused at load, or their predictions refused before they are written ------


def _save_with(tmp_path: Path, name: str, change) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(DEFAULT_CHECKPOINT), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(DEFAULT_CHECKPOINT))
    change(state)
    path = tmp_path / name
    save_file(state, str(path), metadata=metadata)
    return path


def test_checkpoint_with_nan_weights_is_refused_at_load(capfd, tmp_path):
    def poison(state):
        state["blocks.0.icmm.fc2.weight"][0, 0] = float("nan")

    path = _save_with(tmp_path, "nan.safetensors", poison)
    code, out, err = run_cli(capfd, "predict", "--checkpoint", path, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, out, err, path, "NaN or infinite", "blocks.0.icmm.fc2.weight")
    assert_no_output(tmp_path / "o")


@pytest.mark.parametrize("engine", ["streamed", "naive"])
def test_non_finite_predictions_are_never_written(capfd, tmp_path, engine):
    def overflow(state):  # finite weights whose products overflow float32
        state["head.weight"][:] = 3e38

    path = _save_with(tmp_path, "overflow.safetensors", overflow)
    load_checkpoint(path)  # finite: accepted at load
    code, out, err = run_cli(
        capfd, "predict", "--checkpoint", path, "--engine", engine, "--out", tmp_path / "o", "--quiet"
    )
    assert_one_line_error(code, out, err, path, "non-finite predictions")
    assert_no_output(tmp_path / "o")


# ---- options: checked when the command line is parsed -----------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        ["--spacing-um", "0"],
        ["--spacing-um", "-5"],
        ["--spacing-um", "nan"],
        ["--max-memory-mb", "0"],
        ["--max-memory-mb", "-1"],
        ["--heatmaps", "-1"],
        ["--heatmaps", "1000"],
        ["--mpp", "1e-9"],
        ["--mpp", "0"],
        ["--mpp", "inf"],
        ["--mpp", "abc"],
        ["--device", "tpu"],
        ["--device", "cuda:x"],
        ["--batch-size", "0"],
        ["--batch-size", "2.5"],
        ["--reader", "magic"],
        ["--precision", "fp8"],
    ],
)
def test_bad_options_are_one_usage_line(capfd, tmp_path, option):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc_info:
        main(["predict", "--out", str(out), "--quiet", *option])
    assert exc_info.value.code == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("m2ort-fast: error: argument " + option[0]), err
    assert not out.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["convert", "a.jpg", "b.tiff", "--quality", "0"],
        ["convert", "a.jpg", "b.tiff", "--mpp", "-1"],
        ["train", "--config", "x.toml", "--epochs", "0"],
        ["info", "--model", "tiny", "--genes", "0"],
    ],
)
def test_bad_options_of_other_commands(capfd, command):
    with pytest.raises(SystemExit) as exc_info:
        main(command)
    assert exc_info.value.code == 2
    assert capfd.readouterr().err.count("\n") == 1


def test_mpp_overriding_the_slides_own_says_so(tmp_path, caplog, pyramid):
    from m2ort_fast.slide import open_slide

    with caplog.at_level("WARNING"), open_slide(pyramid, mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.mpp_source == "user"
    assert "overrides the slide's own 0.5 um/px" in caplog.text


def test_zero_spacing_is_not_the_default_in_python(tmp_path):
    from m2ort_fast import Predictor
    from m2ort_fast.errors import SpotsError

    with pytest.raises(SpotsError, match="must be > 0"):
        Predictor(progress=False).predict_slide(DEMO_SLIDE, spacing_um=0, out_dir=tmp_path / "o")
    assert_no_output(tmp_path / "o")


# ---- outputs: one line naming the path for every OS error; no debris ---------------------------


def test_out_naming_a_file(capfd, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    code, out, err = run_cli(capfd, "predict", "--out", target, "--quiet")
    assert_one_line_error(code, out, err, target, "not a folder")
    assert target.read_text() == "keep me"


def test_out_that_cannot_be_created(capfd, tmp_path):
    code, out, err = run_cli(capfd, "predict", "--out", "/proc/m2ort-fast-test/out", "--quiet")
    assert_one_line_error(code, out, err, "/proc/m2ort-fast-test", "cannot write")


def test_disk_full_while_writing(capfd, tmp_path, monkeypatch):
    import anndata

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]) if args else None)

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", full)
    out = tmp_path / "o"
    code, stdout, err = run_cli(capfd, "predict", "--out", out, "--quiet")
    assert_one_line_error(code, stdout, err, "no space left on the device")
    assert_no_output(out)


def test_disk_full_reported_by_a_library_in_its_own_way(capfd, tmp_path, monkeypatch):
    """PIL's PNG writer once answered a full disk with "'_idat' object has no attribute 'fileno'"."""

    def odd(*args, **kwargs):
        raise AttributeError("'_idat' object has no attribute 'fileno'")

    monkeypatch.setattr(heatmaps_module, "write_heatmap", odd)
    monkeypatch.setattr(output_folders, "_disk_full", lambda path: True)
    out = tmp_path / "o"
    code, stdout, err = run_cli(capfd, "predict", "--out", out, "--quiet")
    assert_one_line_error(code, stdout, err, "no space left on the device")
    assert_no_output(out)
    monkeypatch.setattr(output_folders, "_disk_full", lambda path: False)  # not full: a bug, shown as one
    with pytest.raises(AttributeError):
        main(["predict", "--out", str(out), "--quiet"])
    assert_no_output(out)


@pytest.fixture
def small_mount(tmp_path):
    """Mount a tmpfs (1 MB, or read-only) under tmp_path: real full and read-only filesystems.
    Needs root (CI and the development machines run as root); skipped elsewhere, where the
    monkeypatched tests above cover the same code."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True
        )
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_full_and_read_only_filesystems(capfd, small_mount):
    full = small_mount("full", "size=1m")
    code, out, err = run_cli(capfd, "predict", "--out", full / "o", "--quiet")
    assert_one_line_error(code, out, err, "no space left on the device")
    assert_no_output(full / "o")
    assert list(full.iterdir()) == []
    read_only = small_mount("ro", "ro,size=1m")
    code, out, err = run_cli(capfd, "predict", "--out", read_only / "o", "--quiet")
    assert_one_line_error(code, out, err, read_only / "o", "Read-only file system")
    code, out, err = run_cli(capfd, "convert", DEMO_SLIDE, read_only / "demo.tiff")
    assert_one_line_error(code, out, err, "Read-only file system")


def test_file_size_limit_is_a_one_line_error(tmp_path):
    """A write cut short by the OS (RLIMIT_FSIZE: "File too large"), in a real process."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    out = tmp_path / "o"
    proc = subprocess.run(
        [PYTHON, "-m", "m2ort_fast.cli", "predict", "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error:" in line][0].endswith(
        "cannot write: file too large for this filesystem or the process's file size limit"
    )
    assert_no_output(out)


def test_two_runs_on_one_output_cannot_both_write(capfd, tmp_path):
    out = tmp_path / "o"
    holder = StagedOutput(out, "demo_slide", "another run's settings")  # a run that is writing
    try:
        code, stdout, err = run_cli(capfd, "predict", "--out", out, "--quiet")
        assert_one_line_error(code, stdout, err, "another m2ort-fast run is writing demo_slide")
        assert not (out / "demo_slide.h5ad").exists()
    finally:
        holder.discard()
    code, _, err = run_cli(capfd, "predict", "--out", out, "--quiet", "--heatmaps", "0")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["demo_slide.csv", "demo_slide.h5ad"]


def test_a_run_finished_meanwhile_is_not_replaced(tmp_path):
    """Checked again once the output is locked: a run that finished between the first look and
    the lock is skipped, not silently replaced, unless --overwrite."""
    from m2ort_fast import Predictor

    predictor = Predictor(progress=False)
    first = predictor.predict_slide(DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=tmp_path, n_heatmaps=0)
    stamp = first.outputs.h5ad.stat().st_mtime_ns
    again = predictor.predict_slide(DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=tmp_path, n_heatmaps=0, overwrite=False)
    assert again.skipped and first.outputs.h5ad.stat().st_mtime_ns == stamp


def test_stale_staging_of_older_versions_is_removed(tmp_path):
    out = tmp_path / "o"
    legacy = out / ".demo_slide.partial-abc123"
    legacy.mkdir(parents=True)
    (legacy / "demo_slide.h5ad").write_bytes(b"half")
    assert main(["predict", "--out", str(out), "--quiet", "--heatmaps", "0", "--no-csv"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["demo_slide.h5ad"]


def test_same_stem_twice_in_one_run(capfd, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    copy = demo_copy(other, "demo_slide.tiff")
    code, out, err = run_cli(capfd, "predict", DEMO_SLIDE, copy, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, out, err, "several slides would write demo_slide.h5ad")


def test_convert_removes_what_killed_conversions_left(tmp_path):
    from m2ort_fast.convert import convert_to_pyramid

    dead = tmp_path / ".out.tiff.tmp999999999"  # a killed conversion's: no such process
    dead.write_bytes(b"half a pyramid")
    running = tmp_path / f".out.tiff.tmp{os.getppid()}"  # a live process's conversion is left alone
    running.write_bytes(b"being written")
    convert_to_pyramid(DEMO_SLIDE, tmp_path / "out.tiff")
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "out.tiff"]


# ---- signals and kills: staging removed on every exit the process sees; a killed run resumes ---

RUN_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from m2ort_fast.predict import DEMO_SLIDE, Predictor, predict_slides

    out, batches = sys.argv[1], int(sys.argv[2])
    predictor = Predictor(progress=False, batch_size=16)
    backend, calls = predictor.backend, [0]

    def killed(*levels):  # the run is killed outright while predicting, after `batches` batches
        calls[0] += 1
        if calls[0] > batches:
            os.kill(os.getpid(), signal.SIGKILL)
        return backend(*levels)

    killed.device = backend.device
    predictor.backend = killed
    predict_slides([DEMO_SLIDE], model=predictor, out_dir=out, spacing_um=40, n_heatmaps=0)
""")


def test_sigterm_removes_staging_and_says_so(tmp_path):
    out = tmp_path / "o"
    script = (
        "import sys; from m2ort_fast import cli, predict\n"
        "real = predict.Predictor.predict_centers\n"
        "def slow(self, *a, **k):\n"
        "    print('model running', flush=True); import time; time.sleep(60)\n"
        "predict.Predictor.predict_centers = slow\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [PYTHON, "-c", script, "predict", "--engine", "naive", "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "model running"
    assert (out / ".demo_slide.partial").is_dir()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "m2ort-fast: terminated (SIGTERM); unfinished outputs removed"
    assert not out.exists()


def test_killed_dense_run_resumes_from_its_finished_rows(tmp_path):
    import anndata

    from m2ort_fast import Predictor

    out = tmp_path / "o"
    proc = subprocess.run([PYTHON, "-c", RUN_SCRIPT, str(out), "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    staging = out / ".demo_slide.partial"
    written = np.load(staging / "written.npy")  # the batches the writer thread had finished
    done = int(written.sum())
    assert 0 < done <= 3 * 16 and done % 16 == 0 and not (out / "demo_slide.h5ad").exists()

    predictor = Predictor(progress=False, batch_size=16)
    calls = []
    backend = predictor.backend

    def counting(*levels):
        calls.append(len(levels[0]))
        return backend(*levels)

    counting.device = backend.device
    predictor.backend = counting
    resumed = predictor.predict_slide(DEMO_SLIDE, out_dir=out, spacing_um=40, n_heatmaps=0)
    assert resumed.engine["resumed_spots"] == done
    assert sum(calls) == resumed.n_spots - done, "finished rows were predicted again"
    assert sorted(p.name for p in out.iterdir()) == ["demo_slide.csv", "demo_slide.h5ad"]

    predictor.backend = backend
    reference = predictor.predict_slide(DEMO_SLIDE, out_dir=tmp_path / "ref", spacing_um=40, n_heatmaps=0)
    a, b = anndata.read_h5ad(resumed.outputs.h5ad), anndata.read_h5ad(reference.outputs.h5ad)
    assert a.obs.equals(b.obs)
    # the resumed rows are batched differently, yet each spot's prediction is its own: bit for bit
    assert np.array_equal(a.X, b.X)


def test_killed_run_with_other_settings_starts_afresh(tmp_path):
    from m2ort_fast import Predictor

    out = tmp_path / "o"
    proc = subprocess.run([PYTHON, "-c", RUN_SCRIPT, str(out), "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    result = Predictor(progress=False).predict_slide(DEMO_SLIDE, out_dir=out, spacing_um=50, n_heatmaps=0)
    assert result.engine["resumed_spots"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["demo_slide.csv", "demo_slide.h5ad"]


def test_failed_evaluate_leaves_no_output_folder(capfd, tmp_path):
    empty = tmp_path / "not_a_section"
    empty.mkdir()
    out = tmp_path / "report"
    code, stdout, err = run_cli(
        capfd, "evaluate", "--checkpoint", DEFAULT_CHECKPOINT, "--no-ridge", "--quiet", "--out", out, empty
    )
    assert_one_line_error(code, stdout, err, "not_a_section")
    assert not out.exists()
    (tmp_path / "f.txt").write_text("x")
    code, stdout, err = run_cli(
        capfd, "evaluate", "--checkpoint", DEFAULT_CHECKPOINT, "--out", tmp_path / "f.txt", "--quiet", empty
    )
    assert_one_line_error(code, stdout, err, "f.txt", "not a folder")
