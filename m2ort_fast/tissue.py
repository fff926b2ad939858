"""Tissue mask of an H&E slide from its thumbnail.

Stained tissue is coloured (eosin pink, haematoxylin purple) while the glass background is white
or light grey, so HSV saturation separates them; Otsu's method picks the cut per slide, with a
floor so that an all-background thumbnail (whose saturation is only noise) yields no tissue, and
the floor as the cut where no glass is in view (a thumbnail that is tissue throughout).
Near-black pixels (scanner padding, out-of-scan areas) have an undefined saturation and are not
tissue. Small specks (dust, debris) are removed and holes inside tissue (fat, lumens) filled.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Saturation below which a pixel is never tissue, whatever Otsu says: white glass and JPEG noise
# stay well under it, faint eosin is above it.
MIN_TISSUE_SATURATION = 0.07
# Otsu splits glass from tissue only where there is glass: when the pixels below its cut average
# more saturation than glass ever has, the thumbnail is tissue throughout (a crop, a dense core)
# and Otsu has split pale stroma from nuclei; the floor above is the cut then.
MAX_GLASS_SATURATION = 0.12
# Pixels whose brightest channel is below this are scanner padding or black marks, not tissue.
MIN_TISSUE_BRIGHTNESS = 30
# Connected tissue pieces smaller than this fraction of the thumbnail are dropped as debris.
MIN_PIECE_FRACTION = 5e-4


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of 1-D ``values``: the cut maximising the between-class variance."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return 0.0
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)[:-1]
    weight_high = values.size - weight_low
    sum_low = np.cumsum(counts * centres)[:-1]
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (np.sum(counts * centres) - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[1:-1][np.argmax(between)])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (h, w) float32 in [0, 1] of an (h, w, 3) uint8 image (0 where black)."""
    rgb = np.asarray(rgb)
    brightest = rgb.max(axis=2).astype(np.float32)
    darkest = rgb.min(axis=2).astype(np.float32)
    return np.divide(brightest - darkest, brightest, out=np.zeros_like(brightest), where=brightest > 0)


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Boolean mask (h, w), True on tissue, of an H&E thumbnail (h, w, 3) uint8 (RGB; RGBA is cut to RGB)."""
    thumbnail = np.asarray(thumbnail)
    if thumbnail.ndim != 3 or thumbnail.shape[2] not in (3, 4) or thumbnail.dtype != np.uint8:
        raise ValueError(f"tissue_mask needs an (h, w, 3) uint8 image, got {thumbnail.shape} {thumbnail.dtype}")
    rgb = thumbnail[..., :3]
    sat = saturation(rgb)
    lit = rgb.max(axis=2) >= MIN_TISSUE_BRIGHTNESS
    if not lit.any():
        return np.zeros(sat.shape, dtype=bool)
    cut = max(otsu_threshold(sat[lit]), MIN_TISSUE_SATURATION)
    below = sat[lit & (sat <= cut)]
    if not below.size or float(below.mean()) > MAX_GLASS_SATURATION:  # no glass in view: all of it is tissue
        cut = MIN_TISSUE_SATURATION
    mask = (sat > cut) & lit
    # Close small gaps between stained nuclei/stroma, then drop isolated specks.
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3), bool), iterations=2, border_value=0)
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
    mask = ndimage.binary_fill_holes(mask)
    return _drop_small_pieces(mask, max(4, int(MIN_PIECE_FRACTION * mask.size)))


def _drop_small_pieces(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    labels, n_pieces = ndimage.label(mask)
    if n_pieces == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False  # label 0 is the background
    return keep[labels]
