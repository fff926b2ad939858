"""`m2ort-fast train`: train M2ORT the way the paper's code does.

    m2ort-fast train --config configs/her2st_small.toml [--epochs N] [--variant V] [--test-sections C2] ...

Recipe (``docs/model.md`` "Targets and training"): targets are log1p CPM of the gene panel's total
(:mod:`m2ort_fast.targets`); loss MSE; Adam, lr 1e-4, no weight decay; batch 96; model kept at the
best validation PCC (per spot, the paper's); augmentation by horizontal / vertical flips and a
rotation by a random angle with white fill, the same transform on all three levels. bf16 autocast
on a GPU.

Options beyond the paper (issue 12; all off by default, so the default recipe is the paper's):

* ``standardize_targets``: the model learns each gene standardised with the training spots' mean
  and std, so every gene weighs in the loss as much as the others (on the raw scale a few highly
  expressed genes, and the one "more or less tissue" axis they share, dominate the MSE). Before
  any checkpoint is written the de-standardisation is folded into the final linear head
  (``W' = diag(std) W``, ``b' = std * b + mean``): checkpoints stay ordinary and predict log1p CPM.
* ``pcc_loss_weight`` w: loss = MSE + w * (1 - mean over genes of the Pearson correlation across
  the batch's spots) (:func:`pcc_loss`), on the standardised (or raw) targets.
* ``color_augment``: stain / colour jitter (:func:`color_augment`): HED jitter (Ruifrok-Johnston
  colour deconvolution, per-stain scale and shift) and brightness / contrast, the same colour
  transform on all three levels of a spot; before the flips / rotation.
* ``select_metric``: "pcc_spot_mean" (the paper's), "pcc_gene_mean" or "pcc_gene_top50_mean".

Outputs in ``--out``: ``last.safetensors`` (every epoch), ``best.safetensors`` (best validation
PCC), ``resume.pt`` (model, optimizer, epoch, history: ``--resume`` continues from it),
``metrics.csv`` / ``metrics.json`` (one row per epoch) and ``summary.json`` (final metrics). The
checkpoints carry a full :class:`ModelCard` with provenance: data, split, gene-panel rule, config,
command, metrics, and the training spots' mean expression (the mean baseline).

Determinism: the initial weights come from ``seed``; every epoch draws its spot order and
augmentations from a generator seeded by (seed, epoch), so a run resumed after epoch k makes
exactly the same updates as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from m2ort_fast import metrics as M
from m2ort_fast.errors import M2ORTError
from m2ort_fast.options import device_name, non_negative_float, non_negative_int, positive_float, positive_int

log = logging.getLogger(__name__)

RESUME_FILE = "resume.pt"
SELECT_METRICS = ("pcc_spot_mean", "pcc_gene_mean", f"pcc_gene_top{M.TOP_GENES}_mean")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Loaded from a TOML file, then CLI overrides."""

    sections: list[str] = dataclasses.field(default_factory=list)  # sample folders (relative: to data_root)
    data_root: str = ""  # relative: to the config file's folder
    test_sections: list[str] = dataclasses.field(default_factory=list)  # folder names held out for testing
    val_sections: list[str] = dataclasses.field(default_factory=list)
    split: str = "explicit"  # "explicit" (the lists above) or "random" (the spec's 60/10/30 by slide)
    val_spot_fraction: float = 0.1  # held-out spots of the training slides when no val slide is given
    variant: str = "small"
    n_genes: int = 250
    panel_top_k: int = 1000
    marker_genes: list[str] = dataclasses.field(default_factory=list)  # added to the panel where measured
    mpp: float = 0.0  # model's level-1 microns per pixel; 0: mean of the training sections'
    level_source: str = "resize"  # levels 2 and 3 resized from level 1, as the paper's code does
    epochs: int = 200
    batch_size: int = 96
    lr: float = 1e-4
    weight_decay: float = 0.0
    augment: bool = True
    color_augment: bool = False  # HED + brightness/contrast jitter, same on the three levels (not in the paper)
    standardize_targets: bool = False  # learn per-gene standardised targets; folded into the head on save
    pcc_loss_weight: float = 0.0  # loss = MSE + w * (1 - mean per-gene PCC over the batch's spots)
    init_head_bias_to_mean: bool = True  # start from the mean baseline (speeds short runs; not in the paper)
    select_metric: str = "pcc_spot_mean"
    seed: int = 0
    max_spots_per_section: int = 0  # 0: all (small numbers are for tests)
    eval_batch_size: int = 128
    model_id: str = ""
    out: str = "runs/m2ort"
    cache_dir: str = ""
    device: str = "auto"
    num_threads: int = 0  # torch CPU threads; 0: torch's default
    # Issue 25: M2ORT over a frozen pretrained encoder (m2ort_fast.encoders.training) where set:
    # "efficientnet-lite0-s8", "efficientnet-lite0" or "timm:NAME" (+ encoder_weights, a local file)
    encoder: str = ""
    encoder_weights: str = ""
    encoder_views: int = 4  # cached views per spot: the spot as read + stain / scanner augmented ones
    encoder_grid: int = 7  # tokens per side
    token_dropout: float = 0.1  # on the encoder channels before the token projection
    feature_cache_dir: str = ""  # default ~/.cache/m2ort-fast/features

    @classmethod
    def from_file(cls, path) -> TrainConfig:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # Python 3.10: the same parser, as a package (a dependency there)
            import tomli as tomllib

        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError:
            raise M2ORTError("cannot read config file", path) from None
        except tomllib.TOMLDecodeError as exc:
            raise M2ORTError(f"invalid TOML ({exc})", path) from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise M2ORTError(f"unknown config keys: {', '.join(unknown)}", path)
        cfg = cls(**data)
        if cfg.data_root and not Path(cfg.data_root).is_absolute():
            cfg.data_root = str((path.parent / cfg.data_root).resolve())
        return cfg

    def section_paths(self) -> list[Path]:
        root = Path(self.data_root) if self.data_root else Path(".")
        return [Path(s) if Path(s).is_absolute() else root / s for s in self.sections]


