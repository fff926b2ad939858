"""One opened slide, run: its run record decided under the staging lock, then predicted (or its
stored predictions reused), written, and published."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from m2ort_fast.outputs import (
    ChunkedH5adWriter,
    SlideView,
    StagedOutput,
    build_anndata,
    check_heatmap_genes,
    check_targets,
)
from m2ort_fast.predict.batches import predict_streamed
from m2ort_fast.predict.opening import OpenedSlide, slide_view
from m2ort_fast.predict.options import OutputOptions
from m2ort_fast.predict.record import Decision, decide, read_record
from m2ort_fast.predict.result import SlideResult

if TYPE_CHECKING:
    from m2ort_fast.predict.predictor import Predictor


def run_opened(
    predictor: Predictor, opened: OpenedSlide, output: OutputOptions, *, streamed: bool | None = None
) -> SlideResult:
    """Predict and write ``opened`` (closed on return) as ``output`` says. The run record is
    decided again once the staging folder is locked, so a run that finished meanwhile is not
    replaced; the staging folder goes on every exit (published, skipped or failed)."""
    started = time.perf_counter()
    streamed = predictor.streamed if streamed is None else streamed
    stem = output.stem or opened.path.stem
    with opened.slide as slide:
        if output.heatmap_genes:
            check_heatmap_genes(predictor.genes, output.heatmap_genes)  # before any spot is read
        check_targets(output.out_dir, stem)
        wanted = predictor.record_for(opened.path, opened.spots, opened.options, output)
        staged = StagedOutput(output.out_dir, stem, predictor.staging_key(slide, opened.spots, streamed))
        try:
            names = predictor.option_names
            existing = None if output.overwrite else read_record(staged.h5ad, names)
            decision = decide(existing, wanted, staged.h5ad, overwrite=output.overwrite, names=names)
            if decision.action == "skip":
                return SlideResult(slide=opened.path, skipped=True)
            result = _write(predictor, opened, output, decision, staged, streamed)
        finally:
            staged.discard()  # published or not, the staging folder goes (a no-op once published)
    result.seconds = opened.timer.summary()
    result.wall_seconds = round(time.perf_counter() - started + opened.timer.seconds.get("open", 0.0), 4)
    return result


def _write(
    predictor: Predictor,
    opened: OpenedSlide,
    output: OutputOptions,
    decision: Decision,
    staged: StagedOutput,
    streamed: bool,
) -> SlideResult:
    slide, timer = opened.slide, opened.timer
    centers = np.asarray(opened.spots.centers_px, dtype=np.float64)
    view = slide_view(opened, predictor.card, staged.stem)
    result = SlideResult(opened.path, len(centers), mpp=opened.slide_mpp, mpp_source=slide.mpp_source)
    with timer.stage("write"):
        if decision.action == "add":
            writer = ChunkedH5adWriter.from_published(staged, predictor.genes, decision.record.to_json())
        else:
            writer = _open_writer(predictor, opened, output, decision, staged, view, streamed)
    try:
        if decision.action == "run" and writer.written.all():  # a killed run's rows, all there
            result.engine = {"spots": len(centers), "resumed_spots": len(centers)}
        elif decision.action == "run":
            if streamed:
                result.engine = predict_streamed(predictor, slide, centers, timer, writer)
            else:
                predictions = predictor.predict_centers(slide, centers, timer)
                with timer.stage("write"):
                    writer.write(np.arange(len(centers)), predictions)
        formats = decision.add if decision.action == "add" else output.formats
        n_heatmaps = output.n_heatmaps if decision.heatmaps else 0
        heatmap_genes = output.heatmap_genes if decision.heatmaps else None
        with timer.stage("write"):
            result.outputs = writer.finish(
                formats=formats, heatmap_genes=heatmap_genes, n_heatmaps=n_heatmaps, view=view, slide=slide
            )
    except BaseException:
        writer.abort()
        raise
    result.added = decision.add if decision.action == "add" else ()
    return result


def _open_writer(
    predictor: Predictor,
    opened: OpenedSlide,
    output: OutputOptions,
    decision: Decision,
    staged: StagedOutput,
    view: SlideView,
    streamed: bool,
) -> ChunkedH5adWriter:
    """The slide's one writer (both engines): obs, obsm and uns written now, X as predictions come.
    A staging folder left by a killed run with the same staging key is continued."""
    spots = opened.spots
    centers = np.asarray(spots.centers_px, dtype=np.float64)
    uns = predictor.run_metadata(
        opened.slide, spots, out_dir=output.out_dir, spacing_um=opened.options.spacing_um, streamed=streamed
    )
    uns["run_record"] = decision.record.to_json()
    skeleton = build_anndata(
        np.empty((len(centers), 0), dtype=np.float32), [], spots.ids, centers, spots.columns, uns, view
    )
    return ChunkedH5adWriter(staged, skeleton, predictor.genes)
