"""Every Triton kernel x every autotune config, compiled for real GPU targets without a GPU.

Triton compiles for a target it is told (``triton.compile(..., target=GPUTarget("cuda", 90, 32))``)
without a device: only loading the binary needs one. This module does that for each kernel of
:mod:`m2ort_fast.kernels`, each of its autotune configs and each target in :data:`TARGETS` (sm_80:
A100; sm_90: H100/H200), with the argument types and constexprs the launchers really pass: the
launchers themselves run on ``meta`` tensors with :meth:`TritonKernel.launch` replaced by a
recorder (:func:`record_launches`: the ITMM and ICMM blocks of every model variant in fp16, bf16
and fp32; the patch assembly at the model's input sizes). Kernels are found by scanning the
package, so a new kernel shows up, uncovered, until its launcher is added there (the tests check).
Pointers are compiled 16-byte aligned, as torch allocates them; integer arguments unspecialised.

Per compiled config it records what ptxas reports (registers per thread, spill stores and loads,
stack frame; ptxas' ``-v`` log as Triton runs it, or the same ptxas run again on the cached PTX
when Triton's cache answered) and the shared memory Triton allocates (``metadata.shared``, what
Triton checks against the device's limit when it loads the kernel). A row is ``ok`` when it
compiled, spilled nothing and fits the target's shared memory per block. The autotuner would
skip a config over the shared limit (OutOfResources) and time a spilling one; neither belongs in
the lists. Which rows fail the check: :func:`judge` (fp32 is tolerated while another config is ok).

    python tools/compile_report.py [--json PATH] [--all] [--jobs N]

prints the table (one line per kernel x config x target x dtype, the worst case over the problem
sizes; ``--all``: every row) and exits 1 when a row fails the check. Compiles go to Triton's cache
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``) and the measurements beside them: cold the
sweep takes ~18 minutes on 2 cores, a rerun seconds.

Shared memory per block (opt-in maximum, what ``cudaDevAttrMaxSharedMemoryPerBlockOptin`` and so
Triton's ``max_shared_mem`` return): 163 KB on compute capability 8.0 and 227 KB on 9.0 (CUDA C++
Programming Guide, table "Technical Specifications per Compute Capability"; the A100 and Hopper
tuning guides; PyTorch's Inductor identifies A100 and H100 by exactly 166912 and 232448 bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from m2ort_fast.kernels.runtime import TritonKernel

# target name -> (compute capability, shared memory per block in bytes, GPUs)
TARGETS: dict[str, tuple[int, int, str]] = {
    "sm_80": (80, 163 * 1024, "A100"),
    "sm_90": (90, 227 * 1024, "H100/H200"),
}
DTYPES = ("fp16", "bf16", "fp32")
# Activation dtypes in which a spilling config is tolerated while another config of its kernel is
# ok for the same problem and target (see judge()); in every other dtype each config must be ok.
TOLERANT_DTYPES = ("fp32",)
# Modules of m2ort_fast.kernels searched for kernels: all but these.
_NOT_KERNEL_MODULES = ("__init__", "compile_report", "runtime", "testing")


def missing_toolchain() -> str | None:
    """Why the report cannot run here (triton or its ptxas missing), or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"triton with its NVIDIA backend is not installed ({exc})"
    try:
        path = get_ptxas(90).path
    except Exception as exc:  # knobs raise when the bundled binary is absent
        return f"triton's ptxas is not available ({exc})"
    if not path or not os.access(path, os.X_OK):
        return f"triton's ptxas is not available ({path!r})"
    return None


# --------------------------------------------------------------------------- launches


@dataclasses.dataclass(frozen=True)
class Launch:
    """One distinct way a launcher calls a kernel: argument types and constexprs (no block sizes)."""

    kernel: str  # the kernel function's name
    module: str  # module holding the TritonKernel
    attr: str  # its name there
    dtype: str  # activation dtype of the run that made this launch
    signature: tuple[tuple[str, str], ...]  # (param, triton type or "constexpr"), in order
    constexprs: tuple[tuple[str, object], ...]  # the launcher's constexprs (block sizes come from configs)
    variants: tuple[str, ...]  # model variants that make this launch

    @property
    def problem(self) -> str:
        """The launch's constexprs, short: ints as NAME=value, True flags by name."""
        parts = []
        for name, value in self.constexprs:
            if isinstance(value, bool):
                if value:
                    parts.append(name)
            elif isinstance(value, int):
                parts.append(f"{name}={value}")
        return " ".join(parts)


