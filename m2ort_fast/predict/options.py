"""The options of one slide's run, typed: how it is opened (:class:`OpenOptions`) and what it
writes (:class:`OutputOptions`), and the one place that routes keyword options to them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m2ort_fast.bounds import DEFAULT_MAX_SPOTS
from m2ort_fast.errors import M2ORTError
from m2ort_fast.options import DEFAULT_OUT_DIR
from m2ort_fast.outputs import DEFAULT_HEATMAP_COUNT, FORMATS

# Keywords of Predictor(...): a model and how it runs, the same for every slide.
PREDICTOR_OPTIONS = (
    "backend",
    "device",
    "precision",
    "batch_size",
    "level_source",
    "num_threads",
    "progress",
    "backend_options",
    "streamed",
    "max_memory_mb",
    "data_path",
    "max_gpu_memory_mb",
    "option_names",
)


@dataclasses.dataclass(frozen=True)
class OpenOptions:
    """How a slide and its spots are opened: ``spot_format`` of a spot table, ``spacing_um`` of
    the grid when there is none (None: Visium's 100 um), ``mpp`` given by the user (None: the
    slide's own; checked against the slide's and the spots' unless ``mpp_force``), ``reader``,
    ``max_spots``: the most spots a grid may have (counted before it is built)."""

    spot_format: str = "auto"
    spacing_um: float | None = None
    mpp: float | None = None
    reader: str = "auto"
    mpp_force: bool = False
    max_spots: int = DEFAULT_MAX_SPOTS


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """What a slide's run writes beside its ``.h5ad`` and where: ``formats`` (of ``FORMATS``),
    heatmaps of ``heatmap_genes`` (None: the ``n_heatmaps`` that vary most), ``stem`` (None: the
    slide's file name), ``overwrite``: redo a slide whose outputs exist (else the run record
    decides: skipped, formats added, or refused)."""

    out_dir: Path = Path(DEFAULT_OUT_DIR)
    formats: tuple[str, ...] = ("csv",)
    heatmap_genes: tuple[str, ...] | None = None
    n_heatmaps: int = DEFAULT_HEATMAP_COUNT
    stem: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise M2ORTError(
                f"unknown output format {unknown[0]!r}: use {', '.join(FORMATS)} (the .h5ad is always written)"
            )
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "formats", tuple(dict.fromkeys(self.formats)))
        if self.heatmap_genes is not None:
            object.__setattr__(self, "heatmap_genes", tuple(self.heatmap_genes))


def output_formats(formats: Sequence[str] | None, write_csv: bool = True) -> tuple[str, ...]:
    """The formats to write beside the .h5ad: csv (unless ``write_csv`` is False) and ``formats``."""
    chosen = ("csv", *(formats or ())) if write_csv else tuple(f for f in formats or () if f != "csv")
    return tuple(dict.fromkeys(chosen))


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], OpenOptions, OutputOptions]:
    """Keyword options as ``predict_slides`` and ``predict_cohort`` take them -> (Predictor's
    keywords, :class:`OpenOptions`, :class:`OutputOptions`); an unknown keyword is an M2ORTError
    naming it and what is accepted."""
    open_keys = {f.name for f in dataclasses.fields(OpenOptions)}
    output_keys = {f.name for f in dataclasses.fields(OutputOptions)} | {"write_csv"}
    unknown = sorted(set(options) - set(PREDICTOR_OPTIONS) - open_keys - output_keys)
    if unknown:
        accepted = ", ".join(sorted({*PREDICTOR_OPTIONS, *open_keys, *output_keys}))
        raise M2ORTError(f"unknown keyword {unknown[0]!r}; accepted: {accepted}")
    output = {k: v for k, v in options.items() if k in output_keys and k not in ("formats", "write_csv")}
    output["formats"] = output_formats(options.get("formats"), options.get("write_csv", True))
    return (
        {k: v for k, v in options.items() if k in PREDICTOR_OPTIONS},
        OpenOptions(**{k: v for k, v in options.items() if k in open_keys}),
        OutputOptions(**output),
    )
