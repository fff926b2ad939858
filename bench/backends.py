"""Every available backend x precision on the same inputs, in one run.

    python bench/backends.py [--variants tiny,small] [--batch-sizes 1,64] [--backends torch,onnxruntime,aoti]
                             [--precisions fp32,bf16,int8] [--device cpu] [--repeats 5] [--threads 2]
                             [--clock-ghz 2.1] [--json out.json]

For each variant, batch size, backend and precision (the pairs the backend runs on the device,
m2ort_fast.precision.BACKEND_PRECISIONS): spots/s (batch / median latency), "vs fp32" (against the
fp32 eager reference, the `torch` row at fp32), GFLOP/s, the share of this CPU's peak for that
precision, latency p50/p99 per batch, peak memory during the warm-up batch (CUDA: peak allocated by
torch; CPU: peak process RSS, sampled), and the max error vs the fp32 eager reference on the same
inputs (relative to max |reference|). Rows are timed round-robin (one batch of each in turn) so
that load from other processes on a shared machine hits them alike. Build time (export/compile on
first use; cached afterwards) is reported separately. Five rows are not registered backends:
"compile" (torch.compile of the eager model), "torch-fused" / "torch-literal" (the eager model with
its attention forced to one fused op, ``set_fused_attention``, or to the reference's matmul ->
softmax -> matmul: which form is faster here, and how much of a compiled backend's gain that op
alone gives), "torch-aten-ln" (the torch backend with torch's own LayerNorm where it would run the
extension's, ``backends.layer_norm``), and "torch-v1" (the eager model's forward as written before issue 26,
``m2ort_fast.model_v1``, run as the torch backend ran it: the old-vs-new comparison of the model
stage in one process). "spots/s IQR": spots/s of the 25% and 75% quantiles of the batch times.

GFLOP/s: spots/s x the reference model's FLOPs per spot (``flops_per_spot``: 2 per multiply-add of
the linear layers and the two attention matmuls), for every row alike, although the compiled
graph skips ~1/depth of them (class-token-only last block); for int8 it is giga-operations/s.
Peak (CPU): cores x clock x operations per cycle per core of the widest unit the CPU's flags show
for that precision (:func:`cpu_peak`): fp32 AVX-512 2 FMA ports x 16 lanes x 2 = 64; bf16 AMX
(TDPBF16PS: 16x16x32 multiply-adds per 16 cycles) 1024, else AVX512_BF16 (VDPBF16PS, 2 ports) 128;
int8 AMX 2048, else AVX512_VNNI 256; fp16 AMX-FP16 1024, else AVX512_FP16 128. The clock is the
"cpu MHz" of /proc/cpuinfo (on a VM: the nominal clock; turbo, and AMX's lower licence clock, are
not visible), or --clock-ghz.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import threading
import time

import numpy as np
import torch

from m2ort_fast.backends import make_backend
from m2ort_fast.backends.workers import engine_call
from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.device import resolve_device
from m2ort_fast.errors import M2ORTError
from m2ort_fast.model import IMAGE_SIZES_PX, build_model, flops_per_spot, set_fused_attention
from m2ort_fast.model_v1 import forward_v1
from m2ort_fast.precision import BACKEND_PRECISIONS, check_precision, torch_dtype

DEFAULT_BACKENDS = {
    "cpu": "torch,torch-v1,torch-fused,torch-literal,torch-aten-ln,onnxruntime,aoti",
    "cuda": "torch,torch-fused,compile,triton,aoti,tensorrt,onnxruntime",
}
DEFAULT_PRECISIONS = {"cpu": "fp32,bf16,int8", "cuda": "fp32,bf16,fp16"}
# the rows that are not registered backends run what the eager model runs
PSEUDO_BACKENDS = {
    "torch-fused": "torch",
    "torch-literal": "torch",
    "torch-aten-ln": "torch",
    "compile": "torch",
    "torch-v1": "torch",
}
# the eager rows that are the torch backend with one of its choices forced
EAGER_CHOICES = {
    "torch-fused": {"fused_attention": True},
    "torch-literal": {"fused_attention": False},
    "torch-aten-ln": {"core_layer_norm": False},
}

# operations per cycle per core, by precision: (cpu flag, ops) from the widest unit down
OPS_PER_CYCLE = {
    "fp32": (("avx512f", 64, "AVX-512 FMA, 2 ports x 16 lanes x 2"), ("fma", 32, "AVX2 FMA, 2 ports x 8 lanes x 2")),
    "bf16": (
        ("amx_bf16", 1024, "AMX TDPBF16PS, 16x16x32 multiply-adds per 16 cycles"),
        ("avx512_bf16", 128, "AVX512_BF16 VDPBF16PS, 2 ports x 32 x 2"),
    ),
    "int8": (
        ("amx_int8", 2048, "AMX TDPBSSD, 16x16x64 multiply-adds per 16 cycles"),
        ("avx512_vnni", 256, "AVX512_VNNI VPDPBUSD, 2 ports x 64 x 2"),
        ("avx_vnni", 128, "AVX-VNNI, 2 ports x 32 x 2"),
    ),
    "fp16": (("amx_fp16", 1024, "AMX-FP16"), ("avx512_fp16", 128, "AVX512_FP16, 2 ports x 32 lanes x 2")),
}


def cpu_flags_and_mhz() -> tuple[set[str], float | None]:
    flags: set[str] = set()
    mhz = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("cpu MHz") and mhz is None:
                    mhz = float(line.split(":", 1)[1])
    except OSError:
        pass
    return flags, mhz


def cpu_peak(precision: str, cores: int, clock_ghz: float | None = None) -> tuple[float | None, str]:
    """(peak GFLOP/s (int8: GOP/s) of ``cores`` cores for ``precision``, how it was computed)."""
    flags, mhz = cpu_flags_and_mhz()
    ghz = clock_ghz or (mhz / 1000 if mhz else None)
    if ghz is None:
        return None, "no clock (pass --clock-ghz)"
    for flag, ops, unit in (*OPS_PER_CYCLE.get(precision, ()), *OPS_PER_CYCLE["fp32"]):
        if flag in flags:
            return cores * ghz * ops, f"{cores} cores x {ghz:.2f} GHz x {ops} ({unit})"
    return cores * ghz * 8, f"{cores} cores x {ghz:.2f} GHz x 8 (no FMA unit found)"


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


class TorchV1Backend:
    """The eager model's forward before issue 26 (m2ort_fast.model_v1), as the torch backend ran it:
    the model cast to the precision's dtype, the fused attention op below fp32, inputs cast first."""

    name = "torch-v1"

    def __init__(self, model, device, precision):
        self.device, self.dtype = device, torch_dtype(precision)
        self.model = model.to(device, self.dtype).eval()
        set_fused_attention(self.model, precision != "fp32")

    @torch.inference_mode()
    def __call__(self, *levels):
        return forward_v1(self.model, *(x.to(self.device) for x in levels)).float().cpu()