_TORCH_TO_TRITON = {
    "float16": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32",
    "uint8": "u8",
    "int8": "i8",
    "int32": "i32",
    "int64": "i64",
}


def kernel_objects() -> dict[tuple[str, str], TritonKernel]:
    """Every TritonKernel defined in a module of m2ort_fast.kernels: {(module, attribute): kernel}."""
    import pkgutil

    import m2ort_fast.kernels as package
    from m2ort_fast.kernels.runtime import TritonKernel

    found = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in _NOT_KERNEL_MODULES:
            continue
        name = f"{package.__name__}.{info.name}"
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, TritonKernel) and value.fn.__module__ == name:
                found[(name, attr)] = value
    return found


def record_launches(variants: Sequence[str] | None = None, dtypes: Sequence[str] = DTYPES) -> list[Launch]:
    """Every distinct kernel launch the launchers make, recorded with TritonKernel.launch replaced
    (nothing is compiled or run), on ``meta`` tensors:

    * the ITMM and ICMM blocks (row_stats, attention, fused_linear) of each model variant, in each
      activation dtype;
    * the device data path's patch assembly (kernels/assemble.py; uint8 pixels in, fp32 out: dtype
      "u8") for each model input size, as a copy (read size = input size), as the first input read
      from a level twice as fine, and as the coarser inputs derived from the first (2x and 4x)."""
    from unittest import mock

    from m2ort_fast.kernels.runtime import TritonKernel

    names = {id(k): key for key, k in kernel_objects().items()}
    calls: list[tuple[object, tuple, dict]] = []

    def recorder(self, grid, *args, **kwargs):
        calls.append((self, args, kwargs))

    found: dict[tuple, Launch] = {}

    def record(dtype: str, label: str) -> None:
        for kernel, args, kwargs in calls:
            module, attr = names[id(kernel)]
            launch = _launch(kernel, module, attr, dtype, args, kwargs, label)
            key = (launch.module, launch.attr, launch.dtype, launch.signature, launch.constexprs)
            if key in found:  # the same launch again (row_stats: ITMM and ICMM), or from another variant
                seen = found[key].variants
                launch = dataclasses.replace(found[key], variants=seen + (label,) * (label not in seen))
            found[key] = launch
        calls.clear()

    with mock.patch.object(TritonKernel, "launch", recorder):
        for label, run in _block_launchers(variants, dtypes) + _assemble_launchers():
            dtype = run()
            record(dtype, label)
    return list(found.values())


def _block_launchers(variants: Sequence[str] | None, dtypes: Sequence[str]) -> list[tuple[str, Callable[[], str]]]:
    """(variant, run) for ITMM + ICMM of each variant in each dtype; run() returns the dtype."""
    import torch

    from m2ort_fast.kernels.icmm import ICMMWeights, icmm
    from m2ort_fast.kernels.itmm import ITMMWeights, itmm
    from m2ort_fast.model import NUM_TOKENS, VARIANTS, Block

    def launcher(variant: str, dtype_name: str) -> Callable[[], str]:
        def run() -> str:
            dtype = getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype_name])
            with torch.device("meta"):
                block = Block(VARIANTS[variant]).to(dtype)
                x = torch.empty(2, NUM_TOKENS + 1, VARIANTS[variant].dim, dtype=dtype)
            icmm(itmm(x, ITMMWeights.from_module(block.itmm)), ICMMWeights.from_module(block.icmm))
            return dtype_name

        return run

    return [(v, launcher(v, d)) for v in variants or list(VARIANTS) for d in dtypes]


def _assemble_launchers() -> list[tuple[str, Callable[[], str]]]:
    """(read->size, run) for the patch assembly kernel at the model's input sizes."""
    import torch

    from m2ort_fast.kernels.assemble import assemble
    from m2ort_fast.model import IMAGE_SIZES_PX

    first = IMAGE_SIZES_PX[0]
    pairs = [(s, s) for s in IMAGE_SIZES_PX] + [(2 * first, first)] + [(first, s) for s in IMAGE_SIZES_PX[1:]]

    def launcher(read_px: int, size_px: int) -> Callable[[], str]:
        def run() -> str:
            with torch.device("meta"):
                region = torch.empty(2 * read_px, 2 * read_px, 3, dtype=torch.uint8)
                origins = torch.empty(4, 2, dtype=torch.int64)
                table = torch.empty(3, 256, dtype=torch.float32)
            assemble(region, origins, read_px, size_px, table)
            return "u8"

        return run

    return [(f"{r}->{s}px", launcher(r, s)) for r, s in pairs]


