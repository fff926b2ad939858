"""Any timm model as the encoder, its weights from a local file (``--encoder timm:NAME --encoder-weights FILE``).

For users holding pathology foundation-model weights (UNI, CONCH, Virchow, H-optimus: timm
architectures whose hubs cannot be reached from every machine): the architecture comes from timm,
the weights from the file (a state dict saved with ``torch.save`` or a ``.safetensors`` file), never
from a hub. The weights are stored in the m2ort-fast checkpoint too, so the checkpoint alone runs.

Features: ``forward_features``. A CNN gives (B, C, h, w) as is; a ViT gives (B, prefix + h * w, C),
whose patch tokens are laid back on their (h, w) grid. ViTs are built with ``dynamic_img_size`` so
that levels 2 and 3 (112 and 56 px) run at their own size.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

from m2ort_fast.encoders.base import IMAGENET_MEAN, IMAGENET_STD, ImageEncoder
from m2ort_fast.encoders.efficientnet import sha256_of
from m2ort_fast.errors import M2ORTError

# torch.library handle that keeps the schemas below defined (see import_timm)
_TORCHVISION_SCHEMAS = None


def import_timm():
    """``import timm``; where the installed torchvision is a build for another torch (the CUDA
    wheel beside a CPU torch: its C ops do not load and its import fails on registering fakes for
    ``torchvision::nms``), the two op schemas it needs are defined first. timm's models use none
    of torchvision's C ops."""
    global _TORCHVISION_SCHEMAS
    try:
        import timm
    except ImportError:
        raise M2ORTError("timm is not installed (pip install 'm2ort-fast[timm]')") from None
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith(("torchvision.", "timm"))]:
            del sys.modules[name]
        _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _TORCHVISION_SCHEMAS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import timm
    return timm


def create_timm(name: str):
    """The timm architecture ``name`` at random init, without classifier or pooling."""
    timm = import_timm()
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", dynamic_img_size=True)
    except TypeError:  # not a ViT: no dynamic_img_size argument
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    except RuntimeError as exc:  # timm's "Unknown model"
        raise M2ORTError(f"timm cannot build encoder {name!r} ({str(exc).splitlines()[0]})") from None


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise M2ORTError("no such encoder weights file", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader error is the file's problem: one line
        raise M2ORTError(f"cannot read encoder weights ({' '.join(str(exc).split())[:160]})", path) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise M2ORTError("encoder weights file does not hold a state dict of tensors", path)
    return state


class TimmEncoder(ImageEncoder):
    """A timm model's ``forward_features`` as a (B, C, h, w) map. ``weights``: a local file, or
    None (random init; the checkpoint then supplies the weights)."""

    def __init__(self, name: str, weights: str | os.PathLike | None = None):
        net = create_timm(name)
        cfg = getattr(net, "pretrained_cfg", None) or {}
        super().__init__(mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)))
        sha = None
        if weights is not None:
            state = read_weights(weights)
            own = net.state_dict()
            # a classifier the file has and the headless model lacks is not needed
            state = {k: v for k, v in state.items() if k in own}
            bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
            if bad:
                got = tuple(state[bad[0]].shape) if bad[0] in state else "missing"
                raise M2ORTError(
                    f"weights do not fit timm model {name!r}: {len(bad)} tensors missing or of another shape, "
                    f"first {bad[0]} ({got}, expected {tuple(own[bad[0]].shape)})",
                    weights,
                )
            net.load_state_dict(state)
            sha = sha256_of(Path(weights))
        self.net = net.eval()
        self.prefix_tokens = int(getattr(net, "num_prefix_tokens", 0))
        self.out_channels = int(net.num_features)
        self.info = {
            "name": f"timm:{name}",
            "source": f"timm {import_timm().__version__} architecture, weights from a local file",
            "weights_sha256": sha,
            "weights_file": str(weights) if weights is not None else None,
            "licence": "as the weights file's (not known to m2ort-fast)",
            "provenance": "user-supplied weights file" if weights is not None else "random init (not pretrained)",
            "out_channels": self.out_channels,
            "pixel_mean": self.pixel_mean.flatten().tolist(),
            "pixel_std": self.pixel_std.flatten().tolist(),
            "weights_in_checkpoint": True,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net.forward_features(x)
        if out.ndim == 4:
            return out
        tokens = out[:, self.prefix_tokens :]  # (B, h * w, C) patch tokens of a square input
        side = math.isqrt(tokens.shape[1])
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
