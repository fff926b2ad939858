"""`m2ort-fast` command line: a thin layer over the Python API.

    m2ort-fast predict [SLIDE ...]       per-spot predictions (.h5ad, .csv, heatmaps); no slide: the demo
    m2ort-fast info [SLIDE] [--model V]  slide levels / mpp / vendor; model parameters and FLOPs
    m2ort-fast convert IMAGE OUT.tiff    flat image -> tiled pyramidal TIFF
    m2ort-fast export --checkpoint CKPT --format onnx|aoti|tensorrt
    m2ort-fast train --config CONFIG     /  m2ort-fast evaluate --checkpoint CKPT SECTION_DIR

Problems with the input are printed as one line (``m2ort-fast: error: FILE: problem``), exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from m2ort_fast.bounds import CLI_OPTIONS, DEFAULT_MAX_SPOTS
from m2ort_fast.cohort.cli import add_cohort_arguments, is_cohort_run, run_cohort
from m2ort_fast.engine import DATA_PATHS, DEFAULT_MAX_GPU_MEMORY_MB, DEFAULT_MAX_MEMORY_MB
from m2ort_fast.errors import M2ORTError
from m2ort_fast.options import DEFAULT_OUT_DIR, MAX_HEATMAPS, device_name, mpp_value, number, positive_int
from m2ort_fast.precision import PRECISION_CHOICES
from m2ort_fast.predict import DEFAULT_MODEL, SHIPPED_MODELS
from m2ort_fast.slide import READERS

log = logging.getLogger(__name__)

# Modules that add their own subcommands through add_subcommands(subparsers).
SUBCOMMAND_MODULES = ("m2ort_fast.convert", "m2ort_fast.export.cli", "m2ort_fast.train", "m2ort_fast.evaluate")


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_predict(subparsers) -> None:
    p = subparsers.add_parser("predict", help="predict per-spot expression for slides (no slide: the demo)")
    for add, title in (
        (_add_input_arguments, "slides, their spots and scale"),
        (_add_model_arguments, "the model and how it runs"),
        (_add_engine_arguments, "the engine"),
        (_add_output_arguments, "outputs"),
    ):
        add(p.add_argument_group(title))
    add_cohort_arguments(p)
    p.set_defaults(func=run_predict)


def _add_input_arguments(p) -> None:
    p.add_argument(
        "slides", nargs="*", help="slides (.svs, pyramidal TIFF, or flat JPEG/PNG/TIFF); none: the shipped demo"
    )
    p.add_argument(
        "--list",
        dest="slide_list",
        default=None,
        metavar="FILE",
        help="text file naming slides, one per line (added after SLIDE ...; # starts a comment)",
    )
    p.add_argument(
        "--spots",
        action="append",
        default=None,
        metavar="FILE",
        help="spot table, once per slide: Visium spatial/ folder or tissue_positions file, legacy ST "
        "spot table, or CSV of centres in level-0 px; none: a grid over the tissue",
    )
    p.add_argument("--spot-format", default="auto", choices=["auto", "visium", "st", "csv"])
    p.add_argument(
        "--spacing-um",
        type=number(float, 0, what="the grid spacing (um)"),
        default=None,
        help="grid spacing when no spot table is given (default 100 um, Visium; smaller for dense maps)",
    )
    p.add_argument(
        "--mpp",
        type=mpp_value,
        default=None,
        help="level-0 microns per pixel, for slides without it (overrides the slide's own, with a warning)",
    )
    p.add_argument(
        "--mpp-force",
        action="store_true",
        help="use --mpp even where it disagrees with the slide's own mpp or what the spots imply (else refused)",
    )
    p.add_argument(
        "--max-spots",
        type=positive_int,
        default=DEFAULT_MAX_SPOTS,
        help="the most spots a grid may have, counted before it is built (default %(default)s)",
    )
    p.add_argument(
        "--reader",
        default="auto",
        choices=["auto", *READERS],
        help="slide reader (default auto: cuCIM, else tiffslide, else OpenSlide; flat images: flat)",
    )


def _add_model_arguments(p) -> None:
    p.add_argument(
        "--checkpoint",
        default=None,
        help=f"model checkpoint (.safetensors) or a shipped model's name ({', '.join(SHIPPED_MODELS)}); "
        f"default: {DEFAULT_MODEL}",
    )
    p.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--batch-size", type=number(int, 0, what="the batch size"), default=64)
    p.add_argument("--backend", default="torch", help="inference backend (default: %(default)s)")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISION_CHOICES,
        help="fp32 (default, the reference), fp16, bf16, int8 (onnxruntime on the CPU), or auto: with "
        "--backend auto, the fastest backend and precision that held the quality bound (docs/precision.md)",
    )
    p.add_argument(
        "--level-source",
        default=None,
        choices=["pyramid", "resize"],
        help="levels 2 and 3 read from the pyramid or resized from level 1 as the paper's code does "
        "(default: as the checkpoint's model was trained)",
    )


def _add_engine_arguments(p) -> None:
    p.add_argument(
        "--engine",
        default="streamed",
        choices=["streamed", "naive"],
        help="streamed (default: each tile decoded once, stages overlapped, bounded memory) or naive "
        "(one read per spot per level); same predictions",
    )
    p.add_argument(
        "--max-memory-mb",
        type=number(float, 0, what="the memory bound (MB)"),
        default=None,
        help=f"streamed engine: bound on decoded slide pixels held at once (default {DEFAULT_MAX_MEMORY_MB})",
    )
    p.add_argument(
        "--data-path",
        default="auto",
        choices=list(DATA_PATHS),
        help="streamed engine: where pixels live between the reader and the model: host (CPU cores), "
        "device (the model's device, from the decoded tiles on) or auto (default: device where the model "
        "runs on a GPU and cuCIM decodes there); same predictions",
    )
    p.add_argument(
        "--max-gpu-memory-mb",
        type=number(float, 0, what="the GPU memory bound (MB)"),
        default=None,
        help=f"device data path: bound on the decoded tiles and batches it holds (default {DEFAULT_MAX_GPU_MEMORY_MB}; "
        "the model's own memory comes on top)",
    )
    p.add_argument(
        "--profile",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="write a per-stage timing summary as JSON (default file: OUT/profile.json) and print it",
    )


def _add_output_arguments(p) -> None:
    p.add_argument("--out", default=DEFAULT_OUT_DIR, help="output folder (default: %(default)s)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo slides whose .h5ad exists in --out (default: skip those made with the same model, spots "
        "and settings, so a stopped batch resumes; refuse those made otherwise)",
    )
    p.add_argument("--genes", type=_csv_list, default=None, help="comma-separated genes to draw heatmaps of")
    p.add_argument(
        "--heatmaps",
        type=number(int, 0, MAX_HEATMAPS, low_inclusive=True, what="the number of heatmaps"),
        default=4,
        help=f"number of heatmaps when --genes is not given (0: none; at most {MAX_HEATMAPS})",
    )
    p.add_argument(
        "--format",
        dest="formats",
        type=_csv_list,
        default=None,
        metavar="FMT[,FMT]",
        help="what to write beside the .h5ad and the CSV (both always written; --no-csv: no CSV): geojson "
        "(QuPath detections: each spot's model window with its predictions as measurements), spatialdata (a "
        "SpatialData zarr store: the slide, spots, windows, tissue and the table; needs the [spatial] extra); "
        "e.g. --format geojson,spatialdata. A rerun that adds a format writes it from the stored predictions",
    )
    p.add_argument("--no-csv", action="store_true", help="do not write the CSV")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run_predict(args) -> int:
    from m2ort_fast.outputs import check_out_dir
    from m2ort_fast.predict import DEMO_SLIDE, DEMO_SPOTS, predict_slides

    check_out_dir(args.out)
    slides, spots = list(args.slides), args.spots
    if args.slide_list:
        slides += _read_slide_list(args.slide_list)
    if not slides:
        slides, spots = [str(DEMO_SLIDE)], [str(DEMO_SPOTS)]
        log.info("no slide given: running the demo (%s with its spot table)", DEMO_SLIDE.name)
    if spots is not None and len(spots) != len(slides):
        raise M2ORTError(
            f"--spots given {len(spots)} times for {len(slides)} slides: give it once per slide, or not at all"
        )
    if is_cohort_run(args):  # --ray / --shard: m2ort_fast.cohort, with a manifest
        return run_cohort(args, slides, spots, _run_options(args))
    results = predict_slides(
        slides,
        model=args.checkpoint,
        out_dir=args.out,
        spots=spots,
        **_run_options(args),
        progress=not args.quiet,
        stop_on_error=len(slides) == 1,
    )
    failed = 0
    for result in results:
        if not result.ok:
            failed += 1
            continue
        if result.skipped:
            print(
                f"{result.slide.name}: skipped, its .h5ad in {args.out} was made from the same run record "
                f"(model, spots, settings and formats; --overwrite to redo it)"
            )
            continue
        if result.added:
            assert result.outputs is not None
            print(
                f"{result.slide.name}: added {', '.join(result.added) or 'heatmaps'} to {result.outputs.h5ad} "
                f"from its stored predictions (the model did not run)"
            )
            continue
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items())
        assert result.outputs is not None  # ok and not skipped: written
        print(
            f"{result.slide.name}: {result.n_spots} spots at {result.mpp:.4f} um/px ({result.mpp_source}) -> "
            f"{result.outputs.h5ad}  [{stages}]"
        )
    if args.profile is not None:
        _write_profile(args.profile or str(Path(args.out) / "profile.json"), results, args)
    if failed:
        print(f"{failed} of {len(results)} slides failed (see the errors above)", file=sys.stderr)
    return 1 if failed else 0


def _read_slide_list(path: str) -> list[str]:
    """Slides named in a text file, one per line; relative paths are relative to the file."""
    list_path = Path(path)
    try:
        lines = list_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise M2ORTError(f"cannot read the slide list: {exc}", list_path) from None
    names = [line.split("#", 1)[0].strip() for line in lines]
    slides = [str(list_path.parent / name) if not Path(name).is_absolute() else name for name in names if name]
    if not slides:
        raise M2ORTError("the slide list names no slides", list_path)
    return slides


def _run_options(args) -> dict[str, Any]:
    """The predict options the command line sets, for predict_slides and predict_cohort alike."""
    options: dict[str, Any] = {
        "streamed": args.engine == "streamed",
        "overwrite": args.overwrite,
        "spot_format": args.spot_format,
        "spacing_um": args.spacing_um,
        "mpp": args.mpp,
        "mpp_force": args.mpp_force,
        "max_spots": args.max_spots,
        "option_names": CLI_OPTIONS,
        "reader": args.reader,
        "heatmap_genes": args.genes,
        "n_heatmaps": args.heatmaps,
        "write_csv": not args.no_csv,
        "formats": args.formats,
        "backend": args.backend,
        "device": args.device,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "level_source": args.level_source,
    }
    if args.max_memory_mb is not None:
        options["max_memory_mb"] = args.max_memory_mb
    if args.data_path != "auto":
        options["data_path"] = args.data_path
    if args.max_gpu_memory_mb is not None:
        options["max_gpu_memory_mb"] = args.max_gpu_memory_mb
    return options


def _write_profile(path: str, results, args) -> None:
    """Per-slide stage seconds (stages overlap in the streamed engine), throughput, read plan."""
    slides = []
    for r in results:
        entry = {"slide": str(r.slide), "ok": r.ok, "skipped": r.skipped, "error": r.error}
        if r.ok and not r.skipped:
            entry.update(
                {
                    "spots": r.n_spots,
                    "wall_s": r.wall_seconds,
                    "stage_s": r.seconds,
                    "spots_per_s": round(r.n_spots / r.wall_seconds, 2) if r.wall_seconds else None,
                    "engine": r.engine,
                }
            )
        slides.append(entry)
    report = {
        "engine": args.engine,
        "backend": args.backend,
        "device": args.device,
        "batch_size": args.batch_size,
        "slides": slides,
    }
    text = json.dumps(report, indent=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(text)
    print(f"profile written to {path}")


def add_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="describe a slide (levels, mpp, vendor) and/or a model (params, FLOPs)")
    p.add_argument("slide", nargs="?", help="slide to describe")
    p.add_argument("--model", default=None, help="model variant: tiny, small, base, large, or 'all'")
    p.add_argument(
        "--checkpoint", default=None, help="describe a checkpoint or shipped model (variant, genes, mpp, provenance)"
    )
    p.add_argument("--genes", type=positive_int, default=250, help="gene panel size for --model (default 250)")
    p.add_argument("--mpp", type=mpp_value, default=None, help="level-0 mpp to assume for a slide without it")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--backends",
        action="store_true",
        help="what --backend auto would pick here for --checkpoint (default: the shipped model): figures and why",
    )
    p.add_argument("--retime", action="store_true", help="with --backends: time the candidates again now")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto", help="with --backends (default auto)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="with --backends: the run's (default 64)")
    p.add_argument("--device", type=device_name, default="auto", help="with --backends: cpu, cuda, cuda:N, auto")
    p.add_argument("--candidates", type=_csv_list, default=None, help="with --backends: backends to try")
    p.add_argument("--budget-s", type=number(float, 0), default=60.0, help="with --backends: most seconds of timing")
    p.set_defaults(func=run_info)


def run_info(args) -> int:
    from m2ort_fast.model import VARIANTS, describe, get_config

    report: dict[str, Any] = {}
    if args.slide:
        from m2ort_fast.slide import open_slide

        with open_slide(args.slide, mpp=args.mpp) as slide:
            report["slide"] = slide.info()
    if args.checkpoint:
        from m2ort_fast.checkpoint import card_size, read_card
        from m2ort_fast.predict import checkpoint_path

        path = checkpoint_path(args.checkpoint)
        card = read_card(path)
        report["checkpoint"] = {
            "path": str(path),
            "model_id": card.model_id,
            "variant": card.variant,
            "trained": card.trained,
            "n_genes": len(card.genes),
            "genes_head": card.genes[:10],
            "mpp": card.mpp,
            "level_mpp": card.level_mpp,
            "patch_sizes_px": card.patch_sizes_px,
            "target_transform": card.target_transform,
            "provenance": card.provenance,
            **card_size(card),
        }
    if args.backends:
        from m2ort_fast.backends.auto_info import auto_info
        from m2ort_fast.predict import checkpoint_path

        report["backends"] = auto_info(
            str(checkpoint_path(args.checkpoint)),
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
            candidates=args.candidates,
            retime=args.retime,
            budget_s=args.budget_s,
        )
    elif args.retime:
        raise M2ORTError("--retime goes with --backends")
    if args.model or not report:
        names = list(VARIANTS) if args.model in (None, "all") else [args.model]
        try:
            report["models"] = [describe(get_config(name, args.genes)) for name in names]
        except ValueError as exc:
            raise M2ORTError(str(exc)) from None
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_info(report)
    return 0


def _print_info(report: dict) -> None:
    if "slide" in report:
        s = report["slide"]
        print(
            f"slide {s.get('path')}: reader {s.get('reader')}, vendor {s.get('vendor')}, "
            f"mpp {s.get('mpp')} ({s.get('mpp_source')})"
        )
        for i, level in enumerate(s.get("levels", [])):
            print(f"  level {i}: {level}")
    if "checkpoint" in report:
        c = report["checkpoint"]
        print(
            f"checkpoint {c['path']}: {c['model_id']} ({c['variant']}, "
            f"{'trained' if c['trained'] else 'NOT trained'}), {c['n_genes']} genes, level-1 mpp {c['mpp']}, "
            f"{c['params_M']} M params, {c['gflops_per_spot']} GFLOPs/spot"
        )
    if "backends" in report:
        from m2ort_fast.backends.auto_info import format_auto_info

        print(format_auto_info(report["backends"]))
    for m in report.get("models", []):
        note = "" if m["in_paper"] else "  (not in the paper: demo/test size)"
        print(
            f"{m['variant']:>6}: D={m['dim']} depth={m['depth']} heads={m['heads']}x64 mlp={m['mlp_dim']} "
            f"genes={m['n_genes']}  params {m['params']:,} ({m['params_M']} M)  "
            f"{m['gflops_per_spot']} GFLOPs/spot{note}"
        )


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (argparse prints the usage block above them)."""

    def error(self, message: str):
        self.exit(2, f"m2ort-fast: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from m2ort_fast import __version__

    parser = _Parser(prog="m2ort-fast", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"m2ort-fast {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_predict(subparsers)
    add_info(subparsers)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_subcommands(subparsers)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop): unwinds like Ctrl-C, so staging is removed."""


def _raise_terminated(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="m2ort-fast: %(message)s", stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    if not args.command:
        parser.print_help()
        return 2
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(args.func(args) or 0)
    except M2ORTError as exc:
        print(f"m2ort-fast: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("m2ort-fast: terminated (SIGTERM); unfinished outputs removed", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("m2ort-fast: interrupted; unfinished outputs removed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
