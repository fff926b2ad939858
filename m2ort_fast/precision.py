"""The precisions a model runs in: the one table (names, dtypes, which backend runs which, and
which precisions held the quality bound).

    PRECISION_NAMES             ("fp32", "fp16", "bf16", "int8"): what a backend accepts
    PRECISION_CHOICES           PRECISION_NAMES + ("auto",): what --precision accepts (auto: --backend auto picks)
    check_precision("bf16")     -> "bf16"; anything else raises M2ORTError ("auto": only --backend auto)
    torch_dtype("bf16")         -> torch.bfloat16; int8 -> torch.float32 (the dtype of what is not quantized)
    is_quantized("int8")        -> True: the Linear layers run in int8 (weights per channel, activations
                                   per batch, quantized at run time), everything else in float32
    depends_on_batch("int8")    -> True: a spot's prediction depends on its batch-mates (see below)
    auto_precisions("cpu")      -> ("fp32", "bf16"): what --precision auto may pick there
    check_backend_precision("torch", "int8", "cpu")  -> M2ORTError naming what runs int8
    PRECISIONS                  {"fp32": torch.float32, ..., "int8": torch.float32}

**Quality bound.** A precision other than fp32 ships for ``--precision auto`` only where it held
:data:`QUALITY_BOUND` on the real her2st sections: predictions of the shipped model on all four
sections against fp32's, every evaluate metric (PCC per spot, PCC per gene, RMSE) moving by at most
0.005 (``python bench/precision.py``; table in the README). :data:`HELD_BOUND` lists, per device type,
the precisions that were measured to hold it there; fp32 is the reference and always holds it.

**Reproducible.** ``--precision auto`` picks only precisions that give a spot the same prediction
whatever its batch-mates (up to the rounding of that precision, measured by ``bench/precision.py``'s
batch-mates column). int8 does not: its activation scales are computed per batch at run time, so a
spot's int8 prediction moves with the other spots of its batch (up to 0.24 log1p-CPM for the paper's
model on the demo, 0.08 for the default encoder model on the real sections).
int8 stays available as an explicit ``--precision int8``, which warns that it depends on the batch.

torch is imported on first use of ``torch_dtype`` / ``PRECISIONS``, not by importing this module, so
that the CLI's parser (which lists the names) stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from m2ort_fast.errors import M2ORTError

if TYPE_CHECKING:
    import torch

# precision -> name of the torch dtype its float part computes in (int8: the Linear layers are
# quantized; norms, softmax, GELU and the residual stream stay float32)
_TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float32"}

PRECISION_NAMES: tuple[str, ...] = tuple(_TORCH_DTYPE_NAMES)
AUTO = "auto"
PRECISION_CHOICES: tuple[str, ...] = (*PRECISION_NAMES, AUTO)
QUANTIZED: frozenset[str] = frozenset({"int8"})

# How far a precision may move every evaluate metric (PCC per spot, PCC per gene, RMSE; log1p-CPM
# units for RMSE) from fp32's on the real sections before it is not offered by --precision auto.
QUALITY_BOUND = 0.005

# Precisions measured to hold QUALITY_BOUND, per device type (bench/precision.py on the four her2st
# sections, the shipped model, torch/aoti bf16 and onnxruntime int8; worst move of any of the three
# metrics on any section 0.0006; README "Precision"). Only these, less BATCH_DEPENDENT, are
# candidates of --precision auto.
# Nothing below fp32 has been measured on a GPU yet, so auto keeps fp32 there.
HELD_BOUND: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "bf16", "int8"),
    "cuda": ("fp32",),
}

# What --backend auto checks on the machine it runs on, beside HELD_BOUND: a candidate whose
# predictions on the trial batch differ from the fp32 eager model's by more than this (log1p-CPM)
# is not picked. A guard against a broken kernel or an overflow on that machine, not the bound
# itself (the trial batch is random pixels, not tissue): on the real sections at batch 64 bf16 and
# int8 moved single predictions by at most 0.074 and 0.144 for the paper's model (int8 0.24 on the
# demo at batch 16: its activation scales are per batch, so a spot's int8 prediction depends on its
# batch-mates), 0.32 and 0.061 for the default encoder model (bf16 0.07 on the random trial batch).
GUARD_MAX_ABS = 0.5

# Precisions whose predictions for a spot depend on the other spots of its batch (int8: activation
# scales computed per batch at run time). Never picked by --precision auto; explicit use warns.
BATCH_DEPENDENT: frozenset[str] = frozenset({"int8"})
BATCH_DEPENDENT_WARNING = (
    "int8 quantizes activations with scales computed per batch: a spot's prediction depends on the other "
    "spots of its batch (up to ~0.1-0.25 log1p-CPM for the shipped models), so results change with --batch-size "
    "and spot order"
)

# backend -> device type -> precisions it runs there. A backend not listed (registered by a user)
# is not checked here. Refusals are one-line M2ORTErrors naming a backend that does run it.
BACKEND_PRECISIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "torch": {"cpu": ("fp32", "fp16", "bf16"), "cuda": ("fp32", "fp16", "bf16")},
    "aoti": {"cpu": ("fp32", "fp16", "bf16"), "cuda": ("fp32", "fp16", "bf16")},
    # onnxruntime's CPU provider has no bf16 kernels; int8 is its dynamic quantization (CPU only)
    "onnxruntime": {"cpu": ("fp32", "fp16", "int8"), "cuda": ("fp32", "fp16", "bf16")},
    # the CPU is Triton's interpreter (tests only): its bf16 matrix products are wrong
    "triton": {"cpu": ("fp32", "fp16"), "cuda": ("fp32", "fp16", "bf16")},
    "tensorrt": {"cuda": ("fp32", "fp16", "bf16")},
}


def check_precision(precision: str, what: str = "") -> str:
    """``precision`` when it is one of :data:`PRECISION_NAMES`, else M2ORTError (``what``: who asks,
    e.g. "the triton backend", named in the message)."""
    if precision not in _TORCH_DTYPE_NAMES:
        where = f" for {what}" if what else ""
        if precision == AUTO:
            raise M2ORTError(
                f"precision auto{where} is picked by --backend auto only; use --backend auto, or one of "
                f"{', '.join(PRECISION_NAMES)}"
            )
        raise M2ORTError(f"unknown precision {precision!r}{where}; use one of {', '.join(PRECISION_NAMES)}")
    return precision


def is_quantized(precision: str) -> bool:
    """Whether ``precision`` (checked) quantizes the Linear layers rather than casting the model."""
    return check_precision(precision) in QUANTIZED


def backends_for(precision: str, device_type: str) -> list[str]:
    """The registered-by-us backends that run ``precision`` on ``device_type`` ("cpu", "cuda")."""
    return [name for name, table in BACKEND_PRECISIONS.items() if precision in table.get(device_type, ())]


def check_backend_precision(backend: str, precision: str, device_type: str) -> str:
    """``precision`` when ``backend`` runs it on ``device_type``, else a one-line M2ORTError naming
    the backends that do. Backends not in :data:`BACKEND_PRECISIONS` are not checked."""
    check_precision(precision, f"the {backend} backend")
    table = BACKEND_PRECISIONS.get(backend)
    if table is None or precision in table.get(device_type, ()):
        return precision
    others = backends_for(precision, device_type)
    instead = f"; on the {device_type} use --backend {' or '.join(others)}" if others else ""
    runs = ", ".join(table.get(device_type, ())) or "nothing"
    raise M2ORTError(
        f"the {backend} backend cannot run precision {precision} on the {device_type} (it runs {runs}){instead}"
    )


def depends_on_batch(precision: str) -> bool:
    """Whether a spot's prediction in ``precision`` (checked) depends on its batch-mates."""
    return check_precision(precision) in BATCH_DEPENDENT


def auto_precisions(device_type: str) -> tuple[str, ...]:
    """The precisions --precision auto tries on ``device_type``: those that held the bound there
    and do not depend on the batch."""
    return tuple(p for p in HELD_BOUND.get(device_type, ("fp32",)) if p not in BATCH_DEPENDENT)


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype ``precision`` (checked) computes its float part in (int8: float32)."""
    import torch

    return getattr(torch, _TORCH_DTYPE_NAMES[check_precision(precision)])


def __getattr__(name: str) -> dict[str, torch.dtype]:
    if name == "PRECISIONS":  # built on first use: it needs torch
        return {precision: torch_dtype(precision) for precision in PRECISION_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
