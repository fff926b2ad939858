"""Type stubs of m2ort_fast._core, the pybind11 extension built from csrc/ (bindings: csrc/module.cpp).

Every bad argument raises ValueError naming the function, the argument and the problem. The
kernels run with the GIL released. ``num_threads``: 0 = one thread per CPU in this process's
affinity mask (:func:`available_cpus`), fewer for small batches; n > 0: n threads (at most one per
unit of work); negative: ValueError.
"""

from collections.abc import Sequence
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt

class ReadPlan(TypedDict):
    """What :func:`plan_reads` returns (a plain dict at run time). N spots, S stripes, T steps."""

    order: npt.NDArray[np.int64]  # (N,) spot indices in read order
    stripe_columns: npt.NDArray[np.int64]  # (S, n_sources, 2)
    stripe_rows: npt.NDArray[np.int64]  # (S, n_sources)
    step_stripe: npt.NDArray[np.int64]  # (T,)
    step_offsets: npt.NDArray[np.int64]  # (T + 1,) into order
    step_rows: npt.NDArray[np.int64]  # (T, n_sources, 3): keep_from, read_y0, read_y1
    tiles_decoded: int
    tiles_needed: int
    naive_tile_reads: int
    peak_bytes: int

def assemble_batch(
    patches: npt.NDArray[np.uint8],
    mean: Sequence[float] | npt.NDArray[np.floating[Any]],
    std: Sequence[float] | npt.NDArray[np.floating[Any]],
    out: npt.NDArray[np.float32] | None = None,
    num_threads: int = 0,
    kernel: str = "auto",
    patch_px: int = 0,
) -> npt.NDArray[np.float32]:
    """Normalise a batch of RGB patches into one float32 array: (patches / 255 - mean) / std.

    patches: (N, H, W, 3) uint8, C-contiguous. mean, std: 3 floats each (R, G, B, on the 0-1 scale;
    std non-zero). patch_px: 0 writes planes, (N, 3, H, W); p > 0 (dividing H and W) writes
    tokens, (N, (H/p) * (W/p), p * p * 3), the grid's p x p squares in row-major order, each
    flattened (p1 p2 c): :func:`m2ort_fast.model.patchify`'s layout. out: optional C-contiguous
    float32 array of that shape written in place (must not share memory with patches). kernel:
    "auto" (what :func:`assemble_kernels` says it picks for patch_px) or one it lists; all give the same
    bits. Returns out.
    """

def assemble_kernels(patch_px: int = 0) -> list[str]:
    """The kernels assemble_batch and assemble_batch_bf16 can run on this CPU for a layout, auto's
    pick first: for tokens of 4, 8 or 16 px, "avx512_bf16" where the CPU has AVX-512 BF16 and
    VBMI (bf16 tokens computed where :func:`assemble_bf16_affine` says so, else the lookups);
    "avx512_vbmi" where the CPU has AVX-512 VBMI, for planes (patch_px 0) and those tokens; then
    "scalar". For float32 tokens "auto" runs "scalar", faster there than the lookups."""

def assemble_bf16_affine(
    mean: Sequence[float] | npt.NDArray[np.floating[Any]], std: Sequence[float] | npt.NDArray[np.floating[Any]]
) -> bool:
    """Whether the "avx512_bf16" kernel computes assemble_batch_bf16's tokens for this mean and
    std: channel c's value of byte v as bfloat16(fma(v, 1 / (255 std[c]), -mean[c] / std[c])) in
    float32, where that gives the lookup table's bits for all 256 bytes of every channel (checked
    on each call, by the kernel itself); elsewhere, and for float32 output, it runs the lookups.
    False also where the CPU lacks AVX-512 BF16 and VBMI."""

def assemble_batch_bf16(
    patches: npt.NDArray[np.uint8],
    mean: Sequence[float] | npt.NDArray[np.floating[Any]],
    std: Sequence[float] | npt.NDArray[np.floating[Any]],
    out: npt.NDArray[np.uint16] | None = None,
    num_threads: int = 0,
    kernel: str = "auto",
    patch_px: int = 0,
) -> npt.NDArray[np.uint16]:
    """``assemble_batch`` rounded to bfloat16 as torch casts float32 (round to nearest even): the
    bit patterns, uint16 in assemble_batch's shape for patch_px; ``torch.from_numpy(a).view(torch.bfloat16)``
    reads them."""

