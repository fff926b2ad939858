"""The run record (m2ort_fast/predict/record.py): one rule decides every rerun, resume and shard.

Each case below once behaved differently by entry point, or silently: a cohort over outputs made
with other settings counted them done; a rerun asking for another format wrote nothing; a run
killed while drawing heatmaps could not be resumed; a killed --overwrite left its staging folder
for good; a failed publish put a new CSV beside the old .h5ad; the manifest's lock file stayed,
its paths were relative to the driver's working directory and its reasons were cut mid-word."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import anndata
import h5py
import numpy as np
import pytest

from m2ort_fast.cli import main
from m2ort_fast.cohort import DONE, SKIPPED, predict_cohort, read_manifest
from m2ort_fast.errors import M2ORTError, exception_detail
from m2ort_fast.predict import DEMO_SLIDE, DEMO_SPOTS, Predictor, RunRecord, decide, read_record

FAST = ["--heatmaps", "0", "--quiet"]


def record(**changes) -> RunRecord:
    fields = dict(
        checkpoint="m (sha256 0)",
        slide="s.tiff (1 bytes)",
        spots="a grid every 100 um over the tissue",
        mpp="the slide's own",
        level_source="resize",
        precision="fp32",
        formats=("csv",),
        heatmaps="the 4 that vary most",
    )
    return RunRecord(**{**fields, **changes})


def test_the_rule(tmp_path):
    h5ad = tmp_path / "s.h5ad"
    assert decide(None, record(), h5ad).action == "run"
    assert decide(record(), record(), h5ad).action == "skip"
    assert decide(record(), record(backend="onnxruntime", version="9"), h5ad).action == "skip"  # not compared
    added = decide(record(), record(formats=("csv", "geojson")), h5ad)
    assert added.action == "add" and added.add == ("geojson",) and not added.heatmaps
    assert added.record.formats == ("csv", "geojson")
    assert decide(record(formats=("csv", "geojson")), record(), h5ad).action == "skip"  # fewer: nothing to add
    redraw = decide(record(), record(heatmaps="genes ERBB2"), h5ad)
    assert redraw.action == "add" and redraw.add == () and redraw.heatmaps
    assert decide(record(), record(precision="auto"), h5ad).action == "skip"  # auto takes what was picked
    with pytest.raises(M2ORTError, match="made with spots 'a grid every 100 um.*this run has spots 'a grid every 55"):
        decide(record(), record(spots="a grid every 55 um over the tissue"), h5ad)
    assert decide(record(), record(spots="x"), h5ad, overwrite=True).action == "run"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["predict", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_rerun_adding_a_format_writes_it_from_the_stored_predictions(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    common = [str(DEMO_SLIDE), "--spots", str(DEMO_SPOTS), "--out", str(out), *FAST]
    assert run_cli(capsys, *common)[0] == 0
    before = anndata.read_h5ad(out / "demo_slide.h5ad")

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(Predictor, "predict_centers", no_model)
    monkeypatch.setattr("m2ort_fast.predict.running.predict_streamed", no_model)
    code, said, _ = run_cli(capsys, *common, "--format", "geojson")
    assert code == 0 and "added geojson" in said and "did not run" in said
    assert (out / "demo_slide.geojson").is_file() and (out / "demo_slide.csv").is_file()
    after = anndata.read_h5ad(out / "demo_slide.h5ad")
    assert np.array_equal(before.X, after.X) and after.obs.equals(before.obs)
    assert read_record(out / "demo_slide.h5ad").formats == ("csv", "geojson")
    code, said, _ = run_cli(capsys, *common, "--format", "geojson")  # now all there: skipped
    assert code == 0 and "skipped" in said
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no staging folder left"


KILLED_RUN = """
import os, signal, sys
from m2ort_fast.outputs import heatmaps
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
heatmaps.write_heatmap = killed
from m2ort_fast.cli import main
sys.exit(main(["predict", *sys.argv[1:]]))
"""


def killed_while_drawing_heatmaps(*argv: str) -> None:
    """A predict run killed with SIGKILL at its first heatmap (after every spot was predicted)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_RUN), *argv], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr


