"""Two Ray nodes, one lost mid-run (issue 23): a cluster of two raylets on this machine, a cohort
over both nodes' workers, and one node's processes killed while its worker writes a slide.

Every slide completes exactly once, the manifest stays a valid CSV throughout, nothing is left
behind (staging folders, lock files, Ray worker processes) and the outputs equal the single-process
ones (``ray_address=None``) bit for bit.

The cluster is Ray's own test cluster (``ray.cluster_utils.Cluster``, what Ray's tests use): a head
node and a second node, one CPU each, each its own raylet, object store and worker pool, as
``ray start --head`` and ``ray start --address`` make them; ``Cluster.remove_node`` kills a node's
processes (SIGKILL, no grace: the node is lost, not drained). The nodes run under a private
``RAY_TMPDIR``: they do not become the machine's "current cluster" that another ``ray.init()`` would
join, and their processes are found (by that variable in their environment) and stopped by pid.

Opt-in (~2 min on 2 shared cores, the cohort itself 25-60 s):
``M2ORT_RAY_TWO_NODES=1 python -m pytest -q -rs -s tests/test_cohort_two_nodes.py`` (``-s`` prints the
run's figure; ``M2ORT_RAY_TWO_NODES_LOG=1`` the driver's log as well); ``.ci/run`` runs it."""

from __future__ import annotations

import _thread
import csv
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch

from m2ort_fast.cohort import DONE, MANIFEST_COLUMNS, PENDING, RUNNING, predict_cohort
from m2ort_fast.convert import write_pyramid
from m2ort_fast.predict import DEMO_SLIDE
from m2ort_fast.slide import open_slide

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("M2ORT_RAY_TWO_NODES") != "1",
        reason="two Ray nodes, one lost (~2 min): opt-in with M2ORT_RAY_TWO_NODES=1 (.ci/run runs it)",
    ),
]

# Eight crops of the demo slide on a 55 um grid: 100-700 spots, 1-4 s a slide on one thread, so
# the lost node's worker is caught mid-slide (rows written) and the other node has work left.
SIDES_PX = (2048, 1792, 1536, 1280, 1152, 1024, 896, 768)
OPTIONS = dict(spacing_um=55.0, n_heatmaps=0, batch_size=16)
DRIVER_TIMEOUT_S = 240  # a driver that has not returned by then hangs: interrupted, the test fails
KILL_TIMEOUT_S = 120
PROCESS_EXIT_S = 20  # the run's Ray worker processes are gone this long after it returns


# --------------------------------------------------------------------------------------------
# Processes: the cluster's, by the RAY_TMPDIR in their environment; a node's workers, by parent


def processes_with_env(marker: str) -> dict[int, str]:
    """pid -> command line of every process whose environment holds ``marker`` (this one aside)."""
    found, needle = {}, marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def children(pid: int) -> list[int]:
    """The processes ``pid`` started, from any of its threads."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def cohort_workers(raylet_pid: int) -> list[int]:
    """The CohortWorker actors' processes a raylet started (Ray titles them ``ray::CohortWorker``)."""
    return [pid for pid in children(raylet_pid) if command_line(pid).startswith("ray::CohortWorker")]


