"""Cohorts: many slides over Ray workers on one or many machines, or one shard per job-array task.

    from m2ort_fast.cohort import predict_cohort
    run = predict_cohort(slides, model="model.safetensors", out_dir="results", ray_address="auto")

Modules: ``run`` (:func:`predict_cohort`: the plan, decided by each slide's run record, and the
run in this process), ``ray_driver`` (Ray Core actors fed one slide at a time, largest first,
faults retried), ``worker`` (one loaded model, many slides), ``manifest`` (``OUT/manifest.csv``,
replaced atomically), ``shards`` (job arrays balanced by size). Ray is imported only on the Ray
path.
"""

from m2ort_fast.cohort.manifest import (
    DONE,
    FAILED,
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    PENDING,
    RUNNING,
    SKIPPED,
    STAGES,
    CohortRun,
    Manifest,
    ManifestRow,
    read_manifest,
)
from m2ort_fast.cohort.ray_driver import DEFAULT_CPUS_PER_WORKER, worker_layout
from m2ort_fast.cohort.run import DEFAULT_MAX_ATTEMPTS, predict_cohort
from m2ort_fast.cohort.shards import parse_shard, shard_members, slide_size
from m2ort_fast.cohort.worker import CohortWorker, SlideTask

__all__ = [
    "DEFAULT_CPUS_PER_WORKER",
    "DEFAULT_MAX_ATTEMPTS",
    "DONE",
    "FAILED",
    "MANIFEST_COLUMNS",
    "MANIFEST_NAME",
    "PENDING",
    "RUNNING",
    "SKIPPED",
    "STAGES",
    "CohortRun",
    "CohortWorker",
    "Manifest",
    "ManifestRow",
    "SlideTask",
    "parse_shard",
    "predict_cohort",
    "read_manifest",
    "shard_members",
    "slide_size",
    "worker_layout",
]