# ----------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class SpotSet:
    """Spots ready for training: uint8 patches per level (N, S, S, 3), targets (N, G), origins."""

    levels: list[np.ndarray]
    targets: np.ndarray
    section: list[str]

    @classmethod
    def concat(cls, parts: list[SpotSet], n_genes: int, sizes) -> SpotSet:
        if not parts:
            return cls([np.zeros((0, s, s, 3), np.uint8) for s in sizes], np.zeros((0, n_genes), np.float32), [])
        return cls(
            [np.concatenate([p.levels[i] for p in parts]) for i in range(len(sizes))],
            np.concatenate([p.targets for p in parts]),
            sum((p.section for p in parts), []),
        )

    def take(self, mask: np.ndarray) -> SpotSet:
        rows = np.flatnonzero(mask)
        return SpotSet([lv[rows] for lv in self.levels], self.targets[rows], [self.section[i] for i in rows])

    def __len__(self) -> int:
        return len(self.targets)


def _sample_mpp(sample) -> float:
    if sample.mpp:
        return float(sample.mpp)
    from m2ort_fast.slide import open_slide

    slide = open_slide(sample.slide_path)
    if slide.mpp is None:
        raise M2ORTError(
            "neither the slide nor the spot table gives a pixel size; set mpp in the config", sample.slide_path
        )
    return float(slide.mpp)


def _thin(sample, max_spots: int):
    if not max_spots or sample.n_spots <= max_spots:
        return sample
    keep = np.zeros(sample.n_spots, dtype=bool)
    keep[np.linspace(0, sample.n_spots - 1, max_spots).round().astype(int)] = True
    return sample.subset(keep)


def resolve_split(cfg: TrainConfig, names: list[str]) -> dict[str, list[str]]:
    from m2ort_fast.targets import split_slides

    unknown = [n for n in cfg.test_sections + cfg.val_sections if n not in names]
    if unknown:
        raise M2ORTError(f"sections {', '.join(unknown)} are not among the configured sections ({', '.join(names)})")
    if cfg.split == "random":
        return split_slides(names, seed=cfg.seed)
    if cfg.split != "explicit":
        raise M2ORTError(f"unknown split {cfg.split!r}; use 'explicit' or 'random'")
    held = set(cfg.test_sections) | set(cfg.val_sections)
    train = [n for n in names if n not in held]
    if not train:
        raise M2ORTError("no training section left after the validation and test sections")
    return {
        "train": train,
        "val": [n for n in names if n in cfg.val_sections],
        "test": [n for n in names if n in cfg.test_sections],
    }