def _jit(fn):
    """The compiler's JITFunction of ``fn``, also when TRITON_INTERPRET=1 (where triton.jit would
    return an InterpretedFunction, which triton.compile cannot take)."""
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


def _launch(kernel, module: str, attr: str, dtype: str, args: tuple, kwargs: dict, variant: str) -> Launch:
    jitted = _jit(kernel.fn)
    values = dict(zip(jitted.arg_names, args, strict=False)) | kwargs
    signature, constexprs = [], []
    for param in jitted.params:
        if param.is_constexpr:
            signature.append((param.name, "constexpr"))
            if param.name in values:
                constexprs.append((param.name, values[param.name]))
            continue
        value = values[param.name]
        if hasattr(value, "dtype") and hasattr(value, "data_ptr"):
            kind = "*" + _TORCH_TO_TRITON[str(value.dtype).removeprefix("torch.")]
        elif isinstance(value, bool):
            kind = "i1"
        elif isinstance(value, int):
            kind = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            kind = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {param.name} of type {type(value).__name__}")
        signature.append((param.name, kind))
    return Launch(kernel.fn.__name__, module, attr, dtype, tuple(signature), tuple(constexprs), (variant,))


# --------------------------------------------------------------------------- compiling


@dataclasses.dataclass(frozen=True)
class Row:
    kernel: str
    problem: str
    variants: str
    config: str
    target: str
    dtype: str
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame per thread
    shared: int  # bytes of shared memory per block
    shared_limit: int
    wgmma_serialized: bool  # ptxas: "wgmma.mma_async instructions are serialized" (sm_90 performance)
    error: str = ""
    failed: bool = False  # set by judge(): not ok, and the check does not tolerate it
    seconds: float = 0.0  # compile time (Triton's cache and ours make a rerun ~0)

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def ok(self) -> bool:
        return not self.error and self.spills == 0 and self.shared <= self.shared_limit

    def why_not_ok(self) -> str:
        if self.error:
            return self.error
        reasons = []
        if self.spills:
            reasons.append(f"spills {self.spill_stores} B stores / {self.spill_loads} B loads")
        if self.shared > self.shared_limit:
            reasons.append(f"shared {self.shared} B > {self.shared_limit} B")
        return ", ".join(reasons)


def config_label(config) -> str:
    blocks = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in config.kwargs.items())
    extra = f" maxnreg={config.maxnreg}" if getattr(config, "maxnreg", None) else ""
    return f"{blocks} w{config.num_warps} s{config.num_stages}{extra}"


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict:
    """registers, stack, spill_stores, spill_loads, wgmma_serialized from ``ptxas -v`` output (one kernel)."""
    registers = _REGISTERS.search(log)
    spills = _SPILLS.search(log)
    if registers is None or spills is None:
        raise ValueError(f"no resource usage in the ptxas log: {log[-500:]!r}")
    return {
        "registers": int(registers.group(1)),
        "stack": int(spills.group(1)),
        "spill_stores": int(spills.group(2)),
        "spill_loads": int(spills.group(3)),
        "wgmma_serialized": "wgmma.mma_async instructions are serialized" in log,
    }


