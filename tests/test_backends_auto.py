"""The `auto` backend: how it decides (rounds, noise, precision, busy machine) on injected timings
and load, what it remembers, `m2ort-fast info --backends`, and one real measurement between torch
and onnxruntime on the tiny variant (aoti left out here: its compile is covered by test_export_aoti).
No test here checks wall-clock speed."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from m2ort_fast.backends import auto, backend_names, make_backend, register_backend, unregister_backend
from m2ort_fast.backends.timing import (
    LoadReading,
    RoundsPolicy,
    decide,
    faster_beyond_noise,
    rounds_disagree,
    run_rounds,
)
from m2ort_fast.checkpoint import ModelCard, load_checkpoint
from m2ort_fast.errors import M2ORTError
from m2ort_fast.model import IMAGE_SIZES_PX, build_model
from m2ort_fast.precision import BACKEND_PRECISIONS
from m2ort_fast.predict import DEFAULT_CHECKPOINT

# --- the decision on injected seconds -----------------------------------------------------------


def test_fastest_beyond_the_noise_is_picked():
    samples = {"a:fp32": [0.10, 0.11, 0.10, 0.12], "b:bf16": [0.05, 0.05, 0.06, 0.05]}
    pick = decide(samples, {"a:fp32": "fp32", "b:bf16": "bf16"}, floor=0.03)
    assert pick.name == "b:bf16" and pick.ranking == ("b:bf16", "a:fp32")
    assert "beyond the noise of the next (a:fp32)" in pick.why


def test_a_pick_within_the_noise_goes_to_the_higher_precision():
    # bf16 is 2% faster by the medians: inside the 3% floor
    samples = {"a:fp32": [0.100, 0.100, 0.100, 0.100], "b:bf16": [0.098, 0.098, 0.098, 0.098]}
    precisions = {"a:fp32": "fp32", "b:bf16": "bf16"}
    pick = decide(samples, precisions, floor=0.03)
    assert pick.name == "a:fp32" and pick.ranking[0] == "b:bf16" and "higher precision (fp32)" in pick.why
    # 10% faster, but the rounds swing by more than that: still within the noise
    swinging = {"a:fp32": [0.10, 0.14, 0.10, 0.14, 0.10, 0.14], "b:bf16": [0.12, 0.09, 0.12, 0.09, 0.12, 0.09]}
    assert not faster_beyond_noise(swinging["b:bf16"], swinging["a:fp32"], 0.03)
    assert decide(swinging, precisions, floor=0.03).name == "a:fp32"
    # the same 10% on steady rounds is signal
    steady = {"a:fp32": [0.11] * 4, "b:bf16": [0.10] * 4}
    assert decide(steady, precisions, floor=0.03).name == "b:bf16"


def test_a_near_tie_at_one_precision_goes_to_the_earlier_candidate_whichever_is_ahead():
    """torch bf16 and aoti bf16 within the noise swapped places between runs on a quiet machine
    (3 picks of one, 2 of the other in 5 runs): the earlier candidate wins every time."""
    precisions = {"torch:bf16": "bf16", "aoti:bf16": "bf16"}
    for ahead, behind in (("aoti:bf16", "torch:bf16"), ("torch:bf16", "aoti:bf16")):
        samples = {ahead: [0.098] * 4, behind: [0.100] * 4}
        pick = decide(samples, precisions, floor=0.03)
        assert pick.name == "torch:bf16" and pick.ranking[0] == ahead
    assert (
        "same precision, earlier candidate"
        in decide({"aoti:bf16": [0.098] * 4, "torch:bf16": [0.100] * 4}, precisions, floor=0.03).why
    )


def test_a_call_of_several_batches_at_once_is_timed_per_batch():
    """A candidate called as the host path calls it (two batches at once) is compared per batch."""
    clock, order = FakeClock(), []
    calls = {"one": scripted(clock, [0.10], order, "one"), "two": scripted(clock, [0.16], order, "two")}
    rounds = run_rounds(
        calls, {"one": "fp32", "two": "fp32"}, RoundsPolicy(min_rounds=3), clock=clock, batches_per_call={"two": 2}
    )
    assert rounds.pick.name == "two" and rounds.samples["two"][0] == pytest.approx(0.08)


def test_a_machine_wide_slowdown_cancels_in_the_paired_ratios():
    # every batch of round 3 took 5x longer (another job): b is still 20% faster in every round
    a = [0.12, 0.12, 0.60, 0.12, 0.12]
    b = [0.10, 0.10, 0.50, 0.10, 0.10]
    assert faster_beyond_noise(b, a, 0.03)
    assert rounds_disagree({"a": a, "b": b}, "b", 0.03, 2 / 3) is None


def test_rounds_that_disagree_are_named():
    a = [0.30, 0.30, 0.09, 0.09, 0.09, 0.30, 0.30]  # fast in 3 of 7 rounds, slow by the median
    b = [0.10, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10]
    assert faster_beyond_noise(b, a, 0.03)
    assert rounds_disagree({"a": a, "b": b}, "b", 0.03, 0.8) == (
        "rounds disagree: b is faster than a by the medians, yet won 57% of the rounds"
    )


def test_load_above_the_cores_is_busy():
    assert LoadReading(others_cores=0.1, steal_cores=0.0, cores=2, threads=2).busy() is None
    busy = LoadReading(others_cores=1.8, steal_cores=0.1, cores=2, threads=2).busy()
    assert busy and busy.startswith("load 3.90 cores above the 2 available")
    # one thread of ours leaves a core to the others
    assert LoadReading(others_cores=0.9, steal_cores=0.0, cores=2, threads=1).busy() is None


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class QuietLoad:
    """A ProcStatLoad stand-in: the reading is injected."""

    others_cores = 0.0

    def __init__(self, threads: int = 2):
        self.threads = threads

    def start(self) -> None:
        pass

    def stop(self) -> LoadReading:
        return LoadReading(self.others_cores, 0.0, 2, self.threads)


class BusyLoad(QuietLoad):
    others_cores = 1.5


def scripted(clock: FakeClock, seconds: list[float], order: list[str], name: str):
    """A call that takes seconds[i] on its i-th run (the last one repeated) and logs its name."""
    runs = iter(seconds + [seconds[-1]] * 1000)

    def call():
        order.append(name)
        clock.now += next(runs)

    return call


def test_rounds_stop_once_the_pick_is_stable_and_rotate_the_order():
    clock, order = FakeClock(), []
    calls = {"a": scripted(clock, [0.2], order, "a"), "b": scripted(clock, [0.1], order, "b")}
    policy = RoundsPolicy(min_rounds=3, stable_rounds=3)
    rounds = run_rounds(calls, {"a": "fp32", "b": "bf16"}, policy, clock=clock, load=QuietLoad())
    # a is out of the race after round 3 (its fastest batch slower than b's slowest); b alone: stable
    assert rounds.stable and rounds.stopped == "stable after 3 rounds" and rounds.pick.name == "b"
    assert rounds.left_race == {"a": 3} and rounds.remember and rounds.busy == []
    assert order == ["a", "b", "b", "a", "a", "b"]  # each round starts one further along


def test_close_candidates_are_timed_until_the_pick_repeats():
    clock, order = FakeClock(), []
    # b leads by 11% in two of the first three rounds (decided b), then by 1% (within the noise:
    # the decision goes to a from round 5, which must then hold for 3 rounds)
    calls = {
        "a": scripted(clock, [0.100], order, "a"),
        "b": scripted(clock, [0.090, 0.101, 0.090, 0.099], order, "b"),
    }
    rounds = run_rounds(calls, {"a": "fp32", "b": "bf16"}, RoundsPolicy(min_rounds=3), clock=clock, load=QuietLoad())
    assert rounds.stable and rounds.stopped == "stable after 7 rounds" and rounds.left_race == {}
    assert rounds.pick.name == "a" and rounds.pick.ranking[0] == "b" and "higher precision (fp32)" in rounds.pick.why


def test_a_budget_that_ends_first_is_said_and_not_remembered():
    clock, order = FakeClock(), []
    # rounds of ~0.23 s: the 0.5 s budget ends after 3, before 3 decisions could agree
    calls = {"a": scripted(clock, [0.10, 0.13, 0.10], order, "a"), "b": scripted(clock, [0.12, 0.11], order, "b")}
    policy = RoundsPolicy(min_rounds=3, stable_rounds=3, budget_s=0.5)
    rounds = run_rounds(calls, {"a": "fp32", "b": "fp32"}, policy, clock=clock, load=QuietLoad())
    assert not rounds.stable and not rounds.remember and rounds.pick.name == "a"
    assert rounds.stopped == "the time budget (0.5 s) ended after 3 rounds, before the pick was stable"
    assert rounds.busy == [f"not stable: {rounds.stopped}"]


def test_a_busy_machine_is_not_remembered():
    clock, order = FakeClock(), []
    calls = {"a": scripted(clock, [0.2], order, "a"), "b": scripted(clock, [0.1], order, "b")}
    rounds = run_rounds(calls, {"a": "fp32", "b": "bf16"}, RoundsPolicy(), clock=clock, load=BusyLoad())
    assert rounds.stable and rounds.pick.name == "b" and not rounds.remember
    assert rounds.busy[0].startswith("load 3.50 cores above the 2 available")


# --- the auto backend on injected timings ---------------------------------------------------------

CLOCK = FakeClock()
# (backend, precision) -> seconds per batch, in order
SCRIPT: dict[tuple[str, str], list[float]] = {}


class ScriptedBackend:
    """The reference model's predictions, taking SCRIPT's seconds on CLOCK."""

    called_with: dict[str, set[torch.dtype]] = {}  # precision -> dtypes of the levels it was given

    def __init__(self, model, card, *, device, precision="fp32"):
        self.device, self.precision, self.model = device, precision, model.float().eval()
        self.seconds = iter(SCRIPT[("scripted", precision)] + [SCRIPT[("scripted", precision)][-1]] * 1000)
        self.input_dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # as the torch backend

    def __call__(self, level1, level2, level3):
        CLOCK.now += next(self.seconds)
        ScriptedBackend.called_with.setdefault(self.precision, set()).add(level1.dtype)
        with torch.inference_mode():
            return self.model(level1.float(), level2.float(), level3.float())


@pytest.fixture
def scripted_auto(monkeypatch):
    """auto with one backend 'scripted' that runs fp32 and bf16 on the CPU, timed on CLOCK; the load
    reading is QuietLoad's unless a test swaps it."""
    register_backend("scripted", "test_backends_auto:ScriptedBackend")
    monkeypatch.setitem(BACKEND_PRECISIONS, "scripted", {"cpu": ("fp32", "bf16")})
    real_run_rounds = auto.run_rounds
    monkeypatch.setattr(auto, "run_rounds", lambda *a, **k: real_run_rounds(*a, **{**k, "clock": CLOCK}))
    monkeypatch.setattr(auto, "ProcStatLoad", QuietLoad)
    yield monkeypatch
    unregister_backend("scripted")