def prepare_data(cfg: TrainConfig, genes: list[str] | None = None, mpp: float | None = None, progress: bool = True):
    """Read the sections, choose the gene panel and mpp (unless given, e.g. on resume), build the
    targets and the cached patches. Returns (sets {"train","val","test"}, info dict)."""
    from m2ort_fast.datasets import read_sample
    from m2ort_fast.patch_cache import PatchCache
    from m2ort_fast.targets import add_marker_genes, expression_targets, holdout_spots, select_gene_panel

    paths = cfg.section_paths()
    if not paths:
        raise M2ORTError("no sections to train on (set `sections` in the config or pass --sections)")
    samples = {}
    for path in paths:
        sample = _thin(read_sample(path), cfg.max_spots_per_section)
        samples[path.name] = sample
    split = resolve_split(cfg, list(samples))
    train_samples = [samples[n] for n in split["train"]]
    panel_rule = None
    if genes is None:
        panel = select_gene_panel(train_samples, n_genes=cfg.n_genes, top_k=cfg.panel_top_k, seed=cfg.seed)
        genes, panel_rule = panel.genes, panel.rule
        if cfg.marker_genes:
            genes, markers = add_marker_genes(genes, train_samples, cfg.marker_genes)
            panel_rule = f"{panel_rule}; plus marker genes measured in every training section: {markers}"
    if mpp is None:
        mpp = cfg.mpp or float(np.mean([_sample_mpp(s) for s in train_samples]))
    from m2ort_fast.checkpoint import ModelCard

    card = ModelCard.for_variant(cfg.variant, genes, mpp)
    cache = PatchCache(cfg.cache_dir or None)
    parts: dict[str, list[SpotSet]] = {"train": [], "val": [], "test": []}
    data_info = []
    t0 = time.perf_counter()
    for role in ("train", "val", "test"):
        for name in split[role]:
            sample = samples[name]
            targets = expression_targets(sample.counts, sample.genes, genes)
            levels = cache.patches(
                sample.slide_path,
                sample.centers_px,
                card.level_mpp,
                slide_mpp=sample.mpp,
                mpp_source=sample.mpp_source,
                sizes_px=card.patch_sizes_px,
                level_source=cfg.level_source,
                progress=progress,
            )
            rows = np.flatnonzero(targets.keep)
            parts[role].append(SpotSet([np.asarray(lv[rows]) for lv in levels], targets.values, [name] * len(rows)))
            data_info.append(
                {
                    "section": name,
                    "role": role,
                    "slide": sample.slide_path.name,
                    "format": sample.format,
                    "n_spots": int(len(rows)),
                    "n_dropped_zero_panel_total": int((~targets.keep).sum()),
                    "n_panel_genes_missing": len(targets.missing_genes),
                    "mpp": sample.mpp,
                    "mpp_source": sample.mpp_source,
                    "notes": sample.notes,
                }
            )
    sizes = card.patch_sizes_px
    sets = {role: SpotSet.concat(parts[role], len(genes), sizes) for role in parts}
    val_source = "sections " + ", ".join(split["val"]) if split["val"] else None
    if not split["val"] and cfg.val_spot_fraction > 0:
        held = holdout_spots(len(sets["train"]), cfg.val_spot_fraction, cfg.seed)
        sets["val"], sets["train"] = sets["train"].take(held), sets["train"].take(~held)
        val_source = f"{cfg.val_spot_fraction:.0%} of the training sections' spots (seed {cfg.seed})"
    info = {
        "genes": genes,
        "panel_rule": panel_rule,
        "mpp": mpp,
        "split": split,
        "val_source": val_source,
        "data": data_info,
        "data_seconds": time.perf_counter() - t0,
        "cache_dir": str(cache.root),
    }
    return sets, info


# ----------------------------------------------------------------------------------------------
# Augmentation


def augment(levels: list[torch.Tensor], generator: torch.Generator, white: torch.Tensor) -> list[torch.Tensor]:
    """Random h/v flips and rotation by a random angle (white fill), the same per spot on all levels.

    levels: (B, 3, S, S) normalised float tensors (S differs per level); white: (3,) the
    normalised value of a white pixel. Rotation is bilinear, about the patch centre."""
    b = levels[0].shape[0]
    hflip = (torch.rand(b, generator=generator) < 0.5).view(b, 1, 1, 1)
    vflip = (torch.rand(b, generator=generator) < 0.5).view(b, 1, 1, 1)
    angle = torch.rand(b, generator=generator, dtype=torch.float64) * (2 * math.pi)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    out = []
    for x in levels:
        device = x.device
        x = torch.where(hflip.to(device), x.flip(-1), x)
        x = torch.where(vflip.to(device), x.flip(-2), x)
        grid = F.affine_grid(theta.to(device=device, dtype=x.dtype), list(x.shape), align_corners=False)
        fill = white.to(device=device, dtype=x.dtype).view(1, 3, 1, 1)
        # Rotating (x - white) with zero padding fills the corners with white.
        x = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
        out.append(x)
    return out


