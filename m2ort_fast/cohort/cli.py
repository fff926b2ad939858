"""The ``predict`` options of cohort runs (Ray workers, or a job-array shard) and their run."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from m2ort_fast.cohort.manifest import DONE, FAILED, SKIPPED
from m2ort_fast.cohort.run import predict_cohort
from m2ort_fast.cohort.shards import parse_shard
from m2ort_fast.errors import M2ORTError
from m2ort_fast.options import positive_int


def _shard_spec(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except M2ORTError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_cohort_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "cohorts",
        "many slides over Ray workers, or one shard of them per job-array task; OUT/manifest.csv "
        "records every slide, and the same command again resumes (done slides skipped)",
    )
    g.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="ADDRESS",
        help="run on Ray: auto (alone: a running cluster, else a local one) or the cluster's address "
        "(host:6379, ray://host:10001); one worker per GPU (without GPUs: per 8 cores). Give slides before it",
    )
    g.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="--ray: how many workers (default: one per GPU; more than the GPUs: they share them)",
    )
    g.add_argument(
        "--shard",
        type=_shard_spec,
        default=None,
        metavar="I/N",
        help="only the I-th of N shards balanced by slide size (I from 0, e.g. $SLURM_ARRAY_TASK_ID/N), "
        "without Ray unless --ray is given; manifest: OUT/manifest.shard-I-of-N.csv",
    )
    g.add_argument(
        "--retry-failed", action="store_true", help="--ray/--shard: redo the slides the manifest records as failed"
    )


def is_cohort_run(args: argparse.Namespace) -> bool:
    """--ray or --shard given; their companions alone are a one-line error."""
    if args.ray is not None or args.shard is not None:
        if args.profile is not None:
            raise M2ORTError("--profile is for runs without --ray/--shard: their manifest.csv has per-stage seconds")
        return True
    if args.workers is not None:
        raise M2ORTError("--workers needs --ray")
    if args.retry_failed:
        raise M2ORTError("--retry-failed needs --ray or --shard (runs with a manifest)")
    return False


def run_cohort(args: argparse.Namespace, slides: list[str], spots: list[str] | None, options: dict[str, Any]) -> int:
    """``predict`` with --ray or --shard: the cohort's manifest, its counts printed."""
    if args.ray is not None and args.ray != "auto" and ":" not in args.ray:
        raise M2ORTError(
            f"--ray takes auto or an address (host:port, ray://host:port), not {args.ray!r}: "
            f"give the slides before --ray, or write --ray auto"
        )
    run = predict_cohort(
        slides,
        model=args.checkpoint,
        out_dir=args.out,
        spots=spots,
        ray_address=args.ray,
        workers=args.workers,
        shard=args.shard,
        retry_failed=args.retry_failed,
        **options,
        progress=not args.quiet and args.ray is None,  # bars from many workers would interleave
    )
    done, failed, skipped = run.count(DONE), run.count(FAILED), run.count(SKIPPED)
    print(f"{done} done, {failed} failed, {skipped} skipped of {len(run.rows)} slides; manifest {run.manifest}")
    if failed:
        print(
            f"{failed} of {len(run.rows)} slides failed (errors in {run.manifest.name}; --retry-failed redoes them)",
            file=sys.stderr,
        )
    return 1 if failed else 0
