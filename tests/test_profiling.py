"""StageTimer: wall time and call counts per stage, each stage an NVTX range of its name."""

from __future__ import annotations

import contextlib
import time

import pytest

from m2ort_fast import profiling
from m2ort_fast.profiling import NVTX_DOMAIN, StageTimer


def test_stages_accumulate_time_and_calls():
    timer = StageTimer()
    for _ in range(3):
        with timer.stage("read"):
            time.sleep(0.01)
    with timer.stage("model"):
        pass
    assert timer.calls == {"read": 3, "model": 1}
    assert timer.seconds["read"] >= 0.03
    assert 0 <= timer.seconds["model"] < timer.seconds["read"]


def test_a_failing_stage_still_counts():
    timer = StageTimer()
    with pytest.raises(ValueError), timer.stage("write"):
        time.sleep(0.01)
        raise ValueError("disk full")
    assert timer.calls["write"] == 1 and timer.seconds["write"] >= 0.01


def test_merge_summary_and_format():
    a, b = StageTimer(), StageTimer()
    a.seconds.update(read=1.0, model=3.0)
    a.calls.update(read=2, model=1)
    b.seconds.update(model=2.0, write=0.123456)
    b.calls.update(model=4, write=1)
    a.merge(b)
    assert a.calls == {"read": 2, "model": 5, "write": 1}
    assert a.summary() == {"read": 1.0, "model": 5.0, "write": 0.1235}
    assert a.format() == "read 1.00 s (16%), model 5.00 s (82%), write 0.12 s (2%)"
    assert StageTimer().format() == ""


def test_each_stage_is_an_nvtx_range_of_its_name(monkeypatch):
    opened = []

    class FakeNvtx:
        @staticmethod
        def annotate(message, domain):
            opened.append((message, domain))
            return contextlib.nullcontext()

    monkeypatch.setattr(profiling, "nvtx", FakeNvtx)
    timer = StageTimer()
    with timer.stage("decode"), timer.stage("assemble"):
        pass
    assert opened == [("decode", NVTX_DOMAIN), ("assemble", NVTX_DOMAIN)]


def test_without_nvtx_the_timer_still_works(monkeypatch):
    monkeypatch.setattr(profiling, "nvtx", None)
    timer = StageTimer()
    with timer.stage("model"):
        pass
    assert timer.calls["model"] == 1