def staging_held(pid: int, out: Path) -> str | None:
    """The stem whose staging folder's lock the process holds open (it is writing that slide)."""
    pattern = re.compile(rf"^{re.escape(str(out))}/\.(.+)\.partial/lock$")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            match = pattern.match(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if match:
            return match.group(1)
    return None


def stop(pids: dict[int, str]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    with open_slide(DEMO_SLIDE) as slide:
        image, mpp = slide.read_region(0, 0, 0, *slide.level_dimensions[0]), slide.mpp
    folder = tmp_path_factory.mktemp("two_nodes_slides")
    return [
        write_pyramid(np.ascontiguousarray(image[:side, :side]), folder / f"s{k}.tiff", mpp=mpp, downsamples=(1, 4, 16))
        for k, side in enumerate(SIDES_PX)
    ]


@pytest.fixture(scope="module")
def reference(slides, tmp_path_factory):
    """The single-process run (``ray_address=None``) with one torch thread, as each Ray worker has
    (one CPU each): a CPU GEMM orders its sums by its thread count."""
    out = tmp_path_factory.mktemp("two_nodes_reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = predict_cohort(slides, out_dir=out, ray_address=None, progress=False, **OPTIONS)
    finally:
        torch.set_num_threads(threads)
    assert run.count(DONE) == len(slides)
    return out


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node (1 CPU each) under a private RAY_TMPDIR; afterwards every
    process of theirs is stopped (by pid) and none may be left."""
    ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "m2ort-fast[ray]")')
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="m2r2n-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    marker = f"RAY_TMPDIR={temp}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", temp)
        nodes = None
        try:
            nodes = Cluster(
                initialize_head=True,
                head_node_args=dict(num_cpus=1, include_dashboard=False),
                shutdown_at_exit=True,
            )
            nodes.add_node(num_cpus=1)
            nodes.wait_for_nodes()
            yield nodes, marker
        finally:
            if ray.is_initialized():
                ray.shutdown()
            if nodes is not None:
                nodes.shutdown()
            deadline = time.monotonic() + PROCESS_EXIT_S
            while (left := processes_with_env(marker)) and time.monotonic() < deadline:
                time.sleep(0.2)
            stop(left)
            shutil.rmtree(temp, ignore_errors=True)
            assert not left, f"Ray processes left running after the cluster's shutdown (killed now): {left}"


@dataclass
class Watch:
    """What was seen while the cohort ran (by the watcher thread, every ~20 ms)."""

    out: Path
    stems: set[str]
    reads: int = 0
    problems: list[str] = field(default_factory=list)
    statuses: dict[str, set[str]] = field(default_factory=dict)
    killed_stem: str | None = None
    killed_pid: int | None = None
    killed_at: float | None = None
    head_workers: list[int] = field(default_factory=list)
    hung: bool = False
    error: str = ""  # the watcher's own failure (it stops watching)

    def read_manifest(self) -> None:
        """One read of the manifest: a valid CSV with every column and one row per slide."""
        path = self.out / "manifest.csv"
        if not path.exists():
            return
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
            self.reads += 1
            if reader.fieldnames != MANIFEST_COLUMNS:
                self.problems.append(f"columns {reader.fieldnames}")
            if sorted(row["stem"] for row in rows) != sorted(self.stems):
                self.problems.append(f"rows {[row['stem'] for row in rows]}")
            for row in rows:
                if row["status"] not in (PENDING, RUNNING, DONE):
                    self.problems.append(f"{row['stem']}: status {row['status']!r} ({row['error']})")
                self.statuses.setdefault(row["stem"], set()).add(row["status"])
        except (OSError, csv.Error, KeyError, UnicodeDecodeError) as exc:
            self.problems.append(f"unreadable: {exc!r}")


def watch(run_done: threading.Event, state: Watch, nodes, lost) -> None:
    """Read the manifest until the run ends; kill the lost node once its worker has written rows of
    a slide; interrupt the driver when it hangs."""
    from ray._private import ray_constants

    started = time.monotonic()
    raylet = lost.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    head_raylet = nodes.head_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    while not run_done.wait(0.02):
        elapsed = time.monotonic() - started
        if elapsed > DRIVER_TIMEOUT_S and not state.hung:
            state.hung = True
            _thread.interrupt_main()
        if state.error:
            continue
        try:
            state.read_manifest()
            if state.killed_stem is None and elapsed < KILL_TIMEOUT_S:
                for pid in cohort_workers(raylet):
                    stem = staging_held(pid, state.out)
                    if stem and (state.out / f".{stem}.partial" / "written.npy").exists():
                        state.head_workers = cohort_workers(head_raylet)
                        nodes.remove_node(lost, allow_graceful=False)
                        state.killed_stem, state.killed_pid, state.killed_at = stem, pid, time.monotonic()
                        break
        except Exception as exc:
            state.error = repr(exc)
    state.read_manifest()


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def lost_node_run(cluster, slides, tmp_path_factory):
    """The cohort over both nodes (2 workers, 1 CPU each), the second node lost mid-slide."""
    nodes, marker = cluster
    (lost,) = nodes.worker_nodes
    out = tmp_path_factory.mktemp("two_nodes") / "out"
    state = Watch(out=out, stems={p.stem for p in slides})
    records, logger = Records(), logging.getLogger("m2ort_fast.cohort")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(records)
    cluster_processes = set(processes_with_env(marker))  # the nodes' own: GCS, raylets, agents, ...
    run_done = threading.Event()
    watcher = threading.Thread(target=watch, args=(run_done, state, nodes, lost), daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        run = predict_cohort(
            slides, out_dir=out, ray_address=nodes.address, workers=2, cpus_per_worker=1, progress=False, **OPTIONS
        )
    except KeyboardInterrupt:
        if not state.hung:
            raise
        pytest.fail(f"the driver did not return in {DRIVER_TIMEOUT_S} s (interrupted)")
    finally:
        ended = time.monotonic()
        run_done.set()
        watcher.join()
        logger.removeHandler(records)
        logger.setLevel(level)
    # what the run started on the cluster (its actors, any restarted one, idle workers) is gone
    # once it returns; the nodes' own processes stay until the cluster stops
    deadline = time.monotonic() + PROCESS_EXIT_S
    while (workers := {p: c for p, c in processes_with_env(marker).items() if p not in cluster_processes}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    lingering_s = round(time.monotonic() - ended, 1)
    retried = [row.stem for row in run.rows if row.attempts > 1]
    print(
        f"\ntwo nodes, one lost: {len(slides)} slides, 2 workers (1 CPU each, one per node), "
        f"{ended - started:.1f} s to complete (Ray connect {run.seconds.get('connect', 0):.1f} s, first worker "
        f"ready {run.seconds.get('start', 0):.1f} s, node lost at {(state.killed_at or ended) - started:.1f} s "
        f"in {state.killed_stem}), retried: {retried}, the run's Ray processes gone {lingering_s} s after it "
        f"returned; CPU {cpu_model()}, {os.cpu_count()} cores"
    )
    if os.environ.get("M2ORT_RAY_TWO_NODES_LOG"):
        print("\n".join(records.messages))
    return dict(run=run, out=out, state=state, messages=records.messages, workers_left=workers, lingering_s=lingering_s)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


# --------------------------------------------------------------------------------------------
# The tests: one run, each property on its own


def test_the_node_was_lost_mid_slide_with_work_on_both_nodes(lost_node_run):
    state = lost_node_run["state"]
    assert not state.error, f"the watcher failed: {state.error}"
    assert state.killed_stem is not None, "the lost node's worker was never seen writing a slide"
    assert state.head_workers, "no CohortWorker on the head node when the other was lost: not over both nodes"
    assert not state.hung


def test_every_slide_completes_exactly_once(lost_node_run, slides):
    run, out, state, messages = (lost_node_run[k] for k in ("run", "out", "state", "messages"))
    stems = [p.stem for p in slides]
    assert [row.status for row in run.rows] == [DONE] * len(slides), [(r.stem, r.status, r.error) for r in run.rows]
    # the driver records each slide done once: one "done" line each, none skipped or failed
    for path in slides:
        done_lines = [m for m in messages if m.startswith(f"{path}: done, ")]
        assert len(done_lines) == 1, (path.stem, done_lines)
    rows = {row.stem: row for row in run.rows}
    killed = rows[state.killed_stem]
    assert killed.attempts == 2 and "died" in killed.retried_because, killed
    died_worker = re.search(r"worker (\S+) on", killed.retried_because).group(1)
    assert killed.worker != died_worker, "redone by the worker on the node that is left"
    assert [row.stem for row in run.rows if row.attempts != 1] == [state.killed_stem], "only the lost slide retried"
    assert len([m for m in messages if " died: " in m]) == 1, [m for m in messages if "died" in m]
    # each slide's outputs once, nothing else: no staging folder, no temporary file
    expected = {f"{s}.h5ad" for s in stems} | {f"{s}.csv" for s in stems} | {"manifest.csv"}
    left = {p.name for p in out.iterdir()} - {".manifest.csv.lock"}  # the lock: its own test below
    assert left == expected, sorted(left ^ expected)


def test_the_manifest_stays_valid_throughout(lost_node_run, slides):
    state, out = lost_node_run["state"], lost_node_run["out"]
    assert state.reads > 10, "the manifest was hardly read while the run was on"
    assert not state.problems, state.problems[:5]
    assert RUNNING in state.statuses[state.killed_stem], "the lost slide was seen running"
    with open(out / "manifest.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = {row["stem"]: row for row in reader}
    assert reader.fieldnames == MANIFEST_COLUMNS and set(rows) == {p.stem for p in slides}
    assert {row["status"] for row in rows.values()} == {DONE}
    assert all(
        (out / row["h5ad"]).resolve() == (out / f"{stem}.h5ad").resolve() for stem, row in rows.items()
    )  # relative to the manifest


def test_outputs_equal_the_single_process_ones_bit_for_bit(lost_node_run, reference, slides):
    out = lost_node_run["out"]
    for path in slides:
        a, b = anndata.read_h5ad(out / f"{path.stem}.h5ad"), anndata.read_h5ad(reference / f"{path.stem}.h5ad")
        assert a.X.dtype == np.float32 and a.X.shape == b.X.shape and a.X.shape[0] > 0, path.stem
        assert np.array_equal(a.X, b.X), path.stem
        assert a.obs.equals(b.obs) and np.array_equal(a.obsm["spatial"], b.obsm["spatial"]), path.stem
        assert (out / f"{path.stem}.csv").read_bytes() == (reference / f"{path.stem}.csv").read_bytes(), path.stem


def test_no_ray_worker_outlives_the_run(lost_node_run):
    assert not lost_node_run["workers_left"], lost_node_run["workers_left"]


def test_no_manifest_lock_left(lost_node_run):
    out = lost_node_run["out"]
    assert not list(out.glob(".manifest*.lock")), sorted(p.name for p in out.iterdir())
