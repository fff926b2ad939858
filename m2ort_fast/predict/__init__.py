"""Predicting per-spot expression for slides: the Python API that the CLI wraps.

    from m2ort_fast import Predictor, predict_slides
    results = predict_slides(["a.svs", "b.svs"], model="model.safetensors", out_dir="out")

A slide goes down the layers once: ``opening`` (slide, spots, thumbnails, tissue) -> ``record``
(what its outputs would be made from, and whether to run, skip, or add formats) -> ``batches``
(the naive or streamed engine, :mod:`m2ort_fast.engine`) -> :mod:`m2ort_fast.outputs` (staged,
published). ``running`` ties them for one opened slide; :class:`Predictor` (``predictor``) holds
the model and backend; :func:`predict_slides` (``slides``) runs many with the next one opened
ahead; ``options`` types what a run takes.
"""

from m2ort_fast.predict.assets import (
    ASSETS,
    DEFAULT_CHECKPOINT,
    DEFAULT_MODEL,
    DEMO_SLIDE,
    DEMO_SOURCE_SECTION,
    DEMO_SPOTS,
    SHIPPED_MODELS,
    checkpoint_path,
)
from m2ort_fast.predict.batches import InMemoryPredictions, normalize_levels
from m2ort_fast.predict.opening import OpenedSlide, close_when_opened
from m2ort_fast.predict.options import PREDICTOR_OPTIONS, OpenOptions, OutputOptions, output_formats, split_options
from m2ort_fast.predict.predictor import Predictor
from m2ort_fast.predict.record import Decision, RunRecord, build_record, decide, decide_before_opening, read_record
from m2ort_fast.predict.result import SlideResult
from m2ort_fast.predict.slides import predict_slides

__all__ = [
    "ASSETS",
    "DEFAULT_CHECKPOINT",
    "DEFAULT_MODEL",
    "DEMO_SLIDE",
    "DEMO_SOURCE_SECTION",
    "DEMO_SPOTS",
    "PREDICTOR_OPTIONS",
    "SHIPPED_MODELS",
    "Decision",
    "InMemoryPredictions",
    "OpenOptions",
    "OpenedSlide",
    "OutputOptions",
    "Predictor",
    "RunRecord",
    "SlideResult",
    "build_record",
    "checkpoint_path",
    "close_when_opened",
    "decide",
    "decide_before_opening",
    "normalize_levels",
    "output_formats",
    "predict_slides",
    "read_record",
    "split_options",
]
