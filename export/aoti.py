"""AOTInductor packages of the whole M2ORT model (``torch.export`` -> ``aoti_compile_and_package``).

A package (``.pt2``) holds compiled code for one device type (C++ for the CPU, Triton/CUDA for a
GPU) plus the weights, and runs without the Python model code:

    runner = load_aoti(path, device)
    runner(level1 (B, 3, 224, 224), level2 (B, 3, 112, 112), level3 (B, 3, 56, 56)) -> (B, n_genes) float32

The batch dimension is dynamic between the batch profile's min and max (AOTInductor's runtime
refuses other sizes; the ``aoti`` backend splits larger batches). The checkpoint's card is stored
in the package metadata (key ``m2ort_fast``, read back with :func:`read_aoti_card`).

Our Triton kernels (the ``triton`` backend) on CUDA: ``m2ort_fast.kernels.export_ops()`` gives the
ITMM and ICMM blocks as custom ops registered with ``torch.library.triton_op`` (kernels/ops.py);
every encoder block but the last (class-token-only, see :mod:`.graph`) is exported as calls to
them, and Inductor compiles their Triton kernels into the package next to its own code for the
patch embedding and head. On the CPU, Inductor compiles the reference blocks itself. NOT VERIFIED
on a GPU yet (none was lent while this was written): the CPU tests show the ops export with a
dynamic batch and trace to their Triton launches; the CUDA package test is marked gpu.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from m2ort_fast.checkpoint import METADATA_KEY, ModelCard
from m2ort_fast.errors import M2ORTError
from m2ort_fast.export.aoti_runner import gil_free_runner
from m2ort_fast.export.cache import DEFAULT_BATCH_PROFILE
from m2ort_fast.export.graph import GRAPH_VERSION, export_model, sample_inputs
from m2ort_fast.model import M2ORT

log = logging.getLogger(__name__)


def kernel_ops(device: torch.device) -> dict[str, Callable] | None:
    """The Triton block ops of m2ort_fast.kernels that torch.export can trace, or None (CPU, no
    kernels package, or a kernels package without ``export_ops``)."""
    if torch.device(device).type != "cuda":
        return None
    try:
        from m2ort_fast import kernels
    except ImportError:
        return None
    export_ops = getattr(kernels, "export_ops", None)
    if export_ops is None:
        return None
    ops = export_ops()
    if not ops or not {"itmm", "icmm"} <= set(ops):
        return None
    return ops


def toolkit_version(device: torch.device, use_kernels: bool) -> str:
    parts = [f"torch {torch.__version__}", f"graph v{GRAPH_VERSION}"]
    if torch.device(device).type == "cuda":
        import triton

        parts.append(f"triton {triton.__version__}")
        if use_kernels and kernel_ops(device) is not None:
            parts.append("m2ort_fast.kernels export_ops")
    return ", ".join(parts)


def inductor_configs(device: torch.device, card: ModelCard, precision: str) -> dict:
    """Inductor settings for the package. Freezing folds the weights in as constants so Inductor
    can pre-pack them for its GEMMs (oneDNN on the CPU); max-autotune is the usual choice for a
    GPU package whose compile time is paid once (cache)."""
    configs = {
        "freezing": True,
        "aot_inductor.metadata": {METADATA_KEY: card.to_json(), "precision": precision},
    }
    if torch.device(device).type == "cuda":
        configs["max_autotune"] = True
    return configs


def exported_program(
    model: M2ORT,
    *,
    device: torch.device,
    precision: str,
    batch_profile: tuple[int, int, int] = DEFAULT_BATCH_PROFILE,
    use_kernels: bool = True,
) -> torch.export.ExportedProgram:
    """torch.export of the model (float32 in and out, ``precision`` inside) with a dynamic batch."""
    # on the CPU Inductor's own GEMMs and softmax beat the flash-attention kernel it would call (export.graph)
    graph = export_model(
        model,
        precision,
        device,
        block_ops=kernel_ops(device) if use_kernels else None,
        fused_attention=torch.device(device).type != "cpu",
    )
    low, _, high = batch_profile
    example = sample_inputs(batch=min(max(2, low), high), device=device)
    dynamic = None
    if high > 1:
        batch = torch.export.Dim("batch", min=low, max=high)
        dynamic = ({0: batch}, {0: batch}, {0: batch})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return torch.export.export(graph, example, dynamic_shapes=dynamic)


def compile_aoti(
    model: M2ORT,
    card: ModelCard,
    path: str | os.PathLike,
    *,
    device: torch.device,
    precision: str = "fp32",
    batch_profile: tuple[int, int, int] = DEFAULT_BATCH_PROFILE,
    use_kernels: bool = True,
) -> dict:
    """Compile an AOTInductor package for ``device`` at ``path``. Returns build info (seconds,
    toolkit, whether our Triton kernels are in it)."""
    device = torch.device(device)
    path = Path(path)
    start = time.perf_counter()
    program = exported_program(
        model, device=device, precision=precision, batch_profile=batch_profile, use_kernels=use_kernels
    )
    export_s = time.perf_counter() - start
    tmp = path.with_name(f".{path.name}.partial.pt2")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(tmp), inductor_configs=inductor_configs(device, card, precision)
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    compile_s = round(time.perf_counter() - start - export_s, 2)
    info = {
        "format": "aoti",
        "device": str(device),
        "precision": precision,
        "batch_profile": list(batch_profile),
        "toolkit": toolkit_version(device, use_kernels),
        "triton_kernels": bool(use_kernels and kernel_ops(device) is not None),
        "export_s": round(export_s, 2),
        "compile_s": compile_s,
    }
    log.info("AOTInductor package for %s built in %.1f s: %s", device, export_s + compile_s, path)
    return info


def load_aoti(path: str | os.PathLike, device: torch.device, *, release_gil: bool = True):
    """Load a package; ``runner(l1, l2, l3)`` takes and returns tensors on ``device``. On the CPU
    with ``release_gil``, the runner releases the GIL while it runs (:mod:`.aoti_runner`)."""
    device = torch.device(device)
    try:
        if release_gil and device.type == "cpu" and (runner := gil_free_runner(path)) is not None:
            return runner
        device_index = device.index if device.index is not None else -1
        return torch._inductor.aoti_load_package(str(path), device_index=device_index)
    except (RuntimeError, OSError, ValueError) as exc:
        raise M2ORTError(f"cannot load AOTInductor package ({str(exc).splitlines()[0]})", path) from None


def read_aoti_card(runner) -> ModelCard:
    return ModelCard.from_json(runner.get_metadata()[METADATA_KEY])