# Ruifrok & Johnston's H&E-DAB stain vectors (RGB optical density of one unit of each stain), as
# scikit-image's ``rgb_from_hed``; ``HED_FROM_RGB`` is its inverse.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_OD_EPS = 1e-6  # darkest RGB value taken into optical density (scikit-image's rgb2hed clip)
HED_SCALE = 0.05  # per-stain scale ~ U(1 - HED_SCALE, 1 + HED_SCALE)
HED_SHIFT = 0.02  # per-stain shift ~ U(-HED_SHIFT, HED_SHIFT), in scikit-image's rgb2hed units
BRIGHTNESS = 0.1  # brightness factor ~ U(1 - BRIGHTNESS, 1 + BRIGHTNESS)
CONTRAST = 0.1  # contrast factor ~ U(1 - CONTRAST, 1 + CONTRAST), about the level-1 patch's grey mean


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> stain concentrations (H, E, D) in scikit-image's ``rgb2hed``
    units (optical density / -log(1e-6)), not clipped at 0 so that :func:`hed_to_rgb` inverts it."""
    od = torch.log(rgb.clamp_min(_OD_EPS)) / math.log(_OD_EPS)
    return torch.einsum("bihw,ij->bjhw", od, torch.as_tensor(HED_FROM_RGB, dtype=rgb.dtype, device=rgb.device))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed`, clipped to [0, 1]."""
    od = torch.einsum("bjhw,ji->bihw", hed, torch.as_tensor(RGB_FROM_HED, dtype=hed.dtype, device=hed.device))
    return torch.exp(od * math.log(_OD_EPS)).clamp(0.0, 1.0)


def hed_jitter(
    rgb: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, gain: torch.Tensor | None = None
) -> torch.Tensor:
    """``hed_to_rgb(rgb_to_hed(rgb) * scale + shift)`` per spot, fused: (B, 3, H, W) RGB in [0, 1],
    (B, 3) stain scales and shifts -> (B, 3, H, W) RGB in [0, 1].

    Optical density is linear in log RGB and the jitter is affine in the stains, so the whole map is
    ``log rgb' = A_b log rgb + c_b`` with ``A_b = (HED_FROM_RGB diag(scale_b) RGB_FROM_HED)^T`` and
    ``c_b = log(1e-6) (shift_b RGB_FROM_HED)``: one log, one 3x3 mix per spot and one exp per pixel.
    ``gain`` (B,), where given, multiplies the result before the clip (brightness), for free."""
    b = rgb.shape[0]
    dtype, device = rgb.dtype, rgb.device
    hed_from_rgb = torch.as_tensor(HED_FROM_RGB, dtype=torch.float64)
    rgb_from_hed = torch.as_tensor(RGB_FROM_HED, dtype=torch.float64)
    mix = hed_from_rgb.unsqueeze(0) * scale.double().unsqueeze(1) @ rgb_from_hed  # (B, 3 in, 3 out)
    offset = (shift.double() @ rgb_from_hed) * math.log(_OD_EPS)  # (B, 3)
    mix = mix.transpose(1, 2).to(device=device, dtype=dtype)
    if gain is not None:
        offset = offset + torch.log(gain.double()).view(b, 1)
    offset = offset.to(device=device, dtype=dtype).view(b, 3, 1)
    log_rgb = torch.log(rgb.clamp_min(_OD_EPS)).reshape(b, 3, -1)
    out = torch.baddbmm(offset, mix, log_rgb)
    return out.exp_().clamp_(0.0, 1.0).view_as(rgb)


def color_augment(levels: list[torch.Tensor], generator: torch.Generator, pixel_mean, pixel_std) -> list[torch.Tensor]:
    """Stain and colour jitter, the same colour transform per spot on all levels.

    levels: (B, 3, S, S) normalised float tensors, ``(rgb - pixel_mean) / pixel_std`` with rgb in
    [0, 1]. Per spot: HED jitter (RGB -> HED with the Ruifrok-Johnston matrix, each stain scaled by
    ~U(0.95, 1.05) and shifted by ~U(-0.02, 0.02), back to RGB; :func:`hed_jitter`), then brightness
    (x * b, b ~U(0.9, 1.1), clipped) and contrast ((x - m) * c + m, c ~U(0.9, 1.1), m the grey mean of the
    spot's level-1 patch after the HED jitter and brightness), clipped to [0, 1]. Every step is a
    per-pixel function of the colour that depends only on the spot, so the three levels get the
    same transform. Returns new tensors, normalised as the inputs."""
    b = levels[0].shape[0]
    scale = 1.0 + (torch.rand(b, 3, generator=generator) * 2 - 1) * HED_SCALE
    shift = (torch.rand(b, 3, generator=generator) * 2 - 1) * HED_SHIFT
    bright = 1.0 + (torch.rand(b, generator=generator) * 2 - 1) * BRIGHTNESS
    contrast = 1.0 + (torch.rand(b, generator=generator) * 2 - 1) * CONTRAST
    device, dtype = levels[0].device, levels[0].dtype
    mean = torch.as_tensor(pixel_mean, dtype=dtype, device=device).view(1, 3, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=dtype, device=device).view(1, 3, 1, 1)
    contrast = contrast.to(device=device, dtype=dtype).view(b, 1, 1, 1)
    identity = bool((mean == 0).all() and (std == 1).all())  # the default normalisation: x is RGB

    def to_rgb(x):
        return x.clamp(0.0, 1.0) if identity else (x * std + mean).clamp_(0.0, 1.0)

    # brightness folded into the HED map (before its clip, as x * b then clip would be)
    jittered = [hed_jitter(to_rgb(x), scale, shift, gain=bright) for x in levels]
    pivot = jittered[0].mean(dim=(1, 2, 3), keepdim=True)  # grey mean of level 1, after brightness
    offset = pivot * (1 - contrast)  # (x - m) * c + m = x * c + m (1 - c)
    out = [rgb.mul_(contrast).add_(offset).clamp_(0.0, 1.0) for rgb in jittered]
    return out if identity else [rgb.sub_(mean).div_(std) for rgb in out]