def make_auto(tmp_path, **options):
    model = build_model("tiny", seed=0)
    card = ModelCard.for_variant("tiny", [f"G{i}" for i in range(250)], 0.5)
    options = {"candidates": ["scripted"], "trial_batch_size": 2, "cache_dir": tmp_path, **options}
    return make_backend("auto", model, card, device="cpu", precision="auto", **options)


def test_auto_remembers_a_quiet_pick_and_retimes_on_request(scripted_auto, tmp_path):
    SCRIPT[("scripted", "fp32")], SCRIPT[("scripted", "bf16")] = [0.2], [0.1]
    first = make_auto(tmp_path)
    assert (first.chosen, first.precision) == ("scripted", "bf16") and first.remembered is None
    assert first.saved_to is not None and first.report()["source"] == "timed now"
    record = json.loads(first.saved_to.read_text())
    assert record["precision"] == "bf16" and record["busy"] == [] and record["stopped"].startswith("stable")
    assert [t["name"] for t in record["trials"]] == ["scripted:fp32", "scripted:bf16"]
    SCRIPT[("scripted", "fp32")] = [0.05]  # now fp32 would win: a remembered pick is not timed again
    again = make_auto(tmp_path)
    assert again.remembered == first.saved_to and again.precision == "bf16" and again.report()["source"] == "remembered"
    retimed = make_auto(tmp_path, retime=True)
    assert retimed.precision == "fp32" and retimed.saved_to == first.saved_to
    assert json.loads(first.saved_to.read_text())["precision"] == "fp32"


