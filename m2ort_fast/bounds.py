"""Bounds checked before work: how many spots a grid may have, and whether a batch fits the memory
bound, each refused as one line naming the option that raises it.

The option names are given by the caller (:class:`OptionNames`): the CLI's messages name its flags
(``--batch-size``), the Python API's its keywords (``batch_size=``); :data:`NEUTRAL_OPTIONS` names
both, for code that serves either.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING

from m2ort_fast.errors import M2ORTError

if TYPE_CHECKING:
    import torch

# A grid of more spots than this is refused before it is built: the 3000 px JPEG read at
# --mpp 50 (a 150 mm "slide") made 987,290 spots. 500,000 is the largest map the engine has been
# shown to hold in bounded memory (README: "a slide with 500,000 spots").
DEFAULT_MAX_SPOTS = 500_000
# Tensors of one spot's width (tokens x channels) alive at once at the peak of a forward pass, and
# the attention scores with their softmax (unfused attention). Measured for the tiny model on the
# CPU (peak RSS over a batch of 512): 1.85 MB a spot, against this estimate's 2.75 MB.
LIVE_TOKEN_TENSORS = 3
LIVE_SCORE_TENSORS = 2


@dataclasses.dataclass(frozen=True)
class OptionNames:
    """How a message names the options that change a bound or force a value."""

    mpp: str
    mpp_force: str
    max_spots: str
    batch_size: str
    max_memory_mb: str
    overwrite: str
    out: str


CLI_OPTIONS = OptionNames(
    "--mpp", "--mpp-force", "--max-spots", "--batch-size", "--max-memory-mb", "--overwrite", "another --out"
)
API_OPTIONS = OptionNames(
    "mpp=", "mpp_force=True", "max_spots=", "batch_size=", "max_memory_mb=", "overwrite=True", "another out_dir="
)
NEUTRAL_OPTIONS = OptionNames(
    "--mpp / mpp=",
    "--mpp-force / mpp_force=True",
    "--max-spots / max_spots=",
    "--batch-size / batch_size=",
    "--max-memory-mb / max_memory_mb=",
    "--overwrite / overwrite=True",
    "another --out / out_dir=",
)


class BoundsError(M2ORTError):
    """A run would exceed a bound (spots, memory): refused before the work starts."""


def check_spot_count(
    n_spots: int,
    max_spots: int = DEFAULT_MAX_SPOTS,
    *,
    what: str = "the grid",
    path=None,
    options: OptionNames = NEUTRAL_OPTIONS,
) -> None:
    """BoundsError when ``n_spots`` (counted before the spots are built) exceeds ``max_spots``."""
    if n_spots > max_spots:
        raise BoundsError(
            f"{what} would have about {n_spots:,} spots, over the limit of {max_spots:,}: check the "
            f"pixel size and spacing, or raise the limit ({options.max_spots} {max(n_spots, max_spots + 1)})",
            path,
        )


def input_bytes_per_spot(patch_sizes_px, dtype_bytes: int = 4) -> int:
    """Bytes of one spot's model input: an RGB square per level (e.g. 224, 112 and 56 px)."""
    return int(sum(3 * int(p) * int(p) for p in patch_sizes_px) * dtype_bytes)


def model_activation_bytes_per_spot(config, dtype_bytes: int = 4, *, fused_attention: bool = False) -> int:
    """Estimate of the activations one spot holds at the peak of an M2ORT forward pass.

    config: an ``M2ORTConfig`` (``dim``, ``heads``, ``mlp_dim``; any object with those attributes).
    The widest per-token tensor is the level-1 patch embedding's input (16 x 16 x 3 = 768 values)
    or the model's width or MLP; attention adds (heads, tokens, tokens) scores unless fused."""
    tokens = 197  # 14 x 14 patch tokens and the class token
    width = max(768, int(config.dim), int(config.mlp_dim))
    per_spot = LIVE_TOKEN_TENSORS * tokens * width
    if not fused_attention:
        per_spot += LIVE_SCORE_TENSORS * int(config.heads) * tokens * tokens
    return int(per_spot * dtype_bytes)


def batch_bytes(batch_size: int, input_bytes: int, activation_bytes: int) -> int:
    """Memory a batch needs: its inputs and the model's activations, per spot times the batch."""
    return int(batch_size) * (int(input_bytes) + int(activation_bytes))


def fit_batch_size(
    batch_size: int,
    n_spots: int,
    *,
    input_bytes: int,
    activation_bytes: int,
    limit_bytes: float,
    limit_option: str | None = None,
    options: OptionNames = NEUTRAL_OPTIONS,
) -> int:
    """The batch size to run: ``batch_size`` capped at ``n_spots``; BoundsError (one line naming the
    options) when that batch needs more than ``limit_bytes`` (inputs + activations per spot).

    input_bytes / activation_bytes: per spot (:func:`input_bytes_per_spot`,
    :func:`model_activation_bytes_per_spot`). limit_bytes: the memory bound the run must keep to
    (``--max-memory-mb``, or the memory available, whichever is smaller). limit_option: the
    option that sets that bound (default ``options.max_memory_mb``)."""
    if batch_size < 1:
        raise BoundsError(f"{options.batch_size} must be at least 1, got {batch_size}")
    batch = max(1, min(int(batch_size), int(n_spots)))
    needed = batch_bytes(batch, input_bytes, activation_bytes)
    if needed <= limit_bytes:
        return batch
    per_spot = input_bytes + activation_bytes
    fits = max(0, int(limit_bytes // per_spot))
    advice = f"use {options.batch_size} {fits} or less" if fits else "no batch fits: raise the bound"
    raise BoundsError(
        f"{options.batch_size} {batch_size} needs about {_size(needed)} ({_size(input_bytes)} of input and "
        f"{_size(activation_bytes)} of model activations per spot), over the memory bound of "
        f"{_size(limit_bytes)} ({limit_option or options.max_memory_mb}); {advice}"
    )


def available_memory_bytes(device: str | torch.device = "cpu") -> int:
    """What a batch may use: free device memory on a GPU, else the host's available memory
    (``MemAvailable``: free and reclaimable), else its physical memory."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _size(n_bytes: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB", "PB")
    exponent = min(len(units) - 1, max(0, int(math.log(max(n_bytes, 1), 1024))))
    return f"{n_bytes / 1024**exponent:.3g} {units[exponent]}"
