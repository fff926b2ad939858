"""m2ort_fast._core (csrc/): batch assembly and cropping against the plain NumPy way, resizing
against the package's reference resize (Pillow)."""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch
from cpu_flags import cpu_flags

from m2ort_fast import _core
from m2ort_fast.crop import resize_patches

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def numpy_assemble(patches: np.ndarray, mean, std) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, the obvious NumPy way."""
    normalised = (patches / 255.0 - np.asarray(mean)) / np.asarray(std)
    return np.ascontiguousarray(normalised.astype(np.float32).transpose(0, 3, 1, 2))


def numpy_crop(region: np.ndarray, origins_xy: np.ndarray, size_px: int) -> np.ndarray:
    """Pad the region with white by `size_px` on every side, then slice."""
    padded = np.pad(region, ((size_px, size_px), (size_px, size_px), (0, 0)), constant_values=255)
    out = np.full((len(origins_xy), size_px, size_px, 3), 255, np.uint8)
    height, width = region.shape[:2]
    for i, (x, y) in enumerate(origins_xy):
        if -size_px < x < width and -size_px < y < height:  # else wholly outside: stays white
            out[i] = padded[y + size_px : y + 2 * size_px, x + size_px : x + 2 * size_px]
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(1, 224, 224), (5, 13, 13), (3, 7, 11), (2, 1, 1), (0, 8, 8)])
@pytest.mark.parametrize("num_threads", [0, 1, 4])
def test_assemble_batch_matches_numpy(rng, shape, num_threads):
    patches = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    got = _core.assemble_batch(patches, MEAN, STD, num_threads=num_threads)
    assert got.dtype == np.float32 and got.shape == (shape[0], 3, shape[1], shape[2])
    assert got.flags.c_contiguous
    np.testing.assert_allclose(got, numpy_assemble(patches, MEAN, STD), rtol=0, atol=1e-6)


def test_assemble_batch_writes_out_in_place(rng):
    patches = rng.integers(0, 256, (4, 17, 17, 3), dtype=np.uint8)
    mean, std = np.array([0.1, 0.5, 0.9]), [0.3, 1.0, 2.0]  # an array works as the sequence too
    out = np.full((4, 3, 17, 17), np.nan, np.float32)
    returned = _core.assemble_batch(patches, mean, std, out=out, num_threads=4)
    assert returned is out or np.shares_memory(returned, out)
    np.testing.assert_allclose(out, numpy_assemble(patches, mean, std), rtol=0, atol=1e-6)


def test_assemble_batch_covers_all_byte_values():
    # Every uint8 value in every channel: the per-channel lookup must be exact at both ends.
    values = np.arange(256, dtype=np.uint8)
    patches = np.stack([values, values[::-1], values], axis=-1).reshape(1, 16, 16, 3)
    got = _core.assemble_batch(patches, MEAN, STD)
    np.testing.assert_allclose(got, numpy_assemble(patches, MEAN, STD), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 224, 224), (2, 3, 63), (2, 2, 64), (2, 2, 65), (1, 7, 129), (2, 1, 1)])
def test_assemble_kernels_give_the_same_bits(rng, shape):
    """Every kernel this CPU runs against the scalar loop, both output types: widths around the
    AVX-512 kernel's 64-pixel chunks (ragged row ends: masked loads and stores)."""
    patches = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    patches[0, 0, : min(shape[2], 256)] = np.arange(min(shape[2], 256))[:, None]  # both table halves
    kernels = _core.assemble_kernels()
    assert kernels[-1] == "scalar" and ("avx512_vbmi" in kernels) == _cpu_has_avx512_vbmi()
    for assemble in (_core.assemble_batch, _core.assemble_batch_bf16):
        expected = assemble(patches, MEAN, STD, kernel="scalar").tobytes()
        for kernel in kernels:
            assert assemble(patches, MEAN, STD, kernel=kernel, num_threads=2).tobytes() == expected, kernel
    with pytest.raises(ValueError, match="kernel 'sse9' cannot assemble on this CPU"):
        _core.assemble_batch(patches, MEAN, STD, kernel="sse9")


