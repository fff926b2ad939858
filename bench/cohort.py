"""Cohort bench: single-process predict_slides against Ray with 1 and 2 workers, on the same slides.

    python bench/cohort.py                        # 8 crops of the demo slide, 55 um grid, ~3 min on 2 cores
    python bench/cohort.py --slides 12 --spacing-um 100 --json out.json

The slides are crops of the shipped demo slide (a real HER2+ section, 2304 px at 0.687 um/px)
from 2304 down to 1280 px a side, written as SVS-like pyramids (levels 1, 4, 16) in a temporary
folder; spots: a grid every ``--spacing-um`` over the tissue; the tiny model, torch backend, CPU.
Three runs, one after the other, each into its own output folder:

- ``single``: ``predict_slides`` in this process (one model, the next slide opened meanwhile),
  torch on every CPU;
- ``ray-1``: ``predict_cohort`` on a local Ray cluster (``ray.init(num_cpus=CPUs)``), 1 worker with
  every CPU;
- ``ray-2``: the same cluster, 2 workers splitting the CPUs.

Reported per run: wall time from the call to the last slide written, the part before the first
slide could start (Ray: connecting, starting the worker processes, loading the model; single: the
model load), slides/hour end to end and after that start, and the per-slide overhead against
``single``: (steady-state seconds per slide of the run) - (single's). The cluster itself is
started before the timed runs (``ray_start_s``), as a long-lived cluster would be. Outputs are
checked equal to ``single``'s bit for bit (equal where the threads per process match: ray-1 has
as many as single; ray-2's one thread each may differ in the last bits of some batches). Also
printed, for the README's cohort estimate: single's seconds per slide by stage, and the decode floor
(level 0 of the largest slide read whole by the engine's reader on one thread, in Mpx/s).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from backends import cpu_model  # bench/backends.py: run as `python bench/cohort.py`

REPO = Path(__file__).resolve().parents[1]


def make_slides(folder: Path, count: int) -> list[Path]:
    from m2ort_fast.convert import write_pyramid
    from m2ort_fast.predict import DEMO_SLIDE
    from m2ort_fast.slide import open_slide

    with open_slide(DEMO_SLIDE) as slide:
        image, mpp = slide.read_region(0, 0, 0, *slide.level_dimensions[0]), slide.mpp
    sides = np.linspace(image.shape[0], 1280, count).astype(int)
    return [
        write_pyramid(
            np.ascontiguousarray(image[:side, :side]), folder / f"slide{k:02d}.tiff", mpp=mpp, downsamples=(1, 4, 16)
        )
        for k, side in enumerate(sides)
    ]


def decode_rate(path: Path, repeats: int = 5) -> dict:
    """The decode floor: level 0 of ``path`` read whole (every JPEG tile decoded) by the reader
    the engine picks, on this thread, in Mpx/s (best of ``repeats``)."""
    from m2ort_fast.slide import open_slide

    with open_slide(path) as slide:
        width, height = slide.level_dimensions[0]
        best = min(_timed(lambda: slide.read_level_region(0, 0, 0, width, height)) for _ in range(repeats))
        return {"reader": slide.reader_name, "mpx": width * height / 1e6, "mpx_per_s": width * height / 1e6 / best}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def x_of(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path) as f:
        return f["X"][:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--spacing-um", type=float, default=55.0)
    parser.add_argument("--heatmaps", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="the Ray cluster's CPUs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="m2ort-fast: %(message)s")
    import ray

    from m2ort_fast.cohort import predict_cohort
    from m2ort_fast.predict import Predictor, predict_slides

    torch.set_num_threads(args.cpus)
    options = dict(spacing_um=args.spacing_um, n_heatmaps=args.heatmaps, progress=False)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="m2ort-cohort-bench-") as tmp:
        tmp_path = Path(tmp)
        slides = make_slides(tmp_path, args.slides)
        sizes_mb = [round(p.stat().st_size / 2**20, 2) for p in slides]

        started = time.perf_counter()
        predictor = Predictor(progress=False)
        load = time.perf_counter() - started
        results = predict_slides(slides, model=predictor, out_dir=tmp_path / "single", **options)
        total = time.perf_counter() - started
        assert all(r.ok for r in results), [r.error for r in results]
        runs["single"] = {
            "total_s": total,
            "start_s": load,
            "spots": sum(r.n_spots for r in results),
            "slide_wall_s": [r.wall_seconds for r in results],
            "stage_s_per_slide": {
                stage: sum(r.seconds.get(stage, 0.0) for r in results) / len(results) for stage in results[0].seconds
            },
        }
        decode = decode_rate(slides[0])

        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="warning")
        ray_start = time.perf_counter() - t
        for workers in (1, 2):
            name = f"ray-{workers}"
            started = time.perf_counter()
            run = predict_cohort(slides, out_dir=tmp_path / name, ray_address="auto", workers=workers, **options)
            total = time.perf_counter() - started
            assert run.count("done") == len(slides), [r.error for r in run.rows]
            runs[name] = {
                "total_s": total,
                "start_s": run.seconds["start"],
                "spots": sum(r.spots or 0 for r in run.rows),
                "slide_wall_s": [r.wall_s for r in run.rows],
                "workers": [{k: w[k] for k in ("worker", "load_s", "ready_s")} for w in run.workers],
            }
        ray.shutdown()
        equal = {
            name: all(
                np.array_equal(x_of(tmp_path / "single" / f"{p.stem}.h5ad"), x_of(tmp_path / name / f"{p.stem}.h5ad"))
                for p in slides
            )
            for name in ("ray-1", "ray-2")
        }

    n = len(slides)
    single_steady = (runs["single"]["total_s"] - runs["single"]["start_s"]) / n
    for run in runs.values():
        steady = run["total_s"] - run["start_s"]
        run["slides_per_hour"] = 3600 * n / run["total_s"]
        run["slides_per_hour_steady"] = 3600 * n / steady
        run["steady_s_per_slide"] = steady / n
        run["overhead_s_per_slide"] = steady / n - single_steady
    report = {
        "slides": n,
        "sizes_mb": sizes_mb,
        "spacing_um": args.spacing_um,
        "cpus": args.cpus,
        "cpu_model": cpu_model(),
        "ray_start_s": ray_start,
        "ray_version": ray.__version__,
        "bit_equal_to_single": equal,
        "decode": decode,
        "runs": runs,
    }
    print(
        f"{n} slides ({min(sizes_mb)}-{max(sizes_mb)} MB, {runs['single']['spots']} spots in all, "
        f"{args.spacing_um:g} um grid), {args.cpus} CPUs ({report['cpu_model']}), Ray {ray.__version__} "
        f"(local cluster started in {ray_start:.1f} s, not counted below)\n"
    )
    print(
        "| run | wall s | before the first slide s | slides/hour | slides/hour after start | s/slide steady | "
        "overhead s/slide vs single |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, run in runs.items():
        print(
            f"| {name} | {run['total_s']:.1f} | {run['start_s']:.1f} | {run['slides_per_hour']:.0f} | "
            f"{run['slides_per_hour_steady']:.0f} | {run['steady_s_per_slide']:.2f} | "
            f"{run['overhead_s_per_slide']:+.2f} |"
        )
    stages = ", ".join(f"{k} {v:.2f}" for k, v in runs["single"]["stage_s_per_slide"].items())
    print(f"\nsingle, seconds per slide by stage (streamed stages overlap): {stages}")
    print(
        f"decode floor: {decode['mpx_per_s']:.0f} Mpx/s on one thread ({decode['reader']}, level 0 of the "
        f"largest slide, {decode['mpx']:.1f} Mpx)"
    )
    for name in ("ray-1", "ray-2"):
        loads = ", ".join(f"{w['load_s']:.2f} s (ready at {w['ready_s']:.1f} s)" for w in runs[name]["workers"])
        print(f"\n{name}: model load per worker {loads}; predictions bit-equal to single: {equal[name]}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
