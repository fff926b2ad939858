"""Benchmark the extension's data-path kernels (csrc/): each kernel this CPU runs, side by side.

For the host path's per-spot work at the shipped model's sizes - the 224 -> 112 px resize (and a
shrink by another factor, 224 -> 150, whose weights take the 32-bit lanes), the token assembly of
each level in bf16 (for the shipped models' mean and std, ImageNet's, and a pair the bf16 kernel
cannot compute exactly, so it looks the values up: the case names say which) and in float32 -
"auto" and every kernel that ``_core.resize_kernels`` / ``_core.assemble_kernels`` lists, timed
in interleaved rounds on one thread, into a reused output: the median per patch, its spread, and
each kernel's speed over the scalar loop.

    python bench/core_kernels.py                 # 64 patches a call, 7 rounds
    python bench/core_kernels.py --patches 4     # a batch that stays in the caches
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from backends import cpu_model  # bench/backends.py: run as `python bench/core_kernels.py`

from m2ort_fast import _core

MEAN_STD = {
    "shipped (0, 1)": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "other": ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
}
TOKEN_LEVELS = ((224, 16), (112, 8), (56, 4))


def cases(patches: int, rng: np.random.Generator) -> list[tuple[str, list[str], Callable[[str], object]]]:
    """(name, kernels, call(kernel)) per case; each call writes into its own reused output."""
    out = []
    for side, size in ((224, 112), (224, 150)):
        x = rng.integers(0, 256, (patches, side, side, 3), dtype=np.uint8)
        buffer = np.empty((patches, size, size, 3), np.uint8)
        out.append(
            (
                f"resize {side} -> {size}",
                _core.resize_kernels(side, size),
                lambda k, x=x, size=size, buffer=buffer: _core.resize_patches(
                    x, size, out=buffer, num_threads=1, kernel=k
                ),
            )
        )
    for side, p in TOKEN_LEVELS:
        x = rng.integers(0, 256, (patches, side, side, 3), dtype=np.uint8)
        shape = (patches, (side // p) ** 2, p * p * 3)
        bits = torch.empty(shape, dtype=torch.bfloat16).view(torch.uint16).numpy()  # torch's 64-byte alignment
        floats = torch.empty(shape, dtype=torch.float32).numpy()
        for label, (mean, std) in MEAN_STD.items():
            how = "computed" if _core.assemble_bf16_affine(mean, std) else "looked up"
            out.append(
                (
                    f"tokens bf16 {side}/{p} {label} ({how})",
                    _core.assemble_kernels(p),
                    lambda k, x=x, p=p, mean=mean, std=std, bits=bits: _core.assemble_batch_bf16(
                        x, mean, std, out=bits, num_threads=1, kernel=k, patch_px=p
                    ),
                )
            )
        mean, std = MEAN_STD["imagenet"]
        out.append(
            (
                f"tokens fp32 {side}/{p}",
                [k for k in _core.assemble_kernels(p) if k != "avx512_bf16"],  # float32 always looks up
                lambda k, x=x, p=p, mean=mean, std=std, floats=floats: _core.assemble_batch(
                    x, mean, std, out=floats, num_threads=1, kernel=k, patch_px=p
                ),
            )
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=64, help="patches per call (default 64, the host path's piece)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    rows = []
    cpu = cpu_model()
    print(f"cpu: {cpu}, one thread, {args.patches} patches a call")
    for name, listed, call in cases(args.patches, rng):
        kernels = ["auto", *listed]
        samples: dict[str, list[float]] = {k: [] for k in kernels}
        for k in kernels:
            call(k)  # warm: first-touch page faults, lazily built tables
        for _ in range(args.rounds):
            for k in kernels:
                start = time.perf_counter()
                call(k)
                samples[k].append((time.perf_counter() - start) / args.patches * 1e6)
        scalar = statistics.median(samples["scalar"])
        for k in kernels:
            median = statistics.median(samples[k])
            row = {
                "case": name,
                "kernel": k,
                "us_per_patch": round(median, 2),
                "range": [round(min(samples[k]), 2), round(max(samples[k]), 2)],
                "vs_scalar": round(scalar / median, 2),
            }
            rows.append(row)
            spread = f"({row['range'][0]}-{row['range'][1]})"
            print(f"{name:46s} {k:12s} {median:8.2f} us/patch {spread:15s} {row['vs_scalar']:5.2f}x scalar")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "patches": args.patches, "rounds": args.rounds, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
