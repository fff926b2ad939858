"""Stain and scanner augmentation of a spot's three uint8 levels, for cached encoder features.

Cross-patient loss is the measured weakness of ImageNet features on H&E (issue 25): another lab's
stain and another scanner's optics. Each augmented view of a spot draws, the same for its three
levels (they are one square of tissue):

* a dihedral transform (one of the 8 flips / quarter turns: exact on every level);
* a random stain matrix: each H&E(-DAB) stain's optical-density vector perturbed (``STAIN_SD``),
  then HED jitter (per-stain scale and shift) and brightness, through :func:`m2ort_fast.train.hed_jitter`;
* scanner optics: Gaussian blur (sigma up to ``BLUR_MAX_PX`` level-1 px, halved per level) and,
  with probability ``JPEG_P``, JPEG recompression at quality ``JPEG_QUALITY``.

Views are drawn from a generator seeded by the spot's content hash and the view number, so a spot's
views are the same whatever set it is in (and the feature cache can be keyed by them).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

STAIN_SD = 0.03  # sd of the perturbation of each stain's unit OD vector (then renormalised)
HED_SCALE = 0.15  # per-stain concentration scale ~ U(1 -, 1 +)
HED_SHIFT = 0.03  # per-stain shift ~ U(-, +) in rgb2hed units
BRIGHTNESS = 0.1
BLUR_MAX_PX = 1.2
JPEG_P = 0.5
JPEG_QUALITY = (50, 95)


def _blur(x: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of (1, 3, S, S), reflect padding; sigma below 0.2 px is left alone."""
    if sigma_px < 0.2:
        return x
    radius = max(1, int(np.ceil(3 * sigma_px)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma_px) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.transpose(-1, -2), groups=3)


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    import simplejpeg

    data = simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB")
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def augment_spot(levels: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """One view of one spot: uint8 (S, S, 3) per level -> uint8 (S, S, 3) per level."""
    from m2ort_fast.train import RGB_FROM_HED, hed_jitter

    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    stains = RGB_FROM_HED + rng.normal(0, STAIN_SD, RGB_FROM_HED.shape)
    stains = np.abs(stains) / np.linalg.norm(stains, axis=1, keepdims=True)
    # the random stain matrix, as a per-spot HED scale relative to the standard one: apply it by
    # rewriting the pixels' OD in the perturbed basis (same mix on every level)
    mix = torch.as_tensor(np.linalg.solve(RGB_FROM_HED.T, stains.T).T, dtype=torch.float32)  # hed -> hed'
    scale = torch.as_tensor(1 + rng.uniform(-HED_SCALE, HED_SCALE, (1, 3)), dtype=torch.float32)
    shift = torch.as_tensor(rng.uniform(-HED_SHIFT, HED_SHIFT, (1, 3)), dtype=torch.float32)
    gain = torch.as_tensor([1 + rng.uniform(-BRIGHTNESS, BRIGHTNESS)], dtype=torch.float32)
    sigma = rng.uniform(0, BLUR_MAX_PX)
    quality = int(rng.integers(*JPEG_QUALITY)) if rng.random() < JPEG_P else 0
    out = []
    for i, level in enumerate(levels):
        x = np.rot90(level, k, axes=(0, 1))
        x = x[:, ::-1] if flip else x
        t = torch.from_numpy(np.array(x)).permute(2, 0, 1)[None].float() / 255.0
        t = stain_mix(t, mix)
        t = hed_jitter(t, scale, shift, gain=gain)
        t = _blur(t, sigma / 2**i)
        rgb = (t[0].permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
        out.append(_jpeg(rgb, quality) if quality else rgb)
    return out


def stain_mix(rgb: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) RGB in [0, 1] re-stained: OD = c @ RGB_FROM_HED becomes c @ (mix @ RGB_FROM_HED),
    i.e. the same stain amounts with perturbed stain colours."""
    from m2ort_fast.train import hed_to_rgb, rgb_to_hed

    hed = rgb_to_hed(rgb)  # (1, 3, H, W) stain amounts
    return hed_to_rgb(torch.einsum("bjhw,jk->bkhw", hed, mix.to(rgb.dtype)))


def spot_view(levels: list[np.ndarray], spot_seed: int, view: int) -> list[np.ndarray]:
    """View ``view`` of a spot: 0 is the spot as read; others are :func:`augment_spot` draws."""
    if view == 0:
        return [np.asarray(level) for level in levels]
    return augment_spot(levels, np.random.default_rng([spot_seed, view]))
