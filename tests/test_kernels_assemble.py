"""The fused assemble kernel (kernels/assemble.py: crop gather + Pillow's resize + normalisation
into NCHW) and its PyTorch reference, against the host path's C++ kernels (_core.crop_patches,
resize_patches, assemble_batch): equal bit for bit, for shrinks, enlargements, the identity and
patches reaching outside the region.

CPU (everywhere, CI): the reference in PyTorch, the Triton kernel in Triton's interpreter (small
shapes: it is slow). GPU (marked gpu): the compiled kernel on CUDA tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from m2ort_fast import _core
from m2ort_fast.kernels.assemble import (
    assemble,
    normalization_table,
    reference_assemble,
    reference_crop,
    reference_resize,
)
from m2ort_fast.kernels.testing import triton_interpreter

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (read_px, size_px): the model's 2x and 4x shrinks, odd factors, an enlargement, the identity
CASES = [(32, 16), (32, 8), (30, 11), (20, 27), (24, 24)]


def _region(height=90, width=70, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# Inside, across every edge and corner, and wholly outside the region.
ORIGINS = np.array([[0, 0], [5, 9], [-7, 3], [60, -10], [50, 80], [-100, -100], [69, 89]], dtype=np.int64)


def _host(region: np.ndarray, origins: np.ndarray, read_px: int, size_px: int) -> np.ndarray:
    patches = _core.resize_patches(_core.crop_patches(region, origins, read_px), size_px)
    return _core.assemble_batch(patches, MEAN, STD)


def test_normalization_table_equals_the_host_kernel():
    values = np.arange(256, dtype=np.uint8)
    patch = np.stack([values, values, values], axis=-1).reshape(1, 16, 16, 3)
    host = _core.assemble_batch(patch, MEAN, STD)  # (1, 3, 16, 16)
    table = normalization_table(MEAN, STD).numpy()
    for c in range(3):
        assert np.array_equal(host[0, c].reshape(-1), table[c])


@pytest.mark.parametrize("read_px,size_px", CASES)
def test_reference_equals_the_host_kernels(read_px, size_px):
    region = _region()
    ours = reference_assemble(
        torch.from_numpy(region), torch.from_numpy(ORIGINS), read_px, size_px, normalization_table(MEAN, STD)
    )
    assert np.array_equal(ours.numpy(), _host(region, ORIGINS, read_px, size_px))


def test_reference_crop_and_resize_equal_the_host_kernels_and_pillow():
    region = _region(seed=3)
    crop = reference_crop(torch.from_numpy(region), torch.from_numpy(ORIGINS), 32).numpy()
    assert np.array_equal(crop, _core.crop_patches(region, ORIGINS, 32))
    for size_px in (16, 8, 13, 40):
        ours = reference_resize(torch.from_numpy(crop), size_px).numpy()
        pillow = np.stack(
            [np.asarray(Image.fromarray(p).resize((size_px, size_px), Image.BILINEAR, reducing_gap=None)) for p in crop]
        )
        assert np.array_equal(ours, pillow), size_px


def test_resize_taps_are_pillows_weights():
    first, weights = _core.resize_taps(8, 4)  # a 2x shrink: taps 1/8, 3/8, 3/8, 1/8 of 2^22
    assert weights.shape == (4, 5)
    assert list(weights[1][:4]) == [1 << 19, 3 << 19, 3 << 19, 1 << 19] and list(first[1:3]) == [1, 3]
    first, weights = _core.resize_taps(5, 5)
    assert list(first) == [0, 1, 2, 3, 4] and (weights == 1 << _core.RESIZE_PRECISION_BITS).all()
    with pytest.raises(ValueError, match="sizes must be"):
        _core.resize_taps(0, 4)


@pytest.mark.parametrize("read_px,size_px", CASES)
def test_triton_kernel_in_the_interpreter_equals_the_host_kernels(read_px, size_px):
    region = _region(seed=read_px)
    out = torch.full((len(ORIGINS), 3, size_px, size_px), float("nan"))
    with triton_interpreter():
        assemble(
            torch.from_numpy(region), torch.from_numpy(ORIGINS), read_px, size_px, normalization_table(MEAN, STD), out
        )
    assert np.array_equal(out.numpy(), _host(region, ORIGINS, read_px, size_px))


def test_kernel_reads_a_strided_region_view():
    """The windows hand over row ranges of a larger buffer: rows strided by the buffer's width."""
    buffer = _region(120, 70, seed=5)
    region = buffer[13:100]
    with triton_interpreter():
        out = assemble(
            torch.from_numpy(buffer)[13:100], torch.from_numpy(ORIGINS), 24, 12, normalization_table(MEAN, STD)
        )
    assert np.array_equal(out.numpy(), _host(np.ascontiguousarray(region), ORIGINS, 24, 12))


def test_arguments_are_checked_up_front():
    region, origins, table = torch.from_numpy(_region()), torch.from_numpy(ORIGINS), normalization_table(MEAN, STD)
    with pytest.raises(ValueError, match="uint8"):
        assemble(region.float(), origins, 8, 8, table)
    with pytest.raises(ValueError, match="packed RGB"):
        assemble(region.permute(1, 0, 2), origins, 8, 8, table)
    with pytest.raises(ValueError, match="int64"):
        assemble(region, origins.int(), 8, 8, table)
    with pytest.raises(ValueError, match="positive"):
        assemble(region, origins, 0, 8, table)
    with pytest.raises(ValueError, match="table"):
        assemble(region, origins, 8, 8, table[:2])
    with pytest.raises(ValueError, match="out must be"):
        assemble(region, origins, 8, 8, table, out=torch.empty(len(ORIGINS), 3, 8, 9))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("read_px,size_px", [(224, 224), (224, 112), (224, 56), (308, 224), (180, 224)])
def test_compiled_kernel_on_the_gpu_equals_the_host_kernels(read_px, size_px):
    region = _region(1200, 900, seed=7)
    origins = np.random.default_rng(1).integers(-200, 1000, (300, 2)).astype(np.int64)
    cuda = torch.device("cuda")
    out = assemble(
        torch.from_numpy(region).to(cuda),
        torch.from_numpy(origins).to(cuda),
        read_px,
        size_px,
        normalization_table(MEAN, STD, cuda),
    )
    assert np.array_equal(out.cpu().numpy(), _host(region, origins, read_px, size_px))
