"""The encoder interface and the module that turns encoder feature maps into M2ORT's tokens.

An :class:`ImageEncoder` maps an image batch to a feature map:

    forward(images (B, 3, H, W) RGB in [0, 1]) -> features (B, C, h, w)

It applies its own pixel normalisation (ImageNet's mean and std for the encoders here), so the
model's inputs stay what every M2ORT checkpoint takes: RGB in [0, 1]. Its ``info`` is what the
checkpoint's card records: name, source, weights' sha256, licence, provenance.

:class:`EncoderTokens` replaces M2ORT's linear patch embedding (LDPE): the encoder runs on each of
the three levels at its own size (224, 112, 56 px: three magnifications of one square), each map is
resized to a ``grid`` x ``grid`` token grid (bilinear; the coarser levels give smaller maps) so
token t of every level covers the same area, as LDPE's tokens do, and projected to the level's
d = D / 3 channels. ITMM / ICMM then mix them as in the paper's model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
N_LEVELS = 3


class ImageEncoder(nn.Module):
    """Base class: ``features(x)`` on normalised pixels; ``forward`` normalises first.

    Subclasses set ``out_channels`` and ``info`` and implement :meth:`features`."""

    out_channels: int
    info: dict
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        # not in the state dict: part of the encoder's definition, recorded in ``info``
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1], any float dtype (cast to the weights': the torch backend hands a
        bf16 model float32 levels, which LDPE casts in its patchify) -> (B, C, h, w)."""
        images = images.to(next(self.parameters(), images).dtype)
        mean = self.pixel_mean.to(images.dtype)
        std = self.pixel_std.to(images.dtype)
        # channels-last: oneDNN's depthwise / 1x1 convolutions run ~4x faster on the CPU (measured on
        # EfficientNet-Lite0, 2 cores); the same values, and no-op in exported graphs
        x = ((images - mean) / std).contiguous(memory_format=torch.channels_last)
        return self.features(x)


class EncoderTokens(nn.Module):
    """Encoder feature maps of the three levels -> M2ORT tokens (B, grid * grid, 3 d).

    ``frozen``: the encoder's weights get no gradient and it stays in eval mode (BatchNorm
    statistics are ImageNet's), so features can be computed once and cached (:meth:`features`),
    and training runs :meth:`tokens` on them."""

    def __init__(self, encoder: ImageEncoder, level_dim: int, grid: int = 7, dropout: float = 0.0, frozen: bool = True):
        super().__init__()
        self.encoder = encoder
        self.grid = grid
        self.num_tokens = grid * grid
        self.frozen = frozen
        channels = encoder.out_channels
        linears = [nn.Linear(channels, level_dim) for _ in range(N_LEVELS)]
        for linear in linears:
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        self.proj = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(channels), nn.Dropout(dropout), linear, nn.LayerNorm(level_dim))
            for linear in linears
        )
        if frozen:
            encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> EncoderTokens:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def features(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's maps of the three levels: [(B, C, h1, w1), (B, C, h2, w2), (B, C, h3, w3)]."""
        return [self.encoder(x) for x in (level1, level2, level3)]

    def tokens(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Maps of the three levels -> (B, grid * grid, 3 d): brought to the grid, projected per level.

        A map whose sides are whole multiples of the grid is averaged over each token's cells (a
        stride-8 map of 28 x 28 -> 7 x 7: every position counts); any other is resized bilinearly
        (a stride-32 map of 3 x 3 -> 7 x 7)."""
        out = []
        for proj, fmap in zip(self.proj, features):  # noqa: B905 (traced by torch.export: three of each)
            h, w = fmap.shape[-2:]
            if (h, w) != (self.grid, self.grid):
                if h % self.grid == 0 and w % self.grid == 0:
                    fmap = F.avg_pool2d(fmap, kernel_size=(h // self.grid, w // self.grid))
                else:
                    fmap = F.interpolate(fmap, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
            out.append(proj(fmap.flatten(2).transpose(1, 2)))
        return torch.cat(out, dim=-1)

    def forward(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.features(level1, level2, level3))
