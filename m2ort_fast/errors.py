"""User-facing errors.

Every problem with a user's input (slide, spots, checkpoint, options) is raised as
:class:`M2ORTError` with a one-line message that names the file and the problem; the CLI prints
that line and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

import os


class M2ORTError(Exception):
    """A problem with the user's input, reported as one line."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        message = " ".join(str(message).split())  # always one line
        if path is not None:
            message = f"{os.fspath(path)}: {message}"
        super().__init__(message)


def exception_detail(exc: BaseException, limit: int | None = 200) -> str:
    """A library exception as one line for our messages (its type name when it has no text), at
    most ``limit`` characters (None: whole), cut between words with "..." when it is longer."""
    text = " ".join(str(exc).split())
    if limit is not None and len(text) > limit:
        text = text[: text.rfind(" ", 0, limit - 3) if " " in text[: limit - 3] else limit - 3] + " ..."
    return text or type(exc).__name__


class SlideError(M2ORTError):
    """The slide cannot be opened or read as needed (not a slide, truncated, missing level...)."""


class SpotsError(M2ORTError):
    """The spot table is unreadable, empty, or its spots fall outside the slide or tissue."""


class CheckpointError(M2ORTError):
    """The checkpoint is unreadable or does not match the model or gene panel asked for."""


class OutputError(M2ORTError):
    """An output cannot be written: the folder is read-only, a file, full, or locked by another run."""