def _rerun_ptxas(ptx: str, arch: int, options) -> str:
    """ptxas -v on the PTX with the flags Triton's make_cubin uses; returns its log."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2"]
        if not options.enable_fp_fusion:
            cmd.append("--fmad=false")
        if options.ptx_options:
            cmd += options.ptx_options.split(" ")
        cmd += [f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


_USAGE_FILE = "m2ort_compile_report.json"
_JITTED: dict[tuple[str, str], Any] = {}  # (module, attribute) -> _jit(kernel.fn)


def _compile_one(job: tuple) -> dict:
    """Worker: compile one (launch, config, target); returns the measurements or an error."""
    module, attr, signature, constexprs, options, arch = job
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.cache import get_cache_manager

    if (module, attr) not in _JITTED:
        kernel = getattr(importlib.import_module(module), attr)
        _JITTED[(module, attr)] = _jit(kernel.fn)
    fn = _JITTED[(module, attr)]
    signature = dict(signature)
    # Pointers are 16-byte aligned (torch's allocations), as the JIT would specialise them.
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t.startswith("*")}
    source = ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs), attrs=attrs)
    start = time.perf_counter()
    log = io.StringIO()
    previous = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas' -v log when it runs ptxas
    try:
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(options))
        finally:
            knobs.nvidia.dump_ptxas_log = previous
        # The measurements are kept beside the kernel in Triton's cache (same key: source,
        # constexprs, options, target, ptxas version), so a rerun reads them back.
        cache = get_cache_manager(compiled.hash)
        saved = cache.get_file(_USAGE_FILE)
        if saved is not None:
            with open(saved) as f:
                return json.load(f) | {"seconds": time.perf_counter() - start}
        text = log.getvalue()
        if "Used " not in text:  # Triton's cache answered: run the same ptxas on the cached PTX
            backend = triton.compiler.compiler.make_backend(compiled.metadata.target)
            text = _rerun_ptxas(compiled.asm["ptx"], arch, backend.parse_options(dict(options)))
        usage = {"shared": int(compiled.metadata.shared), **parse_ptxas_log(text)}
        cache.put(json.dumps(usage), _USAGE_FILE, binary=False)
        return usage | {"seconds": time.perf_counter() - start}
    except Exception as exc:  # recorded as a failing row, with the first line of the error
        message = str(exc).strip().splitlines()
        return {"error": f"{type(exc).__name__}: {message[0] if message else ''}"[:300]}


def sweep(
    variants: Sequence[str] | None = None,
    dtypes: Sequence[str] = DTYPES,
    targets: Sequence[str] = tuple(TARGETS),
    configs: dict[str, list] | None = None,
    kernels: Sequence[str] | None = None,
    jobs: int | None = None,
) -> list[Row]:
    """Compile every recorded launch x config x target; one Row each.

    configs: {kernel function name: [triton.Config, ...]} in place of the kernels' own lists
    (for a kernel named there; the others keep theirs). kernels: only these kernel functions.
    jobs > 1 (default: the CPU count) compiles in spawned processes: a script calling this needs
    the ``if __name__ == "__main__":`` guard. The rows come back judged (``failed`` set)."""
    launches = [x for x in record_launches(variants, dtypes) if kernels is None or x.kernel in kernels]
    objects = kernel_objects()
    work: list[tuple[Launch, Any, str]] = []  # (launch, triton.Config, target)
    for launch in launches:
        kernel = objects[(launch.module, launch.attr)]
        kernel_configs = (configs or {}).get(launch.kernel)
        for config in kernel_configs if kernel_configs is not None else kernel.configs():
            for target in targets:
                work.append((launch, config, target))
    job_args = [
        (
            launch.module,
            launch.attr,
            launch.signature,
            launch.constexprs + tuple(config.kwargs.items()),
            _options(config),
            TARGETS[target][0],
        )
        for launch, config, target in work
    ]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        results = [_compile_one(job) for job in job_args]
    else:
        import multiprocessing

        # spawn: a fresh interpreter per worker (the caller may hold torch's threads and locks)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_compile_one, job_args, chunksize=4))
    rows = []
    for (launch, config, target), result in zip(work, results, strict=True):
        rows.append(
            Row(
                kernel=launch.kernel,
                problem=launch.problem,
                variants=",".join(launch.variants),
                config=config_label(config),
                target=target,
                dtype=launch.dtype,
                registers=result.get("registers", 0),
                spill_stores=result.get("spill_stores", 0),
                spill_loads=result.get("spill_loads", 0),
                stack=result.get("stack", 0),
                shared=result.get("shared", 0),
                shared_limit=TARGETS[target][1],
                wgmma_serialized=result.get("wgmma_serialized", False),
                error=result.get("error", ""),
                seconds=result.get("seconds", 0.0),
            )
        )
    return judge(rows)


def _options(config) -> tuple[tuple[str, object], ...]:
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if getattr(config, "num_ctas", 1) != 1:
        options["num_ctas"] = config.num_ctas
    if getattr(config, "maxnreg", None):
        options["maxnreg"] = config.maxnreg
    return tuple(options.items())


# --------------------------------------------------------------------------- reporting


def judge(rows: Iterable[Row]) -> list[Row]:
    """The rows with ``failed`` set by the check.

    fp16 and bf16 (what the backends run on a GPU; the configs are tuned for them) and the uint8
    assembly kernel: every row that is not ok fails. fp32 (:data:`TOLERANT_DTYPES`; IEEE products:
    FMA instructions, no tensor cores) shares the configs but holds twice the bytes per tile in
    registers, so the 16-bit tiles spill there; a spilling fp32 config is only slow, and the
    autotuner times it. There a row fails only when no config of its kernel is ok for that problem
    and target (all of that group's rows fail)."""
    rows = list(rows)
    covered = {(r.kernel, r.problem, r.target, r.dtype) for r in rows if r.ok}
    return [
        dataclasses.replace(
            r,
            failed=not r.ok
            and (r.dtype not in TOLERANT_DTYPES or (r.kernel, r.problem, r.target, r.dtype) not in covered),
        )
        for r in rows
    ]


def failures(rows: Iterable[Row]) -> list[Row]:
    """The rows that fail the check (see :func:`judge`)."""
    return [r for r in judge(rows) if r.failed]


def worst_per_config(rows: Iterable[Row]) -> list[Row]:
    """One row per (kernel, config, target, dtype): the worst over the problem sizes (most spills,
    then most registers; the largest shared memory; failed if any of them failed)."""
    groups: dict[tuple, list[Row]] = {}
    for row in judge(rows):
        groups.setdefault((row.kernel, row.config, row.target, row.dtype), []).append(row)
    out = []
    for group in groups.values():
        worst = max(group, key=lambda r: (bool(r.error), r.spills, r.registers))
        out.append(
            dataclasses.replace(
                worst,
                problem=f"{len(group)} sizes",
                variants=",".join(dict.fromkeys(v for r in group for v in r.variants.split(","))),
                shared=max(r.shared for r in group),
                wgmma_serialized=any(r.wgmma_serialized for r in group),
                error=next((r.error for r in group if r.error), ""),
                failed=any(r.failed for r in group),
            )
        )
    return out


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a text table; pass judged rows (judge(), failures(), worst_per_config())."""
    header = ("kernel", "problem", "config", "target", "dtype", "regs", "spill B", "shared B", "limit B", "ok")
    body = [
        (
            r.kernel.strip("_").removesuffix("_kernel"),
            r.problem,
            r.config,
            r.target,
            r.dtype,
            str(r.registers),
            f"{r.spill_stores}/{r.spill_loads}",
            str(r.shared),
            str(r.shared_limit),
            ("ok" if r.ok else ("FAIL: " if r.failed else "tolerated (fp32): ") + r.why_not_ok())
            + ("; ptxas: wgmma serialized" if r.wgmma_serialized else ""),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]
    )


def summary(rows: Sequence[Row]) -> str:
    """Per kernel: configs, compiles, configs that spill or overflow (fp16/bf16 and fp32 apart),
    the most registers and shared memory; then the count of failing rows."""
    lines = []
    for kernel in dict.fromkeys(r.kernel for r in rows):
        mine = [r for r in rows if r.kernel == kernel]
        parts = [f"{kernel}: {len({r.config for r in mine})} configs, {len(mine)} compiles"]
        strict = ",".join(dict.fromkeys(r.dtype for r in mine if r.dtype not in TOLERANT_DTYPES))
        for label, in_group in ((strict, lambda d: d not in TOLERANT_DTYPES), ("fp32", lambda d: d in TOLERANT_DTYPES)):
            some = [r for r in mine if in_group(r.dtype)]
            if some:
                spilling = len({r.config for r in some if r.spills})
                over = len({r.config for r in some if r.shared > r.shared_limit})
                parts.append(f"{label}: {spilling} configs spill, {over} over shared memory")
        shared = ", ".join(
            f"{t} {max(r.shared for r in mine if r.target == t)} B" for t in dict.fromkeys(r.target for r in mine)
        )
        parts.append(f"max registers {max(r.registers for r in mine)}, max shared {shared}")
        parts.append(f"compile time {sum(r.seconds for r in mine):.0f} s")
        lines.append("; ".join(parts))
    lines.append(f"{len(rows)} compiles, {sum(not r.ok for r in rows)} not ok, {len(failures(rows))} failing the check")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/compile_report.py", description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write every row to this JSON file")
    parser.add_argument("--all", action="store_true", help="print every row (default: worst case per config)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: the CPU count)")
    parser.add_argument("--variants", default=None, help="comma-separated model variants (default: all)")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--targets", default=",".join(TARGETS))
    args = parser.parse_args(argv)
    why = missing_toolchain()
    if why:
        print(f"compile_report: skipped: {why}", file=sys.stderr)
        return 0
    start = time.perf_counter()
    rows = sweep(
        variants=args.variants.split(",") if args.variants else None,
        dtypes=args.dtypes.split(","),
        targets=args.targets.split(","),
        jobs=args.jobs,
    )
    seconds = time.perf_counter() - start
    print(format_table(judge(rows) if args.all else worst_per_config(rows)))
    print(summary(rows))
    print(f"compile_report: {len(rows)} compiles in {seconds:.0f} s ({args.jobs or os.cpu_count()} processes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) | {"ok": r.ok} for r in judge(rows)], f, indent=1)
    return 1 if failures(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
