"""Predicting per-spot expression for slides: the Python API that the CLI wraps.

    from m2ort_fast import Predictor, predict_slides
    results = predict_slides(["a.svs", "b.svs"], model="model.safetensors", out_dir="out")

One :class:`Predictor` holds one loaded model and backend and serves any number of slides.
A slide goes through stages, each an NVTX range and a timed entry of ``SlideResult.seconds``:
``open`` (slide, spots, tissue), ``read`` (decoding), ``assemble`` (normalised NCHW batches, in
the C++ extension), ``model`` (the backend), ``write`` (h5ad, CSV, heatmaps); the streamed engine
(:mod:`m2ort_fast.stream`, the default) adds ``plan``, ``crop`` and ``resize`` and runs the stages
concurrently, so their seconds overlap.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from m2ort_fast import _core
from m2ort_fast.backends import make_backend
from m2ort_fast.checkpoint import ModelCard, file_sha256, load_checkpoint
from m2ort_fast.crop import read_spot_patches
from m2ort_fast.errors import M2ORTError, SpotsError
from m2ort_fast.options import DEFAULT_OUT_DIR
from m2ort_fast.outputs import (
    FORMATS,
    HIRES_MAX_SIDE_PX,
    ChunkedH5adWriter,
    SlideOutputs,
    SlideView,
    StagedOutput,
    build_anndata,
    check_heatmap_genes,
    check_out_dir,
    existing_run_settings,
    h5ad_path,
    run_key,
)
from m2ort_fast.profiling import StageTimer
from m2ort_fast.slide import Slide, open_slide, require_mpp
from m2ort_fast.spots import Spots, SpotsLike, as_spots, check_spots_inside, grid_spots
from m2ort_fast.stream import (
    DEFAULT_MAX_GPU_MEMORY_MB,
    DEFAULT_MAX_MEMORY_MB,
    check_data_path,
    plan_slide_reads,
    run_stream,
)
from m2ort_fast.stream_device import (
    DeviceMemory,
    resolve_data_path,
    run_stream_on_device,
)
from m2ort_fast.stream_device import reserved_bytes as device_reserved_bytes
from m2ort_fast.tissue import tissue_mask

if TYPE_CHECKING:
    import anndata

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_SLIDE = ASSETS / "demo_slide.tiff"
DEMO_SPOTS = ASSETS / "demo_spots.tsv"
DEFAULT_CHECKPOINT = ASSETS / "m2ort_her2st_tiny.safetensors"
DEMO_SOURCE_SECTION = "C3"  # scripts/make_demo_assets.py crops the demo slide from her2st section C3

VISIUM_PITCH_UM = 100.0
VISIUM_SPOT_DIAMETER_UM = 55.0
THUMBNAIL_MAX_SIDE_PX = 1600
# A spot table whose spots barely touch the tissue belongs to another slide (or another scale).
MIN_SPOTS_ON_TISSUE_FRACTION = 0.1


@dataclass
class SlideResult:
    slide: Path
    n_spots: int = 0
    outputs: SlideOutputs | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    seconds: dict = field(default_factory=dict)
    error: str | None = None
    skipped: bool = False  # its .h5ad existed already (resume) and overwrite was not asked for
    engine: dict = field(default_factory=dict)  # streamed engine: read plan statistics
    wall_seconds: float = 0.0  # open + predict + write, end to end (stages overlap when streamed)

    @property
    def ok(self) -> bool:
        return self.error is None


def normalize_levels(
    levels: list[np.ndarray], card: ModelCard, rows: np.ndarray | slice | None = None, num_threads: int = 0
) -> list[torch.Tensor]:
    """uint8 (N, S, S, 3) per level -> float32 (N, 3, S, S) tensors, normalised as the card says."""
    out = []
    for level in levels:
        batch = np.ascontiguousarray(level if rows is None else level[rows])
        out.append(
            torch.from_numpy(_core.assemble_batch(batch, card.pixel_mean, card.pixel_std, num_threads=num_threads))
        )
    return out


class Predictor:
    """A loaded model + backend, ready for many slides.

    ``checkpoint``: path of a ``.safetensors`` checkpoint (None: the package's default model).
    ``streamed``: use the streamed engine (each tile decoded once, stages overlapped, output
    written in chunks; :mod:`m2ort_fast.stream`) rather than one read per spot per level; both
    give the same predictions. ``max_memory_mb``: the streamed engine's bound on decoded pixels.
    ``data_path``: where the streamed engine's pixels live between the reader and the model:
    "host" (crop, resize and batches on the CPU cores), "device" (on the model's device, from the
    decoded tiles on: :mod:`m2ort_fast.stream_device`) or "auto" (device where the model runs on
    a GPU and cuCIM decodes there); same predictions. ``max_gpu_memory_mb``: the device path's
    bound on the memory it holds (decoded tiles and batches; not the model's own).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        *,
        backend: str = "torch",
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int = 64,
        level_source: str | None = None,
        num_threads: int = 0,
        progress: bool = True,
        backend_options: dict | None = None,
        streamed: bool = True,
        max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
        data_path: str = "auto",
        max_gpu_memory_mb: float = DEFAULT_MAX_GPU_MEMORY_MB,
    ):
        if batch_size < 1:
            raise M2ORTError(f"batch size must be at least 1, got {batch_size}")
        if not max_memory_mb > 0:
            raise M2ORTError(f"the memory bound must be a positive number of MB, got {max_memory_mb}")
        if not max_gpu_memory_mb > 0:
            raise M2ORTError(f"the GPU memory bound must be a positive number of MB, got {max_gpu_memory_mb}")
        if check_data_path(data_path) == "device" and not streamed:
            raise M2ORTError("the device data path is the streamed engine's; it does not run with the naive engine")
        self.checkpoint = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
        model, self.card = load_checkpoint(self.checkpoint)
        self.checkpoint_sha256 = file_sha256(self.checkpoint)
        options = {"precision": precision, "checkpoint_path": str(self.checkpoint), **(backend_options or {})}
        if backend == "auto":  # compiled backends rank differently at batch 1 and 64: time the one we run
            options.setdefault("trial_batch_size", batch_size)
        self.backend = make_backend(backend, model, self.card, device=device, **options)
        self.backend_name = backend
        self.precision = getattr(self.backend, "precision", precision)  # --precision auto: the one picked
        self.batch_size = batch_size
        # None: as the model was trained (the checkpoint says), so inputs match what it learned from
        self.level_source = level_source or self.card.level_source
        self.num_threads = num_threads
        self.progress = progress
        self.streamed = streamed
        self.max_memory_mb = max_memory_mb
        self.data_path = data_path
        self.max_gpu_memory_mb = max_gpu_memory_mb

    @property
    def genes(self) -> list[str]:
        return self.card.genes

    def predict_centers(
        self, slide: Slide, centers_px: np.ndarray, timer: StageTimer | None = None, desc: str | None = None
    ) -> np.ndarray:
        """Predictions (N, n_genes) float32 for spot centres (N, 2) in level-0 px of ``slide``."""
        timer = timer or StageTimer()
        n = len(centers_px)
        predictions = np.empty((n, len(self.card.genes)), dtype=np.float32)
        starts = range(0, n, self.batch_size)
        if self.progress and n > self.batch_size:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc or slide.path.name, unit="batch", leave=False)
        for start in starts:
            stop = min(start + self.batch_size, n)
            with timer.stage("read"):
                patches = read_spot_patches(
                    slide,
                    centers_px[start:stop],
                    self.card.level_mpp,
                    self.card.patch_sizes_px,
                    level_source=self.level_source,
                )
            with timer.stage("assemble"):
                levels = normalize_levels(patches, self.card, num_threads=self.num_threads)
            with timer.stage("model"):
                predictions[start:stop] = self.backend(*levels).numpy()
            self.check_finite(predictions[start:stop], slide)
        return predictions

    def check_finite(self, predictions: np.ndarray, slide: Slide) -> None:
        """M2ORTError naming the checkpoint when the model gave NaN or infinite predictions: a
        broken checkpoint or a precision the model overflows in; never written as results."""
        finite = np.isfinite(predictions)
        if not finite.all():
            bad = int((~finite.all(axis=1)).sum())
            raise M2ORTError(
                f"the model gave non-finite predictions (NaN or inf) for {bad} of {len(predictions)} "
                f"spots of a batch of {slide.path.name} (backend {self.backend_name}, precision "
                f"{self.precision}): the checkpoint's weights or this precision are broken; "
                f"nothing was written",
                self.checkpoint,
            )

    def predict_slide(
        self,
        slide_path: str | os.PathLike,
        *,
        spots: SpotsLike | None = None,
        spot_format: str = "auto",
        spacing_um: float | None = None,
        mpp: float | None = None,
        out_dir: str | os.PathLike = DEFAULT_OUT_DIR,
        heatmap_genes: Sequence[str] | None = None,
        n_heatmaps: int = 4,
        write_csv: bool = True,
        formats: Sequence[str] | None = None,
        reader: str = "auto",
        stem: str | None = None,
        streamed: bool | None = None,
        overwrite: bool = False,
    ) -> SlideResult:
        """Predict every spot of one slide and write ``<stem>.h5ad``, ``.csv`` and heatmaps.

        Spots: a spot file (Visium, legacy ST, CSV of centres), a :class:`Spots`, an AnnData with
        ``obsm["spatial"]`` (Visium read by scanpy, a HEST sample), or None for a hexagonal grid
        over the tissue every ``spacing_um`` (default: Visium's 100 um). ``formats``: what to write
        beside the ``.h5ad`` (``outputs.FORMATS``; default csv, or nothing with ``write_csv=False``).
        ``streamed``: None uses the Predictor's setting. ``overwrite``: False (the CLI's default
        too) skips a slide whose ``.h5ad`` was made with the same checkpoint, spots and settings,
        and refuses (M2ORTError naming the setting) one made otherwise; checked again once the
        output is locked, so a run that finished meanwhile is not replaced.
        """
        opened = self._open_slide(
            slide_path, spots=spots, spot_format=spot_format, spacing_um=spacing_um, mpp=mpp, reader=reader
        )
        return self._predict_opened(
            opened,
            out_dir=out_dir,
            heatmap_genes=heatmap_genes,
            n_heatmaps=n_heatmaps,
            write_csv=write_csv,
            formats=formats,
            stem=stem,
            spacing_um=spacing_um,
            streamed=streamed,
            overwrite=overwrite,
        )

    def predict(
        self,
        slide_path: str | os.PathLike,
        *,
        spots: SpotsLike | None = None,
        spot_format: str = "auto",
        spacing_um: float | None = None,
        mpp: float | None = None,
        reader: str = "auto",
        write: bool = False,
        **write_options: Any,
    ) -> anndata.AnnData:
        """Predict every spot of one slide and return the AnnData (as written to ``<stem>.h5ad``).

        ``write=False``: in memory, nothing written. ``write=True``: written as
        :meth:`predict_slide` writes (``write_options``: out_dir, formats, overwrite, ...), then
        read back."""
        if write:
            import anndata

            result = self.predict_slide(
                slide_path,
                spots=spots,
                spot_format=spot_format,
                spacing_um=spacing_um,
                mpp=mpp,
                reader=reader,
                **write_options,
            )
            if result.error:
                raise M2ORTError(result.error)
            stem = write_options.get("stem") or Path(slide_path).stem
            return anndata.read_h5ad(h5ad_path(write_options.get("out_dir", DEFAULT_OUT_DIR), stem))
        if write_options:
            raise TypeError(f"write options without write=True: {', '.join(write_options)}")
        opened = self._open_slide(
            slide_path, spots=spots, spot_format=spot_format, spacing_um=spacing_um, mpp=mpp, reader=reader
        )
        with opened.slide as slide:
            centers = np.asarray(opened.spots.centers_px, dtype=np.float64)
            if self.streamed:
                sink = _InMemoryPredictions(len(centers), len(self.card.genes))
                self._predict_streamed(slide, centers, opened.timer, sink)
                predictions = sink.predictions
            else:
                predictions = self.predict_centers(slide, centers, opened.timer)
            view = self._view(opened, opened.path.stem)
            uns = self._run_metadata(slide, opened.spots, spacing_um=spacing_um, streamed=self.streamed)
            uns["run_settings"] = json.dumps(self.run_settings(opened.path, opened.spots, spacing_um, mpp))
            return build_anndata(
                predictions, self.card.genes, opened.spots.ids, centers, opened.spots.columns, uns, view
            )

    def _open_slide(
        self,
        slide_path: str | os.PathLike,
        *,
        spots: SpotsLike | None = None,
        spot_format: str = "auto",
        spacing_um: float | None = None,
        mpp: float | None = None,
        reader: str = "auto",
    ) -> _OpenedSlide:
        """The ``open`` stage: slide, spots, thumbnail and tissue (run ahead for the next slide)."""
        timer = StageTimer()
        slide_path = Path(slide_path)
        with timer.stage("open"):
            # the streamed engine's memory bound also refuses flat images too large to decode whole
            slide = open_slide(
                slide_path, mpp=mpp, reader=reader, max_decoded_mb=self.max_memory_mb if self.streamed else None
            )
        try:
            with timer.stage("open"):
                if spots is not None:
                    spots = as_spots(spots, format=spot_format)
                if spots is not None and slide.mpp is None and spots.mpp_from_pitch:
                    slide.set_mpp(spots.mpp_from_pitch, "spot-table")
                    log.info(
                        "%s: no mpp in the slide; %.4f um/px derived from the array pitch of %s",
                        slide_path.name,
                        spots.mpp_from_pitch,
                        spots.path.name if spots.path else "the spot table",
                    )
                slide_mpp = require_mpp(slide)
                thumbnail, downsample = slide.thumbnail(THUMBNAIL_MAX_SIDE_PX)
                hires, hires_downsample = slide.thumbnail(HIRES_MAX_SIDE_PX)
                mask = tissue_mask(thumbnail)
                if spots is None:
                    spots = grid_spots(
                        slide,
                        spacing_um=VISIUM_PITCH_UM if spacing_um is None else spacing_um,
                        spot_diameter_um=VISIUM_SPOT_DIAMETER_UM,
                        mask=mask,
                    )
                else:
                    width_px, height_px = slide.level_dimensions[0]
                    check_spots_inside(spots, width_px, height_px, slide_path)
                    _check_spots_on_tissue(spots, mask, downsample, slide_path)
                self._warn_on_upsampling(slide_path, slide_mpp)
        except BaseException:
            slide.close()
            raise
        return _OpenedSlide(
            slide_path, slide, spots, thumbnail, downsample, slide_mpp, timer, mask, hires, hires_downsample
        )

    def _predict_opened(
        self,
        opened: _OpenedSlide,
        *,
        out_dir: str | os.PathLike,
        heatmap_genes: Sequence[str] | None,
        n_heatmaps: int,
        write_csv: bool,
        stem: str | None,
        spacing_um: float | None,
        streamed: bool | None,
        overwrite: bool = False,
        formats: Sequence[str] | None = None,
    ) -> SlideResult:
        started = time.perf_counter()
        formats = _formats(formats, write_csv)
        streamed = self.streamed if streamed is None else streamed
        slide, spots, slide_mpp, timer = opened.slide, opened.spots, opened.slide_mpp, opened.timer
        result = SlideResult(slide=opened.path)
        stem = stem or opened.path.stem
        with slide:
            centers = np.asarray(spots.centers_px, dtype=np.float64)
            uns = self._run_metadata(slide, spots, out_dir=out_dir, spacing_um=spacing_um, streamed=streamed)
            settings = self.run_settings(
                opened.path, spots, spacing_um, slide.mpp if slide.mpp_source == "user" else None
            )
            uns["run_settings"] = json.dumps(settings)
            staged = StagedOutput(out_dir, stem, self._run_key(slide, spots, centers, streamed))
            if not overwrite and skip_existing(staged.h5ad, settings):  # finished by another run meanwhile
                staged.discard()
                return SlideResult(slide=opened.path, skipped=True)
            view = self._view(opened, stem)
            try:
                with timer.stage("write"):
                    writer = self._open_writer(staged, spots, centers, uns, heatmap_genes, view)
                try:
                    if streamed:
                        result.engine = self._predict_streamed(slide, centers, timer, writer)
                    else:
                        predictions = self.predict_centers(slide, centers, timer)
                        with timer.stage("write"):
                            writer.write(np.arange(len(centers)), predictions)
                    with timer.stage("write"):
                        result.outputs = writer.finish(
                            formats=formats, heatmap_genes=heatmap_genes, n_heatmaps=n_heatmaps, view=view, slide=slide
                        )
                except BaseException:
                    writer.abort()
                    raise
            finally:
                staged.discard()  # published or not, the staging folder goes (a no-op once published)
            result.n_spots = len(centers)
            result.mpp, result.mpp_source = slide_mpp, slide.mpp_source
        result.seconds = timer.summary()
        result.wall_seconds = round(time.perf_counter() - started + timer.seconds.get("open", 0.0), 4)
        return result

    def _run_key(self, slide: Slide, spots: Spots, centers: np.ndarray, streamed: bool) -> str:
        """What decides a slide's predictions: a left-over staging folder is resumed only when it
        was made with the same key (same checkpoint, slide file, spots and run settings)."""
        from m2ort_fast import __version__

        stat = slide.path.stat()
        return run_key(
            {
                "version": __version__,
                "checkpoint_sha256": self.checkpoint_sha256,
                "slide": [str(slide.path.resolve()), stat.st_size, stat.st_mtime_ns, slide.mpp, slide.reader_name],
                "centers_sha256": hashlib.sha256(np.ascontiguousarray(centers).tobytes()).hexdigest(),
                "ids_sha256": hashlib.sha256("\n".join(map(str, spots.ids)).encode()).hexdigest(),
                "backend": self.backend_name,
                "device": str(self.backend.device),
                "precision": self.precision,
                "level_source": self.level_source,
                "streamed": streamed,
            }
        )

    def _open_writer(
        self,
        staged: StagedOutput,
        spots: Spots,
        centers: np.ndarray,
        uns: dict,
        heatmap_genes: Sequence[str] | None,
        view: SlideView,
    ) -> ChunkedH5adWriter:
        """The slide's one writer (both engines): obs, obsm and uns written now, X as predictions come.
        A staging folder left by a killed run with the same settings is continued."""
        if heatmap_genes:
            check_heatmap_genes(self.card.genes, heatmap_genes)  # before any spot is read
        skeleton = build_anndata(
            np.empty((len(centers), 0), dtype=np.float32), [], spots.ids, centers, spots.columns, uns, view
        )
        return ChunkedH5adWriter(staged, skeleton, self.card.genes)

    def _view(self, opened: _OpenedSlide, library_id: str) -> SlideView:
        """What the writers draw on and record about ``opened`` beside its predictions."""
        spots = opened.spots
        spot_diameter_px = (spots.spot_diameter_um or VISIUM_SPOT_DIAMETER_UM) / opened.slide_mpp
        return SlideView(
            library_id=library_id,
            source_image=str(opened.path),
            mpp=opened.slide_mpp,
            hires=opened.hires,
            hires_downsample=opened.hires_downsample,
            thumbnail=opened.thumbnail,
            thumbnail_downsample=opened.downsample,
            tissue_mask=opened.tissue_mask,
            spot_diameter_px=spot_diameter_px,
            window_px=self.card.field_of_view_um / opened.slide_mpp,
            model_id=self.card.model_id,
            in_training=_in_training(self.card, opened.path),
            trained=self.card.trained,
        )

    def run_settings(
        self, slide_path: Path, spots: Spots | None, spacing_um: float | None, mpp: float | None
    ) -> dict[str, str]:
        """What decides a slide's predictions, in words (recorded in ``uns["m2ort_fast"]["run_settings"]``):
        an existing output is skipped only when it was made with the same, else refused."""
        if spots is None or spots.source == "grid":
            where = f"a grid every {VISIUM_PITCH_UM if spacing_um is None else spacing_um:g} um over the tissue"
        else:
            digest = hashlib.sha256(np.ascontiguousarray(spots.centers_px, dtype=np.float64).tobytes())
            digest.update("\n".join(map(str, spots.ids)).encode())
            where = f"{len(spots)} spots from a {spots.source} table (sha256 {digest.hexdigest()[:16]})"
        return {
            "checkpoint": f"{self.card.model_id} (sha256 {self.checkpoint_sha256[:16]})",
            "slide": f"{Path(slide_path).name} ({Path(slide_path).stat().st_size} bytes)",
            "spots": where,
            "mpp": "the slide's own" if mpp is None else f"{mpp:g} (given)",
            "level_source": self.level_source,
            "precision": self.precision,
        }

    def _predict_streamed(
        self, slide: Slide, centers: np.ndarray, timer: StageTimer, writer: ChunkedH5adWriter | _InMemoryPredictions
    ) -> dict:
        """Predictions streamed from the read plan straight into ``writer`` (bounded memory); only
        the spots a resumed staging folder has not written yet are read and predicted."""
        todo = np.flatnonzero(~writer.written)
        if len(todo) < len(centers):
            log.info(
                "%s: resuming an interrupted run: %d of %d spots were already predicted",
                slide.path.name,
                len(centers) - len(todo),
                len(centers),
            )
        resumed_spots = int(len(centers) - len(todo))
        if not len(todo):
            return {"spots": len(centers), "resumed_spots": resumed_spots}
        data_path = self._data_path_for(slide)
        on_device = data_path == "device"
        with timer.stage("plan"):
            plan = plan_slide_reads(
                slide,
                centers[todo],
                self.card.level_mpp,
                self.card.patch_sizes_px,
                level_source=self.level_source,
                max_memory_mb=self.max_gpu_memory_mb if on_device else self.max_memory_mb,
                reserved_bytes=functools.partial(
                    device_reserved_bytes, batch_size=self.batch_size, kernel="auto", device=self.backend.device
                )
                if on_device
                else None,
                bound_option="--max-gpu-memory-mb" if on_device else "--max-memory-mb",
            )

        def write_batch(rows: np.ndarray, predictions: np.ndarray) -> None:
            self.check_finite(predictions, slide)
            writer.write(todo[rows], predictions)

        bar = None
        if self.progress and len(todo) > self.batch_size:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=slide.path.name, unit="spot", leave=False)
        stream_args = (slide, plan, self.backend, self.card.pixel_mean, self.card.pixel_std, write_batch)
        progress = bar.update if bar else None
        memory = DeviceMemory(self.backend.device) if on_device else None
        try:
            if on_device:
                run_stream_on_device(
                    *stream_args, batch_size=self.batch_size, timer=timer, progress=progress, memory=memory
                )
            else:
                run_stream(
                    *stream_args,
                    batch_size=self.batch_size,
                    timer=timer,
                    progress=progress,
                    num_threads=self.num_threads,
                )
        finally:
            if bar is not None:
                bar.close()
        stats = {**plan.stats(), "resumed_spots": resumed_spots, "data_path": data_path}
        if memory is not None:
            stats["device_peak_mb"] = round(memory.peak_bytes / 2**20, 1)
        return stats

    def _data_path_for(self, slide: Slide) -> str:
        """The data path this predictor's streamed engine takes for ``slide``: "host" or "device"."""
        return resolve_data_path(self.data_path, slide, self.backend.device)

    def _warn_on_upsampling(self, slide_path: Path, slide_mpp: float) -> None:
        needed = self.card.level_mpp[0]
        if slide_mpp > needed * 1.25:
            log.warning(
                "%s: slide resolution %.3f um/px is coarser than the model's %.3f um/px; level-1 patches are upsampled",
                slide_path.name,
                slide_mpp,
                needed,
            )

    def _run_metadata(self, slide: Slide, spots: Spots, **params: Any) -> dict:
        from m2ort_fast import __version__

        card: ModelCard = self.card
        return {
            "version": __version__,
            "model_id": card.model_id,
            "variant": card.variant,
            "trained": card.trained,
            "checkpoint": str(self.checkpoint),
            "checkpoint_sha256": self.checkpoint_sha256,
            "target_transform": card.target_transform,
            "model_mpp": card.mpp,
            "level_mpp": list(card.level_mpp),
            "patch_sizes_px": list(card.patch_sizes_px),
            "slide": str(slide.path),
            "slide_reader": slide.reader_name,
            "slide_vendor": slide.vendor,
            "slide_mpp": slide.mpp,
            "slide_mpp_source": slide.mpp_source,
            "spots_source": spots.source,
            "spots_file": str(spots.path) if spots.path else None,
            "backend": self.backend_name,
            "device": str(self.backend.device),
            "precision": self.precision,
            "batch_size": self.batch_size,
            "level_source": self.level_source,
            "data_path": self._data_path_for(slide) if params.get("streamed", self.streamed) else "host",
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()},
        }


