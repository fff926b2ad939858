"""Shards (job arrays: Slurm, PBS, LSF) and the order slides are handed out in: largest first."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from m2ort_fast.errors import M2ORTError

log = logging.getLogger(__name__)


def slide_size(path: str | os.PathLike) -> int:
    """The slide file's size in bytes (0 when it cannot be read: its worker will say why)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def shard_members(slides: Sequence[str], sizes: Sequence[int], count: int) -> list[list[int]]:
    """Positions of ``slides`` in each of ``count`` shards, balanced by size: largest first (ties by
    path), each to the shard with the fewest bytes so far (ties: the lower shard). The shards
    partition the list, and the split depends only on the paths and sizes, not on the list's order,
    so every task of an array computes the same one. Within a shard: largest first."""
    if count < 1:
        raise M2ORTError(f"the shard count must be at least 1, got {count}")
    loads, members = [0] * count, [[] for _ in range(count)]  # type: list[int], list[list[int]]
    for position in sorted(range(len(slides)), key=lambda p: (-sizes[p], str(slides[p]), p)):
        shard = min(range(count), key=lambda s: (loads[s], s))
        members[shard].append(position)
        loads[shard] += sizes[position]
    return members


def parse_shard(text: str) -> tuple[int, int]:
    """ "I/N" -> (I, N), 0 <= I < N (I: the task's index from 0, e.g. $SLURM_ARRAY_TASK_ID)."""
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise M2ORTError(f"shard {text!r} is not I/N (e.g. 0/8: the first of 8 shards, I from 0)") from None
    if not 0 <= i < n:
        raise M2ORTError(f"shard {text!r}: I must be at least 0 and less than N (I counts from 0)")
    return i, n
