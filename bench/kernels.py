"""Benchmark the fused Triton kernels against the eager reference blocks and torch.compile.

For each variant: the ITMM and ICMM blocks (block 0 of a random-weight model) as (a) the eager
reference module, (b) torch.compile of it (mode max-autotune on a GPU), (c) the fused Triton
kernels (GPU only), same device, dtype and input; one run each, median of --reps timed calls.
Reports time, achieved FLOP/s (the spec's convention: 2 per multiply-add of the matmuls) and
bandwidth (the minimum traffic: read x and the weights, write y, over the time), and the speed-up
over eager. On a GPU also the whole encoder (all blocks + final norm): spots/s at --encoder-batch
for eager vs compile vs triton.

    python bench/kernels.py                       # GPU: every variant, bf16, batch 256
    python bench/kernels.py --variant tiny --batch 2 --json out.json    # what a CPU run does

On the CPU, Triton kernels cannot run compiled (the interpreter is far too slow to time), so only
eager vs compile are measured, for reference; the output says which device it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from m2ort_fast.model import NUM_TOKENS, VARIANTS, build_model
from m2ort_fast.precision import PRECISION_NAMES, is_quantized, torch_dtype

TOKENS = NUM_TOKENS + 1


def block_flops(cfg, op: str) -> int:
    """FLOPs of one spot through one block (matmuls only)."""
    d, dim, inner, t = cfg.level_dim, cfg.dim, cfg.inner_dim, TOKENS
    if op == "itmm":
        return 2 * (t * (3 * d * inner + inner * dim) + 2 * t * t * inner)
    return 2 * (2 * t * dim * cfg.mlp_dim)


def time_ms(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median wall time of fn() in ms (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def compiled(module, device: torch.device, mode: str | None):
    return torch.compile(module, mode=mode) if mode != "none" else None


def bench_blocks(variant: str, args, device, dtype, triton_ok: bool) -> list[dict]:
    from m2ort_fast.kernels.icmm import ICMMWeights, icmm
    from m2ort_fast.kernels.itmm import ITMMWeights, itmm

    cfg = VARIANTS[variant]
    model = build_model(variant, seed=0).to(device=device, dtype=dtype)
    block = model.blocks[0]
    x = torch.randn(args.batch, TOKENS, cfg.dim, device=device, dtype=dtype)
    rows = []
    for op, module, kernel, weights in (
        ("itmm", block.itmm, itmm, ITMMWeights),
        ("icmm", block.icmm, icmm, ICMMWeights),
    ):
        flops = block_flops(cfg, op) * args.batch
        weight_bytes = sum(p.numel() for p in module.parameters()) * x.element_size()
        min_bytes = 2 * x.numel() * x.element_size() + weight_bytes
        impls = {"eager": module}
        compiled_module = compiled(module, device, args.compile_mode)
        if compiled_module is not None:
            impls[f"compile ({args.compile_mode or 'default'})"] = compiled_module
        if triton_ok:
            w = weights(module)
            impls["triton"] = lambda x, kernel=kernel, w=w: kernel(x, w)
        eager_ms = None
        reference = None
        for name, fn in impls.items():
            with torch.inference_mode():
                ms = time_ms(lambda fn=fn: fn(x), device, args.reps)
                out = fn(x)
            if reference is None:
                reference = out.float()
            err = ((out.float() - reference).abs().max() / (reference - x.float()).abs().max()).item()
            eager_ms = eager_ms or ms
            rows.append(
                {
                    "variant": variant,
                    "op": op,
                    "impl": name,
                    "batch": args.batch,
                    "ms": ms,
                    "gflops": flops / ms / 1e6,
                    "gbps": min_bytes / ms / 1e6,
                    "vs_eager": eager_ms / ms,
                    "rel_err_vs_eager": err,
                }
            )
    return rows


def bench_encoder(variant: str, args, device, dtype, triton_ok: bool) -> list[dict]:
    from m2ort_fast.backends.triton_backend import TritonBackend
    from m2ort_fast.checkpoint import ModelCard

    cfg = VARIANTS[variant]
    model = build_model(variant, seed=0).to(device=device, dtype=dtype)
    tokens = torch.randn(args.encoder_batch, TOKENS, cfg.dim, device=device, dtype=dtype)
    impls = {"eager": model.encode}
    compiled_encode = compiled(model.encode, device, args.compile_mode)
    if compiled_encode is not None:
        impls[f"compile ({args.compile_mode or 'default'})"] = compiled_encode
    if triton_ok:
        card = ModelCard.for_variant(variant, genes=[f"g{i}" for i in range(cfg.n_genes)], mpp=0.5)
        backend = TritonBackend(model, card, device=device, precision=args.dtype)
        impls["triton"] = backend.encode
    rows, eager_ms, reference = [], None, None
    for name, fn in impls.items():
        with torch.inference_mode():
            ms = time_ms(lambda fn=fn: fn(tokens), device, args.reps)
            out = fn(tokens).float()
        reference = out if reference is None else reference
        eager_ms = eager_ms or ms
        rows.append(
            {
                "variant": variant,
                "impl": name,
                "batch": args.encoder_batch,
                "ms": ms,
                "spots_per_s": args.encoder_batch / ms * 1e3,
                "vs_eager": eager_ms / ms,
                "rel_err_vs_eager": ((out - reference).abs().max() / reference.abs().max()).item(),
            }
        )
    return rows


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return (
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--variant", nargs="+", default=None, choices=[*VARIANTS, "all"], help="default: all on a GPU, tiny on the CPU"
    )
    parser.add_argument("--batch", type=int, default=None, help="spots per block call (default 256 GPU, 2 CPU)")
    parser.add_argument("--encoder-batch", type=int, default=256, help="spots per encoder call (GPU only)")
    parser.add_argument(
        "--dtype",
        choices=[p for p in PRECISION_NAMES if not is_quantized(p)],
        default=None,
        help="default bf16 on a GPU, fp32 on the CPU",
    )
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode; default max-autotune on a GPU, the default mode on the CPU; "
        "'none' skips torch.compile",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default 20 GPU, 5 CPU)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    gpu = device.type == "cuda"
    variants = args.variant or (["all"] if gpu else ["tiny"])
    variants = list(VARIANTS) if "all" in variants else variants
    args.batch = args.batch or (256 if gpu else 2)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.reps = args.reps or (20 if gpu else 5)
    if args.compile_mode is None and gpu:
        args.compile_mode = "max-autotune"
    dtype = torch_dtype(args.dtype)
    if not gpu:
        torch.set_num_threads(min(2, os.cpu_count() or 1))

    print(f"# Kernel benchmark on {device_description(device)}")
    print(
        f"torch {torch.__version__}, triton {_triton_version()}, {args.dtype}, block batch {args.batch}, "
        f"median of {args.reps} runs"
    )
    if not gpu:
        print(
            "\nTriton kernels need a CUDA GPU (on the CPU they only run in the slow interpreter, which is "
            "not worth timing): the triton rows are skipped; eager vs torch.compile shown for reference."
        )
    triton_ok = gpu and _triton_version() != "not installed"

    block_rows, encoder_rows = [], []
    for variant in variants:
        block_rows += bench_blocks(variant, args, device, dtype, triton_ok)
        if gpu:
            encoder_rows += bench_encoder(variant, args, device, dtype, triton_ok)

    print("\n## Blocks\n")
    print("| variant | block | impl | ms | GFLOP/s | GB/s (min traffic) | vs eager | max rel err vs eager |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in block_rows:
        print(
            f"| {r['variant']} | {r['op']} | {r['impl']} | {r['ms']:.3f} | {r['gflops']:.0f} | {r['gbps']:.0f} "
            f"| {r['vs_eager']:.2f}x | {r['rel_err_vs_eager']:.1e} |"
        )
    if encoder_rows:
        print(f"\n## Encoder (all blocks + final norm), batch {args.encoder_batch}\n")
        print("| variant | impl | ms | spots/s | vs eager | max rel err vs eager |")
        print("|---|---|---:|---:|---:|---:|")
        for r in encoder_rows:
            print(
                f"| {r['variant']} | {r['impl']} | {r['ms']:.2f} | {r['spots_per_s']:.0f} | {r['vs_eager']:.2f}x "
                f"| {r['rel_err_vs_eager']:.1e} |"
            )
    if args.json:
        payload = {
            "device": device_description(device),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "dtype": args.dtype,
            "blocks": block_rows,
            "encoder": encoder_rows,
        }
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, args.json)
    return 0


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
