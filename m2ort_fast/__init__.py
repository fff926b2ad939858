"""m2ort-fast: per-spot gene expression from H&E whole-slide images with M2ORT.

from m2ort_fast import Predictor, predict_slides
"""

__version__ = "0.1.0"

__all__ = [
    "Predictor",
    "SlideResult",
    "predict_slides",
    "predict_cohort",
    "load_checkpoint",
    "build_model",
    "open_slide",
    "Spots",
    "as_spots",
]


def __getattr__(name: str) -> object:
    # Imported on first use, so that `import m2ort_fast` (and the CLI's --help) stays quick.
    if name in ("Predictor", "SlideResult", "predict_slides"):
        from m2ort_fast import predict

        return getattr(predict, name)
    if name == "predict_cohort":  # Ray is imported only when a cohort runs on it
        from m2ort_fast.cohort import predict_cohort

        return predict_cohort
    if name == "load_checkpoint":
        from m2ort_fast.checkpoint import load_checkpoint

        return load_checkpoint
    if name == "build_model":
        from m2ort_fast.model import build_model

        return build_model
    if name == "open_slide":
        from m2ort_fast.slide import open_slide

        return open_slide
    if name in ("Spots", "as_spots"):
        from m2ort_fast import spots

        return getattr(spots, name)
    raise AttributeError(f"module 'm2ort_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy exports above are not module globals until first used: list them for dir() and
    # tab completion, with the names the module does hold.
    return sorted({*globals(), *__all__})
