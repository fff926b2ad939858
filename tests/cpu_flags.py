"""The CPU's feature flags as /proc/cpuinfo lists them: what the extension's kernel lists
(``_core.*_kernels()``) are checked against."""

from __future__ import annotations

from pathlib import Path


def cpu_flags() -> set[str] | None:
    """The first CPU's flags, or None where there is no /proc/cpuinfo to read them from."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return None
