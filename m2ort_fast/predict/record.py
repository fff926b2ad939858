"""The run record: what a slide's outputs were made from, and the one rule every entry point
(``Predictor.predict_slide``, ``predict_slides``, the CLI, shards, Ray) follows before it runs.

The record is stored in the ``.h5ad`` (``uns["m2ort_fast"]["run_record"]``, JSON). Before a slide
is run, the record it would make is compared with the one its outputs hold (:func:`decide`):

- no outputs, or ``overwrite``: run;
- a setting that decides the predictions differs (:data:`VALUE_SETTINGS`): refused, one line
  naming the setting and both values (``--overwrite`` or another ``--out``);
- the same predictions, but formats or heatmaps asked for that are not there: added from the
  stored predictions, without running the model;
- otherwise: skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from m2ort_fast.bounds import NEUTRAL_OPTIONS, OptionNames
from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.errors import M2ORTError, OutputError, SlideError, exception_detail
from m2ort_fast.outputs import check_targets, h5ad_path, remove_stale_staging
from m2ort_fast.predict.opening import VISIUM_PITCH_UM
from m2ort_fast.predict.options import OpenOptions, OutputOptions
from m2ort_fast.spots import Spots

log = logging.getLogger(__name__)

# The settings that decide a slide's predictions: an output made otherwise is never reused.
VALUE_SETTINGS = ("checkpoint", "slide", "spots", "mpp", "level_source", "precision")
# What is made from the predictions: missing ones are added without running the model.
DERIVED_SETTINGS = ("formats", "heatmaps")
# A requested precision that any recorded one satisfies (--precision auto picks at run time).
ANY_PRECISION = "auto"


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What one slide's outputs are made from, in words a user can compare (``info`` and the
    refusal messages print them). ``backend`` and ``version`` are recorded, not compared: fp32
    backends agree to rounding, and a new release should not redo a finished cohort."""

    checkpoint: str  # "<model id> (sha256 <16 hex>)"
    slide: str  # "<file name> (<bytes> bytes)"
    spots: str  # "a grid every 100 um over the tissue" | "<n> spots from a <kind> table (sha256 ...)"
    mpp: str  # "the slide's own" | "<value> (given)"
    level_source: str
    precision: str
    formats: tuple[str, ...] = ()
    heatmaps: str = ""  # "genes A,B" | "the 4 that vary most" | "" (none asked)
    backend: str = ""
    version: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        fields = json.loads(text)
        fields["formats"] = tuple(fields.get("formats", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})

    def with_formats(self, formats: tuple[str, ...]) -> RunRecord:
        return dataclasses.replace(self, formats=tuple(sorted(set(formats))))


@dataclasses.dataclass(frozen=True)
class Decision:
    """``action``: "run", "skip" or "add" (``add``: the formats to write from the stored
    predictions; ``heatmaps``: whether the heatmaps are redrawn); ``record``: what the outputs
    will record once this run has published them."""

    action: str
    record: RunRecord
    add: tuple[str, ...] = ()
    heatmaps: bool = True


def spots_description(spots: Spots | None, spacing_um: float) -> str:
    """The spots' part of the record: the grid's spacing, or the table's size and digest."""
    if spots is None or spots.source == "grid":
        return f"a grid every {spacing_um:g} um over the tissue"
    digest = hashlib.sha256(np.ascontiguousarray(spots.centers_px, dtype=np.float64).tobytes())
    digest.update("\n".join(map(str, spots.ids)).encode())
    return f"{len(spots)} spots from a {spots.source} table (sha256 {digest.hexdigest()[:16]})"


def heatmaps_description(heatmap_genes: tuple[str, ...] | None, n_heatmaps: int) -> str:
    if heatmap_genes:
        return "genes " + ",".join(heatmap_genes)
    return f"the {n_heatmaps} that vary most" if n_heatmaps else ""


def slide_description(slide_path: Path) -> str:
    try:
        size = slide_path.stat().st_size
    except OSError as exc:
        raise SlideError(f"cannot read the slide: {exception_detail(exc)}", slide_path) from None
    return f"{slide_path.name} ({size} bytes)"


