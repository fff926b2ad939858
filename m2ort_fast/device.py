"""Which torch device a run uses: one rule for predict, train, evaluate, export and the backends."""

from __future__ import annotations

import torch

from m2ort_fast.errors import M2ORTError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' -> cuda when there is one, else cpu; a cuda device asked for without CUDA is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise M2ORTError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)") from None
    if device.type not in ("cpu", "cuda"):
        raise M2ORTError(f"device {device} is not supported (use cpu, cuda, cuda:N or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise M2ORTError(f"device {device} asked for, but this machine has no CUDA GPU (use --device cpu)")
    return device


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), on which oneDNN runs bf16
    GEMMs and PyTorch's CPU flash-attention kernel far faster than on AVX-512 alone. torch's own
    probe (``torch.cpu._is_amx_tile_supported``, the one its kernels dispatch on); False where this
    torch lacks it."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if callable(probe) else False
