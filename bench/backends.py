"""Every available backend on the same inputs, in one run.

    python bench/backends.py --variant small --batch-sizes 1,64,256 [--backends torch,onnxruntime,aoti]
                             [--device cpu] [--precision fp32] [--repeats 5] [--threads 2] [--json out.json]

For each backend and batch size: spots/s (batch / median latency), latency p50/p99 per batch,
peak memory during the warm-up batch (CUDA: peak allocated by torch; CPU: peak process RSS, sampled), and the
max error vs the fp32 eager reference on the same inputs (relative to max |reference|). Backends
are timed round-robin (one batch of each in turn) so that load from other processes on a shared
machine hits them alike. Build time (export/compile on first use; cached afterwards) is reported
separately. Two rows are not registered backends: "compile" (torch.compile of the eager model) and
"torch-fused" (the eager model with its attention as one fused op, ``set_fused_attention``), which
shows how much of the compiled backends' gain that op alone gives.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np
import torch

from m2ort_fast.backends import make_backend
from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.device import resolve_device
from m2ort_fast.errors import M2ORTError
from m2ort_fast.model import IMAGE_SIZES_PX, build_model, set_fused_attention
from m2ort_fast.precision import PRECISION_NAMES, torch_dtype

DEFAULT_BACKENDS = {
    "cpu": "torch,torch-fused,onnxruntime,aoti",
    "cuda": "torch,torch-fused,compile,triton,aoti,tensorrt,onnxruntime",
}


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 2 ms (MiB)."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        return False


class CompileBackend:
    """torch.compile of the eager model (max-autotune on CUDA), for comparison."""

    name = "compile"

    def __init__(self, model, device, precision):
        self.device, self.dtype = device, torch_dtype(precision)
        mode = "max-autotune" if device.type == "cuda" else None
        self.fn = torch.compile(model.to(device, self.dtype).eval(), mode=mode, dynamic=False)

    @torch.inference_mode()
    def __call__(self, *levels):
        return self.fn(*(x.to(self.device, self.dtype) for x in levels)).float().cpu()


def build(name, model, card, device, precision, cache_dir):
    # each backend gets its own copy: some move/cast the model they are given
    fresh = build_model(card.variant, len(card.genes))
    fresh.load_state_dict(model.state_dict())
    if name == "compile":
        return CompileBackend(fresh, device, precision)
    if name == "torch-fused":  # eager with the fused attention op: how much of a compiled gain is that op
        backend = make_backend("torch", set_fused_attention(fresh, True), card, device=device, precision=precision)
        backend.name = name
        return backend
    options = {"precision": precision}
    if name not in ("torch", "triton"):
        options["cache_dir"] = cache_dir
    return make_backend(name, fresh, card, device=device, **options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="small")
    parser.add_argument("--batch-sizes", default="1,64,256")
    parser.add_argument("--backends", default=None, help="comma-separated (default: all for the device)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=PRECISION_NAMES)
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per backend and batch size")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every backend (default: torch's)")
    parser.add_argument(
        "--cache-dir", default=None, help="artifact cache (default: $M2ORT_FAST_CACHE or ~/.cache/m2ort-fast)"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    names = (args.backends or DEFAULT_BACKENDS[device.type]).split(",")
    model = build_model(args.variant, seed=0)
    card = ModelCard.for_variant(args.variant, [f"G{i}" for i in range(model.cfg.n_genes)], mpp=0.5)
    device_label = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"# {args.variant} ({card.dim}x{card.depth}), {args.precision}, device: {device_label}, "
        f"torch {torch.__version__}"
    )

    backends, build_s, unavailable = {}, {}, {}
    for name in names:
        start = time.perf_counter()
        try:
            backends[name] = build(name, model, card, device, args.precision, args.cache_dir)
            build_s[name] = time.perf_counter() - start
        except (M2ORTError, ImportError, RuntimeError) as exc:
            unavailable[name] = " ".join(str(exc).split())[:160]
            print(f"# {name}: unavailable ({unavailable[name]})")

    reference = model.float().to(device).eval()
    rows = []
    for batch in batch_sizes:
        g = torch.Generator().manual_seed(batch)
        levels = [torch.rand(batch, 3, s, s, generator=g) for s in IMAGE_SIZES_PX]
        with torch.inference_mode():
            ref = reference(*(x.to(device) for x in levels)).float().cpu()
        errors, latencies, peaks = {}, {n: [] for n in backends}, {}
        for name, backend in backends.items():  # warm-up: error and peak memory
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with PeakRSS() as rss:
                out = backend(*levels)
            errors[name] = float((out - ref).abs().max() / ref.abs().max())
            peaks[name] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak
        for _ in range(args.repeats):  # round-robin; no memory sampling here: a sampling thread
            for name, backend in backends.items():  # stalls OpenMP's thread team on a 2-core machine
                start = time.perf_counter()
                backend(*levels)  # returns a CPU tensor: device work is done
                latencies[name].append(time.perf_counter() - start)
        for name in backends:
            lat = np.array(latencies[name])
            p50 = float(np.median(lat))
            peak_mib = peaks[name] / 2**20
            rows.append(
                {
                    "backend": name,
                    "batch": batch,
                    "spots_per_s": batch / p50,
                    "p50_ms": p50 * 1e3,
                    "p99_ms": float(np.percentile(lat, 99)) * 1e3,
                    "peak_mib": peak_mib,
                    "max_rel_err": errors[name],
                    "build_s": build_s[name],
                }
            )

    eager = {r["batch"]: r["spots_per_s"] for r in rows if r["backend"] == "torch"}
    print("| backend | batch | spots/s | vs torch | p50 ms | p99 ms | peak MiB | max rel err | build s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['spots_per_s'] / eager[r['batch']]:.2f}x" if r["batch"] in eager else "-"
        print(
            f"| {r['backend']} | {r['batch']} | {r['spots_per_s']:.1f} | {ratio} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['peak_mib']:.0f} | {r['max_rel_err']:.1e} | {r['build_s']:.1f} |"
        )
    if device.type == "cpu":
        print(
            "# peak MiB on the CPU: peak RSS of the whole process while that backend ran (includes the others' weights)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "variant": args.variant,
                    "device": device_label,
                    "precision": args.precision,
                    "rows": rows,
                    "unavailable": unavailable,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
