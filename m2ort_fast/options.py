"""Command-line option types: every number and name checked when the command line is parsed, so
a bad value is one usage line (exit 2) before any work starts."""

from __future__ import annotations

import argparse
import math

from m2ort_fast.slide import MPP_RANGE

# The output folder when none is given, for the CLI and the Python API alike; here rather than in
# outputs.py because the CLI imports this module at start-up, before the writers' dependencies.
DEFAULT_OUT_DIR = "m2ort-fast-out"

# More heatmaps than this is a mistake, not a wish (one PNG each, ~0.4 s apiece).
MAX_HEATMAPS = 64


def number(kind, low: float, high: float | None = None, low_inclusive: bool = False, what: str = ""):
    """An argparse type: ``kind`` (int or float) in (low, high] (or [low, high] when
    ``low_inclusive``), finite; anything else is a one-line usage error at parse time."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}"
            ) from None
        too_low = value < low if low_inclusive else value <= low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            bound = f"{'at least' if low_inclusive else 'more than'} {low:g}" + (
                f" and at most {high:g}" if high else ""
            )
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what or 'it'} must be {bound}")
        return value

    return parse


positive_int = number(int, 0)
non_negative_int = number(int, 0, low_inclusive=True)
positive_float = number(float, 0)
non_negative_float = number(float, 0, low_inclusive=True)


def device_name(text: str) -> str:
    """cpu, cuda, cuda:N or auto, checked at parse time."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device (use cpu, cuda, cuda:N or auto)")


mpp_value = number(float, MPP_RANGE[0], MPP_RANGE[1], low_inclusive=True, what="microns per pixel")
