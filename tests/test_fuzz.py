"""The fuzz target's contract, replayed without atheris: the seeds and fixed mutations of them
(truncations, byte flips, spliced garbage) parse or raise M2ORTError, nothing else. CI also runs
the target under atheris for a bounded time (.ci/run)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
from fuzz_inputs import TARGETS, one_input, seed_inputs  # noqa: E402


def mutations(data: bytes, rng: np.random.Generator, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        kind = rng.integers(4)
        body = bytearray(data[1:])
        if kind == 0 and body:  # cut short
            body = body[: rng.integers(len(body))]
        elif kind == 1 and body:  # flip bytes
            for i in rng.integers(0, len(body), 1 + rng.integers(8)):
                body[i] = rng.integers(256)
        elif kind == 2:  # splice garbage in
            at = rng.integers(len(body) + 1)
            body[at:at] = rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8).tobytes()
        else:  # overwrite a run with a value TIFF offsets and counts like to hold
            if body:
                at = rng.integers(len(body))
                body[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x08\x00\x00\x00"])
        out.append(data[:1] + bytes(body))
    return out


def test_seeds_cover_every_target():
    chosen = {data[0] for data in seed_inputs()}
    assert chosen == set(range(len(TARGETS)))


@pytest.mark.parametrize("seed", range(len(seed_inputs())))
def test_seed_and_its_mutations_parse_or_fail_in_one_line(seed):
    data = seed_inputs()[seed]
    one_input(data)
    for mutated in mutations(data, np.random.default_rng(seed), 150):
        one_input(mutated)


def test_the_contract_can_fail(monkeypatch):
    """A parser bug (any exception but M2ORTError) escapes one_input: the harness would see it."""
    from m2ort_fast import spots

    def broken(path, format):
        raise IndexError("a bug")

    monkeypatch.setattr(spots, "load_spots", broken)
    with pytest.raises(IndexError):
        one_input(bytes([0]) + b"id,x,y\n")


@pytest.mark.parametrize("crash", sorted((Path(__file__).parent / "fuzz" / "crashes").iterdir()), ids=lambda p: p.name)
def test_inputs_the_fuzzer_once_crashed_on(crash):
    """Each file under fuzz/crashes/ is an input (target byte first) that once escaped the contract."""
    one_input(crash.read_bytes())


def test_every_short_prefix_of_a_tiff():
    """Headers cut anywhere in their first bytes (where struct unpacking reads past the end)."""
    tiffs = [data for data in seed_inputs() if TARGETS[data[0]][1] is None]
    for data in tiffs:
        for n in range(0, 40):
            one_input(data[: 1 + n])
