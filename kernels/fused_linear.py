"""Fused linear layer: LayerNorm prologue -> GEMM -> bias, exact GELU, residual epilogue.

    y (M, N) = [x (M, N) +] [GELU]( LN(x) (M, K) @ W(N, K)^T [+ bias (N,)] )

with every part optional, in ONE kernel. The LayerNorm's statistics (per-row mean and 1/std,
fp32) come from :func:`row_stats`, a one-read pass over x (one program owns whole rows, so mean
and variance are exact two-pass values from registers); the GEMM kernel then normalises each
(BLOCK_M, BLOCK_K) tile of x as it loads it (gamma, beta applied, rounded to the activation dtype
as torch's LayerNorm output is), so the normalised activations never reach global memory.
Accumulation is fp32; bias, GELU (erf form, torch's default) and the residual add are applied to
the fp32 accumulator before one rounding to the output dtype.

Global-memory passes of ``LN + linear + epilogue``: x read twice (statistics, GEMM), y written
once; the residual (when used) read once in the epilogue; W read once per M-tile (L2-resident).
Without the LN prologue: x read once, y written once.

Used by ITMM (output projection + bias + residual) and ICMM (LN + fc1 + GELU; fc2 + bias +
residual). ``reference_*`` are the same math in plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from m2ort_fast.kernels.runtime import TritonKernel, dot_precision, gpu_configs, size_class, tl, triton

# --------------------------------------------------------------------------- row statistics


def _row_stats_kernel(
    x_ptr, mean_ptr, rstd_ptr, M, eps, size_bucket, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr
):
    """mean and 1/sqrt(var + eps) of each row of x (M, D); a program owns BLOCK_M whole rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < D)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    centred = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / D
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, 1.0 / tl.sqrt(var + eps), mask=row_ok)


def _row_stats_configs():
    # 16 rows on 4 warps spill for D = 1152 (16 x 2048 values over 128 threads); 8 warps do not
    # (every config here compiles spill-free for sm_80 and sm_90: tools/compile_report.py).
    return gpu_configs(
        [{"BLOCK_M": m} for m in (1, 2, 4, 8, 16)],
        num_warps=[4, 8],
        num_stages=[1],
        keep=lambda meta, warps, stages: not (meta["BLOCK_M"] == 16 and warps == 4),
    )


ROW_STATS = TritonKernel(
    _row_stats_kernel,
    configs=_row_stats_configs,
    key=["D", "size_bucket"],
    interpreter_meta=lambda kw: {"BLOCK_M": 64},
)


def row_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, D) contiguous -> (mean (M,), rstd (M,)) fp32, as LayerNorm computes them."""
    m, d = x.shape
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    ROW_STATS.launch(
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),),
        x,
        mean,
        rstd,
        m,
        float(eps),
        size_class(m),
        D=d,
        BLOCK_D=triton.next_power_of_2(d),
    )
    return mean, rstd


def reference_row_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=-1, unbiased=False)
    return mean, torch.rsqrt(var + eps)


# --------------------------------------------------------------------------- fused linear


def _fused_linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    mean_ptr,
    rstd_ptr,
    gamma_ptr,
    beta_ptr,
    res_ptr,
    y_ptr,
    M,
    size_bucket,
    N: tl.constexpr,
    K: tl.constexpr,
    LN_PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    RESIDUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y (M, N) = epilogue(prologue(x) (M, K) @ w (N, K)^T); all of x, w, res, y contiguous."""
    # Grouped tile order: GROUP_M row-tiles share each column-tile of W while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    if LN_PROLOGUE:
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)

    # Pointers advance by BLOCK_K; when BLOCK_K divides K (every M2ORT layer) the loads carry no
    # mask along the contiguous K axis, which keeps them vectorised and lets the loop pipeline.
    a_ptrs = x_ptr + rows64[:, None] * K + ks[None, :]
    b_ptrs = w_ptr + cols[None, :] * K + ks[:, None]  # (BLOCK_K, BLOCK_N) tile of W^T, (N, K) layout
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if K % BLOCK_K == 0:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + ks) < K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if LN_PROLOGUE:
            k = k0 + ks
            gamma = tl.load(gamma_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
            a = a.to(w_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    out_mask = row_ok[:, None] & col_ok[None, :]
    out_offsets = rows64[:, None] * N + cols[None, :]
    if RESIDUAL:
        acc += tl.load(res_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + out_offsets, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _linear_configs():
    # Hopper: 128-row tiles with 8 warps (two warpgroups of wgmma) and 3-4 smem stages do best
    # for these K (192-1152) and N (192-1152); smaller tiles for the small-N layers. Each config
    # compiles for sm_80 and sm_90 in fp16/bf16 without register spills and within shared memory
    # (tools/compile_report.py). Dropped because they spill with the LayerNorm prologue and the
    # epilogue in registers: 128x256 and 256x128 (on 8 warps, and on 16), 128x128 on 4 warps
    # (128x128x32 moved to 8 warps). In fp32 only 64x64 is spill-free (tolerated: see the report).
    tiles = [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 256, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in tiles
    ]


FUSED_LINEAR = TritonKernel(
    _fused_linear_kernel,
    configs=_linear_configs,
    key=["N", "K", "size_bucket", "LN_PROLOGUE", "GELU", "RESIDUAL"],
    # Interpreter: few, large programs (each is a numpy evaluation) and few K steps.
    interpreter_meta=lambda kw: {
        "BLOCK_M": 256,
        "BLOCK_N": min(256, triton.next_power_of_2(kw["N"])),
        "BLOCK_K": min(256, triton.next_power_of_2(kw["K"])),
        "GROUP_M": 8,
    },
)


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (M, K), weight (N, K) [nn.Linear layout], bias (N,) -> y (M, N) in x's dtype.

    norm = (mean (M,), rstd (M,), gamma (K,), beta (K,)) applies LayerNorm to x first;
    gelu applies exact GELU after the bias; residual (M, N) is added last.
    """
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight {tuple(weight.shape)} does not match input width {k}")
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    mean, rstd, gamma, beta = norm if norm is not None else (x, x, x, x)  # unused placeholders
    if residual is not None:
        residual = residual.contiguous()
        if residual.shape != y.shape:
            raise ValueError(f"residual {tuple(residual.shape)} does not match output {tuple(y.shape)}")
    FUSED_LINEAR.launch(
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        x,
        weight,
        bias if bias is not None else x,
        mean,
        rstd,
        gamma,
        beta,
        residual if residual is not None else x,
        y,
        m,
        size_class(m),
        N=n,
        K=k,
        LN_PROLOGUE=norm is not None,
        HAS_BIAS=bias is not None,
        GELU=gelu,
        RESIDUAL=residual is not None,
        DOT_PRECISION=dot_precision(x.dtype),
    )
    return y


def reference_fused_linear(x, weight, bias=None, *, norm=None, gelu=False, residual=None):
    """The same math in PyTorch (fp32 normalisation, rounded to x's dtype, like nn.LayerNorm)."""
    if norm is not None:
        mean, rstd, gamma, beta = norm
        x = ((x.float() - mean[:, None]) * rstd[:, None] * gamma.float() + beta.float()).to(x.dtype)
    y = F.linear(x, weight, bias)
    if gelu:
        y = F.gelu(y)
    return y if residual is None else residual + y