def test_a_run_killed_while_drawing_heatmaps_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    common = [str(DEMO_SLIDE), "--spots", str(DEMO_SPOTS), "--out", str(out), "--heatmaps", "2", "--quiet"]
    killed_while_drawing_heatmaps(*common)
    assert (out / ".demo_slide.partial").is_dir() and not (out / "demo_slide.h5ad").exists()
    result = Predictor(progress=False).predict_slide(DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=out, n_heatmaps=2)
    assert result.ok and result.engine["resumed_spots"] == result.n_spots == 65  # the model did not run again
    assert len(result.outputs.heatmaps) == 3 and all(p.is_file() for p in result.outputs.heatmaps)
    reference = Predictor(progress=False).predict_slide(DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=tmp_path / "ref")
    resumed, clean = anndata.read_h5ad(result.outputs.h5ad), anndata.read_h5ad(reference.outputs.h5ad)
    assert np.array_equal(resumed.X, clean.X)
    assert not (out / ".demo_slide.partial").exists()


def test_a_killed_overwrite_then_a_plain_rerun_leaves_no_staging(tmp_path, capsys):
    out = tmp_path / "out"
    common = [str(DEMO_SLIDE), "--spots", str(DEMO_SPOTS), "--out", str(out), "--heatmaps", "2", "--quiet"]
    assert run_cli(capsys, *common)[0] == 0
    killed_while_drawing_heatmaps(*common, "--overwrite")
    assert (out / ".demo_slide.partial").is_dir()
    code, said, _ = run_cli(capsys, *common)
    assert code == 0 and "skipped" in said
    assert not (out / ".demo_slide.partial").exists()


def test_a_folder_where_the_h5ad_goes_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "demo_slide.h5ad").mkdir(parents=True)
    (out / "demo_slide.h5ad" / "keep").write_text("the user's")
    code, _, err = run_cli(capsys, str(DEMO_SLIDE), "--spots", str(DEMO_SPOTS), "--out", str(out), "--overwrite", *FAST)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert str(out / "demo_slide.h5ad") in lines[0] and "folder" in lines[0] and ".partial" not in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["demo_slide.h5ad"]  # no CSV put in place, no staging


def test_a_cohort_over_outputs_made_otherwise_is_refused_like_predict(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, str(DEMO_SLIDE), "--out", str(out), "--spacing-um", "55", *FAST)[0] == 0
    made = (out / "demo_slide.h5ad").stat().st_mtime_ns
    plain = run_cli(capsys, str(DEMO_SLIDE), "--out", str(out), *FAST)
    shard = run_cli(capsys, str(DEMO_SLIDE), "--out", str(out), "--shard", "0/1", *FAST)
    for code, _, err in (plain, shard):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "spots" in lines[0] and "grid every 55 um" in lines[0], err
    assert (out / "demo_slide.h5ad").stat().st_mtime_ns == made
    with pytest.raises(M2ORTError, match="grid every 55 um"):
        predict_cohort([DEMO_SLIDE], out_dir=out, ray_address=None, n_heatmaps=0, progress=False)


def test_a_cohort_adds_formats_skips_what_is_done_and_leaves_a_clean_manifest(tmp_path, capsys):
    out = tmp_path / "out"
    options = dict(spots=[DEMO_SPOTS], out_dir=out, ray_address=None, n_heatmaps=0, progress=False)
    first = predict_cohort([DEMO_SLIDE], **options)
    assert first.count(DONE) == 1
    row = read_manifest(out / "manifest.csv")[0]
    assert row.h5ad == "demo_slide.h5ad" and row.csv == "demo_slide.csv"  # relative to the manifest's folder
    again = predict_cohort([DEMO_SLIDE], **options)
    assert again.count(DONE) == 1 and not again.workers  # nothing to do: no worker started
    added = predict_cohort([DEMO_SLIDE], formats=["geojson"], **options)
    assert added.count(DONE) == 1 and (out / "demo_slide.geojson").is_file()
    assert (out / read_manifest(out / "manifest.csv")[0].h5ad).is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no lock, no staging
    made_elsewhere = predict_cohort(
        [DEMO_SLIDE], spots=[DEMO_SPOTS], out_dir=tmp_path / "other", ray_address=None, n_heatmaps=0, progress=False
    )
    assert made_elsewhere.count(DONE) == 1
    (tmp_path / "other" / "manifest.csv").unlink()
    skipped = predict_cohort(
        [DEMO_SLIDE], spots=[DEMO_SPOTS], out_dir=tmp_path / "other", ray_address=None, n_heatmaps=0, progress=False
    )
    assert skipped.count(SKIPPED) == 1, "outputs with no manifest row are decided by their record too"


