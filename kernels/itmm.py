"""Fused ITMM block (intra-level token mixing), (B, T, D) -> (B, T, D):

    h = LayerNorm(x);  q = h[..., :d] Wq^T,  k = h[..., d:2d] Wk^T,  v = h[..., 2d:] Wv^T
    y = x + proj(softmax(q k^T / sqrt(64)) v) + proj.bias          (heads of 64 channels)

Kernels (three launches):

1. :func:`~.fused_linear.row_stats`: per-token LayerNorm mean and 1/std (reads x once).
2. ``_ln_qkv_attention_kernel``, one program per (BLOCK_M queries, batch, head): LayerNorm is
   applied to x tiles as they are loaded (prologue), the head's q, k and v are projected on chip
   from their level's channel slice, and attention runs flash-style: keys in BLOCK_N blocks,
   online softmax (running max and sum in fp32, exp2 with the scale folded into q), so neither
   q/k/v nor the (T, T) scores ever reach global memory. Each program projects k and v for all
   T keys; with BLOCK_M >= T (the autotuner may pick 256) there is no recomputation at all,
   with smaller BLOCK_M the k/v projection is recomputed once per query block (a compute-for-
   memory trade the autotuner weighs). Writes the attention output o (B*T, heads*64) once.
3. :func:`~.fused_linear.fused_linear`: output projection + bias + residual add of x in the
   epilogue (reads o and x once, writes y once).

Global-memory passes that remain: x is read 3 times (statistics, attention, residual; the
attention kernel's re-reads of x across heads hit L2), o is written once and read once, y is
written once. The (B, heads, T, T) scores and the q/k/v projections (3x the size of x) are never
stored, where the eager block writes and re-reads each of them.

T = 197 is not a multiple of 16: query rows and key columns past T are masked (scores of padded
keys are -inf before the softmax).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from m2ort_fast.kernels.fused_linear import fused_linear, reference_row_stats, row_stats
from m2ort_fast.kernels.runtime import TritonKernel, dot_precision, size_class, tl, triton
from m2ort_fast.model import HEAD_DIM, ITMM

LOG2_E = 1.4426950408889634


def _ln_qkv_attention_kernel(
    x_ptr,
    mean_ptr,
    rstd_ptr,
    gamma_ptr,
    beta_ptr,
    wq_ptr,
    wk_ptr,
    wv_ptr,
    o_ptr,
    qk_scale_log2,
    size_bucket,
    T: tl.constexpr,
    D: tl.constexpr,
    LEVEL_DIM: tl.constexpr,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """x (B, T, D) -> o (B, T, HEADS*HEAD_DIM) for one (query block, batch, head).

    wq/wk/wv: (HEADS*HEAD_DIM, LEVEL_DIM) nn.Linear weights; q reads channels [0, d), k [d, 2d),
    v [2d, 3d) of the normalised x. mean/rstd: (B*T,) fp32 LayerNorm statistics.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // HEADS
    head = pid_bh % HEADS
    dtype = wq_ptr.dtype.element_ty
    x_base = x_ptr + batch.to(tl.int64) * (T * D)
    stats_base = batch.to(tl.int64) * T
    head_rows = head * HEAD_DIM + tl.arange(0, HEAD_DIM)  # this head's rows of Wq/Wk/Wv
    ks = tl.arange(0, BLOCK_K)

    # q = LN(x)[:, :d] @ Wq_h^T for this block of queries, scaled by log2(e)/sqrt(HEAD_DIM).
    q_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = q_rows < T
    q_mean = tl.load(mean_ptr + stats_base + q_rows, mask=q_ok, other=0.0)
    q_rstd = tl.load(rstd_ptr + stats_base + q_rows, mask=q_ok, other=0.0)
    # Pointer tiles are built once and advanced by BLOCK_K (64-bit pointer tensors are costly
    # in registers); the W tiles are (BLOCK_K, HEAD_DIM) slices of W^T read from (inner, d).
    w_offsets = head_rows[None, :] * LEVEL_DIM + ks[:, None]
    x_ptrs = x_base + q_rows[:, None] * D + ks[None, :]
    wq_ptrs = wq_ptr + w_offsets
    q = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for c0 in range(0, LEVEL_DIM, BLOCK_K):
        c = c0 + ks
        c_ok = c < LEVEL_DIM
        if LEVEL_DIM % BLOCK_K == 0:  # no mask along the contiguous channel axis: vectorised loads
            x_mask = q_ok[:, None]
            w_mask = (head_rows < HEADS * HEAD_DIM)[None, :]
        else:
            x_mask = q_ok[:, None] & c_ok[None, :]
            w_mask = c_ok[:, None]
        xa = tl.load(x_ptrs, mask=x_mask, other=0.0)
        gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        xa = ((xa.to(tl.float32) - q_mean[:, None]) * q_rstd[:, None] * gamma[None, :] + beta[None, :]).to(dtype)
        w = tl.load(wq_ptrs, mask=w_mask, other=0.0)
        q = tl.dot(xa, w, acc=q, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        wq_ptrs += BLOCK_K
    q = (q * qk_scale_log2).to(dtype)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for n0 in range(0, T, BLOCK_N):
        kv_rows = n0 + tl.arange(0, BLOCK_N)
        kv_ok = kv_rows < T
        kv_mean = tl.load(mean_ptr + stats_base + kv_rows, mask=kv_ok, other=0.0)
        kv_rstd = tl.load(rstd_ptr + stats_base + kv_rows, mask=kv_ok, other=0.0)
        # keys from level 2's channels [d, 2d), values from level 3's [2d, 3d)
        xk_ptrs = x_base + kv_rows[:, None] * D + LEVEL_DIM + ks[None, :]
        wk_ptrs = wk_ptr + w_offsets
        wv_ptrs = wv_ptr + w_offsets
        k = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
        v = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
        for c0 in range(0, LEVEL_DIM, BLOCK_K):
            c = c0 + ks
            c_ok = c < LEVEL_DIM
            if LEVEL_DIM % BLOCK_K == 0:
                tile_mask = kv_ok[:, None]
                w_mask = (head_rows < HEADS * HEAD_DIM)[None, :]
            else:
                tile_mask = kv_ok[:, None] & c_ok[None, :]
                w_mask = c_ok[:, None]
            xk = tl.load(xk_ptrs, mask=tile_mask, other=0.0)
            gamma = tl.load(gamma_ptr + LEVEL_DIM + c, mask=c_ok, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + LEVEL_DIM + c, mask=c_ok, other=0.0).to(tl.float32)
            xk = ((xk.to(tl.float32) - kv_mean[:, None]) * kv_rstd[:, None] * gamma[None, :] + beta[None, :]).to(dtype)
            k = tl.dot(xk, tl.load(wk_ptrs, mask=w_mask, other=0.0), acc=k, input_precision=DOT_PRECISION)
            xv = tl.load(xk_ptrs + LEVEL_DIM, mask=tile_mask, other=0.0)
            gamma = tl.load(gamma_ptr + 2 * LEVEL_DIM + c, mask=c_ok, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + 2 * LEVEL_DIM + c, mask=c_ok, other=0.0).to(tl.float32)
            xv = ((xv.to(tl.float32) - kv_mean[:, None]) * kv_rstd[:, None] * gamma[None, :] + beta[None, :]).to(dtype)
            v = tl.dot(xv, tl.load(wv_ptrs, mask=w_mask, other=0.0), acc=v, input_precision=DOT_PRECISION)
            xk_ptrs += BLOCK_K
            wk_ptrs += BLOCK_K
            wv_ptrs += BLOCK_K

        # Online softmax over this key block (scores already in log2 units).
        s = tl.dot(q, tl.trans(k.to(dtype)), input_precision=DOT_PRECISION)
        s = tl.where(kv_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(dtype), v.to(dtype), acc=acc, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    out_cols = head * HEAD_DIM + tl.arange(0, HEAD_DIM)
    o_offsets = (stats_base + q_rows)[:, None] * (HEADS * HEAD_DIM) + out_cols[None, :]
    tl.store(o_ptr + o_offsets, out.to(o_ptr.dtype.element_ty), mask=q_ok[:, None])


def _attention_configs():
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). A program holds q and the output accumulator
    # (BLOCK_M x 64) and a key block's k and v (BLOCK_N x 64) in registers, and x / W tiles of
    # BLOCK_K channels; each config here compiles for sm_80 and sm_90 in fp16/bf16 without spills
    # (tools/compile_report.py). With BLOCK_K 64 every 4-warp config spilled and so did 256 rows
    # on 8 or 16 warps; BLOCK_K 32 (it divides every M2ORT d, as 64 does) makes the room.
    # BLOCK_M 256 covers all 197 queries (no k/v recomputation, 16 warps at 128 registers);
    # 128/64/32 trade recomputation for more programs. 32x16 on 4 warps is the one that does not
    # spill in fp32 either (IEEE products, no tensor cores).
    tiles = [
        (256, 32, 32, 16, 2),
        (128, 32, 64, 8, 2),
        (128, 32, 64, 8, 3),
        (128, 64, 32, 8, 2),
        (128, 32, 32, 4, 2),
        (64, 32, 64, 8, 2),
        (64, 32, 32, 4, 2),
        (64, 64, 32, 4, 2),
        (32, 16, 32, 4, 2),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in tiles
    ]


LN_QKV_ATTENTION = TritonKernel(
    _ln_qkv_attention_kernel,
    configs=_attention_configs,
    key=["T", "D", "HEADS", "size_bucket"],
    # Interpreter: one program covers all queries and one key block all keys (256 >= 197).
    interpreter_meta=lambda kw: {"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": triton.next_power_of_2(kw["LEVEL_DIM"])},
)


def ln_qkv_attention(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
) -> torch.Tensor:
    """x (B, T, D) contiguous, LayerNorm stats (B*T,) -> attention output o (B*T, heads*64)."""
    b, t, dim = x.shape
    inner, level_dim = wq.shape
    heads = inner // HEAD_DIM
    o = torch.empty((b * t, inner), device=x.device, dtype=x.dtype)
    LN_QKV_ATTENTION.launch(
        lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * heads),
        x,
        mean,
        rstd,
        gamma,
        beta,
        wq,
        wk,
        wv,
        o,
        HEAD_DIM**-0.5 * LOG2_E,
        size_class(b * t),
        T=t,
        D=dim,
        LEVEL_DIM=level_dim,
        HEADS=heads,
        HEAD_DIM=HEAD_DIM,
        DOT_PRECISION=dot_precision(x.dtype),
    )
    return o


