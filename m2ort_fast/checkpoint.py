"""Checkpoints: safetensors weights plus everything needed to use them.

A checkpoint is one ``.safetensors`` file. Its header metadata (``__metadata__``, str -> str)
holds ``m2ort_fast`` = JSON of :class:`ModelCard`: the variant and architecture, the gene panel
(names, in order), the working resolution of level 1 in microns per pixel, the patch sizes of the
three levels, the pixel normalisation, the target transform and the provenance of the weights.
Nothing about how to use the weights is taken from the data at hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from m2ort_fast.errors import CheckpointError, M2ORTError
from m2ort_fast.model import IMAGE_SIZES_PX, M2ORT, VARIANTS, M2ORTConfig

FORMAT = "m2ort-fast/1"
METADATA_KEY = "m2ort_fast"


@dataclasses.dataclass
class ModelCard:
    """What a checkpoint says about its weights."""

    variant: str
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    genes: list[str]
    mpp: float  # microns per pixel of level 1 (the finest of the three inputs)
    patch_sizes_px: list[int] = dataclasses.field(default_factory=lambda: list(IMAGE_SIZES_PX))
    # Pixels are fed as (uint8 / 255 - mean) / std per RGB channel; the paper's code uses [0, 1].
    pixel_mean: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])
    pixel_std: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0, 1.0])
    # Predictions are on this scale: counts -> counts per million of the panel total -> log1p.
    target_transform: str = "log1p_cpm"
    model_id: str = "m2ort"
    trained: bool = False
    provenance: dict = dataclasses.field(default_factory=dict)
    format: str = FORMAT
    # A pretrained image encoder in place of LDPE (m2ort_fast.encoders.encoder_card): name, source,
    # weights_sha256, licence, provenance, grid, weights_in_checkpoint. Empty: the paper's LDPE.
    encoder: dict = dataclasses.field(default_factory=dict)

    @property
    def config(self) -> M2ORTConfig:
        return M2ORTConfig(
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            mlp_dim=self.mlp_dim,
            n_genes=len(self.genes),
            variant=self.variant,
        )

    @property
    def level_mpp(self) -> list[float]:
        """Microns per pixel of the three inputs: level 1, 2 and 3."""
        return [self.mpp * self.patch_sizes_px[0] / size for size in self.patch_sizes_px]

    @property
    def level_source(self) -> str:
        """How the model's levels 2 and 3 were made in training: "resize" (from level 1, as the
        paper's code does) or "pyramid" (read from the slide's pyramid); inference does the same."""
        return self.provenance.get("level_source", "pyramid")

    @property
    def field_of_view_um(self) -> float:
        """Side of the physical square every level of a spot covers."""
        return self.mpp * self.patch_sizes_px[0]

    @classmethod
    def for_variant(cls, variant: str, genes: list[str], mpp: float, **kwargs: Any) -> ModelCard:
        cfg = VARIANTS[variant]
        return cls(
            variant=variant,
            dim=cfg.dim,
            depth=cfg.depth,
            heads=cfg.heads,
            mlp_dim=cfg.mlp_dim,
            genes=list(genes),
            mpp=float(mpp),
            **kwargs,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def save_checkpoint(path: str | os.PathLike, model: M2ORT, card: ModelCard) -> None:
    """Write weights + card atomically (temporary name, then rename)."""
    if model.cfg.n_genes != len(card.genes):
        raise ValueError(f"model predicts {model.cfg.n_genes} genes, card lists {len(card.genes)}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    skip = _external_prefix(card)
    state = {
        k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not (skip and k.startswith(skip))
    }
    save_file(state, str(tmp), metadata={METADATA_KEY: card.to_json()})
    os.replace(tmp, path)


def _external_prefix(card: ModelCard) -> str | None:
    """State-dict prefix of weights the checkpoint does not hold (an encoder resolved from its
    installed package at load time, hash-checked), or None."""
    if card.encoder and not card.encoder.get("weights_in_checkpoint", True):
        from m2ort_fast.encoders import ENCODER_PREFIX

        return ENCODER_PREFIX
    return None


def model_for_card(card: ModelCard) -> M2ORT:
    """The (untrained) model a card describes: the reference M2ORT, or M2ORT over the card's encoder."""
    if not card.encoder:
        return M2ORT(card.config)
    from m2ort_fast.encoders import EncoderTokens, encoder_from_card

    cfg = card.config
    grid = int(card.encoder.get("grid", 7))
    return M2ORT(cfg, token_embed=EncoderTokens(encoder_from_card(card.encoder), cfg.level_dim, grid=grid))


