"""The slide's pixel size (microns per pixel, mpp) from the sources that state it, and the one line
when two of them disagree.

Sources: the user (``--mpp`` / ``mpp=``), the slide's metadata, and the spots (their array pitch,
else their ``spot_diameter_fullres`` read under its writer's convention: :mod:`m2ort_fast.spots`).
Two values agree when they differ by at most :data:`MPP_AGREEMENT`; beyond that the run stops with
both values and the option that forces one, since a wrong scale gives wrong predictions silently.
"""

from __future__ import annotations

import math

from m2ort_fast.bounds import NEUTRAL_OPTIONS, OptionNames
from m2ort_fast.errors import M2ORTError

# Two estimates of one pixel size from independent sources (a fit of ~100 spot centres, a rounded
# scale factor, a scanner's calibration) differ by ~1% when they describe the same image.
MPP_AGREEMENT = 0.05


class ScaleError(M2ORTError):
    """Two sources of the slide's pixel size disagree."""


def mpp_ratio(a: float, b: float) -> float:
    """How far apart two mpp values are: max(a/b, b/a) - 1 (0 when equal)."""
    return math.exp(abs(math.log(a / b))) - 1


def mpps_agree(a: float, b: float, tolerance: float = MPP_AGREEMENT) -> bool:
    return mpp_ratio(a, b) <= tolerance


def resolve_mpp(
    *,
    user_mpp: float | None = None,
    slide_mpp: float | None = None,
    slide_source: str = "the slide's metadata",
    spots_mpp: float | None = None,
    spots_source: str = "the spots",
    force: bool = False,
    options: OptionNames = NEUTRAL_OPTIONS,
    tolerance: float = MPP_AGREEMENT,
) -> tuple[float | None, str | None]:
    """The level-0 mpp to run at and where it comes from: ``("user" | "metadata" | "spots")``, or
    ``(None, None)`` where no source states one.

    user_mpp: ``--mpp`` / ``mpp=``; checked against the slide's and the spots' values unless
    ``force``. slide_mpp: the slide's own (its metadata), ``slide_source`` saying where it is from.
    spots_mpp: what the spots imply (``Spots.mpp_from_pitch``), ``spots_source`` saying how
    (``Spots.mpp_source``). Any disagreement beyond ``tolerance`` is a :class:`ScaleError` naming
    both values and the option that forces one (``options``: the CLI's flags or the API's keywords).
    """
    if user_mpp is not None:
        if not force:
            for other, source in ((slide_mpp, slide_source), (spots_mpp, spots_source)):
                if other is not None and not mpps_agree(user_mpp, other, tolerance):
                    raise ScaleError(
                        f"{options.mpp} {user_mpp:g} disagrees with the {other:.4g} um/px of {source} "
                        f"({mpp_ratio(user_mpp, other) + 1:.3g}x apart): check the value, or add "
                        f"{options.mpp_force} to use {user_mpp:g}"
                    )
        return float(user_mpp), "user"
    if slide_mpp is not None and spots_mpp is not None and not mpps_agree(slide_mpp, spots_mpp, tolerance):
        raise ScaleError(
            f"{slide_source} gives {slide_mpp:.4g} um/px and {spots_source} {spots_mpp:.4g} um/px "
            f"({mpp_ratio(slide_mpp, spots_mpp) + 1:.3g}x apart: spots for another resolution of this "
            f"image?); pass the right one as {options.mpp} with {options.mpp_force}"
        )
    if slide_mpp is not None:
        return float(slide_mpp), "metadata"
    if spots_mpp is not None:
        return float(spots_mpp), "spots"
    return None, None
