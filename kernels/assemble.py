"""Fused spot-patch assembly for the device data path, one model input at a time:

    out (N, 3, S, S) float32 = table[c][ resize_{R->S}( crop_R(region, origins[i]) ) ]

in ONE kernel per model input: the crop is a gather from the decoded window ``region`` (H, W, 3)
uint8 (white outside it); the resize is Pillow's antialiased bilinear in Pillow's own fixed-point
arithmetic, so that it equals ``_core.resize_patches`` (the host path's) bit for bit: the taps
come from ``_core.resize_taps``, the horizontal pass is rounded to uint8, then the vertical pass;
R == S is the identity (one tap of weight 2**22). Normalisation is a lookup in the (3, 256) table
``_core.assemble_batch`` computes ((v / 255 - mean) / std in double, rounded to float32), and the
result is written straight into the model's NCHW batch. Nothing between the decoded window and the
batch reaches global memory: eager PyTorch would write the crop, both resize passes (in int32)
and the channel-last float copy.

``reference_assemble`` is the same in plain PyTorch (a batched gather, two int32 passes, a table
lookup); ``normalization_table`` is the table.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from m2ort_fast import _core
from m2ort_fast.kernels.runtime import TritonKernel, gpu_configs, tl

PRECISION_BITS = int(_core.RESIZE_PRECISION_BITS)
WHITE = 255


def _assemble_kernel(
    region_ptr,
    region_height,
    region_width,
    row_stride,
    origins_ptr,
    first_x_ptr,
    weights_x_ptr,
    first_y_ptr,
    weights_y_ptr,
    table_ptr,
    out_ptr,
    S,
    KX: tl.constexpr,
    KY: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (pixel block, spot): BLOCK output pixels of one spot, all three channels."""
    spot = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = pixels < S * S
    y = pixels // S
    x = pixels % S
    origin_x = tl.load(origins_ptr + 2 * spot)
    origin_y = tl.load(origins_ptr + 2 * spot + 1)
    first_x = tl.load(first_x_ptr + x, mask=ok, other=0)
    first_y = tl.load(first_y_ptr + y, mask=ok, other=0)
    half = 1 << (BITS - 1)
    red = tl.full((BLOCK,), half, tl.int32)
    green = tl.full((BLOCK,), half, tl.int32)
    blue = tl.full((BLOCK,), half, tl.int32)
    for ky in range(KY):  # not unrolled: unrolling both tap loops spills registers (compile_report)
        weight_y = tl.load(weights_y_ptr + y * KY + ky, mask=ok, other=0)
        row = origin_y + first_y + ky
        row_in = ok & (row >= 0) & (row < region_height)
        h_red = tl.full((BLOCK,), half, tl.int32)
        h_green = tl.full((BLOCK,), half, tl.int32)
        h_blue = tl.full((BLOCK,), half, tl.int32)
        for kx in tl.static_range(KX):
            weight_x = tl.load(weights_x_ptr + x * KX + kx, mask=ok, other=0)
            column = origin_x + first_x + kx
            inside = row_in & (column >= 0) & (column < region_width)
            pixel = region_ptr + row * row_stride + column * 3
            h_red += tl.load(pixel, mask=inside, other=255).to(tl.int32) * weight_x
            h_green += tl.load(pixel + 1, mask=inside, other=255).to(tl.int32) * weight_x
            h_blue += tl.load(pixel + 2, mask=inside, other=255).to(tl.int32) * weight_x
        # The horizontal pass rounds to uint8 before the vertical one, as Pillow does.
        red += tl.minimum(tl.maximum(h_red >> BITS, 0), 255) * weight_y
        green += tl.minimum(tl.maximum(h_green >> BITS, 0), 255) * weight_y
        blue += tl.minimum(tl.maximum(h_blue >> BITS, 0), 255) * weight_y
    red = tl.minimum(tl.maximum(red >> BITS, 0), 255)
    green = tl.minimum(tl.maximum(green >> BITS, 0), 255)
    blue = tl.minimum(tl.maximum(blue >> BITS, 0), 255)
    plane = S * S
    out = out_ptr + spot * 3 * plane + pixels
    tl.store(out, tl.load(table_ptr + red, mask=ok, other=0.0), mask=ok)
    tl.store(out + plane, tl.load(table_ptr + 256 + green, mask=ok, other=0.0), mask=ok)
    tl.store(out + 2 * plane, tl.load(table_ptr + 512 + blue, mask=ok, other=0.0), mask=ok)


def _assemble_configs():
    # 1024 pixels on 4 warps spills with the 9 taps of a 4x shrink (compile_report, sm_80 and sm_90)
    return gpu_configs(
        [{"BLOCK": b} for b in (256, 512, 1024)],
        num_warps=[4, 8],
        num_stages=[1],
        keep=lambda meta, warps, stages: not (meta["BLOCK"] == 1024 and warps == 4),
    )


ASSEMBLE = TritonKernel(
    _assemble_kernel,
    configs=_assemble_configs,
    key=["S", "KX", "KY"],
    interpreter_meta=lambda kw: {"BLOCK": 4096},
)