@dataclasses.dataclass(frozen=True)
class ITMMWeights:
    """The weights of one ITMM block, contiguous, in the block's device and dtype."""

    eps: float
    gamma: torch.Tensor  # (D,) LayerNorm
    beta: torch.Tensor
    wq: torch.Tensor  # (heads*64, d) each
    wk: torch.Tensor
    wv: torch.Tensor
    w_proj: torch.Tensor  # (D, heads*64)
    b_proj: torch.Tensor  # (D,)

    def __post_init__(self):
        if self.wq.shape[0] % HEAD_DIM or self.wq.shape[1] % 16:
            raise ValueError(
                f"ITMM kernels need heads of {HEAD_DIM} and d a multiple of 16, got {tuple(self.wq.shape)}"
            )

    @classmethod
    def from_module(cls, module: ITMM) -> ITMMWeights:
        def c(p):
            return p.detach().contiguous()

        return cls(
            module.norm.eps,
            c(module.norm.weight),
            c(module.norm.bias),
            c(module.to_q.weight),
            c(module.to_k.weight),
            c(module.to_v.weight),
            c(module.proj.weight),
            c(module.proj.bias),
        )


def itmm(x: torch.Tensor, weights: ITMMWeights) -> torch.Tensor:
    """Fused ITMM block: x (B, T, D) -> (B, T, D) in x's dtype (three kernel launches)."""
    b, t, dim = x.shape
    x = x.contiguous()
    rows = x.view(b * t, dim)
    mean, rstd = row_stats(rows, weights.eps)
    o = ln_qkv_attention(x, mean, rstd, weights.gamma, weights.beta, weights.wq, weights.wk, weights.wv)
    y = fused_linear(o, weights.w_proj, weights.b_proj, residual=rows)
    return y.view(b, t, dim)


def reference_itmm(x: torch.Tensor, weights: ITMMWeights) -> torch.Tensor:
    """The kernels' math in plain PyTorch: stats -> normalise slices -> per-head softmax attention
    -> projection + bias + residual (fp32 softmax, as the kernel keeps it)."""
    b, t, dim = x.shape
    d = dim // 3
    mean, rstd = reference_row_stats(x, weights.eps)
    h = ((x.float() - mean[..., None]) * rstd[..., None] * weights.gamma.float() + weights.beta.float()).to(x.dtype)
    heads = weights.wq.shape[0] // HEAD_DIM

    def split(z):  # (B, T, heads*64) -> (B, heads, T, 64)
        return z.reshape(b, t, heads, HEAD_DIM).transpose(1, 2)

    q = split(h[..., :d] @ weights.wq.T)
    k = split(h[..., d : 2 * d] @ weights.wk.T)
    v = split(h[..., 2 * d :] @ weights.wv.T)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(HEAD_DIM)
    o = (torch.softmax(scores, dim=-1) @ v.float()).to(x.dtype)
    o = o.transpose(1, 2).reshape(b, t, heads * HEAD_DIM)
    return x + (o @ weights.w_proj.T + weights.b_proj)
