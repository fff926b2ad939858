"""What the package ships: the demo slide with its spot table, and the default model."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_SLIDE = ASSETS / "demo_slide.tiff"
DEMO_SPOTS = ASSETS / "demo_spots.tsv"
DEFAULT_CHECKPOINT = ASSETS / "m2ort_her2st_tiny.safetensors"
DEMO_SOURCE_SECTION = "C3"  # scripts/make_demo_assets.py crops the demo slide from her2st section C3