def test_auto_uses_but_does_not_remember_a_busy_pick(scripted_auto, tmp_path, caplog):
    scripted_auto.setattr(auto, "ProcStatLoad", BusyLoad)
    SCRIPT[("scripted", "fp32")], SCRIPT[("scripted", "bf16")] = [0.2], [0.1]
    with caplog.at_level(logging.WARNING, logger="m2ort_fast.backends.auto"):
        busy = make_auto(tmp_path)
    assert busy.precision == "bf16" and busy.saved_to is None and not list(tmp_path.glob("auto/*.json"))
    assert "not remembering it (load 3.50 cores above the 2 available" in caplog.text
    assert "not remembered: load 3.50" in busy.reason
    scripted_auto.setattr(auto, "ProcStatLoad", QuietLoad)
    SCRIPT[("scripted", "fp32")] = [0.05]  # timed again, since nothing was remembered
    assert make_auto(tmp_path).precision == "fp32"


def test_a_busy_retime_keeps_the_quiet_record(scripted_auto, tmp_path, caplog):
    SCRIPT[("scripted", "fp32")], SCRIPT[("scripted", "bf16")] = [0.2], [0.1]
    quiet = make_auto(tmp_path)
    scripted_auto.setattr(auto, "ProcStatLoad", BusyLoad)
    SCRIPT[("scripted", "fp32")] = [0.05]
    with caplog.at_level(logging.WARNING, logger="m2ort_fast.backends.auto"):
        busy = make_auto(tmp_path, retime=True)
    assert busy.precision == "fp32" and busy.saved_to is None  # used for this run only
    assert f"the pick remembered in {quiet.saved_to} stays" in caplog.text
    assert json.loads(quiet.saved_to.read_text())["precision"] == "bf16"