def card_size(card: ModelCard) -> dict:
    """{"params", "params_M", "gflops_per_spot"} of the model a card describes. The reference
    M2ORT: its configuration's closed form (:func:`m2ort_fast.model.describe`); M2ORT over an
    encoder: parameters counted on the built model (the encoder's included) and FLOPs counted by
    torch's FlopCounterMode on one spot (2 per multiply-add of matmuls and convolutions; the
    encoder's dominate)."""
    from m2ort_fast.model import count_parameters, describe

    if not card.encoder:
        return {k: v for k, v in describe(card.config).items() if k in ("params", "params_M", "gflops_per_spot")}
    from torch.utils.flop_counter import FlopCounterMode

    model = model_for_card(card).eval()
    levels = [torch.zeros(1, 3, s, s) for s in IMAGE_SIZES_PX]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*levels)
    params = count_parameters(model)
    gflops = counter.get_total_flops() / 1e9
    return {"params": params, "params_M": round(params / 1e6, 2), "gflops_per_spot": round(gflops, 2)}


def read_card(path: str | os.PathLike) -> ModelCard:
    """Read only the metadata of a checkpoint (cheap: the header, not the weights)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no such checkpoint file", path)
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len < 100_000_000:
                raise ValueError
            header = json.loads(f.read(header_len))
        meta = header.get("__metadata__") or {}
        return ModelCard.from_json(meta[METADATA_KEY])
    except KeyError:
        raise CheckpointError(
            "safetensors file carries no m2ort_fast metadata (not an m2ort-fast checkpoint)", path
        ) from None
    except (ValueError, TypeError, UnicodeDecodeError):
        raise CheckpointError("not a safetensors checkpoint (unreadable header)", path) from None


def load_checkpoint(
    path: str | os.PathLike,
    *,
    variant: str | None = None,
    genes: list[str] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[M2ORT, ModelCard]:
    """Load a checkpoint into the reference model, in eval mode.

    ``variant`` / ``genes``, where given, are what the caller expects; a checkpoint for another
    variant or gene panel is refused with a one-line :class:`CheckpointError`.
    """
    card = read_card(path)
    if variant is not None and card.variant != variant:
        raise CheckpointError(f"checkpoint is for variant {card.variant!r}, not {variant!r}", path)
    if genes is not None and list(genes) != card.genes:
        missing = [g for g in genes if g not in set(card.genes)]
        detail = (
            f"{len(missing)} of the {len(genes)} genes asked for are not in it"
            if missing
            else "same genes in another order"
        )
        raise CheckpointError(f"checkpoint is for another gene panel ({len(card.genes)} genes; {detail})", path)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read weights ({str(exc).splitlines()[0]})", path) from None
    try:
        model = model_for_card(card)
    except ValueError as exc:
        raise CheckpointError(str(exc), path) from None
    except M2ORTError as exc:  # the card's encoder cannot be built here
        raise CheckpointError(str(exc), path) from None
    skip = _external_prefix(card)
    expected = {k: v for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}
    head = state.get("head.weight")
    if head is not None and head.shape[0] != len(card.genes):
        raise CheckpointError(
            f"weights predict {head.shape[0]} genes but the checkpoint's gene panel lists {len(card.genes)}", path
        )
    bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    extra = [k for k in state if k not in expected]
    if bad or extra:
        name = (bad or extra)[0]
        got = tuple(state[name].shape) if name in state else "missing"
        want = tuple(expected[name].shape) if name in expected else "unexpected"
        raise CheckpointError(f"weights do not fit variant {card.variant!r}: {name} is {got}, expected {want}", path)
    broken = [k for k, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise CheckpointError(
            f"weights contain NaN or infinite values ({len(broken)} of {len(state)} tensors, first "
            f"{broken[0]}): "
            f"a damaged or diverged checkpoint",
            path,
        )
    model.load_state_dict(state, strict=skip is None)  # without strict: only the external encoder is absent
    return model.to(device).eval(), card


def file_sha256(path: str | os.PathLike) -> str:
    """Hash of a checkpoint's bytes: the key of compiled artifacts built from it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