def normalization_table(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(3, 256) float32: table[c, v] = (v / 255 - mean[c]) / std[c], computed in double and rounded
    once, as ``_core.assemble_batch`` computes it (so a lookup equals the host path exactly)."""
    values = np.arange(256, dtype=np.float64) / 255.0
    table = np.stack([(values - float(m)) / float(s) for m, s in zip(mean, std, strict=True)])
    return torch.from_numpy(table.astype(np.float32)).to(device)


def resize_taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first (out_size,) int32, weights (out_size, K) int32) of one axis, on ``device`` (copied
    there once per size pair and device: a copy per launch would wait for the stream)."""
    return _taps(int(in_size), int(out_size), torch.device(device))


@functools.lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    first, weights = _core.resize_taps(in_size, out_size)
    return torch.from_numpy(first).to(device), torch.from_numpy(weights).to(device)


def _check_arguments(region: torch.Tensor, origins: torch.Tensor, read_px: int, size_px: int, table: torch.Tensor):
    if region.dtype != torch.uint8 or region.dim() != 3 or region.shape[2] != 3:
        raise ValueError(f"region must be (H, W, 3) uint8, got {tuple(region.shape)} {region.dtype}")
    if region.stride(2) != 1 or region.stride(1) != 3:
        raise ValueError(f"region must have packed RGB pixels (strides (row, 3, 1)), got strides {region.stride()}")
    if origins.dtype != torch.int64 or origins.dim() != 2 or origins.shape[1] != 2 or not origins.is_contiguous():
        raise ValueError(f"origins must be contiguous (N, 2) int64, got {tuple(origins.shape)} {origins.dtype}")
    if read_px < 1 or size_px < 1:
        raise ValueError(f"patch sizes must be positive, got read {read_px} px -> {size_px} px")
    if table.shape != (3, 256) or table.dtype != torch.float32:
        raise ValueError(f"table must be (3, 256) float32, got {tuple(table.shape)} {table.dtype}")
    devices = {region.device, origins.device, table.device}
    if len(devices) != 1:
        raise ValueError(f"region, origins and table must be on one device, got {sorted(map(str, devices))}")


def assemble(
    region: torch.Tensor,
    origins: torch.Tensor,
    read_px: int,
    size_px: int,
    table: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """region (H, W, 3) uint8 with packed pixels, origins (N, 2) int64 top-left (x, y) in region px
    -> out (N, 3, size_px, size_px) float32 (written in place when given: e.g. rows of a batch):
    squares of read_px cropped (white outside the region), resized to size_px, normalised by
    ``table`` (3, 256). One Triton launch (CUDA, or the CPU interpreter with TRITON_INTERPRET=1)."""
    _check_arguments(region, origins, read_px, size_px, table)
    n = origins.shape[0]
    shape = (n, 3, size_px, size_px)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=region.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {shape} float32, got {tuple(out.shape)} {out.dtype}")
    if n == 0:
        return out
    first, weights = resize_taps(read_px, size_px, region.device)
    ASSEMBLE.launch(
        lambda meta: (-(-size_px * size_px // meta["BLOCK"]), n),
        region,
        region.shape[0],
        region.shape[1],
        region.stride(0),
        origins,
        first,
        weights,
        first,
        weights,
        table.contiguous(),
        out,
        size_px,
        KX=weights.shape[1],
        KY=weights.shape[1],
        BITS=PRECISION_BITS,
    )
    return out


# --------------------------------------------------------------------------- references


def reference_crop(region: torch.Tensor, origins: torch.Tensor, size_px: int) -> torch.Tensor:
    """(N, size_px, size_px, 3) uint8: squares of ``region`` at ``origins`` (x, y), white outside
    (``_core.crop_patches``), as one batched gather."""
    height, width = region.shape[:2]
    steps = torch.arange(size_px, device=region.device)
    rows = origins[:, 1, None] + steps  # (N, size)
    columns = origins[:, 0, None] + steps
    rows_in = (rows >= 0) & (rows < height)
    columns_in = (columns >= 0) & (columns < width)
    pixels = region[rows.clamp(0, height - 1)[:, :, None], columns.clamp(0, width - 1)[:, None, :]]
    return pixels.masked_fill(~(rows_in[:, :, None] & columns_in[:, None, :])[..., None], WHITE)


def _reference_pass(values: torch.Tensor, dim: int, first: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One axis of Pillow's resize on int32 values (any shape), along ``dim``."""
    first = first.long()
    shape = [1] * values.dim()
    shape[dim] = -1
    total = torch.full((), 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=values.device)
    for k in range(weights.shape[1]):
        total = total + values.index_select(dim, first + k) * weights[:, k].view(shape)
    return (total >> PRECISION_BITS).clamp(0, 255)


def reference_resize(patches: torch.Tensor, size_px: int) -> torch.Tensor:
    """(N, R, R, 3) uint8 -> (N, size_px, size_px, 3) uint8, bit for bit ``_core.resize_patches``."""
    side = patches.shape[1]
    if side == size_px:
        return patches.clone()
    first, weights = resize_taps(side, size_px, patches.device)
    values = _reference_pass(patches.to(torch.int32), 2, first, weights)  # horizontal, rounded to uint8 values
    return _reference_pass(values, 1, first, weights).to(torch.uint8)


def reference_assemble(
    region: torch.Tensor, origins: torch.Tensor, read_px: int, size_px: int, table: torch.Tensor
) -> torch.Tensor:
    """What :func:`assemble` computes, in plain PyTorch: (N, 3, size_px, size_px) float32."""
    _check_arguments(region, origins, read_px, size_px, table)
    patches = reference_resize(reference_crop(region, origins, read_px), size_px)
    channels = torch.arange(3, device=region.device)[None, :, None, None]
    return table[channels, patches.permute(0, 3, 1, 2).long()]
