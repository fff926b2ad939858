"""The ``open`` stage: a slide, its spots, thumbnails and tissue, ready to be predicted (run ahead
of the model for the next slide)."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m2ort_fast.bounds import API_OPTIONS, OptionNames
from m2ort_fast.checkpoint import ModelCard, file_sha256
from m2ort_fast.errors import SpotsError
from m2ort_fast.outputs import HIRES_MAX_SIDE_PX, SlideView
from m2ort_fast.predict.assets import DEMO_SLIDE, DEMO_SOURCE_SECTION
from m2ort_fast.predict.options import OpenOptions
from m2ort_fast.profiling import StageTimer
from m2ort_fast.scale import mpps_agree, resolve_mpp
from m2ort_fast.slide import Slide, open_slide, require_mpp
from m2ort_fast.spots import Spots, SpotsLike, as_spots, check_spots_inside, grid_spots
from m2ort_fast.tissue import tissue_mask

log = logging.getLogger(__name__)

VISIUM_PITCH_UM = 100.0
VISIUM_SPOT_DIAMETER_UM = 55.0
THUMBNAIL_MAX_SIDE_PX = 1600
# A spot table whose spots barely touch the tissue belongs to another slide (or another scale).
MIN_SPOTS_ON_TISSUE_FRACTION = 0.1


@dataclass
class OpenedSlide:
    """A slide opened for prediction (the open stage's product; the slide is open until the run
    that takes it closes it). ``tissue_mask`` (h, w) bool on ``thumbnail``; ``hires`` (h, w, 3)
    uint8, at most HIRES_MAX_SIDE_PX a side."""

    path: Path
    slide: Slide
    spots: Spots
    thumbnail: np.ndarray
    downsample: float
    slide_mpp: float
    timer: StageTimer
    tissue_mask: np.ndarray
    hires: np.ndarray
    hires_downsample: float
    options: OpenOptions


def open_for_prediction(
    slide_path: Path,
    spots: SpotsLike | None,
    options: OpenOptions,
    card: ModelCard,
    *,
    max_decoded_mb: float | None,
    names: OptionNames = API_OPTIONS,
) -> OpenedSlide:
    """Open ``slide_path`` and its spots (None: a grid over the tissue), check that they belong
    together (the same scale, on the tissue), and take the thumbnails and tissue mask the writers
    need. ``names``: how messages name the options (the CLI's flags or the API's keywords)."""
    timer = StageTimer()
    with timer.stage("open"):
        # the streamed engine's memory bound also refuses flat images too large to decode whole;
        # opened at its own mpp, which the user's is checked against
        slide = open_slide(slide_path, reader=options.reader, max_decoded_mb=max_decoded_mb)
    try:
        with timer.stage("open"):
            table = None
            if spots is not None:
                table = as_spots(spots, format=options.spot_format, check_scale=options.mpp is None, options=names)
            _resolve_mpp(slide, table, options, names)
            slide_mpp = require_mpp(slide, names.mpp)
            thumbnail, downsample = slide.thumbnail(THUMBNAIL_MAX_SIDE_PX)
            hires, hires_downsample = slide.thumbnail(HIRES_MAX_SIDE_PX)
            mask = tissue_mask(thumbnail)
            if table is None:
                spacing_um = VISIUM_PITCH_UM if options.spacing_um is None else options.spacing_um
                table = grid_spots(
                    slide,
                    spacing_um=spacing_um,
                    spot_diameter_um=VISIUM_SPOT_DIAMETER_UM,
                    mask=mask,
                    max_spots=options.max_spots,
                    options=names,
                )
            else:
                width_px, height_px = slide.level_dimensions[0]
                check_spots_inside(table, width_px, height_px, slide_path)
                check_spots_on_tissue(table, mask, downsample, slide_path)
            warn_on_upsampling(slide_path, slide_mpp, card)
    except BaseException:
        slide.close()
        raise
    return OpenedSlide(
        slide_path, slide, table, thumbnail, downsample, slide_mpp, timer, mask, hires, hires_downsample, options
    )


def _resolve_mpp(slide: Slide, spots: Spots | None, options: OpenOptions, names: OptionNames) -> None:
    """The mpp the slide is read at: the user's (checked against the slide's own and the spots'
    unless forced), else the slide's metadata, else what its spots imply (their lattice pitch or
    diameter); ScaleError naming both values where two sources disagree."""
    mpp, source = resolve_mpp(
        user_mpp=options.mpp,
        slide_mpp=slide.mpp,
        spots_mpp=spots.mpp_from_pitch if spots is not None else None,
        spots_source=(spots.mpp_source or "the spots") if spots is not None else "the spots",
        force=options.mpp_force,
        options=names,
    )
    if mpp is None or source == "metadata":
        return
    if source == "user":
        if slide.mpp is not None and not mpps_agree(mpp, slide.mpp):
            log.warning(
                "%s: %s %g overrides the slide's own %g um/px (forced)", slide.path.name, names.mpp, mpp, slide.mpp
            )
        slide.set_mpp(mpp, "user")
        return
    assert spots is not None
    slide.set_mpp(mpp, "spot-table")
    log.info("%s: no mpp in the slide; %.4f um/px from %s", slide.path.name, mpp, spots.mpp_source or "the spots")


def check_spots_on_tissue(spots: Spots, mask: np.ndarray, downsample: float, slide_path: Path) -> None:
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


def warn_on_upsampling(slide_path: Path, slide_mpp: float, card: ModelCard) -> None:
    needed = card.level_mpp[0]
    if slide_mpp > needed * 1.25:
        log.warning(
            "%s: slide resolution %.3f um/px is coarser than the model's %.3f um/px; level-1 patches are upsampled",
            slide_path.name,
            slide_mpp,
            needed,
        )


def slide_view(opened: OpenedSlide, card: ModelCard, library_id: str) -> SlideView:
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
        window_px=card.field_of_view_um / opened.slide_mpp,
        model_id=card.model_id,
        in_training=in_training(card, opened.path, spots.path),
        trained=card.trained,
    )


def in_training(card: ModelCard, slide_path: Path, spots_path: Path | None = None) -> bool | None:
    """Whether the model was trained on this slide, by its card's provenance (None: it does not
    say): the slide's file name, its stem as the section's name, or a spot table named after the
    section (``C3_selection.tsv``, as the her2st data names them) identify a training section."""
    data = card.provenance.get("data") if card.trained else []
    if not data:
        return None if card.trained else False
    seen = [d for d in data if isinstance(d, dict) and d.get("role", "train") in ("train", "val")]
    if _is_demo_slide(Path(slide_path)):
        return any(d.get("section") == DEMO_SOURCE_SECTION for d in seen)
    table = spots_path.name if spots_path is not None else ""
    return any(
        d.get("slide") == Path(slide_path).name
        or d.get("section") == Path(slide_path).stem
        or (d.get("section") and table.startswith(f"{d['section']}_"))
        for d in seen
    )


def _is_demo_slide(slide_path: Path) -> bool:
    """The shipped demo slide, or a copy of it (same size, same bytes)."""
    if slide_path.resolve() == DEMO_SLIDE.resolve():
        return True
    try:
        return slide_path.stat().st_size == DEMO_SLIDE.stat().st_size and file_sha256(slide_path) == file_sha256(
            DEMO_SLIDE
        )
    except OSError:
        return False


def close_when_opened(future: Future[OpenedSlide]) -> None:
    """Close the slide a look-ahead open made, once it is made; its error belongs to a run that
    will not happen (predict_slides and the cohort worker stopping early)."""
    try:
        future.result().slide.close()
    except BaseException:
        pass