@pytest.mark.parametrize(
    "shape, patch_px", [((3, 224, 224), 16), ((2, 112, 112), 8), ((2, 56, 56), 4), ((2, 14, 21), 7)]
)
def test_assemble_tokens_are_the_models_patchify_of_the_planes(rng, shape, patch_px):
    """patch_px > 0 writes model.patchify's layout of the planes' values, bit for bit, float32 and
    bf16, on one thread and several; a non-square patch and a patch size the model lacks too."""
    from m2ort_fast.model import patchify

    patches = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    patches[0, 0, : min(shape[2], 256)] = np.arange(min(shape[2], 256))[:, None]
    tokens_shape = (shape[0], (shape[1] // patch_px) * (shape[2] // patch_px), patch_px * patch_px * 3)
    kernels = _core.assemble_kernels(patch_px)
    vector = ["avx512_bf16"] * _cpu_has_avx512_bf16() + ["avx512_vbmi"] * _cpu_has_avx512_vbmi()
    assert kernels == (vector if patch_px in (4, 8, 16) else []) + ["scalar"]
    for assemble, dtype, bits in (
        (_core.assemble_batch, torch.float32, torch.int32),
        (_core.assemble_batch_bf16, torch.bfloat16, torch.int16),
    ):
        expected = patchify(torch.from_numpy(assemble(patches, MEAN, STD)).view(dtype), patch_px)
        for kernel, num_threads in itertools.product(kernels, (1, 3)):
            tokens = assemble(patches, MEAN, STD, patch_px=patch_px, num_threads=num_threads, kernel=kernel)
            assert tokens.shape == tokens_shape and tokens.flags.c_contiguous
            assert torch.equal(torch.from_numpy(tokens).view(bits), expected.view(bits)), (kernel, num_threads)


@pytest.mark.parametrize("patch_px", [0, 16])
def test_assemble_large_outputs_stream_the_same_bits(rng, patch_px):
    """A call writing more than 1 MB streams whole 64-byte-aligned lines to memory (the vector
    kernels): the same bits into torch's 64-byte-aligned buffers and into unaligned ones (the
    ordinary stores there), both output types, every kernel."""
    patches = rng.integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)
    shape = (6, 196, 768) if patch_px else (6, 3, 224, 224)
    for assemble, out_dtype, torch_dtype in (
        (_core.assemble_batch, np.float32, torch.float32),
        (_core.assemble_batch_bf16, np.uint16, torch.bfloat16),
    ):
        expected = assemble(patches, MEAN, STD, patch_px=patch_px, kernel="scalar")
        for kernel in _core.assemble_kernels(patch_px):
            aligned = torch.zeros(shape, dtype=torch_dtype)  # torch allocates 64-byte aligned
            aligned = (aligned if torch_dtype == torch.float32 else aligned.view(torch.int16)).numpy().view(out_dtype)
            spare = np.zeros(aligned.size + 1, out_dtype)
            unaligned = spare[1:] if spare.ctypes.data % 64 == 0 else spare[:-1]
            unaligned = unaligned.reshape(shape)
            assert aligned.ctypes.data % 64 == 0 and unaligned.ctypes.data % 64 != 0
            for out in (aligned, unaligned):
                assemble(patches, MEAN, STD, patch_px=patch_px, kernel=kernel, out=out)
                assert out.tobytes() == expected.tobytes(), (kernel, out.ctypes.data % 64)


# The shipped models' (0, 1), ImageNet's (the FMA gives every byte's table value); one where it
# gives another value for at least one byte, so the kernel falls back to the lookups.
AFFINE_CASES = [((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), True), (MEAN, STD, True), ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), False)]


