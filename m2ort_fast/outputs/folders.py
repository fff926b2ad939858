"""The output folder and its errors: every failed write as one line naming the path."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path

from m2ort_fast.errors import M2ORTError, OutputError, exception_detail

# Below this much free space, a write that failed in a library's own way is reported as a full disk.
DISK_FULL_BYTES = 16 * 2**20


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """OutputError (one line) when ``out_dir`` names something that is not a folder; checked
    before any work, so a wrong ``--out`` costs nothing."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("exists and is not a folder (the output must be a folder)", out_dir)
    return out_dir


def ensure_out_dir(out_dir: str | os.PathLike) -> Path:
    """The output folder, created if needed; OutputError (one line) when it cannot be."""
    out_dir = check_out_dir(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, out_dir) from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError("the output folder is not writable", out_dir)
    return out_dir


def output_error(exc: BaseException, path: str | os.PathLike) -> OutputError:
    """A failed write as one line naming the path (the file the OS names, else ``path``)."""
    code = exc.errno if isinstance(exc, OSError) else _errno_in_message(exc)
    where = (exc.filename if isinstance(exc, OSError) else None) or path
    if code == errno.ENOSPC:
        reason = "no space left on the device"
    elif code == errno.EFBIG:
        reason = "file too large for this filesystem or the process's file size limit"
    elif code:
        reason = os.strerror(code)
    else:
        reason = exception_detail(exc)
    return OutputError(f"cannot write: {reason}", where)


def _errno_in_message(exc: BaseException) -> int | None:
    """The OS error number a library put in its own exception's text (h5py: "errno = 27")."""
    match = re.search(r"errno\s*=\s*(\d+)", str(exc))
    return int(match.group(1)) if match else None


def _disk_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < DISK_FULL_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def output_errors(path: str | os.PathLike):
    """OS errors of the writes inside become one-line OutputErrors naming ``path``, also where a
    library wraps them in its own type (h5py: ``RuntimeError: ... errno = 27``), and so does any
    failure on a full disk (PIL's PNG writer once answered one with ``'_idat' object has no
    attribute 'fileno'``)."""
    try:
        yield
    except M2ORTError:
        raise
    except OSError as exc:
        raise output_error(exc, path) from None
    except Exception as exc:
        if _errno_in_message(exc):
            raise output_error(exc, path) from None
        if _disk_full(Path(path)):
            raise OutputError("cannot write: no space left on the device", path) from None
        raise
