"""Cohorts (m2ort_fast/cohort.py): Ray workers over a local cluster, the run manifest, resume,
faults (a bad slide, a worker killed mid-slide, the driver interrupted), and job-array shards.

Six small slides of different sizes (crops of the demo slide), a coarse grid (200 um) and no
heatmaps but in one test keep a slide well under a second, so the Ray tests fit in about a minute
on 2 cores."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch

from m2ort_fast.cli import main
from m2ort_fast.cohort import (
    DONE,
    FAILED,
    MANIFEST_COLUMNS,
    PENDING,
    RUNNING,
    SKIPPED,
    parse_shard,
    predict_cohort,
    read_manifest,
    shard_members,
    slide_size,
    worker_layout,
)
from m2ort_fast.convert import write_pyramid
from m2ort_fast.errors import M2ORTError
from m2ort_fast.predict import DEMO_SLIDE, predict_slides
from m2ort_fast.slide import open_slide

SIDES_PX = (1792, 1536, 1280, 1152, 1024, 768)
# No heatmaps (a PNG is ~1 s of matplotlib): one test draws them and compares them byte for byte.
# Batches of 16 everywhere: a batch's size orders the GEMM's sums too, and the slide a worker is
# killed in needs several batches.
OPTIONS = dict(spacing_um=200.0, n_heatmaps=0, batch_size=16)
HEATMAPS = dict(OPTIONS, n_heatmaps=1)
SLOW_SPOT_STEP_PX = 150  # the slide a worker is killed in: a dense table of spots, a few seconds


@pytest.fixture(scope="module")
def demo_pixels():
    with open_slide(DEMO_SLIDE) as slide:
        return slide.read_region(0, 0, 0, *slide.level_dimensions[0]), slide.mpp


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, demo_pixels):
    """Six slides (crops of the demo slide, 1.4 to 0.35 MB) and a slide list naming them."""
    image, mpp = demo_pixels
    folder = tmp_path_factory.mktemp("cohort")
    slides = [
        write_pyramid(np.ascontiguousarray(image[:side, :side]), folder / f"s{k}.tiff", mpp=mpp, downsamples=(1, 4, 16))
        for k, side in enumerate(SIDES_PX)
    ]
    (folder / "cohort.txt").write_text("".join(f"{path.name}\n" for path in slides))
    return slides


def predict_on_one_thread(slides, out: Path, **options) -> None:
    """Single-process predict with one torch thread, as each of the tests' Ray workers has (one
    CPU each): a CPU GEMM's sums are ordered by its thread count, so only equal counts are equal
    bit for bit (the model's float32 last bits; on a GPU, the same kernels run either way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = predict_slides(slides, out_dir=out, progress=False, **options)
    finally:
        torch.set_num_threads(threads)
    assert all(r.ok and not r.skipped for r in results)


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
    """The folder single-process predict writes the cohort into (with a heatmap each)."""
    out = tmp_path_factory.mktemp("reference")
    predict_on_one_thread(cohort, out, **HEATMAPS)
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "m2ort-fast[ray]")')
    context = ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield context
    ray.shutdown()


def assert_outputs_equal(out: Path, reference: Path, stem: str) -> None:
    """The .h5ad's X, obs and spot positions, the CSV and the heatmaps' PNGs (where drawn), byte for byte."""
    a, b = anndata.read_h5ad(out / f"{stem}.h5ad"), anndata.read_h5ad(reference / f"{stem}.h5ad")
    assert a.X.dtype == np.float32 and np.array_equal(a.X, b.X), stem
    assert a.obs.equals(b.obs) and np.array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert (out / f"{stem}.csv").read_bytes() == (reference / f"{stem}.csv").read_bytes()
    if (out / f"{stem}_heatmaps").exists():
        maps = sorted((reference / f"{stem}_heatmaps").iterdir())
        assert maps and [p.name for p in sorted((out / f"{stem}_heatmaps").iterdir())] == [p.name for p in maps]
        for path in maps:
            assert (out / f"{stem}_heatmaps" / path.name).read_bytes() == path.read_bytes()


