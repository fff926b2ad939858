"""The `auto` backend: selection logic, and a real measurement between torch and onnxruntime on
the tiny variant (aoti left out here: its compile is covered by test_export_aoti)."""

from __future__ import annotations

import pytest
import torch

from m2ort_fast.backends import backend_names, make_backend, register_backend, unregister_backend
from m2ort_fast.backends.auto import Trial, pick_fastest
from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.errors import M2ORTError
from m2ort_fast.model import IMAGE_SIZES_PX, build_model


class MissingToolkitBackend:
    def __init__(self, model, card, *, device, precision="fp32"):
        raise M2ORTError("toolkit X is not installed")


def test_pick_fastest_names_winner_runner_up_and_unavailable():
    trials = [Trial("torch", 50.0), Trial("onnxruntime", 80.0), Trial("tensorrt", error="no CUDA GPU")]
    best, reason = pick_fastest(trials)
    assert best.name == "onnxruntime"
    assert reason.startswith("picked onnxruntime: 80.0 spots/s, 1.60x the next (torch: 50.0 spots/s)")
    assert "tensorrt: unavailable (no CUDA GPU)" in reason


def test_pick_fastest_with_nothing_available():
    with pytest.raises(M2ORTError, match="no backend is available: x: unavailable"):
        pick_fastest([Trial("x", error="broken")])


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
        cache_dir=tmp_path,
    )
    by_name = {t.name: t for t in backend.trials}
    assert by_name["missing"].spots_per_s is None and "toolkit X" in by_name["missing"].error
    measured = [t for t in backend.trials if t.spots_per_s is not None]
    assert {t.name for t in measured} == {"torch", "onnxruntime"}
    assert backend.chosen == max(measured, key=lambda t: t.spots_per_s).name
    assert backend.reason.startswith(f"picked {backend.chosen}:") and backend.name == f"auto:{backend.chosen}"
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