def test_reasons_are_kept_whole_or_cut_between_words():
    long = "worker m2ort-fast-abc-1 died: " + "the actor died unexpectedly because its node was lost " * 6
    assert exception_detail(Exception(long), limit=None) == " ".join(long.split())
    cut = exception_detail(Exception(long), limit=120)
    assert len(cut) <= 120 and cut.endswith(" ...") and long.startswith(cut[:-4])
    assert cut[:-4].split()[-1] in long.split()  # a whole word


def test_an_old_output_without_a_record_names_overwrite(tmp_path):
    h5ad = tmp_path / "x.h5ad"
    anndata.AnnData(np.zeros((1, 1), np.float32)).write_h5ad(h5ad)
    with h5py.File(h5ad, "r") as f:
        assert "uns/m2ort_fast" not in f
    with pytest.raises(M2ORTError, match="--overwrite"):
        read_record(h5ad)
    assert read_record(Path(tmp_path / "none.h5ad")) is None


def test_a_slide_another_process_still_writes_is_left_pending_not_failed(tmp_path, monkeypatch):
    """A killed driver's worker can outlive it (Ray ends it within about a minute) and still hold
    a slide's staging lock: the next run's worker waits for it, then leaves the slide pending, so
    that a plain rerun (no --retry-failed) does it."""
    from m2ort_fast.cohort import PENDING, CohortWorker, SlideTask
    from m2ort_fast.cohort import worker as worker_module
    from m2ort_fast.outputs import StagedOutput
    from m2ort_fast.predict import OpenOptions, OutputOptions

    out = tmp_path / "out"
    held = StagedOutput(out, "demo_slide")  # another run's lock (flock: per open file, so per "process")
    monkeypatch.setattr(worker_module, "STAGING_LOCK_WAIT_S", 0.5)
    worker = CohortWorker("w", None, {"progress": False}, OpenOptions(), OutputOptions(out_dir=out, n_heatmaps=0))
    try:
        fields = worker.run(SlideTask(str(DEMO_SLIDE), str(DEMO_SPOTS), "demo_slide"))
    finally:
        worker.close()
        held.discard()
    assert fields["status"] == PENDING and "another m2ort-fast run" in fields["error"]
    rerun = predict_cohort(
        [DEMO_SLIDE], spots=[DEMO_SPOTS], out_dir=out, ray_address=None, n_heatmaps=0, progress=False
    )
    assert rerun.count(DONE) == 1


def test_api_refusals_name_the_keywords_not_the_flags(tmp_path):
    from m2ort_fast import predict_slides

    out = tmp_path / "out"
    predict_slides([DEMO_SLIDE], out_dir=out, spacing_um=200, n_heatmaps=0, progress=False)
    with pytest.raises(M2ORTError) as refused:
        predict_slides([DEMO_SLIDE], out_dir=out, spacing_um=150, n_heatmaps=0, progress=False, stop_on_error=True)
    assert "overwrite=True" in str(refused.value) and "out_dir=" in str(refused.value)
    assert "--overwrite" not in str(refused.value)
    with pytest.raises(M2ORTError, match="mpp_force=True"):
        Predictor(progress=False).predict(DEMO_SLIDE, spots=DEMO_SPOTS, mpp=5.0)