def layer_norm_bf16(
    x: npt.NDArray[np.uint16],
    weight: npt.NDArray[np.uint16],
    bias: npt.NDArray[np.uint16],
    eps: float,
    out: npt.NDArray[np.uint16] | None = None,
    num_threads: int = 0,
    kernel: str = "auto",
) -> npt.NDArray[np.uint16]:
    """LayerNorm over the last axis of bfloat16 values, as their bit patterns (uint16).

    x: (..., W), C-contiguous (a bf16 tensor's ``.view(torch.uint16).numpy()``). weight, bias:
    (W,). Per row, in float32: the mean and biased variance from the sums of d = x - x[0] and d^2
    (16 x 2 lanes, then a fixed tree), rstd = 1 / sqrt(var + eps), y = (x * rstd - mean * rstd) *
    weight + bias (two FMAs), rounded to nearest even: torch.nn.functional.layer_norm's function
    on bf16 rows in float32 (torch reaches the variance by Welford's update instead). out: optional
    uint16 array of x's shape (must not share memory with x). kernel: "auto" (the first of
    :func:`layer_norm_kernels`) or one it lists; all give the same bits. Returns out.
    """

def layer_norm_kernels() -> list[str]:
    """The kernels layer_norm_bf16 can run on this CPU, the one "auto" picks first: "avx512_bw" where
    the CPU has AVX-512 (F, BW, VL, DQ) and FMA, then "scalar". Every kernel gives the same bits."""

def crop_patches(
    region: npt.NDArray[np.uint8],
    origins_px: npt.NDArray[np.integer[Any]],
    size_px: int,
    out: npt.NDArray[np.uint8] | None = None,
    num_threads: int = 0,
) -> npt.NDArray[np.uint8]:
    """Crop square patches from a decoded RGB region.

    region: (H, W, 3) uint8, any strides (e.g. an RGBA array's [..., :3] view). origins_px: (N, 2)
    integer (any integer dtype; int64 is used) top-left (x, y) of each patch in region pixels;
    patches may lie partly or wholly outside the region, where they are white (255). size_px: patch
    side, > 0. out: optional (N, size_px, size_px, 3) uint8 C-contiguous array written in place.
    Returns out, (N, size_px, size_px, 3) uint8.
    """

def resize_patches(
    patches: npt.NDArray[np.uint8],
    size_px: int,
    out: npt.NDArray[np.uint8] | None = None,
    num_threads: int = 0,
    kernel: str = "auto",
) -> npt.NDArray[np.uint8]:
    """Resize square RGB patches to size_px x size_px, bit for bit as m2ort_fast.crop.resize_patches
    (Pillow's Image.resize(BILINEAR, reducing_gap=None)).

    patches: (N, S, S, 3) uint8, C-contiguous, S > 0. size_px > 0. out: optional
    (N, size_px, size_px, 3) uint8 C-contiguous array written in place. kernel: "auto" (the first
    of resize_kernels(S, size_px)) or one it lists; all give the same bytes. Returns out.
    """

def resize_kernels(in_size: int, out_size: int) -> list[str]:
    """The kernels resize_patches can run for in_size -> out_size on this CPU, auto's pick first:
    "avx512_vbmi" where the CPU has AVX-512 VBMI and the shrink is at most ~4x, then "scalar"."""

RESIZE_PRECISION_BITS: int

def resize_taps(in_size: int, out_size: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """One axis of resize_patches' arithmetic: (first (out_size,) int32, weights (out_size, K) int32);
    output i of a pass is clip((sum_k weights[i, k] * in[first[i] + k] + 2**21) >> 22, 0, 255).
    in_size == out_size gives the identity (K = 1, weight 2**22)."""

def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; the host's count where there is none): the
    number of threads the kernels use when num_threads is 0 and the batch is large enough."""

def plan_reads(
    centers_px: npt.NDArray[np.floating[Any]] | npt.NDArray[np.integer[Any]],
    sources: Sequence[tuple[int, int, int, int]],
    patch_sets: list[tuple[int, int, npt.NDArray[np.integer[Any]]]],
    max_bytes: int = 0,
    max_step_spots: int = 256,
    reads_in_flight: int = 1,
) -> ReadPlan:
    """Plan the streamed engine's reads: each needed tile decoded once, held while spots need it.

    centers_px: (N, 2) level-0 spot centres (x, y), any real dtype (converted to float64), for
    ordering. sources: one (width_px, height_px, tile_width_px, tile_height_px) per pyramid level
    read. patch_sets: one (source, read_px, top_left_px) per model input, top_left_px (N, 2) integer
    (converted to int64). max_bytes: budget for peak_bytes (0: none); max_step_spots: spots per
    step at most; reads_in_flight: decoded steps held besides the windows. Returns a dict, see
    :class:`ReadPlan` and csrc/read_plan.hpp.
    """
