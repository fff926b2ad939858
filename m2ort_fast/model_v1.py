"""The reference model's forward as it was written before issue 26, for the parity test
(tests/test_model.py) and the old-vs-new row of bench/backends.py ("torch-v1"); never used to predict.

What changed since (the same function, exact in real arithmetic):
* patchify was one permuting copy straight from NCHW; now two copies with contiguous runs;
* the inputs were cast to the model's dtype before the model (a pass of its own); now in patchify;
* the last encoder block ran for every token; now for the class token only (all the head reads).

    forward_v1(model, level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56)) -> (B, G)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m2ort_fast.model import M2ORT, LevelPatchEmbed


def patchify_v1(image: torch.Tensor, patch_px: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C), patches flattened in (p1 p2 c) order: one copy."""
    b, c, h, w = image.shape
    gh, gw = h // patch_px, w // patch_px
    x = image.reshape(b, c, gh, patch_px, gw, patch_px)
    x = x.permute(0, 2, 4, 3, 5, 1)  # b gh gw p1 p2 c
    return x.reshape(b, gh * gw, patch_px * patch_px * c)


def embed_v1(branch: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """One LDPE branch (a LevelPatchEmbed) on the one-copy patchify."""
    assert isinstance(branch, LevelPatchEmbed)
    x = patchify_v1(image, branch.patch_px)
    return branch.norm_out(branch.fc2(F.gelu(branch.fc1(branch.norm_in(x)))))


def forward_v1(model: M2ORT, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
    """The old forward on ``model``'s weights; inputs are cast to its dtype first, as its callers did."""
    dtype = model.head.weight.dtype
    levels = (level1.to(dtype), level2.to(dtype), level3.to(dtype))
    tokens = torch.cat([embed_v1(branch, image) for branch, image in zip(model.embeds, levels)], dim=-1)  # noqa: B905
    cls = model.cls_token.expand(tokens.shape[0], -1, -1)
    tokens = torch.cat([cls, tokens], dim=1) + model.pos_embed
    for block in model.encoder_blocks():
        tokens = block(tokens)
    return model.head(model.norm(tokens[:, 0]))