def read_record(h5ad: Path, names: OptionNames = NEUTRAL_OPTIONS) -> RunRecord | None:
    """The record an existing ``.h5ad`` holds; None when there is no ``.h5ad``. OutputError (one
    line naming the file) when it is not a file, cannot be read, or holds no record."""
    if not h5ad.exists():
        return None
    if not h5ad.is_file():
        raise OutputError(f"exists and is not a file: move it away, or use {names.out}", h5ad)
    import h5py

    try:
        with h5py.File(h5ad, "r") as f:
            node = f.get("uns/m2ort_fast/run_record")
            value = node[()] if node is not None else None
        if value is None:
            raise OutputError(
                f"exists, made by an earlier version that did not record its settings: {names.overwrite} to replace it",
                h5ad,
            )
        return RunRecord.from_json(value.decode() if isinstance(value, bytes) else str(value))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise OutputError(
            f"exists but its run record cannot be read ({exception_detail(exc)}): {names.overwrite} to replace it", h5ad
        ) from None


def decide(
    existing: RunRecord | None,
    wanted: RunRecord,
    h5ad: Path,
    *,
    overwrite: bool = False,
    names: OptionNames = NEUTRAL_OPTIONS,
) -> Decision:
    """What to do for a slide whose outputs hold ``existing`` (None: no outputs) when this run
    would make ``wanted``; M2ORTError naming the first value setting that differs."""
    if existing is None or overwrite:
        return Decision("run", wanted)
    for name in VALUE_SETTINGS:
        mine, theirs = getattr(wanted, name), getattr(existing, name)
        if mine != theirs and not (name == "precision" and mine == ANY_PRECISION):
            raise M2ORTError(
                f"exists, made with {name} {theirs!r}; this run has {name} {mine!r} "
                f"({names.overwrite} to replace it, or {names.out})",
                h5ad,
            )
    missing = tuple(f for f in wanted.formats if f not in existing.formats)
    redraw = bool(wanted.heatmaps) and wanted.heatmaps != existing.heatmaps
    record = dataclasses.replace(
        wanted,
        precision=existing.precision,
        formats=tuple(sorted({*existing.formats, *wanted.formats})),
        heatmaps=wanted.heatmaps if redraw else existing.heatmaps,
    )
    if missing or redraw:
        log.info(
            "%s: exists; adding %s from its stored predictions", h5ad, ", ".join([*missing, *["heatmaps"] * redraw])
        )
        return Decision("add", record, add=missing, heatmaps=redraw)
    log.info("%s: exists, made from the same run record: skipped", h5ad)
    return Decision("skip", existing)


def build_record(
    card: ModelCard,
    checkpoint_sha256: str,
    slide_path: Path,
    spots: Spots | None,
    open_options: OpenOptions,
    output: OutputOptions,
    *,
    level_source: str,
    precision: str,
    backend: str = "",
) -> RunRecord:
    """The record a run with these settings makes for ``slide_path``; computed without opening
    the slide (a cohort's driver decides before any worker starts)."""
    from m2ort_fast import __version__

    spacing_um = VISIUM_PITCH_UM if open_options.spacing_um is None else open_options.spacing_um
    return RunRecord(
        checkpoint=f"{card.model_id} (sha256 {checkpoint_sha256[:16]})",
        slide=slide_description(Path(slide_path)),
        spots=spots_description(spots, spacing_um),
        mpp="the slide's own" if open_options.mpp is None else f"{open_options.mpp:g} (given)",
        level_source=level_source,
        precision=precision,
        formats=tuple(sorted(output.formats)),
        heatmaps=heatmaps_description(output.heatmap_genes, output.n_heatmaps),
        backend=backend,
        version=__version__,
    )


def decide_before_opening(
    wanted: Callable[[], RunRecord], output: OutputOptions, stem: str, names: OptionNames = NEUTRAL_OPTIONS
) -> str:
    """:func:`decide`'s action ("run", "skip" or "add") for a slide not opened yet, its outputs'
    record read from ``output.out_dir`` (``wanted`` is called only when there are outputs); a
    skipped slide's staging folder left by a killed run is removed (when no run holds it)."""
    check_targets(output.out_dir, stem)
    h5ad = h5ad_path(output.out_dir, stem)
    if output.overwrite or not h5ad.exists():
        return "run"
    action = decide(read_record(h5ad, names), wanted(), h5ad, names=names).action
    if action == "skip":
        remove_stale_staging(output.out_dir, stem)
    return action