def manifest_rows(out: Path, name: str = "manifest.csv") -> dict[str, dict[str, str]]:
    """The manifest as csv.DictReader reads it (a valid CSV with every column), by stem."""
    with open(out / name, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == MANIFEST_COLUMNS
        return {row["stem"]: row for row in reader}


def no_staging_left(out: Path) -> bool:
    return not list(out.glob(".*.partial"))


# --------------------------------------------------------------------------------------------
# Ray


def test_ray_cohort_equals_single_process_and_records_a_bad_slide(ray_cluster, cohort, reference, tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    out = tmp_path / "out"
    run = predict_cohort([*cohort, bad], out_dir=out, ray_address="auto", workers=2, progress=False, **HEATMAPS)
    assert len(run.workers) == 2 and {w["worker"] for w in run.workers} == {r.worker for r in run.rows if r.worker}
    rows = manifest_rows(out)
    assert [rows[p.stem]["status"] for p in cohort] == [DONE] * len(cohort)
    assert rows["bad"]["status"] == FAILED and "bad.svs" in rows["bad"]["error"] and "\n" not in rows["bad"]["error"]
    for path in cohort:
        row = rows[path.stem]
        assert_outputs_equal(out, reference, path.stem)
        assert (out / f"{path.stem}_heatmaps").is_dir() and row["heatmaps"] == f"{path.stem}_heatmaps"
        assert (
            row["h5ad"] == f"{path.stem}.h5ad"  # relative to the manifest's folder
            and row["checkpoint_sha256"] == run.workers[0]["checkpoint_sha256"]
        )
        assert int(row["spots"]) > 0 and float(row["model_s"]) > 0 and row["host"] and row["attempts"] == "1"
    assert no_staging_left(out)

    # the same command again: nothing redone (the bad slide stays failed until --retry-failed)
    again = predict_cohort([*cohort, bad], out_dir=out, ray_address="auto", workers=2, progress=False, **HEATMAPS)
    assert again.workers == [] and manifest_rows(out) == rows


def dense_spots(path: Path, side_px: int) -> Path:
    """A CSV of spot centres every SLOW_SPOT_STEP_PX over a slide ``side_px`` wide."""
    steps = np.arange(SLOW_SPOT_STEP_PX, side_px - SLOW_SPOT_STEP_PX, SLOW_SPOT_STEP_PX)
    xs, ys = np.meshgrid(steps, steps)
    path.write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in zip(xs.ravel(), ys.ravel(), strict=True)))
    return path