@pytest.mark.parametrize("mean, std, computed", AFFINE_CASES)
@pytest.mark.parametrize("side, patch_px", [(64, 16), (32, 8), (56, 4), (12, 4)])
def test_assemble_bf16_tokens_computed_or_looked_up_give_the_tables_bits(mean, std, computed, side, patch_px):
    """The avx512_bf16 kernel computes bf16 tokens only where that gives every byte's table value
    (assemble_bf16_affine), and then the scalar loop's bits, for all 256 bytes in every channel
    (sides >= 16): whole 192-byte steps and ragged ends (56 and 12 px at 4: 96 and 36 bytes left)."""
    if not _cpu_has_avx512_bf16():
        assert _core.assemble_bf16_affine(mean, std) is False
        pytest.skip("this CPU lacks AVX-512 BF16 and VBMI: the kernel is not built to run here")
    assert _core.assemble_bf16_affine(mean, std) is computed
    values = np.arange(side * side * 3) % 256  # every byte in every channel (256 is not a multiple of 3)
    patches = values.astype(np.uint8).reshape(1, side, side, 3).repeat(2, axis=0)
    patches[1] = patches[1, ::-1]
    expected = _core.assemble_batch_bf16(patches, mean, std, patch_px=patch_px, kernel="scalar")
    for num_threads in (1, 2):
        got = _core.assemble_batch_bf16(
            patches, mean, std, patch_px=patch_px, kernel="avx512_bf16", num_threads=num_threads
        )
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("num_threads", [1, 4])
def test_crop_patches_matches_numpy_inside_and_outside(rng, num_threads):
    region = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    size = 9
    origins = np.array(
        [
            [0, 0],
            [44, 28],
            [20, 10],  # wholly inside, touching both far edges
            [-4, 3],
            [50, -2],
            [-8, -8],  # partly outside left/top/right/corner
            [52, 36],
            [-9, 0],
            [53, 0],  # one pixel inside; wholly outside left and right
            [0, 37],
            [0, -9],
            [10**12, -(10**12)],  # wholly outside bottom/top; far away
        ],
        dtype=np.int64,
    )
    got = _core.crop_patches(region, origins, size, num_threads=num_threads)
    assert got.shape == (len(origins), size, size, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[:-1], numpy_crop(region, origins[:-1], size))
    assert (got[-1] == 255).all()
    assert (got[-2] == 255).all() and (got[7] == 255).all()
    assert got[6, 0, 0].tolist() == region[36, 52].tolist()
    assert (got[6, 1:] == 255).all() and (got[6, 0, 1:] == 255).all()


def test_crop_patches_odd_size_single_patch_and_out(rng):
    region = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    origins = np.array([[3, -2]], dtype=np.int64)
    out = np.zeros((1, 7, 7, 3), np.uint8)
    returned = _core.crop_patches(region, origins, 7, out=out, num_threads=1)
    assert np.shares_memory(returned, out)
    np.testing.assert_array_equal(out, numpy_crop(region, origins, 7))


def test_crop_patches_reads_strided_rgba_view_without_copy(rng):
    # OpenSlide gives RGBA: the [..., :3] view has a 4-byte pixel stride.
    rgba = rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)
    origins = rng.integers(-10, 40, (25, 2))  # int64, and any other integer dtype is accepted too
    got = _core.crop_patches(rgba[..., :3], origins.astype(np.int32), 12, num_threads=4)
    np.testing.assert_array_equal(got, numpy_crop(np.ascontiguousarray(rgba[..., :3]), origins, 12))


def test_assemble_batch_bf16_rounds_as_torch_casts_every_byte_value():
    """The bf16 batch is torch's cast of the float32 batch, bit for bit, for all 256 values of
    every channel (what a bf16 model's first op would make of the float32 batch)."""
    values = np.arange(256, dtype=np.uint8)
    patches = np.stack([values, values[::-1], np.roll(values, 77)], axis=-1).reshape(1, 16, 16, 3)
    for mean, std in (((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))):
        as_float = torch.from_numpy(_core.assemble_batch(patches, mean, std)).to(torch.bfloat16)
        bits = _core.assemble_batch_bf16(patches, mean, std, num_threads=2)
        assert bits.dtype == np.uint16 and bits.shape == (1, 3, 16, 16)
        assert torch.equal(torch.from_numpy(bits).view(torch.bfloat16), as_float)
        out = torch.empty((1, 3, 16, 16), dtype=torch.bfloat16)
        _core.assemble_batch_bf16(patches, mean, std, out=out.view(torch.uint16).numpy())
        assert torch.equal(out, as_float)