@dataclass
class _OpenedSlide:
    path: Path
    slide: Slide
    spots: Spots
    thumbnail: np.ndarray
    downsample: float
    slide_mpp: float
    timer: StageTimer
    tissue_mask: np.ndarray  # (h, w) bool on the thumbnail
    hires: np.ndarray  # (h, w, 3) uint8, at most HIRES_MAX_SIDE_PX a side
    hires_downsample: float


class _InMemoryPredictions:
    """Where the streamed engine writes when nothing goes to disk: (n_spots, n_genes) float32."""

    def __init__(self, n_spots: int, n_genes: int):
        self.predictions = np.zeros((n_spots, n_genes), dtype=np.float32)
        self.written = np.zeros(n_spots, dtype=bool)

    def write(self, spots: np.ndarray, predictions: np.ndarray) -> None:
        self.predictions[spots] = predictions
        self.written[spots] = True


def _check_spots_on_tissue(spots: Spots, mask: np.ndarray, downsample: float, slide_path: Path) -> None:
    """Refuse a spot table none of whose spots (or too few) lie on the slide's tissue."""
    h, w = mask.shape
    xy = np.floor(np.asarray(spots.centers_px) / downsample).astype(np.int64)
    xy[:, 0] = xy[:, 0].clip(0, w - 1)
    xy[:, 1] = xy[:, 1].clip(0, h - 1)
    on_tissue = mask[xy[:, 1], xy[:, 0]]
    if on_tissue.mean() < MIN_SPOTS_ON_TISSUE_FRACTION:
        where = spots.path or "spot table"
        raise SpotsError(
            f"only {int(on_tissue.sum())} of {len(on_tissue)} spots lie on the tissue of "
            f"{slide_path.name}: spots outside the tissue (spot table for another slide or scale?)",
            where,
        )