# ----------------------------------------------------------------------------------------------
# Loss and target standardisation


def pcc_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - mean over genes of the Pearson correlation across the batch's spots: (B, G), (B, G) -> ().

    0 for a perfect (up to a positive affine map per gene) prediction, 1 for an uncorrelated one,
    2 for an anti-correlated one. Genes whose target is constant within the batch have no
    correlation and are left out (0 when every gene is constant, or with fewer than 2 spots)."""
    pred = pred.float()
    target = target.float()
    if pred.shape[0] < 2:
        return pred.sum() * 0.0
    p = pred - pred.mean(dim=0, keepdim=True)
    t = target - target.mean(dim=0, keepdim=True)
    t_var = (t * t).sum(dim=0)
    r = (p * t).sum(dim=0) / torch.sqrt(((p * p).sum(dim=0) + eps) * (t_var + eps))
    valid = t_var > eps * max(1.0, float(target.abs().max()) ** 2)
    if not bool(valid.any()):
        return pred.sum() * 0.0
    return 1.0 - r[valid].mean()


def training_loss(pred: torch.Tensor, target: torch.Tensor, pcc_weight: float = 0.0) -> torch.Tensor:
    """MSE, plus ``pcc_weight`` * :func:`pcc_loss` when the weight is positive."""
    loss = F.mse_loss(pred.float(), target.float())
    if pcc_weight > 0:
        loss = loss + pcc_weight * pcc_loss(pred, target)
    return loss


def target_scaling(targets: np.ndarray, min_std: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and std (population) of the training targets, float32. A gene with (nearly)
    no spread gets std 1, so it is only centred."""
    values = np.asarray(targets, dtype=np.float64)
    mean = values.mean(axis=0)
    std = values.std(axis=0)
    std = np.where(std > min_std, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def fold_standardization(model, mean, std):
    """A copy of ``model`` whose head also de-standardises: y = std * (W x + b) + mean, i.e.
    ``W' = diag(std) W`` and ``b' = std * b + mean`` (computed in float64). ``model`` is not changed."""
    import copy

    folded = copy.deepcopy(model)
    head = folded.head
    with torch.no_grad():
        mean = torch.as_tensor(np.asarray(mean), dtype=torch.float64, device=head.weight.device)
        std = torch.as_tensor(np.asarray(std), dtype=torch.float64, device=head.weight.device)
        weight = head.weight.double() * std[:, None]
        bias = head.bias.double() * std + mean
        head.weight.copy_(weight.to(head.weight.dtype))
        head.bias.copy_(bias.to(head.bias.dtype))
    return folded


# ----------------------------------------------------------------------------------------------
# Training


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_history(out: Path, history: list[dict]) -> None:
    import pandas as pd

    tmp = out / ".metrics.csv.partial"
    pd.DataFrame(history).to_csv(tmp, index=False, float_format="%.6f")
    os.replace(tmp, out / "metrics.csv")
    tmp = out / ".metrics.json.partial"
    tmp.write_text(json.dumps(history, indent=1))
    os.replace(tmp, out / "metrics.json")


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _loss_description(cfg: TrainConfig) -> str:
    """The training loss in words, for the checkpoint's provenance."""
    loss = "MSE"
    if cfg.pcc_loss_weight > 0:
        loss += (
            f" + {cfg.pcc_loss_weight:g} * (1 - mean over genes of the Pearson correlation across the batch's spots)"
        )
    return loss + (" on per-gene standardised targets" if cfg.standardize_targets else " on log1p CPM")


def _augmentation_description(cfg: TrainConfig) -> str:
    """The augmentations in words, for the checkpoint's provenance."""
    parts = []
    if cfg.color_augment:
        parts.append(
            f"HED jitter (Ruifrok-Johnston; stain scale U({1 - HED_SCALE:g}, {1 + HED_SCALE:g}), shift "
            f"U(-{HED_SHIFT:g}, {HED_SHIFT:g})) + brightness U({1 - BRIGHTNESS:g}, {1 + BRIGHTNESS:g}) / "
            f"contrast U({1 - CONTRAST:g}, {1 + CONTRAST:g}), same on the three levels"
        )
    if cfg.augment:
        parts.append("h/v flips + rotation by a random angle (white fill), same on the three levels")
    return ", ".join(parts) or "none"


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, command: str | None = None) -> dict:
    """Run (or resume) training; returns the summary (also written to ``out/summary.json``)."""
    from tqdm import tqdm

    from m2ort_fast.checkpoint import ModelCard, save_checkpoint
    from m2ort_fast.device import resolve_device
    from m2ort_fast.evaluate import predict_levels
    from m2ort_fast.model import M2ORT, VARIANTS, set_fused_attention
    from m2ort_fast.predict import normalize_levels

    if cfg.variant not in VARIANTS:
        raise M2ORTError(f"unknown variant {cfg.variant!r}; known: {', '.join(VARIANTS)}")
    if cfg.select_metric not in SELECT_METRICS:
        raise M2ORTError(f"unknown select_metric {cfg.select_metric!r}; known: {', '.join(SELECT_METRICS)}")
    if not (math.isfinite(cfg.pcc_loss_weight) and cfg.pcc_loss_weight >= 0):
        raise M2ORTError(f"pcc_loss_weight must be a finite number >= 0, got {cfg.pcc_loss_weight!r}")
    if cfg.encoder:
        if resume:
            raise M2ORTError("--resume is not supported with --encoder (frozen-encoder runs take minutes: rerun)")
        from m2ort_fast.encoders.training import train_encoder

        return train_encoder(cfg, progress=progress, command=command)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    state = None
    resume_path = out / RESUME_FILE
    if resume:
        if not resume_path.is_file():
            raise M2ORTError(f"nothing to resume: no {RESUME_FILE}", out)
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        saved_cfg = TrainConfig(**state["config"])
        cfg = dataclasses.replace(
            saved_cfg,
            epochs=cfg.epochs,
            out=cfg.out,
            device=cfg.device,
            cache_dir=cfg.cache_dir,
            num_threads=cfg.num_threads,
        )
    sets, info = prepare_data(
        cfg, genes=state["genes"] if state else None, mpp=state["mpp"] if state else None, progress=progress
    )
    if state:
        info["panel_rule"] = state["panel_rule"]
    genes = info["genes"]
    train_set, val_set, test_set = sets["train"], sets["val"], sets["test"]
    if len(train_set) == 0:
        raise M2ORTError("no training spots (all spots have a zero total over the gene panel?)")
    train_mean = train_set.targets.mean(axis=0)
    target_mean: np.ndarray | None
    target_std: np.ndarray | None
    if cfg.standardize_targets:
        target_mean, target_std = target_scaling(train_set.targets)
        train_targets = (train_set.targets - target_mean) / target_std
    else:
        target_mean = target_std = None
        train_targets = train_set.targets

    torch.manual_seed(cfg.seed)
    model = M2ORT(VARIANTS[cfg.variant].with_genes(len(genes)))
    # the same function as the literal attention, ~1.4x faster steps on the CPU and no
    # (B, heads, 197, 197) scores kept for the backward pass
    set_fused_attention(model, True)
    if cfg.init_head_bias_to_mean:
        with torch.no_grad():
            # standardised targets have mean 0 on the training spots: the zero bias is the mean baseline
            model.head.bias.copy_(torch.zeros(len(genes)) if cfg.standardize_targets else torch.from_numpy(train_mean))

    def inference_model():
        """The model as checkpoints hold it: predicting log1p CPM (standardisation folded in)."""
        if cfg.standardize_targets:
            return fold_standardization(model, target_mean, target_std)
        return model

    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict] = []
    start_epoch, best = 0, -math.inf
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, history = state["epoch"], state["best"], state["history"]

    card = ModelCard.for_variant(
        cfg.variant, genes, info["mpp"], trained=True, model_id=cfg.model_id or f"m2ort-{cfg.variant}"
    )
    provenance = {
        "data": info["data"],
        "split": {**info["split"], "validation": info["val_source"]},
        "gene_panel_rule": info["panel_rule"],
        "target_transform": (
            "counts over the panel -> CPM of the spot's panel total -> log1p; spots with panel total 0 dropped"
        ),
        "level_source": cfg.level_source,
        "mpp_rule": f"config mpp {cfg.mpp}" if cfg.mpp else "mean of the training sections' mpp (spot-table pitch)",
        "config": dataclasses.asdict(cfg),
        "command": command or "m2ort_fast.train.train(...)",
        "train_mean_expression": [round(float(v), 5) for v in train_mean],
        "loss": _loss_description(cfg),
        "augmentation": _augmentation_description(cfg),
        "selection": f"best validation {cfg.select_metric}",
        "torch": torch.__version__,
    }
    if target_mean is not None and target_std is not None:  # cfg.standardize_targets
        provenance["target_standardization"] = {
            "rule": "targets standardised per gene with the training spots' mean and std (population; std 1 "
            "where below 1e-6) for training; the de-standardisation y = std * (W x + b) + mean is folded "
            "into the head (W' = diag(std) W, b' = std * b + mean) in every checkpoint, so the "
            "checkpoint predicts log1p CPM",
            "folded_into_head": True,
            "mean": [round(float(v), 6) for v in target_mean],
            "std": [round(float(v), 6) for v in target_std],
        }
    white = (1.0 - torch.tensor(card.pixel_mean)) / torch.tensor(card.pixel_std)
    n_train = len(train_set)

    def score(scored_model, spot_set: SpotSet, desc: str) -> dict | None:
        """Metrics of ``scored_model`` (predicting log1p CPM) on ``spot_set``."""
        if len(spot_set) == 0:
            return None
        pred = predict_levels(
            scored_model,
            card,
            spot_set.levels,
            batch_size=cfg.eval_batch_size,
            device=device,
            progress=progress,
            desc=desc,
        )
        return M.summarize(pred, spot_set.targets)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        generator = _epoch_generator(cfg.seed, epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # any global-RNG op (e.g. dropout) is per-epoch seeded too
        order = torch.randperm(n_train, generator=generator).numpy()
        model.train()
        total, seen = 0.0, 0
        batches = range(0, n_train, cfg.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False, disable=not progress)
        for start in bar:
            rows = np.sort(order[start : start + cfg.batch_size])
            inputs = normalize_levels(train_set.levels, card, rows)
            if cfg.color_augment:
                inputs = color_augment(inputs, generator, card.pixel_mean, card.pixel_std)
            if cfg.augment:
                inputs = augment(inputs, generator, white)
            inputs = [x.to(device, non_blocking=True) for x in inputs]
            target = torch.from_numpy(train_targets[rows]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pred = model(*inputs)
            loss = training_loss(pred, target, cfg.pcc_loss_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
            seen += len(rows)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        train_seconds = time.perf_counter() - t0
        saved_model = inference_model()
        val = score(saved_model, val_set, "validate")
        row = {
            "epoch": epoch + 1,
            "train_loss": total / seen,
            "train_seconds": round(train_seconds, 3),
            "epoch_seconds": round(time.perf_counter() - t0, 3),
        }
        if val:
            row.update({f"val_{k}": v for k, v in val.items() if not k.startswith("n_")})
        history.append(row)
        card.provenance = {
            **provenance,
            "epoch": epoch + 1,
            "metrics": {"validation": val, "history_tail": history[-3:]},
        }
        save_checkpoint(out / "last.safetensors", saved_model, card)
        current = val[cfg.select_metric] if val else -row["train_loss"]
        improved = np.isfinite(current) and current > best
        if improved or not (out / "best.safetensors").is_file():
            best = max(best, current) if np.isfinite(current) else best
            save_checkpoint(out / "best.safetensors", saved_model, card)
        _atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "best": best,
                "history": history,
                "genes": genes,
                "mpp": info["mpp"],
                "panel_rule": info["panel_rule"],
                "config": dataclasses.asdict(cfg),
                "torch_rng": torch.get_rng_state(),
            },
            resume_path,
        )
        _write_history(out, history)
        log.info("epoch %d: %s", epoch + 1, row)
        if progress:
            shown = f"val PCC/spot {val['pcc_spot_mean']:.4f} PCC/gene {val['pcc_gene_mean']:.4f}" if val else ""
            print(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} {shown} "
                f"({row['epoch_seconds']:.1f} s)",
                file=sys.stderr,
            )

    # Final test of the best model: the report a reader compares with the mean baseline.
    from m2ort_fast.checkpoint import load_checkpoint

    summary = {
        "out": str(out),
        "epochs": cfg.epochs,
        "best_" + cfg.select_metric: best,
        "split": info["split"],
        "validation": info["val_source"],
        "n_train_spots": n_train,
        "n_val_spots": len(val_set),
        "n_test_spots": len(test_set),
        "history": history,
        "data_seconds": round(info["data_seconds"], 2),
    }
    if (out / "best.safetensors").is_file():
        best_model, best_card = load_checkpoint(out / "best.safetensors", device=device)
        test_metrics, baseline_metrics = {}, {}
        for name in info["split"]["test"]:
            part = test_set.take(np.asarray([s == name for s in test_set.section]))
            test_metrics[name] = score(best_model, part, f"test {name}")
            baseline_metrics[name] = M.summarize(np.broadcast_to(train_mean, part.targets.shape), part.targets)
        summary["test"] = test_metrics
        summary["test_mean_baseline"] = baseline_metrics
        if test_metrics:
            best_card.provenance["metrics"] = {
                **best_card.provenance.get("metrics", {}),
                "test": test_metrics,
                "test_mean_baseline": baseline_metrics,
            }
            save_checkpoint(out / "best.safetensors", best_model, best_card)
    tmp = out / ".summary.json.partial"
    tmp.write_text(json.dumps(summary, indent=1, default=float))
    os.replace(tmp, out / "summary.json")
    return summary