def test_crop_then_assemble_pipeline(rng):
    region = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    origins = rng.integers(-8, 60, (6, 2))
    patches = _core.crop_patches(region, origins, 16)
    batch = _core.assemble_batch(patches, MEAN, STD)
    np.testing.assert_allclose(batch, numpy_assemble(numpy_crop(region, origins, 16), MEAN, STD), atol=1e-6)


# (input side, output side): the model's 2x and 4x shrinks, shrinks by non-integer factors (a
# slide whose mpp differs from the model's), enlarging, unchanged, a window of taps longer than
# the input, single pixels.
RESIZE_CASES = [
    (224, 112),
    (224, 56),
    (448, 224),
    # 2x and 4x shrinks: their weights away from the edges are multiples of 2^15 (16-bit lanes on
    # AVX-512); rows of 33 and 150 output bytes end inside a 32-byte block
    (22, 11),
    (100, 50),
    (96, 24),
    (309, 224),
    (225, 112),
    (333, 56),
    (61, 29),
    (56, 112),
    (13, 20),
    (100, 100),
    (7, 3),
    (3, 2),
    (2, 1),
    (1, 4),
]


@pytest.mark.parametrize("side, size", RESIZE_CASES)
def test_resize_patches_equals_the_reference_bit_for_bit(rng, side, size):
    patches = rng.integers(0, 256, (6, side, side, 3), dtype=np.uint8)
    patches[0] = 255  # flat and extreme images: the rounding at both ends of the range
    patches[1] = 0
    patches[2, ::2] = 0
    patches[2, 1::2] = 255
    expected = resize_patches(patches, size)
    np.testing.assert_array_equal(_core.resize_patches(patches, size, num_threads=3), expected)
    for kernel in _core.resize_kernels(side, size):  # each kernel this CPU runs, not only auto's pick
        np.testing.assert_array_equal(_core.resize_patches(patches, size, num_threads=1, kernel=kernel), expected)


