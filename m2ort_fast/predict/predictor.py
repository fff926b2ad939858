"""The :class:`Predictor`: one loaded model and backend, serving any number of slides."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from m2ort_fast.backends import make_backend
from m2ort_fast.bounds import (
    API_OPTIONS,
    DEFAULT_MAX_SPOTS,
    OptionNames,
    available_memory_bytes,
    fit_batch_size,
    input_bytes_per_spot,
    model_activation_bytes_per_spot,
)
from m2ort_fast.checkpoint import ModelCard, file_sha256, load_checkpoint
from m2ort_fast.device import resolve_device
from m2ort_fast.engine import DEFAULT_MAX_GPU_MEMORY_MB, DEFAULT_MAX_MEMORY_MB, check_data_path, resolve_data_path
from m2ort_fast.errors import M2ORTError
from m2ort_fast.options import DEFAULT_OUT_DIR
from m2ort_fast.outputs import DEFAULT_HEATMAP_COUNT, build_anndata, run_key
from m2ort_fast.predict.assets import checkpoint_path
from m2ort_fast.predict.batches import InMemoryPredictions, predict_naive, predict_streamed
from m2ort_fast.predict.opening import OpenedSlide, open_for_prediction, slide_view
from m2ort_fast.predict.options import OpenOptions, OutputOptions, output_formats
from m2ort_fast.predict.record import RunRecord, build_record
from m2ort_fast.predict.result import SlideResult
from m2ort_fast.predict.running import run_opened
from m2ort_fast.profiling import StageTimer
from m2ort_fast.slide import Slide
from m2ort_fast.spots import Spots, SpotsLike

if TYPE_CHECKING:
    import anndata


class Predictor:
    """A loaded model + backend, ready for many slides.

    ``checkpoint``: path of a ``.safetensors`` checkpoint (None: the package's default model).
    ``streamed``: use the streamed engine (each tile decoded once, stages overlapped, output
    written in chunks; :mod:`m2ort_fast.engine`) rather than one read per spot per level; both
    give the same predictions. ``max_memory_mb``: the streamed engine's bound on decoded pixels.
    ``data_path``: where the streamed engine's pixels live between the reader and the model:
    "host" (crop, resize and batches on the CPU cores), "device" (on the model's device, from the
    decoded tiles on: :mod:`m2ort_fast.engine.device`) or "auto" (device where the model runs on
    a GPU and cuCIM decodes there); same predictions. ``max_gpu_memory_mb``: the device path's
    bound on the memory it holds (decoded tiles and batches; not the model's own).
    ``option_names``: how messages name options (the API's keywords; the CLI passes its flags).
    ``batch_size`` is capped at a slide's spot count, and a batch whose inputs and activations
    would not fit the memory available is refused in one line (:mod:`m2ort_fast.bounds`).

    A slide goes through stages, each an NVTX range and a timed entry of ``SlideResult.seconds``:
    ``open`` (slide, spots, tissue), ``read``, ``assemble``, ``model``, ``write``; the streamed
    engine adds ``plan``, ``crop`` and ``resize`` and runs the stages concurrently.
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
        option_names: OptionNames = API_OPTIONS,
    ):
        _check_engine_options(batch_size, max_memory_mb, max_gpu_memory_mb, data_path, streamed)
        self.checkpoint = checkpoint_path(checkpoint)
        model, self.card = load_checkpoint(self.checkpoint)
        self.checkpoint_sha256 = file_sha256(self.checkpoint)
        options = {"precision": precision, "checkpoint_path": str(self.checkpoint), **(backend_options or {})}
        self.option_names = option_names
        if backend == "auto":  # compiled backends rank differently at batch 1 and 64: time the one we run
            options.setdefault("trial_batch_size", self._largest_batch_that_fits(batch_size, device, precision))
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

    def batch_for(self, n_spots: int) -> int:
        """The batch size a slide of ``n_spots`` runs at: ``batch_size`` capped at ``n_spots``;
        BoundsError (one line naming ``batch_size``) when its inputs and the model's activations
        would not fit the memory available."""
        input_bytes, activation_bytes = self._bytes_per_spot(self.precision)
        return fit_batch_size(
            self.batch_size,
            n_spots,
            input_bytes=input_bytes,
            activation_bytes=activation_bytes,
            limit_bytes=available_memory_bytes(self.backend.device),
            limit_option="the memory available now",
            options=self.option_names,
        )

    def _bytes_per_spot(self, precision: str) -> tuple[int, int]:
        activation_dtype_bytes = 2 if precision in ("bf16", "fp16") else 4
        input_bytes = input_bytes_per_spot(self.card.patch_sizes_px)
        return input_bytes, model_activation_bytes_per_spot(self.card.config, activation_dtype_bytes)

    def _largest_batch_that_fits(self, batch_size: int, device: str, precision: str) -> int:
        """``--backend auto``'s trial batch: the run's, or as many spots as fit the memory available."""
        input_bytes, activation_bytes = self._bytes_per_spot(precision)
        fits = available_memory_bytes(resolve_device(device)) // (input_bytes + activation_bytes)
        return max(1, min(batch_size, int(fits)))

    def open(
        self, slide_path: str | os.PathLike, spots: SpotsLike | None = None, options: OpenOptions | None = None
    ) -> OpenedSlide:
        """The ``open`` stage of ``slide_path`` (run ahead of the model for the next slide) -> :class:`OpenedSlide`."""
        max_decoded_mb = self.max_memory_mb if self.streamed else None
        return open_for_prediction(
            Path(slide_path),
            spots,
            options or OpenOptions(),
            self.card,
            max_decoded_mb=max_decoded_mb,
            names=self.option_names,
        )

    def run(self, opened: OpenedSlide, output: OutputOptions, *, streamed: bool | None = None) -> SlideResult:
        """Predict and write an opened slide as its run record decides (run, skip, add formats)."""
        return run_opened(self, opened, output, streamed=streamed)

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
        n_heatmaps: int = DEFAULT_HEATMAP_COUNT,
        write_csv: bool = True,
        formats: Sequence[str] | None = None,
        reader: str = "auto",
        stem: str | None = None,
        streamed: bool | None = None,
        overwrite: bool = False,
        mpp_force: bool = False,
        max_spots: int = DEFAULT_MAX_SPOTS,
    ) -> SlideResult:
        """Predict every spot of one slide and write ``<stem>.h5ad``, ``.csv`` and heatmaps.

        Spots: a spot file (Visium, legacy ST, CSV of centres), a :class:`Spots`, an AnnData with
        ``obsm["spatial"]`` (Visium read by scanpy, a HEST sample), or None for a hexagonal grid
        over the tissue every ``spacing_um`` (default: Visium's 100 um). ``formats``: written beside
        the ``.h5ad`` and the CSV (``outputs.FORMATS``; ``write_csv=False``: no CSV).
        ``streamed``: None uses the Predictor's setting. ``overwrite``: False (the CLI's default
        too) lets the run record decide (skipped, formats added, or refused naming the setting).
        ``mpp_force``: use ``mpp`` where it disagrees with the slide's or the spots'; ``max_spots``:
        the most spots a grid may have.
        """
        opened = self.open(slide_path, spots, OpenOptions(spot_format, spacing_um, mpp, reader, mpp_force, max_spots))
        output = OutputOptions(
            out_dir=Path(out_dir),
            formats=output_formats(formats, write_csv),
            heatmap_genes=tuple(heatmap_genes) if heatmap_genes else None,
            n_heatmaps=n_heatmaps,
            stem=stem,
            overwrite=overwrite,
        )
        return self.run(opened, output, streamed=streamed)

    def predict(
        self,
        slides: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        spots: SpotsLike | Sequence[SpotsLike | None] | None = None,
        spot_format: str = "auto",
        spacing_um: float | None = None,
        mpp: float | None = None,
        reader: str = "auto",
        mpp_force: bool = False,
        max_spots: int = DEFAULT_MAX_SPOTS,
        write: bool = False,
        **write_options: Any,
    ) -> anndata.AnnData | Iterator[anndata.AnnData]:
        """Predict every spot of a slide and return its AnnData (as written to ``<stem>.h5ad``);
        given several slides (a list or any iterable of paths), yield one AnnData per slide, in
        order, each predicted when it is asked for (``spots``: then one source per slide, or None).

        ``write=False``: in memory, nothing written. ``write=True``: written as
        :meth:`predict_slide` writes (``write_options``: out_dir, formats, overwrite, ...), then
        read back."""
        if write_options and not write:
            raise TypeError(f"write options without write=True: {', '.join(write_options)}")
        options = OpenOptions(spot_format, spacing_um, mpp, reader, mpp_force, max_spots)
        if isinstance(slides, (str, os.PathLike)):
            return self._predict_one(slides, spots, options, write_options if write else None)
        return self._predict_many(slides, spots, options, write_options if write else None)

    def _predict_many(
        self,
        slides: Iterable[str | os.PathLike],
        spots: SpotsLike | Sequence[SpotsLike | None] | None,
        options: OpenOptions,
        write_options: dict | None,
    ) -> Iterator[anndata.AnnData]:
        slides = list(slides)
        if spots is not None and not (isinstance(spots, Sequence) and not isinstance(spots, str)):
            raise M2ORTError("spots= for several slides takes one spot source per slide (a list), or None")
        sources = list(spots) if spots is not None else [None] * len(slides)
        if len(sources) != len(slides):
            raise M2ORTError(f"spots= has {len(sources)} spot sources for {len(slides)} slides: give one per slide")
        return (
            self._predict_one(path, source, options, write_options)
            for path, source in zip(slides, sources, strict=True)
        )

    def _predict_one(
        self, slide_path: str | os.PathLike, spots: SpotsLike | None, options: OpenOptions, write_options: dict | None
    ) -> anndata.AnnData:
        if write_options is not None:
            return self._predict_written(slide_path, spots, options, write_options)
        opened = self.open(slide_path, spots, options)
        with opened.slide as slide:
            centers = np.asarray(opened.spots.centers_px, dtype=np.float64)
            predictions = self.predict_centers_streamed(slide, centers, opened.timer)
            view = slide_view(opened, self.card, opened.path.stem)
            uns = self.run_metadata(slide, opened.spots, spacing_um=options.spacing_um, streamed=self.streamed)
            uns["run_record"] = self.record_for(opened.path, opened.spots, options, OutputOptions()).to_json()
            return build_anndata(predictions, self.genes, opened.spots.ids, centers, opened.spots.columns, uns, view)

    def _predict_written(
        self, slide_path: str | os.PathLike, spots: SpotsLike | None, open_options: OpenOptions, write_options: dict
    ) -> anndata.AnnData:
        import anndata

        from m2ort_fast.outputs import h5ad_path

        result = self.predict_slide(slide_path, spots=spots, **vars(open_options), **write_options)
        if result.error:
            raise M2ORTError(result.error)
        stem = write_options.get("stem") or Path(slide_path).stem
        return anndata.read_h5ad(h5ad_path(write_options.get("out_dir", DEFAULT_OUT_DIR), stem))

    def predict_centers(self, slide: Slide, centers_px: np.ndarray, timer: StageTimer | None = None) -> np.ndarray:
        """Predictions (N, n_genes) float32 for spot centres (N, 2) in level-0 px of ``slide``,
        by the naive engine (one read per spot per level)."""
        return predict_naive(self, slide, centers_px, timer or StageTimer())

    def predict_centers_streamed(self, slide: Slide, centers_px: np.ndarray, timer: StageTimer) -> np.ndarray:
        """As :meth:`predict_centers`, by this predictor's engine (streamed unless it says naive)."""
        if not self.streamed:
            return self.predict_centers(slide, centers_px, timer)
        sink = InMemoryPredictions(len(centers_px), len(self.genes))
        predict_streamed(self, slide, centers_px, timer, sink)
        return sink.predictions

    def record_for(
        self, slide_path: Path, spots: Spots | None, open_options: OpenOptions, output: OutputOptions
    ) -> RunRecord:
        """The run record this predictor makes for ``slide_path`` (:mod:`m2ort_fast.predict.record`)."""
        return build_record(
            self.card,
            self.checkpoint_sha256,
            slide_path,
            spots,
            open_options,
            output,
            level_source=self.level_source,
            precision=self.precision,
            backend=self.backend_name,
        )

    def staging_key(self, slide: Slide, spots: Spots, streamed: bool) -> str:
        """What a killed run's staging folder must have been made with to be continued: the record's
        value settings and the exact engine (a resumed file mixes rows of two runs)."""
        from m2ort_fast import __version__

        stat = slide.path.stat()
        centers = np.ascontiguousarray(spots.centers_px, dtype=np.float64)
        return run_key(
            {
                "version": __version__,
                "checkpoint_sha256": self.checkpoint_sha256,
                "slide": [str(slide.path.resolve()), stat.st_size, stat.st_mtime_ns, slide.mpp, slide.reader_name],
                "centers_sha256": hashlib.sha256(centers.tobytes()).hexdigest(),
                "ids_sha256": hashlib.sha256("\n".join(map(str, spots.ids)).encode()).hexdigest(),
                "backend": self.backend_name,
                "device": str(self.backend.device),
                "precision": self.precision,
                "level_source": self.level_source,
                "streamed": streamed,
            }
        )

    def data_path_for(self, slide: Slide) -> str:
        """The data path this predictor's streamed engine takes for ``slide``: "host" or "device"."""
        return resolve_data_path(self.data_path, slide, self.backend.device)

    def run_metadata(self, slide: Slide, spots: Spots, **params: Any) -> dict:
        """What ``uns["m2ort_fast"]`` records of the model, the slide, the spots and the engine."""
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
            "data_path": self.data_path_for(slide) if params.get("streamed", self.streamed) else "host",
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()},
        }


def _check_engine_options(
    batch_size: int, max_memory_mb: float, max_gpu_memory_mb: float, data_path: str, streamed: bool
) -> None:
    if batch_size < 1:
        raise M2ORTError(f"batch size must be at least 1, got {batch_size}")
    if not max_memory_mb > 0:
        raise M2ORTError(f"the memory bound must be a positive number of MB, got {max_memory_mb}")
    if not max_gpu_memory_mb > 0:
        raise M2ORTError(f"the GPU memory bound must be a positive number of MB, got {max_gpu_memory_mb}")
    if check_data_path(data_path) == "device" and not streamed:
        raise M2ORTError("the device data path is the streamed engine's; it does not run with the naive engine")