# ----------------------------------------------------------------------------------------------
# CLI


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def config_from_args(args) -> TrainConfig:
    cfg = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    overrides = {
        "epochs": args.epochs,
        "variant": args.variant,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "out": args.out,
        "seed": args.seed,
        "val_sections": args.val_sections,
        "test_sections": args.test_sections,
        "sections": args.sections,
        "cache_dir": args.cache_dir,
        "device": args.device,
        "max_spots_per_section": args.max_spots,
        "split": args.split,
        "num_threads": args.threads,
        "standardize_targets": args.standardize_targets,
        "pcc_loss_weight": args.pcc_loss_weight,
        "color_augment": args.color_augment,
        "select_metric": args.select_metric,
        "encoder": args.encoder,
        "encoder_weights": args.encoder_weights,
        "encoder_views": args.encoder_views,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    if args.data_root is not None:
        cfg.data_root = str(Path(args.data_root).resolve())
    return cfg


def run_train(args) -> int:
    cfg = config_from_args(args)
    command = "m2ort-fast train " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else None
    summary = train(cfg, resume=args.resume, progress=not args.quiet, command=command)
    best_key = "best_" + cfg.select_metric
    print(f"best validation {cfg.select_metric}: {summary[best_key]:.4f}; checkpoints in {summary['out']}")
    for name, metrics in (summary.get("test") or {}).items():
        base = summary["test_mean_baseline"][name]
        print(
            f"test {name}: PCC/spot {metrics['pcc_spot_mean']:.4f} (baseline {base['pcc_spot_mean']:.4f}), "
            f"RMSE/spot {metrics['rmse_spot_mean']:.4f} (baseline {base['rmse_spot_mean']:.4f}), "
            f"PCC/gene {metrics['pcc_gene_mean']:.4f} (baseline undefined: constant)"
        )
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("train", help="train M2ORT on spatial-transcriptomics sections (config file + overrides)")
    p.add_argument("--config", default=None, help="TOML config (e.g. configs/her2st_small.toml)")
    p.add_argument(
        "--sections", type=_names, default=None, help="comma-separated section folders (overrides the config)"
    )
    p.add_argument("--data-root", default=None, help="folder the section names are relative to")
    p.add_argument(
        "--test-sections", type=_names, default=None, help="comma-separated section names held out for testing"
    )
    p.add_argument(
        "--val-sections",
        type=_names,
        default=None,
        help="comma-separated validation sections (none: a share of the training spots)",
    )
    p.add_argument(
        "--split",
        choices=["explicit", "random"],
        default=None,
        help="random: the spec's 60/10/30 split by slide with --seed",
    )
    p.add_argument("--variant", default=None, help="tiny, small, base or large")
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None)
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--seed", type=non_negative_int, default=None)
    p.add_argument(
        "--max-spots", type=positive_int, default=None, help="use at most this many spots per section (quick tests)"
    )
    p.add_argument("--out", default=None, help="run folder (checkpoints, metrics, resume file)")
    p.add_argument("--cache-dir", default=None, help="patch cache folder (default ~/.cache/m2ort-fast/patches)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument(
        "--standardize-targets",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train on per-gene standardised targets (folded into the head in checkpoints)",
    )
    p.add_argument(
        "--pcc-loss-weight",
        type=non_negative_float,
        default=None,
        help="add W * (1 - mean per-gene PCC over the batch's spots) to the MSE loss (default 0)",
    )
    p.add_argument(
        "--color-augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="HED stain + brightness/contrast jitter, the same on the three levels",
    )
    p.add_argument(
        "--select-metric",
        choices=SELECT_METRICS,
        default=None,
        help="validation metric the best checkpoint is chosen by (default pcc_spot_mean)",
    )
    p.add_argument(
        "--encoder",
        default=None,
        help="M2ORT over a frozen pretrained encoder: efficientnet-lite0-s8 (the default model's), "
        "efficientnet-lite0 or timm:NAME (docs/encoder.md)",
    )
    p.add_argument("--encoder-weights", default=None, help="weights file of a timm:NAME encoder (never fetched)")
    p.add_argument("--encoder-views", type=positive_int, default=None, help="cached views per spot (default 4)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its resume.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)