def test_resize_weights_of_a_2x_shrink_are_narrow_away_from_the_edges():
    """The premise of the 16-bit resize lanes (csrc/resize_avx512.hpp): a 2x shrink's interior
    weights are 2^19 * (1, 3, 3, 1), so (sum w p + 2^21) >> 22 == (sum (w / 2^15) p + 2^6) >> 7;
    the edges' renormalised weights are not (they take the 32-bit lanes)."""
    first, weights = _core.resize_taps(224, 112)
    weights = np.asarray(weights)
    interior = weights[1:-1]
    assert np.all(interior % 2**15 == 0) and np.all(interior.sum(axis=1) == 2**22)
    assert sorted(np.unique(interior // 2**15).tolist()) == [0, 16, 48]
    assert np.any(weights[0] % 2**15 != 0) and np.any(weights[-1] % 2**15 != 0)


def test_resize_kernels_list_what_auto_runs():
    kernels = _core.resize_kernels(224, 112)
    assert kernels == (["avx512_vbmi", "scalar"] if _cpu_has_avx512_vbmi() else ["scalar"])
    # Beyond a ~4x shrink a group of 16 output bytes reads more than the permute's 128-byte window.
    assert _core.resize_kernels(448, 56) == ["scalar"]
    with pytest.raises(ValueError, match=r"kernel 'avx512_vbmi' cannot resize 448 -> 56 on this CPU"):
        _core.resize_patches(np.zeros((1, 448, 448, 3), np.uint8), 56, kernel="avx512_vbmi")
    with pytest.raises(ValueError, match="kernel 'sse9' cannot resize"):
        _core.resize_patches(np.zeros((1, 8, 8, 3), np.uint8), 4, kernel="sse9")


def _cpu_has_avx512_vbmi() -> bool:
    """What /proc/cpuinfo says (False where there is none to read)."""
    return {"avx512f", "avx512bw", "avx512vl", "avx512vbmi"} <= (cpu_flags() or set())


def _cpu_has_avx512_bf16() -> bool:
    return _cpu_has_avx512_vbmi() and "avx512_bf16" in (cpu_flags() or set())


def test_resize_patches_on_slide_pixels_threads_and_out(rng):
    from m2ort_fast.predict import DEMO_SLIDE
    from m2ort_fast.slide import open_slide

    with open_slide(DEMO_SLIDE) as slide:
        region = slide.read_region(0, 0, 0, 1024, 1024)
    origins = rng.integers(-20, 820, (40, 2))
    patches = _core.crop_patches(region, origins, 224)
    expected = resize_patches(patches, 112)
    out = np.zeros((40, 112, 112, 3), np.uint8)
    returned = _core.resize_patches(patches, 112, out=out, num_threads=1)
    assert np.shares_memory(returned, out)
    np.testing.assert_array_equal(out, expected)
    for threads in (0, 2, 7, 64):
        np.testing.assert_array_equal(_core.resize_patches(patches, 112, num_threads=threads), expected)
    assert _core.resize_patches(patches[:0], 56).shape == (0, 56, 56, 3)


RESIZE_ERRORS = [
    (dict(patches=np.zeros((2, 8, 8, 3), np.float32)), "patches must have dtype uint8"),
    (dict(patches=np.zeros((2, 8, 8), np.uint8)), r"patches must have shape \(N, H, W, 3\)"),
    (dict(patches=np.zeros((2, 16, 16, 3), np.uint8)[:, ::2, ::2]), "patches must be C-contiguous"),
    (dict(patches=np.zeros((2, 8, 9, 3), np.uint8)), r"patches must be square \(N, S, S, 3\), got \(2, 8, 9, 3\)"),
    (dict(patches=np.zeros((2, 0, 0, 3), np.uint8)), "patches must not be empty images"),
    (dict(size_px=0), "size_px must be > 0"),
    (dict(out=np.zeros((2, 5, 5, 3), np.uint8)), r"out must have shape \(2, 4, 4, 3\)"),
    (dict(num_threads=-1), "num_threads must be >= 0"),
]


@pytest.mark.parametrize("change, message", RESIZE_ERRORS)
def test_resize_patches_rejects_bad_arguments(change, message):
    kwargs = dict(patches=np.zeros((2, 8, 8, 3), np.uint8), size_px=4) | change
    with pytest.raises(ValueError, match=message):
        _core.resize_patches(**kwargs)


ASSEMBLE_ERRORS = [
    (lambda p: dict(patches=p.astype(np.float32)), "patches must have dtype uint8, got float32"),
    (lambda p: dict(patches=p[..., 0]), r"patches must have shape \(N, H, W, 3\), got \(2, 8, 8\)"),
    (lambda p: dict(patches=np.zeros((2, 8, 8, 4), np.uint8)), "patches must have shape"),
    (lambda p: dict(patches=p[:, ::2]), "patches must be C-contiguous"),
    (lambda p: dict(patches=p.tolist()), "patches must be a numpy.ndarray, got list"),
    (lambda p: dict(mean=(0.5, 0.5)), "mean must have 3 values"),
    (lambda p: dict(std=(0.5, 0.0, 0.5)), "std values must be non-zero"),
    (lambda p: dict(out=np.empty((2, 3, 8, 8), np.float64)), "out must have dtype float32, got float64"),
    (lambda p: dict(out=np.empty((2, 8, 8, 3), np.float32)), r"out must have shape \(2, 3, 8, 8\), got \(2, 8, 8, 3\)"),
    (lambda p: dict(out=np.empty((2, 3, 8, 16), np.float32)[..., ::2]), "out must be C-contiguous"),
    (lambda p: dict(num_threads=-1), "num_threads must be >= 0"),
    (lambda p: dict(patch_px=-4), r"patch_px must be >= 0 \(0 = planes\), got -4"),
    (lambda p: dict(patch_px=3), "patch_px 3 does not divide the patches' 8 x 8 px"),
    (lambda p: dict(patch_px=4, out=np.empty((2, 3, 8, 8), np.float32)), r"out must have shape \(2, 4, 48\)"),
    (
        lambda p: dict(patch_px=2, kernel="avx512_vbmi"),
        r"kernel 'avx512_vbmi' cannot assemble tokens of 2 px on this CPU \(available: auto, scalar\)",
    ),
]


@pytest.mark.parametrize("change, message", ASSEMBLE_ERRORS)
def test_assemble_batch_rejects_bad_arguments(change, message):
    patches = np.zeros((2, 8, 8, 3), np.uint8)
    kwargs = dict(patches=patches, mean=MEAN, std=STD) | change(patches)
    with pytest.raises(ValueError, match=message):
        _core.assemble_batch(**kwargs)


def test_assemble_batch_rejects_read_only_and_aliased_out():
    patches = np.zeros((2, 8, 8, 3), np.uint8)
    out = np.zeros((2, 3, 8, 8), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        _core.assemble_batch(patches, MEAN, STD, out=out)
    shared = np.zeros(2 * 3 * 8 * 8 * 4, np.uint8)
    with pytest.raises(ValueError, match="out must not share memory with the input"):
        _core.assemble_batch(
            shared[: 2 * 8 * 8 * 3].reshape(2, 8, 8, 3), MEAN, STD, out=shared.view(np.float32).reshape(2, 3, 8, 8)
        )


CROP_ERRORS = [
    (dict(region=np.zeros((10, 10, 3), np.float32)), "region must have dtype uint8"),
    (dict(region=np.zeros((10, 10), np.uint8)), r"region must have shape \(H, W, 3\)"),
    (dict(origins_px=np.zeros((3, 2), np.float64)), "origins_px must have an integer dtype"),
    (dict(origins_px=np.zeros((3, 3), np.int64)), r"origins_px must have shape \(N, 2\)"),
    (dict(size_px=0), "size_px must be > 0"),
    (dict(out=np.zeros((3, 4, 4, 3), np.uint8)), r"out must have shape \(3, 5, 5, 3\)"),
    (dict(out=np.zeros((3, 5, 5, 3), np.int8)), "out must have dtype uint8"),
    (dict(num_threads=-2), "num_threads must be >= 0"),
]


@pytest.mark.parametrize("change, message", CROP_ERRORS)
def test_crop_patches_rejects_bad_arguments(change, message):
    kwargs = dict(region=np.zeros((10, 10, 3), np.uint8), origins_px=np.zeros((3, 2), np.int64), size_px=5) | change
    with pytest.raises(ValueError, match=message):
        _core.crop_patches(**kwargs)


def test_assemble_batch_releases_the_gil():
    """A Python thread must make progress *during* a long assemble_batch call.

    With the GIL held for the whole call, the ticker thread can run only before the call starts
    (for at most one switch interval after `start`) or after it returns, so no tick can fall in
    the middle of the window below. Retries absorb a busy machine not scheduling the ticker.
    """
    patches = np.random.default_rng(1).integers(0, 256, (192, 224, 224, 3), dtype=np.uint8)  # 29 MB
    out = np.empty((192, 3, 224, 224), np.float32)  # 116 MB
    margin_s = 0.003
    ticks: list[float] = []
    stop = threading.Event()

    def ticker():
        last = 0.0
        while not stop.is_set():
            now = time.perf_counter()
            if now - last > 1e-4:  # bounded memory: at most one tick per 0.1 ms
                ticks.append(now)
                last = now

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        windows = []
        for _ in range(8):
            start = time.perf_counter()
            _core.assemble_batch(patches, MEAN, STD, out=out, num_threads=1)
            end = time.perf_counter()
            windows.append((start, end))
            if end - start > 4 * margin_s and any(start + margin_s < t < end - margin_s for t in ticks):
                break
        else:
            pytest.fail(
                f"no Python progress during any of {len(windows)} calls "
                f"(durations {[round(e - s, 4) for s, e in windows]} s): is the GIL released?"
            )
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity mask on this platform")
def test_default_threads_follow_the_cpu_affinity_mask(rng):
    """num_threads=0 sizes the kernels' threads by the CPUs this process may run on (a container's
    share), not by the host's core count."""
    allowed = os.sched_getaffinity(0)
    assert _core.available_cpus() == len(allowed)
    os.sched_setaffinity(0, {min(allowed)})  # this thread only; the kernels' threads start from it
    try:
        assert _core.available_cpus() == 1
        patches = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        np.testing.assert_allclose(
            _core.assemble_batch(patches, MEAN, STD), numpy_assemble(patches, MEAN, STD), rtol=0, atol=1e-6
        )
    finally:
        os.sched_setaffinity(0, allowed)
