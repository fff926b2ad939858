"""Where and how the Triton kernels run: compiled and autotuned on a CUDA GPU, or in Triton's CPU
interpreter when ``TRITON_INTERPRET=1``.

``triton.jit`` decides between the compiler and the interpreter when it decorates a function, i.e.
when the defining module is imported. Test modules, the CLI and other imports may load triton (and
these modules) before anyone sets ``TRITON_INTERPRET``, so the kernels here are plain functions
wrapped in :class:`TritonKernel`, which applies ``triton.jit`` at the first launch, in the mode the
environment asks for *at that moment* (and keeps one build per mode).

In the interpreter the kernels run with one fixed, large-tile configuration (each program is a
numpy evaluation, so fewer, bigger programs are faster); on a GPU they are autotuned over configs
chosen for Hopper (H100/H200), keyed on the problem sizes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

import torch

from m2ort_fast.errors import M2ORTError

try:
    import triton
    import triton.language as tl
except ImportError:  # the triton backend reports this; importing the module must still work
    triton = None
    tl = None

_TRUE = ("1", "true", "on", "yes")


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is asked for (TRITON_INTERPRET=1), read now."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def check_can_run(device: torch.device, dtype: torch.dtype) -> None:
    """Raise M2ORTError (one line) when the kernels cannot run on ``device`` in ``dtype``."""
    if triton is None:
        raise M2ORTError("the triton backend needs the 'triton' package (pip install 'm2ort-fast[triton]')")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise M2ORTError(f"device {device} asked for, but this machine has no CUDA GPU")
        return
    if device.type != "cpu":
        raise M2ORTError(f"the triton backend runs on a CUDA GPU (or the CPU interpreter), not on {device}")
    if not interpreter_enabled():
        raise M2ORTError(
            "Triton kernels need a CUDA GPU; on the CPU they run only in Triton's interpreter "
            "(set TRITON_INTERPRET=1; slow, for testing) - or use --backend torch"
        )
    if dtype == torch.bfloat16:
        raise M2ORTError("bf16 matrix products are wrong in Triton's CPU interpreter; use precision fp32 (or fp16)")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 (the GPU default would be TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def size_class(m: int) -> int:
    """Autotuning bucket of a row count (B*T): small (< 8k rows, about 40 spots), medium (< 32k),
    large. Tiles are tuned once per bucket, not for every batch size a run ends with.

    Integer arithmetic, no comparison: under torch.export ``m`` is symbolic (dynamic batch) and
    a branch on it would specialise the exported program to one bucket."""
    return torch.sym_min(m // 8192, 1) + torch.sym_min(m // 32768, 1)


class TritonKernel:
    """A Triton kernel, jitted at its first launch in the mode TRITON_INTERPRET asks for then.

    fn: the undecorated kernel function (it must not call other @triton.jit functions).
    configs: ``triton.Config`` list for the GPU autotuner (built lazily: a callable returning it).
    key: argument names the autotuner keys on.
    interpreter_meta: callable(kwargs) -> dict of the constexpr block sizes used in the interpreter.
    """

    def __init__(
        self, fn: Callable, *, configs: Callable[[], list], key: list[str], interpreter_meta: Callable[[dict], dict]
    ):
        self.fn = fn
        self.configs = configs
        self.key = key
        self.interpreter_meta = interpreter_meta
        self._builds: dict[bool, object] = {}

    def _build(self, interpret: bool):
        if interpret not in self._builds:
            if triton is None:
                raise M2ORTError("the triton backend needs the 'triton' package (pip install 'm2ort-fast[triton]')")
            # triton.jit reads TRITON_INTERPRET now and returns an InterpretedFunction or a JITFunction.
            jitted = triton.jit(self.fn)
            if not interpret:
                jitted = triton.autotune(configs=self.configs(), key=self.key)(jitted)
            self._builds[interpret] = jitted
        return self._builds[interpret]

    def launch(self, grid: Callable[[dict], tuple], *args, **kwargs) -> None:
        """Launch over ``grid(meta)``; ``meta`` holds the chosen block sizes."""
        interpret = interpreter_enabled()
        kernel = self._build(interpret)
        if interpret:
            meta = self.interpreter_meta(kwargs)
            with _interpretable_triton_language():
                kernel[grid(meta)](*args, **kwargs, **meta)
        else:
            # wrap_triton: a plain launch in eager mode; under torch.export / torch.compile (the
            # custom ops of .ops) it records the kernel so that Inductor embeds it in its output.
            torch.library.wrap_triton(kernel)[grid](*args, **kwargs)

    def best_config(self):
        """The autotuner's choice for the last launched key (GPU only), for reports."""
        build = self._builds.get(False)
        return getattr(build, "best_config", None)


_INTERPRETED_HELPERS: dict[int, object] = {}


@contextlib.contextmanager
def _interpretable_triton_language():
    """Make triton.language's own @jit helpers (tl.sum, tl.max, tl.cdiv, their combine
    functions...) callable by the interpreter for the duration of a launch.

    Those helpers were decorated when triton was first imported; if TRITON_INTERPRET was unset
    then (the CLI, torch.compile or another test imported triton first), they are compiled-mode
    JITFunctions, which the interpreter refuses to call. They are swapped for interpreted
    versions of the same Python functions and put back afterwards.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    swaps = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                if id(value) not in _INTERPRETED_HELPERS:
                    _INTERPRETED_HELPERS[id(value)] = (value, InterpretedFunction(value.fn))
                swaps.append((module, attr, value))
    for module, attr, value in swaps:
        setattr(module, attr, _INTERPRETED_HELPERS[id(value)][1])
    try:
        yield
    finally:
        for module, attr, value in swaps:
            setattr(module, attr, value)


def gpu_configs(space: list[dict], num_warps: list[int], num_stages: list[int], keep=None) -> list:
    """Cartesian product of block-size dicts and (num_warps, num_stages), optionally filtered."""
    configs = []
    for meta in space:
        for warps in num_warps:
            for stages in num_stages:
                if keep is None or keep(meta, warps, stages):
                    configs.append(triton.Config(dict(meta), num_warps=warps, num_stages=stages))
    return configs