def test_a_worker_killed_mid_slide_has_its_slide_redone_elsewhere(ray_cluster, cohort, reference, tmp_path):
    import ray

    spots = [dense_spots(tmp_path / "s0_spots.csv", SIDES_PX[0]), *[None] * (len(cohort) - 1)]
    slow_reference = tmp_path / "slow_reference"
    predict_on_one_thread(cohort[:1], slow_reference, spots=spots[:1], **OPTIONS)
    out = tmp_path / "out"
    killed: list[str] = []

    def kill_the_worker_of_s0() -> None:
        """Once s0 (largest: handed out first) has rows written, kill the worker that writes them."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            written = (out / ".s0.partial" / "written.npy").exists()
            row = manifest_rows(out).get("s0") if (out / "manifest.csv").exists() else None
            if written and row and row["status"] == RUNNING and row["worker"]:
                ray.kill(ray.get_actor(row["worker"]))
                killed.append(row["worker"])
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_worker_of_s0)
    killer.start()
    run = predict_cohort(cohort, spots=spots, out_dir=out, ray_address="auto", workers=2, progress=False, **OPTIONS)
    killer.join()
    assert killed, "the slow slide was never seen running with rows written"
    rows = manifest_rows(out)
    assert all(row["status"] == DONE for row in rows.values()), rows
    s0 = rows["s0"]
    assert s0["attempts"] == "2" and killed[0] in s0["retried_because"] and "died" in s0["retried_because"]
    assert s0["worker"] != killed[0], "redone by the other worker (ray.kill: no restart)"
    assert_outputs_equal(out, slow_reference, "s0")
    for path in cohort[1:]:
        assert_outputs_equal(out, reference, path.stem)
    assert no_staging_left(out) and run.count(DONE) == len(cohort)


def test_an_interrupted_driver_leaves_a_valid_manifest_and_the_rerun_resumes(ray_cluster, cohort, reference, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "m2ort_fast.cli",
        "predict",
        "--list",
        str(cohort[0].parent / "cohort.txt"),
        "--out",
        str(out),
        "--ray",
        ray_cluster.address_info["address"],
        "--workers",
        "2",  # one CPU each: one torch thread, as the reference
        "--spacing-um",
        "200",
        "--heatmaps",
        "0",
        "--batch-size",
        "16",
    ]
    driver = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C reaches it even where this test runs as a background job (which ignores SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        if (out / "manifest.csv").exists() and DONE in {r["status"] for r in manifest_rows(out).values()}:
            break
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 130, err
    assert "Traceback" not in err, err
    rows = manifest_rows(out)
    done = {stem for stem, row in rows.items() if row["status"] == DONE}
    assert done and len(done) < len(cohort), "interrupted after the first slide, before the last"
    assert {row["status"] for row in rows.values()} <= {DONE, PENDING}, "nothing left running"
    assert all((out / f"{stem}.h5ad").exists() for stem in done)
    # a slide a worker published in the instant the driver stopped, before its result arrived, is
    # pending with a complete .h5ad (published last, so complete): the rerun finds and skips it
    published_unrecorded = {s for s in rows if s not in done and (out / f"{s}.h5ad").exists()}
    assert no_staging_left(out), "the slide the worker held when stopped left no staging folder"
    done_at = {stem: (rows[stem]["finished"], (out / f"{stem}.h5ad").stat().st_mtime_ns) for stem in done}

    run = predict_cohort(cohort, out_dir=out, ray_address="auto", workers=2, progress=False, **OPTIONS)
    assert {r.stem for r in run.rows if r.status == SKIPPED} == published_unrecorded
    assert run.count(DONE) + run.count(SKIPPED) == len(cohort)
    rows = manifest_rows(out)
    assert {s: (rows[s]["finished"], (out / f"{s}.h5ad").stat().st_mtime_ns) for s in done} == done_at, "not redone"
    for path in cohort:
        assert_outputs_equal(out, reference, path.stem)


# --------------------------------------------------------------------------------------------
# Without Ray: the manifest, resume, shards


def test_resume_keeps_failed_slides_until_asked_to_retry(cohort, tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide")
    out = tmp_path / "out"
    slides = [cohort[-1], bad]
    first = predict_cohort(slides, out_dir=out, ray_address=None, progress=False, **OPTIONS)
    assert [r.status for r in first.rows] == [DONE, FAILED] and "bad.svs" in first.rows[1].error
    before = read_manifest(out / "manifest.csv")
    second = predict_cohort(slides, out_dir=out, ray_address=None, progress=False, **OPTIONS)
    assert second.workers == [] and read_manifest(out / "manifest.csv") == before, "nothing redone"
    bad.unlink()
    third = predict_cohort(slides, out_dir=out, ray_address=None, retry_failed=True, progress=False, **OPTIONS)
    assert third.rows[0] == before[0], "the done slide is kept as it was"
    assert third.rows[1].status == FAILED and "no such file" in third.rows[1].error.lower()
    # outputs made by another run with the same settings (no manifest row): skipped, not redone
    other = predict_cohort([cohort[-2]], out_dir=tmp_path / "other", ray_address=None, progress=False, **OPTIONS)
    assert other.count(DONE) == 1
    h5ad = out / f"{cohort[-2].stem}.h5ad"
    os.replace(tmp_path / "other" / h5ad.name, h5ad)
    made = h5ad.stat().st_mtime_ns
    fourth = predict_cohort([*slides, cohort[-2]], out_dir=out, ray_address=None, progress=False, **OPTIONS)
    assert fourth.rows[2].status == SKIPPED and fourth.rows[2].h5ad == h5ad.name and h5ad.stat().st_mtime_ns == made


def test_shards_cover_every_slide_exactly_once_balanced_by_size(cohort):
    rng = np.random.default_rng(0)
    paths = [str(p) for p in cohort] + [f"/data/x{k}.svs" for k in range(17)]
    sizes = [slide_size(p) for p in cohort] + rng.integers(1, 3_000_000, 17).tolist()
    for n in range(1, 6):
        shards = shard_members(paths, sizes, n)
        flat = [p for shard in shards for p in shard]
        assert sorted(flat) == list(range(len(paths))), f"N={n}: every slide once"
        loads = [sum(sizes[p] for p in shard) for shard in shards]
        assert max(loads) - min(loads) <= max(sizes), f"N={n}: balanced by size {loads}"
        # the same split whatever the list's order (every task of an array computes it alone)
        order = rng.permutation(len(paths))
        again = shard_members([paths[i] for i in order], [sizes[i] for i in order], n)
        assert [sorted(paths[order[p]] for p in shard) for shard in again] == [
            sorted(paths[p] for p in shard) for shard in shards
        ]
    assert parse_shard("0/4") == (0, 4) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/4", "1", "a/b", "0/0"):
        with pytest.raises(M2ORTError):
            parse_shard(bad)


def test_shards_on_the_command_line_without_ray(cohort, reference, tmp_path):
    """Every shard of 3 as its own process (a job array): together, each slide once, outputs equal;
    and neither a shard nor a plain predict imports Ray."""
    out = tmp_path / "out"
    script = (
        "import sys\n"
        "from m2ort_fast.cli import main\n"
        "codes = [main(['predict', '--list', sys.argv[1], '--out', sys.argv[2], '--shard', f'{i}/3', '--quiet',\n"
        "               '--spacing-um', '200', '--heatmaps', '0', '--batch-size', '16']) for i in range(3)]\n"
        "codes.append(main(['predict', sys.argv[3], '--out', sys.argv[4], '--quiet', '--spacing-um', '200',\n"
        "                   '--heatmaps', '0']))\n"
        "assert 'ray' not in sys.modules, 'a shard or predict imported ray'\n"
        "sys.exit(max(codes))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(cohort[0].parent / "cohort.txt"), str(out), cohort[-1], tmp_path / "one"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # one torch thread, as the reference
    )
    assert proc.returncode == 0, proc.stderr
    seen = []
    for i in range(3):
        rows = manifest_rows(out, f"manifest.shard-{i}-of-3.csv")
        assert {row["status"] for row in rows.values()} == {DONE}
        seen += list(rows)
    assert sorted(seen) == sorted(p.stem for p in cohort)
    for path in cohort:
        assert_outputs_equal(out, reference, path.stem)


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # a usage error, found by argparse
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--workers", "2"], "--workers needs --ray"),
        (["--retry-failed"], "--retry-failed needs --ray or --shard"),
        (["--shard", "2/2"], "I must be at least 0 and less than N"),
        (["--shard", "x"], "is not I/N"),
        (["--ray", "s.svs"], "--ray takes auto or an address"),
        (["--ray", "--profile"], "--profile is for runs without --ray/--shard"),
    ],
)
def test_cohort_options_misused_are_one_line_errors(capsys, tmp_path, argv, fragment):
    code, err = run_cli(capsys, "predict", DEMO_SLIDE, "--out", tmp_path / "o", *argv)
    lines = [line for line in err.strip().splitlines() if line.startswith("m2ort-fast: error:")]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def test_worker_layout():
    two_gpu_nodes = [{"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 4}]
    assert worker_layout(two_gpu_nodes, None, 8, use_gpu=True) == (8, 8.0, 1.0)
    assert worker_layout(two_gpu_nodes, 16, 8, use_gpu=True) == (16, 4.0, 0.5), "two workers share a GPU"
    assert worker_layout(two_gpu_nodes, 9, 8, use_gpu=True) == (9, 4.0, 0.5)
    cpu_nodes = [{"CPU": 16}, {"CPU": 8}]
    assert worker_layout(cpu_nodes, None, 8, use_gpu=False) == (3, 8.0, 0)
    assert worker_layout(cpu_nodes, 2, 8, use_gpu=False) == (2, 8.0, 0), "12 each would not fit on the 8-CPU node"
    assert worker_layout([{"CPU": 2}], 2, 8, use_gpu=False) == (2, 1.0, 0)
    assert worker_layout([{"CPU": 2}], 4, 8, use_gpu=False) == (4, 0.5, 0)
