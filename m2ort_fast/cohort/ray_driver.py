"""Cohorts on Ray: Ray Core actors, one per GPU (or per ``cpus_per_worker`` cores), fed one slide
at a time, largest first; a slide whose worker died is handed out again."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m2ort_fast.cohort.manifest import (
    FAILED,
    PENDING,
    RUNNING,
    CohortRun,
    Manifest,
    ManifestRow,
    finish_row,
    log_row,
)
from m2ort_fast.cohort.worker import CohortWorker, SlideTask
from m2ort_fast.errors import M2ORTError, OutputError, exception_detail
from m2ort_fast.outputs import STAGING_SUFFIX, StagedOutput

log = logging.getLogger(__name__)

DEFAULT_CPUS_PER_WORKER = 8  # CPU-only clusters: decode threads + the model's intra-op threads


WORKER_RESTARTS = 3  # Ray restarts of one worker (max_restarts) before it is given up


WAIT_S = 0.5  # the driver's longest sleep: Ctrl-C and the manifest's next write are not held up


MAX_PROBES = 20  # a restarting worker that still does not answer is given up


STAGING_UNLOCK_WAIT_S = 10.0  # a dead worker's staging lock is released when its process is gone


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise M2ORTError(
            'Ray is not installed: pip install "m2ort-fast[ray]" (or run shards without Ray: --shard I/N)'
        ) from None
    return ray


def worker_layout(
    nodes: Sequence[dict[str, float]], workers: int | None, cpus_per_worker: int, use_gpu: bool
) -> tuple[int, float, float]:
    """(workers, CPUs each, GPUs each) for a cluster whose alive nodes have ``nodes``' resources
    ({"CPU": .., "GPU": ..}): one worker per GPU with the CPUs that come with it (``workers`` more
    than the GPUs: k = ceil(workers / GPUs) share each GPU, 1/k of it and of its CPUs each, so the
    CPU-side stages of k slides overlap on one GPU), or on CPUs alone ``cpus_per_worker`` each
    (``workers`` given: as many CPUs each as lets them all fit, node by node, so that none waits
    for a node with room that never comes)."""
    if use_gpu:
        gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= 1]
        gpus = sum(int(n["GPU"]) for n in gpu_nodes)
        count = workers or gpus
        share = -(-count // gpus)  # workers per GPU
        cpus = min(max(1, int(n.get("CPU", 1) // (int(n["GPU"]) * share))) for n in gpu_nodes)
        return count, float(cpus), 1.0 / share
    node_cpus = [int(n.get("CPU", 0)) for n in nodes]
    if workers is None:
        each = min(cpus_per_worker, max(node_cpus, default=1)) or 1
        return max(1, sum(c // each for c in node_cpus)), float(each), 0.0
    for each in range(max(node_cpus, default=1), 0, -1):
        if sum(c // each for c in node_cpus) >= workers:
            return workers, float(each), 0.0
    return workers, max(sum(node_cpus), 1) / workers, 0.0  # more workers than CPUs: they share them


def _death_reason(exc: BaseException) -> str:
    """A Ray error about a dead worker as one short line (Ray's text spans many)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith("The actor") and "because" in line), None)
    return exception_detail(Exception(reason or (lines[0] if lines else type(exc).__name__)), limit=None)


def discard_staging(out: Path, stem: str) -> None:
    """Remove a dead worker's staging folder once its lock is free (its process is gone)."""
    if not (out / f".{stem}{STAGING_SUFFIX}").exists():
        return
    deadline = time.monotonic() + STAGING_UNLOCK_WAIT_S
    while True:
        try:
            StagedOutput(out, stem).discard()
            return
        except OutputError as exc:
            if time.monotonic() > deadline:
                log.warning("%s (left in place)", exc)
                return
            time.sleep(0.2)


@dataclass
class _Slot:
    """One actor as the driver sees it: idle, busy (``running``), restarting or dead."""

    name: str
    handle: Any
    state: str = "starting"
    host: str = ""
    running: int | None = None
    reserved: int | None = None  # the slide it opens meanwhile: given to it next
    probes: int = 0  # "are you back?" asked since it last died


class RayDriver:
    """Hands the slides of ``todo`` to Ray actors and records what comes back."""

    def __init__(
        self,
        run: CohortRun,
        manifest: Manifest,
        tasks: dict[int, SlideTask],
        rows: dict[int, ManifestRow],
        todo: deque[int],
        worker_args: dict[str, Any],
        sha: str,
        max_attempts: int,
        out: Path,
    ):
        self.run_, self.manifest, self.tasks, self.rows, self.queue = run, manifest, tasks, rows, todo
        self.worker_args, self.sha, self.max_attempts, self.out = worker_args, sha, max_attempts, out
        self.total, self.finished = len(todo), 0
        self.slots: list[_Slot] = []
        self.refs: dict[Any, tuple[_Slot, str]] = {}  # in flight: ObjectRef -> (slot, "ready" | "run")
        self.started = time.perf_counter()
        self.last_death = ""

    def run(self, address: str, workers: int | None, cpus_per_worker: int, predictor_options: dict[str, Any]) -> None:
        ray = import_ray()
        self.ray = ray
        ours = not ray.is_initialized()
        if ours:
            try:
                ray.init(address=None if address == "auto" else address, logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise M2ORTError(f"cannot connect to the Ray cluster at {address}: {exception_detail(exc)}") from None
        self.run_.seconds["connect"] = round(time.perf_counter() - self.started, 4)
        try:
            nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
            device = str(predictor_options.get("device", "auto"))
            use_gpu = device != "cpu" and any(n.get("GPU", 0) >= 1 for n in nodes)
            if device.startswith("cuda") and not use_gpu:
                raise M2ORTError(f"--device {device}, but the Ray cluster has no GPUs")
            count, cpus, gpus = worker_layout(nodes, workers, cpus_per_worker, use_gpu)
            count = min(count, len(self.queue))
            # no progress bars unless asked: many workers' bars would interleave in the driver's log
            worker_options = {"progress": False, **predictor_options}
            if gpus:  # each worker sees its own GPU as cuda:0 (Ray sets CUDA_VISIBLE_DEVICES)
                worker_options["device"] = "cuda"
            self.worker_args["predictor_options"] = worker_options
            log.info(
                "%d Ray worker%s for %d slides, each with %g CPU%s%s",
                count,
                "" if count == 1 else "s",
                self.total,
                cpus,
                "" if cpus == 1 else "s",
                f" and {gpus:g} GPU" if gpus else "",
            )
            self._start(count, cpus, gpus, pilot=predictor_options.get("backend", "torch") != "torch")
            self._loop()
        except BaseException:
            self._stop(interrupted=True)
            raise
        else:
            self._stop(interrupted=False)
        finally:
            if ours:
                ray.shutdown()

    def _start(self, count: int, cpus: float, gpus: float, pilot: bool) -> None:
        """Start the actors. A compiled backend's artifact is built by the first worker alone and
        then loaded by the others from the artifact cache (point $M2ORT_FAST_CACHE at a shared
        folder for one build per GPU model across nodes), not built by each at once."""
        env = {k: os.environ[k] for k in ("M2ORT_FAST_CACHE",) if k in os.environ}
        actor = self.ray.remote(CohortWorker)
        options: dict[str, Any] = dict(
            num_cpus=cpus,
            num_gpus=gpus,
            max_restarts=WORKER_RESTARTS,
            max_task_retries=0,  # a slide whose worker died goes back to the queue (below), to any worker
        )
        if env:
            options["runtime_env"] = {"env_vars": env}
        run_id = uuid.uuid4().hex[:6]
        threads = max(1, int(cpus))
        for k in range(count):
            name = f"m2ort-fast-{run_id}-{k}"
            handle = actor.options(name=name, **options).remote(name, num_threads=threads, **self.worker_args)
            slot = _Slot(name=name, handle=handle)
            self.slots.append(slot)
            self.refs[handle.info.remote()] = (slot, "ready")
            if pilot and k == 0 and count > 1:
                log.info("starting one worker first: it builds the backend's artifact for the others")
                self._wait_for(slot)

    def _wait_for(self, slot: _Slot) -> None:
        while slot.state == "starting":
            self._handle(self._wait())

    def _wait(self) -> list[Any]:
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=WAIT_S)
        return ready

    def _loop(self) -> None:
        while self.finished < self.total:
            for slot in self.slots:
                if slot.state == "idle":
                    self._assign(slot)
            if all(slot.state == "dead" for slot in self.slots):
                left = self.total - self.finished
                raise M2ORTError(
                    f"every Ray worker died ({self.last_death}); {left} slides not done: rerun to resume them"
                )
            if not self.refs:
                raise RuntimeError("the cohort driver has slides left but nothing in flight")
            self._handle(self._wait())
            self.manifest.write()

    def _assign(self, slot: _Slot) -> None:
        """Give ``slot`` its reserved slide, else the queue's head, else (the queue empty) the
        largest slide another worker reserved, so that no worker idles at the end while a busy one
        holds one. Then reserve the queue's next slide for it to open meanwhile, when every other
        worker is busy too: one starting, restarting or idle takes that slide itself instead,
        largest first."""
        if slot.reserved is not None:
            i, slot.reserved = slot.reserved, None
        elif self.queue:
            i = self.queue.popleft()
        else:
            reserved = [s for s in self.slots if s.reserved is not None]
            if not reserved:
                return
            other = min(reserved, key=lambda s: self._largest_first(s.reserved))
            i, other.reserved = other.reserved, None  # type: ignore[assignment]
        others_busy = all(s.state in ("busy", "dead") for s in self.slots if s is not slot)
        slot.reserved = self.queue.popleft() if self.queue and others_busy else None
        prefetch = self.tasks[slot.reserved] if slot.reserved is not None else None
        slot.running, slot.state = i, "busy"
        row = self.rows[i]
        row.status, row.attempts, row.worker, row.host = RUNNING, row.attempts + 1, slot.name, slot.host
        self.manifest.changed()
        self.refs[slot.handle.run.remote(self.tasks[i], prefetch)] = (slot, "run")

    def _largest_first(self, i: int | None) -> tuple[int, str]:
        row = self.rows[i] if i is not None else None
        return (-row.size_bytes, row.slide) if row else (0, "")

    def _handle(self, ready: list[Any]) -> None:
        ray = self.ray
        for ref in ready:
            slot, kind = self.refs.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # raised past the worker's own handling: a bug
                if kind == "ready":
                    raise M2ORTError(f"worker {slot.name} did not start: {exception_detail(exc)}") from None
                self._record(slot, {"status": FAILED, "error": f"unexpected error: {exception_detail(exc)}"})
            except ray.exceptions.RayError as exc:  # the worker is gone (killed, out of memory, node lost)
                if kind == "ready":
                    self._probe_failed(slot, exc)
                else:
                    self._worker_died(slot, exc)
            else:
                if kind == "ready":
                    self._ready(slot, value)
                else:
                    self._record(slot, value)

    def _ready(self, slot: _Slot, info: dict[str, Any]) -> None:
        if info["error"]:
            raise M2ORTError(f"worker {slot.name} on {info['host']}: {info['error']}")
        if info["checkpoint_sha256"] != self.sha:
            raise M2ORTError(
                f"worker {slot.name} on {info['host']} loaded a checkpoint with sha256 "
                f"{info['checkpoint_sha256'][:12]}, not {self.sha[:12]}: give a path that names the same file "
                f"on every node"
            )
        first = slot.state == "starting"
        slot.state, slot.host = "idle", info["host"]
        ready_s = round(time.perf_counter() - self.started, 4)
        if first:
            self.run_.workers.append({**info, "ready_s": ready_s})
            self.run_.seconds.setdefault("start", ready_s)
        log.info(
            "worker %s %s on %s (%s, model loaded in %.1f s)",
            slot.name,
            "ready" if first else "restarted",
            info["host"],
            info["device"],
            info["load_s"],
        )

    def _record(self, slot: _Slot, fields: dict[str, Any]) -> None:
        i, slot.running, slot.state = slot.running, None, "idle"
        assert i is not None
        row = self.rows[i]
        finish_row(row, fields)
        self.finished += 1
        self.manifest.changed()
        log_row(row, self.finished, self.total)

    def _worker_died(self, slot: _Slot, exc: BaseException) -> None:
        """Re-queue what the dead worker held (its running slide counts an attempt, its staging
        folder is removed) and ask Ray whether the worker comes back (restarted) or not."""
        reason = f"worker {slot.name} on {slot.host or '?'} died: {_death_reason(exc)}"
        log.warning("%s", reason)
        if slot.reserved is not None:
            self.queue.appendleft(slot.reserved)
            slot.reserved = None
        i, slot.running = slot.running, None
        if i is not None:
            row = self.rows[i]
            discard_staging(self.out, row.stem)
            row.retried_because = reason
            if row.attempts >= self.max_attempts:
                self._record_failure(i, f"{reason} (gave up after {row.attempts} attempts)")
            else:
                row.status = PENDING
                self.queue.appendleft(i)  # the largest left, or near it: first again
            self.manifest.changed()
        slot.state, slot.probes = "restarting", 0
        self.refs[slot.handle.info.remote()] = (slot, "ready")

    def _probe_failed(self, slot: _Slot, exc: BaseException) -> None:
        """A worker that did not answer: gone for good (killed without restart, restarts used up,
        or it could not start), or still restarting (asked again)."""
        slot.probes += 1
        if isinstance(exc, self.ray.exceptions.ActorDiedError) or slot.probes > MAX_PROBES:
            self.last_death = f"worker {slot.name} on {slot.host or '?'}: {_death_reason(exc)}"
            log.warning("%s; it is not restarted", self.last_death)
            slot.state = "dead"
            return
        self.refs[slot.handle.info.remote()] = (slot, "ready")

    def _record_failure(self, i: int, error: str) -> None:
        row = self.rows[i]
        finish_row(row, {"status": FAILED, "error": error})
        self.finished += 1
        log_row(row, self.finished, self.total)

    def _stop(self, interrupted: bool) -> None:
        """Kill the actors (Ray would at the job's end; now frees their GPUs at once). When
        interrupted: wait until they are gone, record the slides they finished before (their
        results came back but were not read yet), then remove the staging folders of the slides
        they still held and put those back to pending, so the manifest says what a rerun will do."""
        ray = self.ray
        for slot in self.slots:
            with contextlib.suppress(Exception):
                ray.kill(slot.handle, no_restart=True)
        if not interrupted:
            return
        runs = {ref: slot for ref, (slot, kind) in self.refs.items() if kind == "run"}
        with contextlib.suppress(Exception):
            ray.wait(list(runs), num_returns=len(runs), timeout=STAGING_UNLOCK_WAIT_S)
        for ref, slot in runs.items():
            try:
                fields = ray.get(ref, timeout=0)
            except Exception:  # killed under it: handled below
                continue
            self._record(slot, fields)
        for slot in self.slots:
            if slot.running is not None:
                discard_staging(self.out, self.rows[slot.running].stem)
                self.rows[slot.running].status = PENDING
                slot.running = None
        self.manifest.changed()
