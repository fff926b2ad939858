"""Fused ITMM block vs its PyTorch reference and vs m2ort_fast.model.ITMM.

CPU (everywhere, CI): Triton's interpreter in fp32, bound 1e-4 (relative to the block's update).
The interpreter is slow, so batch 64 runs for the tiny variant only and batches 1 and 7 for every
variant. GPU (marked gpu): fp16/bf16 kernels against the fp32 reference, batches 1, 7, 64, 256.
"""

from __future__ import annotations

import pytest
import torch

from m2ort_fast.kernels.itmm import ITMMWeights, itmm, reference_itmm
from m2ort_fast.kernels.testing import (
    CPU_CASES,
    ERROR_BOUNDS,
    random_tokens,
    randomize_,
    relative_error,
    triton_compiled,
    triton_interpreter,
)
from m2ort_fast.model import ITMM, VARIANTS

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _block(variant: str, seed: int) -> ITMM:
    return randomize_(ITMM(VARIANTS[variant]), seed).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_reference_matches_model_itmm(variant):
    block = _block(variant, seed=1)
    x = random_tokens(2, block.norm.normalized_shape[0], seed=2)
    torch.testing.assert_close(reference_itmm(x, ITMMWeights.from_module(block)), block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant,batch", CPU_CASES)
@torch.no_grad()
def test_itmm_kernel_fp32_interpreter(variant, batch):
    block = _block(variant, seed=batch)
    x = random_tokens(batch, block.norm.normalized_shape[0], seed=100 + batch)  # fresh inputs per case
    with triton_interpreter():
        out = itmm(x, ITMMWeights.from_module(block))
    ref = reference_itmm(x, ITMMWeights.from_module(block))
    assert out.shape == x.shape
    assert relative_error(out, ref, x) < ERROR_BOUNDS[torch.float32]
    assert relative_error(out, block(x), x) < ERROR_BOUNDS[torch.float32]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 7, 64, 256])
@torch.no_grad()
def test_itmm_kernel_gpu(dtype, variant, batch):
    block = _block(variant, seed=batch).cuda()
    x = random_tokens(batch, block.norm.normalized_shape[0], seed=batch).cuda()
    with triton_compiled():
        out = itmm(x.to(dtype), ITMMWeights.from_module(block.to(dtype)))
    # fp32 reference from the same (rounded) weights and inputs: only the kernel's rounding differs
    ref = reference_itmm(x.to(dtype).float(), ITMMWeights.from_module(block.float()))
    assert relative_error(out, ref, x.to(dtype).float()) < ERROR_BOUNDS[dtype]