def _formats(formats: Sequence[str] | None, write_csv: bool = True) -> tuple[str, ...]:
    """The formats to write beside the .h5ad: ``formats`` (default csv), less csv when ``write_csv`` is False."""
    chosen = ("csv",) if formats is None else tuple(formats)
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown:
        raise M2ORTError(
            f"unknown output format {unknown[0]!r}: use {', '.join(FORMATS)} (the .h5ad is always written)"
        )
    return tuple(f for f in chosen if write_csv or f != "csv")


def _in_training(card: ModelCard, slide_path: Path) -> bool | None:
    """Whether the model was trained on this slide, by its card's provenance (None: it does not say)."""
    data = card.provenance.get("data") if card.trained else []
    if not data:
        return None if card.trained else False
    seen = [d for d in data if isinstance(d, dict) and d.get("role", "train") in ("train", "val")]
    if Path(slide_path).resolve() == DEMO_SLIDE.resolve():
        return any(d.get("section") == DEMO_SOURCE_SECTION for d in seen)
    return any(d.get("slide") == Path(slide_path).name or d.get("section") == Path(slide_path).stem for d in seen)


def skip_existing(h5ad: Path, settings: dict[str, str]) -> bool:
    """True when ``h5ad`` exists and was made with ``settings`` (the slide is skipped); False when
    there is none; M2ORTError naming the first setting that differs otherwise."""
    if not h5ad.exists():
        return False
    made_with = existing_run_settings(h5ad)
    if made_with is None:
        raise M2ORTError(
            "exists, made by an earlier version that did not record its settings: --overwrite to replace it", h5ad
        )
    for key, value in settings.items():
        if made_with.get(key) != value:
            raise M2ORTError(
                f"exists, made with {key} {made_with.get(key)!r}; this run has {key} {value!r} "
                f"(--overwrite to replace it, or another --out)",
                h5ad,
            )
    log.info("%s: exists, made with the same model, spots and settings: skipped", h5ad)
    return True