def test_auto_times_at_the_runs_batch_size(scripted_auto, tmp_path):
    SCRIPT[("scripted", "fp32")], SCRIPT[("scripted", "bf16")] = [0.2], [0.1]
    backend = make_auto(tmp_path, trial_batch_size=7)
    assert {t.batch_size for t in backend.trials} == {7}
    assert backend.trials[1].spots_per_s == pytest.approx(70.0)


def test_auto_times_each_candidate_on_batches_in_the_dtype_it_asks_for(scripted_auto, tmp_path):
    """The host path hands a backend whose ``input_dtype`` is bf16 bf16 batches: timed the same way
    (a float32 trial batch would charge it a cast the engine never makes)."""
    SCRIPT[("scripted", "fp32")], SCRIPT[("scripted", "bf16")] = [0.2], [0.1]
    ScriptedBackend.called_with.clear()
    make_auto(tmp_path)
    # float32 once each: the warm-up against the fp32 model; then every timed call in its own dtype
    assert ScriptedBackend.called_with == {"fp32": {torch.float32}, "bf16": {torch.float32, torch.bfloat16}}


# --- info --backends --------------------------------------------------------------------------------


def test_info_backends_shows_the_pick_the_figures_and_why(scripted_auto, tmp_path, capsys, monkeypatch):
    from m2ort_fast.cli import main

    monkeypatch.setenv("M2ORT_FAST_CACHE", str(tmp_path))
    SCRIPT[("scripted", "fp32")], SCRIPT[("scripted", "bf16")] = [0.2], [0.1]
    args = ["info", "--backends", "--candidates", "scripted", "--batch-size", "2", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "--backend auto at batch 2 on cpu" in out and "scripted:bf16 (timed now" in out
    assert "why: picked scripted:bf16 (fastest, beyond the noise of the next (scripted:fp32))" in out
    assert "| scripted:bf16 (picked) | 20.0 |" in out and "| scripted:fp32 | 10.0 |" in out
    assert main(args) == 0
    assert "scripted:bf16 (remembered" in capsys.readouterr().out
    SCRIPT[("scripted", "fp32")] = [0.05]
    assert main([*args, "--retime", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["backends"]
    assert report["pick"] == "scripted:fp32" and report["source"] == "timed now"
    assert main(["info", "--retime"]) == 2  # --retime alone: one line, exit 2
    assert "--retime goes with --backends" in capsys.readouterr().err


# --- a real measurement -----------------------------------------------------------------------------


class MissingToolkitBackend:
    def __init__(self, model, card, *, device, precision="fp32"):
        raise M2ORTError("toolkit X is not installed")


@pytest.fixture
def missing_backend():
    register_backend("missing", "test_backends_auto:MissingToolkitBackend")
    yield "missing"
    unregister_backend("missing")
    assert "missing" not in backend_names()


def test_auto_measures_and_picks(missing_backend, tmp_path):
    model = build_model("tiny", seed=0)
    card = ModelCard.for_variant("tiny", [f"G{i}" for i in range(250)], 0.5)
    backend = make_backend(
        "auto",
        model,
        card,
        device="cpu",
        candidates=["torch", "onnxruntime", "missing"],
        trial_batch_size=2,
        trial_repeats=2,
        budget_s=5,
        cache_dir=tmp_path,
    )
    by_name = {t.name: t for t in backend.trials}
    assert by_name["missing"].spots_per_s is None and "toolkit X" in by_name["missing"].error
    measured = [t for t in backend.trials if t.spots_per_s is not None]
    assert {t.name for t in measured} == {"torch", "onnxruntime"} and all(len(t.batch_s) >= 2 for t in measured)
    assert backend.reason.startswith(f"picked {backend.chosen} (") and backend.name == f"auto:{backend.chosen}"
    x = [torch.rand(3, 3, s, s) for s in IMAGE_SIZES_PX]
    with torch.inference_mode():
        ref = model(*x)
    assert (backend(*x) - ref).abs().max() < 1e-4


def test_predictor_times_auto_at_its_batch_size():
    from m2ort_fast.predict import Predictor

    predictor = Predictor(
        backend="auto", batch_size=5, progress=False, backend_options={"candidates": ["torch"], "trial_repeats": 1}
    )
    assert predictor.backend.chosen == "torch" and predictor.backend.trial_batch_size == 5


def test_nothing_available_is_one_line(missing_backend, tmp_path):
    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    with pytest.raises(M2ORTError, match="no backend is available: missing: unavailable"):
        make_backend("auto", model, card, device="cpu", candidates=["missing"], cache_dir=tmp_path)
