"""Whole-slide bench: the naive path against the streamed engine on a real her2st section.

    python bench/slide.py                          # C2, 55 um dense grid, tiny model, ~2 min on 2 cores
    python bench/slide.py --spacing-um 27.5 --region-px 0 --variant small --json out.json

The section's JPEG (or a --region-px crop of its centre) is converted to an SVS-like pyramid
(levels 1, 4, 16) in a temporary folder, at the mpp fitted from its spot table. Spots: a dense
hexagonal grid over the tissue. Both paths use the same backend, spots and batch size:

- naive: ``Predictor.predict_centers`` (one ``read_region`` per spot per level, then the model);
- streamed: ``stream.run_stream`` (read plan, each tile decoded once, stages overlapped), the host
  data path (crop, resize, batches on the CPU cores);
- device: ``engine.run_stream_on_device``, the same plan with the pixels on the model's
  device from the decoded tiles on (on the CPU: CPU tensors and the host kernels).

Each is run twice: with the model (end to end) and with a zero "model" (the data path alone:
reading, cropping, resizing, assembling). Beside them: the model alone (the backend on prepared
batches: the ceiling of any end-to-end figure), timed against the streamed path end to end in
``--rounds`` interleaved rounds and reported per round with the median ratio and its range, and
decoding the planned tiles alone (``decode_only``, the floor of the data path), each in spots/s.
Each round also takes the CPU time per spot of the model alone and of the data path alone: where
the two stages share every core, end to end can reach at most model / (model + data path) of the
model alone (the "CPU-time ceiling"), however the cores are shared out.
Reported: spots/s, tiles decoded per spot, traced peak host memory (tracemalloc: numpy and Python
allocations; the device path's torch buffers are counted by its own ledger instead,
``peak_buffers_mb``), per-stage seconds (streamed stages overlap, so they add up to more than the
wall time), and each reader (cuCIM, tiffslide, OpenSlide) on the same regions (a compact block of
the grid). Predictions of the two paths are checked equal bit for bit.

``--baseline BACKEND[:PRECISION]`` (e.g. ``aoti:fp32``) also runs the streamed host path and the
model alone with that backend, in the same process right after the others, and reports the
end-to-end ratio against it: a speed-up measured on one VM in one sitting, where the same command
on another day may run ~1.6x faster or slower.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "her2st"


class ZeroModel:
    """Returns zeros: isolates the data path (the backend interface: levels -> (B, G)). It asks for
    its batches as ``like`` does (dtype, tokens, calls at once), so that the data path alone does
    the work it does end to end."""

    name = "zero"

    def __init__(self, n_genes: int, device: torch.device, like=None):
        self.n_genes, self.device = n_genes, device
        for attribute in ("input_dtype", "input_token_px", "concurrent_calls"):
            if hasattr(like, attribute):
                setattr(self, attribute, getattr(like, attribute))

    def forward_on_device(self, l1, l2, l3):
        return torch.zeros((l1.shape[0], self.n_genes), device=l1.device)

    def __call__(self, l1, l2, l3):
        return torch.zeros((l1.shape[0], self.n_genes))


def prepare_slide(section: Path, region_px: int, out: Path):
    from m2ort_fast.convert import write_pyramid
    from m2ort_fast.slide import open_slide
    from m2ort_fast.spots import load_spots

    spots = load_spots(next(section.glob("*_selection.tsv")), format="st")
    with open_slide(next(section.glob("*_HE*.jpg"))) as flat:
        image = flat.image
        if region_px:
            h, w = image.shape[:2]
            top, left = max(0, (h - region_px) // 2), max(0, (w - region_px) // 2)
            image = image[top : top + region_px, left : left + region_px]
        path = write_pyramid(
            np.ascontiguousarray(image),
            out / f"{section.name}.svs",
            mpp=spots.mpp_from_pitch,
            layout="svs",
            downsamples=(1, 4, 16),
        )
    return path, spots.mpp_from_pitch


def make_predictor(args, mpp: float, tmp: Path, backend: str | None = None, precision: str | None = None):
    from m2ort_fast.checkpoint import ModelCard, read_card, save_checkpoint
    from m2ort_fast.model import build_model
    from m2ort_fast.predict import DEFAULT_CHECKPOINT, Predictor

    checkpoint = args.checkpoint
    if checkpoint is None and args.variant == "tiny":
        checkpoint = "m2ort-her2st-tiny"  # the paper's model as shipped (the figures in docs/ are its)
    elif checkpoint is None:
        genes = read_card(DEFAULT_CHECKPOINT).genes
        card = ModelCard.for_variant(args.variant, genes, mpp)
        torch.manual_seed(0)
        model = build_model(args.variant, len(genes), seed=0)
        checkpoint = tmp / f"{args.variant}.safetensors"
        save_checkpoint(checkpoint, model, card)
    return Predictor(
        checkpoint,
        backend=backend or args.backend,
        device=args.device,
        precision=precision or args.precision,
        batch_size=args.batch_size,
        level_source=args.level_source,
        progress=False,
    )


def traced(fn, trace: bool = True):
    """(fn(), seconds, traced peak bytes: 0 where ``trace`` is off, as in the timed rounds, since
    tracing numpy's allocations costs the data path time the model alone does not pay)."""
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        value = fn()
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
    finally:
        if trace:
            tracemalloc.stop()
    return value, seconds, peak


def device_peak_mb() -> float | None:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None


def run_naive(predictor, slide, centers):
    from m2ort_fast.profiling import StageTimer

    timer = StageTimer()
    predictions, seconds, peak = traced(lambda: predictor.predict_centers(slide, centers, timer))
    return predictions, seconds, peak, timer.summary()


def run_streamed(predictor, slide, centers, max_memory_mb, data_path="host", trace=True):
    from m2ort_fast.engine import DeviceMemory, plan_slide_reads, reserved_bytes, run_stream, run_stream_on_device
    from m2ort_fast.profiling import StageTimer

    device = predictor.backend.device
    on_device = data_path == "device"
    memory = DeviceMemory(device)  # the device path's buffers (tracemalloc does not see torch's)
    timer = StageTimer()
    predictions = np.empty((len(centers), len(predictor.genes)), dtype=np.float32)

    def store(spots, values):
        predictions[spots] = values

    def work():
        with timer.stage("plan"):
            plan = plan_slide_reads(
                slide,
                centers,
                predictor.card.level_mpp,
                predictor.card.patch_sizes_px,
                level_source=predictor.level_source,
                max_memory_mb=max_memory_mb,
                reserved_bytes=functools.partial(
                    reserved_bytes, batch_size=predictor.batch_size, kernel="auto", device=device
                )
                if on_device
                else None,
            )
        args = (slide, plan, predictor.backend, predictor.card.pixel_mean, predictor.card.pixel_std, store)
        if on_device:
            run_stream_on_device(*args, batch_size=predictor.batch_size, timer=timer, memory=memory)
        else:
            run_stream(*args, batch_size=predictor.batch_size, timer=timer, num_threads=predictor.num_threads)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return plan

    plan, seconds, peak = traced(work, trace)
    return predictions, seconds, peak, timer.summary(), plan, memory.peak_bytes


def decode_only_seconds(slide, plan, on_device: bool) -> float:
    """Seconds to decode the plan's tiles alone, one step after another (the data path's floor)."""
    from m2ort_fast.engine import read_step
    from m2ort_fast.profiling import StageTimer

    start = time.perf_counter()
    for step in range(plan.n_steps):
        read_step(slide, plan, step, StageTimer(), as_tensors=on_device)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def model_only_spots_per_s(backend, sizes_px, batch_size: int, n_spots: int, workers: int = 1) -> tuple[float, float]:
    """The backend alone on prepared batches (on its device, as the host path hands them: in its
    ``input_dtype``, as tokens where it takes them), about n_spots in all: one call at a time on all
    of torch's threads, or ``workers`` calls at once on one intra-op thread each (as the host path
    calls a backend with ``concurrent_calls``: m2ort_fast.backends.workers). Returns (spots/s, CPU
    seconds per spot: the process's, all threads)."""
    from m2ort_fast.backends.workers import backend_inputs, calls_at_once

    device = backend.device
    one = getattr(backend, "forward_on_device", None) or backend
    batches = [
        [
            x.to(device)
            for x in backend_inputs(
                backend,
                [torch.rand(batch_size, 3, s, s, generator=torch.Generator().manual_seed(seed)) for s in sizes_px],
            )
        ]
        for seed in range(workers)
    ]
    call = calls_at_once(one, batches) if workers > 1 else functools.partial(one, *batches[0])
    call()  # warm-up
    repeats = max(3, n_spots // batch_size // workers)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    spots = workers * repeats * batch_size
    return spots / (time.perf_counter() - start), (time.process_time() - cpu_start) / spots


def data_path_cpu_s_per_spot(predictor, slide, centers, max_memory_mb: float, zero: ZeroModel) -> float:
    """CPU seconds per spot (the process's, all threads) of the streamed host path with ``zero``
    as its model: the data path's own work."""
    model, predictor.backend = predictor.backend, zero
    try:
        start = time.process_time()
        run_streamed(predictor, slide, centers, max_memory_mb, trace=False)
        return (time.process_time() - start) / len(centers)
    finally:
        predictor.backend = model


def interleaved_rounds(predictor, slide, centers, max_memory_mb: float, rounds: int, zero: ZeroModel) -> dict:
    """The model alone and the streamed host path end to end, timed in alternating rounds (one
    figure of each per round, so that a slow spell of a shared machine hits both): per round, end
    to end over the better of the model alone called one at a time and as the engine calls it.

    Also per round, the CPU time per spot of the model alone (as the engine calls it) and of the
    data path alone (``zero`` as the model): where both stages share every core, end to end can
    reach at most model / (model + data path) of the model alone (the "CPU-time ceiling")."""
    from m2ort_fast.backends.workers import model_workers

    n, workers = len(centers), model_workers(predictor.backend)
    sizes, batch = predictor.card.patch_sizes_px, predictor.batch_size
    figures = []
    for _ in range(rounds):
        one_call, one_call_cpu = model_only_spots_per_s(predictor.backend, sizes, batch, n)
        as_engine, model_cpu = (
            model_only_spots_per_s(predictor.backend, sizes, batch, n, workers)
            if workers > 1
            else (one_call, one_call_cpu)
        )
        end_to_end = n / run_streamed(predictor, slide, centers, max_memory_mb, trace=False)[1]
        data_cpu = data_path_cpu_s_per_spot(predictor, slide, centers, max_memory_mb, zero)
        ceiling = model_cpu / (model_cpu + data_cpu)
        figures.append(
            (one_call, as_engine, end_to_end, end_to_end / max(one_call, as_engine), model_cpu, data_cpu, ceiling)
        )
    columns = np.array(figures)
    ratios = columns[:, 3]
    return {
        "rounds": rounds,
        "model_workers": workers,
        "model_alone_one_call_spots_per_s": [round(float(x), 1) for x in columns[:, 0]],
        "model_alone_as_engine_spots_per_s": [round(float(x), 1) for x in columns[:, 1]],
        "end_to_end_spots_per_s": [round(float(x), 1) for x in columns[:, 2]],
        "end_to_end_vs_model_alone": [round(float(x), 3) for x in ratios],
        "median_ratio": round(float(np.median(ratios)), 3),
        "ratio_range": [round(float(ratios.min()), 3), round(float(ratios.max()), 3)],
        "model_alone_cpu_ms_per_spot": [round(1e3 * float(x), 3) for x in columns[:, 4]],
        "data_path_alone_cpu_ms_per_spot": [round(1e3 * float(x), 3) for x in columns[:, 5]],
        "cpu_time_ceiling": [round(float(x), 3) for x in columns[:, 6]],
    }


def bench_baseline(
    baseline, args, slide, centers: np.ndarray, predictions: np.ndarray, streamed_spots_per_s_of_run: float
):
    """The streamed host path and the model alone with ``baseline`` (the ``--baseline`` predictor),
    on the same slide and spots; ``streamed_spots_per_s_of_run`` (this run's) over the baseline's."""
    n = len(centers)
    zero = ZeroModel(len(baseline.genes), baseline.backend.device, like=baseline.backend)
    rounds = interleaved_rounds(baseline, slide, centers, args.max_memory_mb, args.rounds, zero)
    streamed = run_streamed(baseline, slide, centers, args.max_memory_mb)
    streamed_spots_per_s = n / streamed[1]
    return {
        "backend": baseline.backend_name,
        "precision": baseline.precision,
        "model_alone_and_end_to_end": rounds,
        "streamed_spots_per_s": round(streamed_spots_per_s, 1),
        "streamed_stages_s": streamed[3],
        "streamed_vs_baseline": round(streamed_spots_per_s_of_run / streamed_spots_per_s, 2),
        "max_abs_diff": float(np.abs(streamed[0] - predictions).max()),
    }


def bench_readers(path: Path, mpp: float, centers: np.ndarray, card, max_memory_mb: float) -> list[dict]:
    """Each reader on the same regions: naive squares and the streamed engine's planned rows."""
    from m2ort_fast.crop import read_spot_patches
    from m2ort_fast.engine import iter_streamed_patches, plan_slide_reads
    from m2ort_fast.errors import M2ORTError
    from m2ort_fast.slide import open_slide

    rows = []
    for reader in ("cucim", "tiffslide", "openslide"):
        try:
            slide = open_slide(path, reader=reader)
        except M2ORTError as exc:
            rows.append({"reader": reader, "error": str(exc)})
            continue
        with slide:
            start = time.perf_counter()
            read_spot_patches(slide, centers, card.level_mpp, card.patch_sizes_px)
            naive_s = time.perf_counter() - start
            plan = plan_slide_reads(slide, centers, card.level_mpp, card.patch_sizes_px, max_memory_mb=max_memory_mb)
            start = time.perf_counter()
            for _ in iter_streamed_patches(slide, plan):  # crop and resize on every core, as predict does
                pass
            streamed_s = time.perf_counter() - start
        rows.append(
            {
                "reader": reader,
                "spots": len(centers),
                "naive_read_spots_per_s": round(len(centers) / naive_s, 1),
                "streamed_read_spots_per_s": round(len(centers) / streamed_s, 1),
                "ratio": round(naive_s / streamed_s, 2),
            }
        )
    return rows


def rounds_line(label: str, rounds: dict) -> str:
    return (
        f"{label}: end to end {rounds['median_ratio']:.0%} of the model alone (median of {rounds['rounds']} "
        f"interleaved rounds, range {rounds['ratio_range'][0]:.0%}-{rounds['ratio_range'][1]:.0%}; end to end "
        f"{rounds['end_to_end_spots_per_s']} spots/s; alone, one call at a time "
        f"{rounds['model_alone_one_call_spots_per_s']}, as the engine calls it ({rounds['model_workers']} at once) "
        f"{rounds['model_alone_as_engine_spots_per_s']}); CPU ms per spot, model alone "
        f"{rounds['model_alone_cpu_ms_per_spot']}, data path alone {rounds['data_path_alone_cpu_ms_per_spot']}: "
        f"the ceiling where both share every core, model / (model + data path), {rounds['cpu_time_ceiling']}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="her2st folder (default: %(default)s)")
    parser.add_argument("--section", default="C2")
    parser.add_argument(
        "--slide",
        type=Path,
        default=None,
        help="bench on this pyramid (with mpp) instead of a converted her2st section, e.g. the demo slide",
    )
    parser.add_argument("--region-px", type=int, default=3072, help="centre crop of the section (0: whole section)")
    parser.add_argument("--spacing-um", type=float, default=55.0)
    parser.add_argument(
        "--variant", default="tiny", help="random-weight model of this variant (tiny: the shipped m2ort-her2st-tiny)"
    )
    parser.add_argument(
        "--checkpoint", default=None, help="a checkpoint or shipped model, e.g. m2ort-her2st-tiny-efficientnet-lite0-s8"
    )
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16, int8 (see the README's Precision)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--level-source",
        default=None,
        choices=["pyramid", "resize"],
        help="how the coarser inputs are made (default: the model card's); pyramid: one read per "
        "spot per level on the naive path",
    )
    parser.add_argument("--max-memory-mb", type=float, default=512)
    parser.add_argument("--max-gpu-memory-mb", type=float, default=2048, help="the device path's bound")
    parser.add_argument("--reader", default="tiffslide", help="reader for the two paths (default: %(default)s)")
    parser.add_argument(
        "--reader-spots",
        type=int,
        default=300,
        help="spots for the per-reader comparison (the block nearest the tissue's middle)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="BACKEND[:PRECISION]",
        help="also time this backend (e.g. aoti:fp32) streamed end to end and alone, and report the ratio",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of the model alone and end to end (default 3)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)

    from m2ort_fast.slide import open_slide, require_mpp
    from m2ort_fast.spots import grid_spots
    from m2ort_fast.tissue import tissue_mask

    section = args.data / args.section
    if args.slide is None and not section.is_dir():
        print(
            f"bench/slide.py: no her2st section at {section} (../shared/data is absent): nothing measured",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.slide is not None:
            with open_slide(args.slide) as given:
                path, mpp = args.slide, require_mpp(given)
        else:
            path, mpp = prepare_slide(section, args.region_px, tmp)
        predictor = make_predictor(args, mpp, tmp)
        baseline = None
        if args.baseline:  # built before the timed runs: a wrong name fails at once, a compile is not timed
            backend, _, precision = args.baseline.partition(":")
            baseline = make_predictor(args, mpp, tmp, backend=backend, precision=precision or "fp32")
        with open_slide(path, reader=args.reader) as slide:
            thumbnail, _ = slide.thumbnail(1600)
            spots = grid_spots(slide, spacing_um=args.spacing_um, mask=tissue_mask(thumbnail))
            centers = np.asarray(spots.centers_px, dtype=np.float64)
            n = len(centers)
            label = args.slide.name if args.slide is not None else f"her2st {args.section}"
            report = {
                "slide": f"{label} {slide.level_dimensions[0]} px, {mpp:.4f} um/px, levels {slide.level_downsamples}",
                "reader": args.reader,
                "spots": n,
                "spacing_um": args.spacing_um,
                "model": f"{predictor.card.variant} ({args.backend} {predictor.precision}, {predictor.backend.device})",
                "level_source": predictor.level_source,
                "batch_size": args.batch_size,
                "torch_threads": torch.get_num_threads(),
                "runs": {},
            }
            # Warm the model (first calls allocate).
            predictor.backend(*[torch.zeros(2, 3, s, s) for s in predictor.card.patch_sizes_px])
            model = predictor.backend
            zero = ZeroModel(len(predictor.genes), model.device, like=model)
            for label, backend in (("end_to_end", model), ("data_path", zero)):
                predictor.backend = backend
                naive = run_naive(predictor, slide, centers)
                streamed = run_streamed(predictor, slide, centers, args.max_memory_mb)
                device = run_streamed(predictor, slide, centers, args.max_gpu_memory_mb, "device")
                plan = streamed[4]
                if label == "end_to_end":
                    end_to_end_predictions = streamed[0]
                    report["bit_equal"] = bool(np.array_equal(naive[0], streamed[0]))
                    report["device_path_bit_equal"] = bool(np.array_equal(streamed[0], device[0]))
                report["runs"][label] = {
                    "naive": {
                        "spots_per_s": round(n / naive[1], 1),
                        "seconds": round(naive[1], 2),
                        "tiles_decoded_per_spot": round(plan.naive_tile_reads / n, 2),
                        "peak_host_mb": round(naive[2] / 2**20, 1),
                        "stages_s": naive[3],
                    },
                    "streamed": {
                        "spots_per_s": round(n / streamed[1], 1),
                        "seconds": round(streamed[1], 2),
                        "tiles_decoded_per_spot": round(plan.tiles_decoded / n, 3),
                        "peak_host_mb": round(streamed[2] / 2**20, 1),
                        "stages_s": streamed[3],
                        "plan": plan.stats(),
                    },
                    "device": {
                        "spots_per_s": round(n / device[1], 1),
                        "seconds": round(device[1], 2),
                        "tiles_decoded_per_spot": round(device[4].tiles_decoded / n, 3),
                        "peak_host_mb": round(device[2] / 2**20, 1),
                        "peak_buffers_mb": round(device[5] / 2**20, 1),
                        "stages_s": device[3],
                        "plan": device[4].stats(),
                    },
                    "speedup": round(naive[1] / streamed[1], 2),
                    "device_vs_host": round(streamed[1] / device[1], 2),
                    "peak_device_mb": device_peak_mb(),
                }
            predictor.backend = model
            on_device = predictor.backend.device.type == "cuda"
            report["decode_only_spots_per_s"] = round(n / decode_only_seconds(slide, device[4], on_device), 1)
            report["model_alone_and_end_to_end"] = interleaved_rounds(
                predictor, slide, centers, args.max_memory_mb, args.rounds, zero
            )
            if baseline is not None:
                report["baseline"] = bench_baseline(
                    baseline,
                    args,
                    slide,
                    centers,
                    end_to_end_predictions,
                    report["runs"]["end_to_end"]["streamed"]["spots_per_s"],
                )
        # A compact block of the dense grid (the spots nearest the tissue's middle), as a dense
        # map is read: spots scattered over the whole slide would make every planned band span it.
        middle = np.median(centers, axis=0)
        subset = centers[np.argsort(np.hypot(*(centers - middle).T), kind="stable")[: args.reader_spots]]
        report["readers"] = bench_readers(path, mpp, subset, predictor.card, args.max_memory_mb)

    print(json.dumps(report, indent=2))
    print()
    print(f"{'run':<12}{'path':<10}{'spots/s':>9}{'tiles/spot':>12}{'peak MB':>9}   stages (s)")
    for label, run in report["runs"].items():
        for path_name in ("naive", "streamed", "device"):
            r = run[path_name]
            print(
                f"{label:<12}{path_name:<10}{r['spots_per_s']:>9}{r['tiles_decoded_per_spot']:>12}"
                f"{r['peak_host_mb']:>9}   {r['stages_s']}"
            )
        print(f"{label:<12}speedup {run['speedup']}x (streamed vs naive), device path {run['device_vs_host']}x host")
    print(rounds_line("model", report["model_alone_and_end_to_end"]))
    print(f"decoding the planned tiles alone {report['decode_only_spots_per_s']} spots/s")
    print(f"predictions bit-equal: naive/streamed {report['bit_equal']}, host/device {report['device_path_bit_equal']}")
    if "baseline" in report:
        b = report["baseline"]
        print(
            f"baseline {b['backend']} {b['precision']}: streamed {b['streamed_spots_per_s']} spots/s; this run's "
            f"streamed is {b['streamed_vs_baseline']}x it (same process), predictions differ by at most "
            f"{b['max_abs_diff']:.2e}"
        )
        print(rounds_line("baseline", b["model_alone_and_end_to_end"]))
    for r in report["readers"]:
        print(r)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