def predict_slides(
    slides: Iterable[str | os.PathLike],
    *,
    model: str | os.PathLike | Predictor | None = None,
    out_dir: str | os.PathLike = DEFAULT_OUT_DIR,
    spots: Sequence[SpotsLike | None] | None = None,
    stop_on_error: bool = False,
    overwrite: bool = False,
    **options: Any,
) -> list[SlideResult]:
    """Predict many slides with one loaded model.

    ``model``: a checkpoint path, a ready :class:`Predictor`, or None for the default model.
    ``spots``: one spot source per slide (None entries: grid over the tissue).
    ``options``: Predictor options (backend, device, precision, batch_size, streamed,
    max_memory_mb, ...) when ``model`` is not a Predictor, and predict_slide options (spacing_um,
    mpp, heatmap_genes, ...).
    ``overwrite``: False (the default, as the CLI's) skips slides whose ``<stem>.h5ad`` exists and
    was made with the same checkpoint, spots and settings, and fails those made otherwise (their
    error names the setting); outputs are renamed into place only when complete, so an
    interrupted batch resumes where it stopped.
    A slide that fails is reported in its result's ``error`` and the batch goes on. The next
    slide is opened (slide, spots, thumbnail, tissue) while the current one is predicted.
    """
    slide_paths = [Path(s) for s in slides]
    spots = list(spots) if spots is not None else [None] * len(slide_paths)
    if len(spots) != len(slide_paths):
        raise M2ORTError(f"{len(spots)} spot files given for {len(slide_paths)} slides")
    out_dir = check_out_dir(out_dir)  # before the model loads: one line, at once
    stems = [options.get("stem") or path.stem for path in slide_paths]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise M2ORTError(
            f"several slides would write {repeated[0]}.h5ad into {out_dir}: slides need distinct "
            f"file names (or run them into different --out folders)"
        )
    predictor_keys = set(inspect.signature(Predictor.__init__).parameters) - {"self", "checkpoint"}
    if isinstance(model, Predictor):
        predictor = model
    else:
        predictor = Predictor(model, **{k: v for k, v in options.items() if k in predictor_keys})
    slide_options = {k: v for k, v in options.items() if k not in predictor_keys}
    open_keys = ("spot_format", "spacing_um", "mpp", "reader")
    open_options = {k: v for k, v in slide_options.items() if k in open_keys}
    run_options = {k: v for k, v in slide_options.items() if k not in open_keys}
    run_options.setdefault("spacing_um", slide_options.get("spacing_um"))
    for key, default in (
        ("heatmap_genes", None),
        ("n_heatmaps", 4),
        ("write_csv", True),
        ("stem", None),
        ("streamed", None),
    ):
        run_options.setdefault(key, default)

    _formats(run_options.get("formats"), run_options["write_csv"])  # a wrong format fails before any slide
    todo = []
    results: dict[int, SlideResult] = {}
    for i, slide_path in enumerate(slide_paths):
        h5ad = h5ad_path(out_dir, run_options["stem"] or slide_path.stem)
        if overwrite or not h5ad.exists():
            todo.append(i)
            continue
        try:  # decided without opening the slide: a resumed cohort skips its done slides at once
            table = None if spots[i] is None else as_spots(spots[i], format=open_options.get("spot_format", "auto"))
            spots[i] = table
            settings = predictor.run_settings(
                slide_path, table, open_options.get("spacing_um"), open_options.get("mpp")
            )
            if skip_existing(h5ad, settings):
                results[i] = SlideResult(slide=slide_path, skipped=True)
                continue
        except M2ORTError as exc:
            if stop_on_error:
                raise
            log.error("%s", exc)
            results[i] = SlideResult(slide=slide_path, error=str(exc))
            continue
        todo.append(i)

    def open_one(i: int) -> _OpenedSlide:
        return predictor._open_slide(slide_paths[i], spots=spots[i], **open_options)

    created_out_dir = not out_dir.exists()
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="m2ort-open") as opener:
            pending = opener.submit(open_one, todo[0]) if todo else None
            for k, i in enumerate(todo):
                future = pending
                assert future is not None  # submitted for todo[0], then for each next slide
                pending = opener.submit(open_one, todo[k + 1]) if k + 1 < len(todo) else None
                try:
                    results[i] = predictor._predict_opened(
                        future.result(), out_dir=out_dir, overwrite=overwrite, **run_options
                    )
                except M2ORTError as exc:
                    if stop_on_error:
                        if pending is not None:
                            _close_when_opened(pending)
                        raise
                    log.error("%s", exc)
                    results[i] = SlideResult(slide=slide_paths[i], error=str(exc))
                except BaseException:
                    if pending is not None:
                        _close_when_opened(pending)
                    raise
    finally:
        if created_out_dir:  # a run that wrote nothing leaves no empty folder behind
            with contextlib.suppress(OSError):
                out_dir.rmdir()
    return [results[i] for i in range(len(slide_paths))]


def _close_when_opened(future: Future) -> None:
    """Close the slide a look-ahead open made, once it is made; its error belongs to a run that
    will not happen (predict_slides and the cohort worker stopping early)."""
    try:
        future.result().slide.close()
    except BaseException:
        pass
