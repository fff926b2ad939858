"""An AOTInductor package called with the GIL released, on the CPU.

torch's runner (``torch._inductor.aoti_load_package``) holds the GIL for the whole call, so while
the model runs, the streamed engine's reader and assembler threads stop at their next line of
Python. ``aoti_runner.cpp`` calls the same ``AOTIModelPackageLoader`` with the GIL released; it is
built by ``torch.utils.cpp_extension`` on first use (~25 s on 2 cores, once per torch version;
the ``aoti`` backend needs the same C++ toolchain to compile its packages) and cached where torch
keeps its extensions. Where it cannot be built, torch's runner is used and a warning says why.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("aoti_runner.cpp")


@functools.cache
def runner_module():
    """The built extension module, or None (warned once) where it cannot be built."""
    from torch.utils.cpp_extension import load

    name = "m2ort_aoti_runner_" + re.sub(r"\W", "_", torch.__version__)
    try:
        return load(name=name, sources=[str(SOURCE)], extra_cflags=["-O2"], verbose=False)
    except (RuntimeError, OSError, ImportError) as exc:  # no compiler, headers or write access
        log.warning("aoti: cannot build the GIL-free runner (%s); using torch's", str(exc).splitlines()[0])
        return None


class GilFreeRunner:
    """runner(*inputs) -> the package's output, like torch's runner, with the GIL released."""

    def __init__(self, module, path: str | os.PathLike):
        self.package = module.PackageRunner(str(path), -1, 1)

    def __call__(self, *inputs: torch.Tensor):
        outputs = self.package.run(list(inputs))
        return outputs[0] if len(outputs) == 1 else outputs

    def get_metadata(self) -> dict[str, str]:
        return self.package.metadata()


def gil_free_runner(path: str | os.PathLike) -> GilFreeRunner | None:
    """A CPU package's GIL-free runner, or None where the extension cannot be built."""
    module = runner_module()
    return GilFreeRunner(module, path) if module is not None else None
