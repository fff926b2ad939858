"""Which slide readers' libraries are installed here: tests use those and skip the others with
the reason (cuCIM has no wheels for some platforms; the README calls it optional)."""

from __future__ import annotations

import importlib

import pytest

_READER_MODULES = {"cucim": "cucim", "tiffslide": "tiffslide", "openslide": "openslide", "flat": "PIL"}


def _reader_missing(reader: str) -> str | None:
    """Why ``reader``'s library cannot be imported here, or None when it can."""
    try:
        importlib.import_module(_READER_MODULES[reader])
    except ImportError as exc:
        return f"the {reader} reader is not installed here ({exc})"
    return None


def reader_installed(reader: str) -> bool:
    return _reader_missing(reader) is None


def installed_readers(*readers: str) -> list:
    """``readers`` as pytest parameters, those whose library is not installed skipped with the reason."""
    return [
        reader
        if _reader_missing(reader) is None
        else pytest.param(reader, marks=pytest.mark.skip(reason=_reader_missing(reader)))
        for reader in readers
    ]