def cpu_model() -> str:
    """/proc/cpuinfo's model name (or the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def runs(name: str, precision: str, device_type: str) -> bool:
    """Whether backend ``name`` (or the pseudo backend's base) runs ``precision`` on the device."""
    if name == "torch-fused" and precision != "fp32" and device_type != "cpu":
        return False  # below fp32 on a GPU the torch backend itself runs the fused attention op
    table = BACKEND_PRECISIONS.get(PSEUDO_BACKENDS.get(name, name))
    return table is None or precision in table.get(device_type, ())


def build(name, model, card, device, precision, cache_dir):
    # each backend gets its own copy: some move/cast the model they are given
    fresh = build_model(card.variant, len(card.genes))
    fresh.load_state_dict(model.state_dict())
    if name == "compile":
        return CompileBackend(fresh, device, precision)
    if name == "torch-v1":
        return TorchV1Backend(fresh, device, precision)
    if name in EAGER_CHOICES:  # how much of a gain one choice of the torch backend gives
        backend = make_backend("torch", fresh, card, device=device, precision=precision, **EAGER_CHOICES[name])
        backend.name = name
        return backend
    options = {"precision": precision}
    if name not in ("torch", "triton"):
        options["cache_dir"] = cache_dir
    return make_backend(name, fresh, card, device=device, **options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", "--variant", default="tiny,small", help="comma-separated (default %(default)s)")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--backends", default=None, help="comma-separated (default: all for the device)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--precisions", "--precision", default=None, help="comma-separated (default: fp32,bf16,int8 on the CPU)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per row and batch size")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every backend (default: torch's)")
    parser.add_argument("--clock-ghz", type=float, default=None, help="CPU clock for the peak (default: /proc/cpuinfo)")
    parser.add_argument(
        "--cache-dir", default=None, help="artifact cache (default: $M2ORT_FAST_CACHE or ~/.cache/m2ort-fast)"
    )
    parser.add_argument(
        "--as-engine",
        action="store_true",
        help="time each backend as the host path calls it: batches in its input_dtype (bf16 for torch bf16) and, "
        "where calls may overlap (torch on the CPU), one call per thread at once, one intra-op thread each "
        "(m2ort_fast.backends.workers); default: float32 batches, one call at a time",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    names = (args.backends or DEFAULT_BACKENDS[device.type]).split(",")
    precisions = [check_precision(p) for p in (args.precisions or DEFAULT_PRECISIONS[device.type]).split(",")]
    if "fp32" not in precisions:
        precisions.insert(0, "fp32")  # the reference row
    cores = torch.get_num_threads()
    device_label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {cores} threads"
    print(f"# {device_label}, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at the start")
    peaks = {}
    if device.type == "cpu":
        for precision in precisions:
            peaks[precision] = cpu_peak(precision, cores, args.clock_ghz)
            print(f"# peak {precision}: {peaks[precision][0] or 0:.0f} G(FL)OP/s = {peaks[precision][1]}")
    results = {"device": device_label, "torch": torch.__version__, "peaks": peaks, "variants": {}}
    for variant in args.variants.split(","):
        results["variants"][variant] = bench_variant(variant, names, precisions, batch_sizes, device, args, peaks)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def bench_variant(variant, names, precisions, batch_sizes, device, args, peaks) -> dict:
    model = build_model(variant, seed=0)
    card = ModelCard.for_variant(variant, [f"G{i}" for i in range(model.cfg.n_genes)], mpp=0.5)
    flops = flops_per_spot(model.cfg)
    threads = torch.get_num_threads()
    device_label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {threads} threads"
    print(
        f"\n# {variant} ({card.dim}x{card.depth}, {flops / 1e9:.2f} GFLOP/spot), device: {device_label}, "
        f"torch {torch.__version__}"
    )
    backends, build_s, unavailable, skipped = {}, {}, {}, []
    for precision in precisions:
        for name in names:
            if not runs(name, precision, device.type):
                skipped.append(f"{name}:{precision}")
                continue
            row = (name, precision)
            start = time.perf_counter()
            try:
                backends[row] = build(name, model, card, device, precision, args.cache_dir)
                build_s[row] = time.perf_counter() - start
            except (M2ORTError, ImportError, RuntimeError) as exc:
                unavailable[f"{name}:{precision}"] = " ".join(str(exc).split())[:160]
                print(f"# {name}:{precision}: unavailable ({unavailable[f'{name}:{precision}']})")
    if skipped:
        print(f"# not run by that backend on {device.type} (precision table): {', '.join(skipped)}")

    reference = model.float().to(device).eval()
    rows = []
    for batch in batch_sizes:
        g = torch.Generator().manual_seed(batch)
        levels = [torch.rand(batch, 3, s, s, generator=g) for s in IMAGE_SIZES_PX]
        with torch.inference_mode():
            ref = reference(*(x.to(device) for x in levels)).float().cpu()
        errors, latencies, peak_mem = {}, {row: [] for row in backends}, {}
        for row, backend in backends.items():  # warm-up: error and peak memory
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with PeakRSS() as rss:
                out = backend(*levels)
            errors[row] = float((out - ref).abs().max() / ref.abs().max())
            peak_mem[row] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak
        # with --as-engine, each backend runs as the host path runs it: batches in its input dtype, and
        # a backend whose calls may overlap one call per thread
        calls = {
            row: engine_call(backend, levels) if args.as_engine else (functools.partial(backend, *levels), 1)
            for row, backend in backends.items()
        }
        workers = {row: batches for row, (_, batches) in calls.items()}
        for _ in range(args.repeats):  # round-robin; no memory sampling here: a sampling thread
            for row, (call, _) in calls.items():  # stalls OpenMP's thread team on a 2-core machine
                start = time.perf_counter()
                call()  # returns CPU tensors: device work is done
                latencies[row].append((time.perf_counter() - start) / workers[row])
        if any(n > 1 for n in workers.values()):
            print(
                f"# batch {batch}, as the engine calls them: "
                + ", ".join(
                    f"{name}:{precision} {n} calls at once (one intra-op thread each; time per batch)"
                    for (name, precision), n in workers.items()
                    if n > 1
                )
            )
        for (name, precision), lat in latencies.items():
            p50 = float(np.median(lat))
            spots = batch / p50
            q25_s, q75_s = np.percentile(lat, [25, 75])
            peak = peaks.get(precision, (None, ""))[0]
            rows.append(
                {
                    "backend": name,
                    "precision": precision,
                    "batch": batch,
                    "spots_per_s": spots,
                    "spots_per_s_iqr": (batch / q75_s, batch / q25_s),
                    "gflops": spots * flops / 1e9,
                    "peak_share": spots * flops / 1e9 / peak if peak else None,
                    "p50_ms": p50 * 1e3,
                    "p99_ms": float(np.percentile(lat, 99)) * 1e3,
                    "peak_mib": peak_mem[(name, precision)] / 2**20,
                    "max_rel_err": errors[(name, precision)],
                    "build_s": build_s[(name, precision)],
                }
            )

    eager = {r["batch"]: r["spots_per_s"] for r in rows if r["backend"] == "torch" and r["precision"] == "fp32"}
    print(
        "| backend | precision | batch | spots/s | spots/s IQR | vs fp32 eager | GFLOP/s | of peak | p50 ms | p99 ms | "
        "peak MiB | max rel err | build s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['spots_per_s'] / eager[r['batch']]:.2f}x" if r["batch"] in eager else "-"
        share = f"{100 * r['peak_share']:.1f}%" if r["peak_share"] is not None else "-"
        print(
            f"| {r['backend']} | {r['precision']} | {r['batch']} | {r['spots_per_s']:.1f} | "
            f"{r['spots_per_s_iqr'][0]:.1f}-{r['spots_per_s_iqr'][1]:.1f} | {ratio} | "
            f"{r['gflops']:.1f} | {share} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['peak_mib']:.0f} | "
            f"{r['max_rel_err']:.1e} | {r['build_s']:.1f} |"
        )
    if device.type == "cpu":
        print(
            "# peak MiB on the CPU: peak RSS of the whole process while that backend ran (includes the others' weights)"
        )
    return {"card": f"{card.dim}x{card.depth}", "flops_per_spot": flops, "rows": rows, "unavailable": unavailable}


if __name__ == "__main__":
    sys.exit(main())
