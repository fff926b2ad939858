"""The precisions a model runs in, and the torch dtype of each: the one table.

    PRECISION_NAMES             ("fp32", "fp16", "bf16"): what --precision accepts
    check_precision("bf16")     -> "bf16"; anything else raises M2ORTError
    torch_dtype("bf16")         -> torch.bfloat16
    PRECISIONS                  {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

torch is imported on first use of ``torch_dtype`` / ``PRECISIONS``, not by importing this module, so
that the CLI's parser (which lists the names) stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from m2ort_fast.errors import M2ORTError

if TYPE_CHECKING:
    import torch

# precision -> name of its torch dtype
_TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

PRECISION_NAMES: tuple[str, ...] = tuple(_TORCH_DTYPE_NAMES)


def check_precision(precision: str, what: str = "") -> str:
    """``precision`` when it is one of :data:`PRECISION_NAMES`, else M2ORTError (``what``: who asks,
    e.g. "the triton backend", named in the message)."""
    if precision not in _TORCH_DTYPE_NAMES:
        where = f" for {what}" if what else ""
        raise M2ORTError(f"unknown precision {precision!r}{where}; use one of {', '.join(PRECISION_NAMES)}")
    return precision


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of ``precision`` (checked)."""
    import torch

    return getattr(torch, _TORCH_DTYPE_NAMES[check_precision(precision)])


def __getattr__(name: str) -> dict[str, torch.dtype]:
    if name == "PRECISIONS":  # built on first use: it needs torch
        return {precision: torch_dtype(precision) for precision in PRECISION_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
