"""Precisions: the table's checks up front, int8 through onnxruntime, --precision auto, and the
quality bound pinned on the demo slide.

The bound itself is measured on the four real her2st sections by ``bench/precision.py`` (README,
"Precision"); the demo has no measured expression, so here the measurement is stood in for by the
fp32 prediction plus seeded noise of the size of the model's real residual (RMSE ~2.2 log1p-CPM on
her2st), and every evaluate metric of each shipped precision must stay within QUALITY_BOUND of
fp32's. A deliberately broken precision must fail the same check (so the check can fail).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from m2ort_fast import metrics as M
from m2ort_fast.backends import make_backend, register_backend, unregister_backend
from m2ort_fast.backends.auto import CPU_CANDIDATES, candidate_pairs
from m2ort_fast.backends.timing import LoadReading
from m2ort_fast.checkpoint import ModelCard, load_checkpoint
from m2ort_fast.errors import M2ORTError
from m2ort_fast.model import IMAGE_SIZES_PX, build_model
from m2ort_fast.precision import (
    HELD_BOUND,
    PRECISION_CHOICES,
    QUALITY_BOUND,
    auto_precisions,
    check_backend_precision,
    check_precision,
    depends_on_batch,
    is_quantized,
    torch_dtype,
)
from m2ort_fast.predict import DEFAULT_CHECKPOINT, DEMO_SLIDE, DEMO_SPOTS, Predictor
from m2ort_fast.slide import open_slide

BOUND_METRICS = ("pcc_spot_mean", "pcc_gene_mean", "rmse_spot_mean")
# (backend, precision) pairs that ship on the CPU: the fastest path of each lower precision
SHIPPED_CPU = [("torch", "bf16"), ("onnxruntime", "int8")]


def test_table_names_and_dtypes():
    assert check_precision("int8") == "int8" and is_quantized("int8") and not is_quantized("bf16")
    assert torch_dtype("int8") == torch.float32 and torch_dtype("bf16") == torch.bfloat16
    assert "auto" in PRECISION_CHOICES
    assert set(HELD_BOUND["cpu"]) >= {"fp32", "bf16", "int8"}
    # int8 held the bound but depends on the batch: auto leaves it to an explicit --precision int8
    assert depends_on_batch("int8") and not depends_on_batch("bf16") and not depends_on_batch("fp32")
    assert auto_precisions("cpu") == ("fp32", "bf16") and auto_precisions("cuda") == ("fp32",)
    with pytest.raises(M2ORTError, match="picked by --backend auto only"):
        check_precision("auto", "the torch backend")
    with pytest.raises(M2ORTError, match="unknown precision 'fp8'"):
        check_precision("fp8")


@pytest.mark.parametrize(
    "backend, precision, device, message",
    [
        ("torch", "int8", "cpu", "the torch backend cannot run precision int8 on the cpu.*--backend onnxruntime"),
        ("aoti", "int8", "cpu", "the aoti backend cannot run precision int8 on the cpu.*--backend onnxruntime"),
        ("onnxruntime", "bf16", "cpu", "the onnxruntime backend cannot run precision bf16 on the cpu.*--backend torch"),
        ("tensorrt", "int8", "cuda", "the tensorrt backend cannot run precision int8 on the cuda"),
    ],
)
def test_a_precision_a_backend_cannot_run_is_one_line(backend, precision, device, message):
    with pytest.raises(M2ORTError, match=message) as info:
        check_backend_precision(backend, precision, device)
    assert "\n" not in str(info.value)


def test_backends_refuse_before_any_work():
    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    for name in ("torch", "aoti"):  # aoti would compile for minutes: the refusal comes first
        with pytest.raises(M2ORTError, match=f"the {name} backend cannot run precision int8"):
            make_backend(name, model, card, device="cpu", precision="int8")
    with pytest.raises(M2ORTError, match="picked by --backend auto only"):
        Predictor(progress=False, device="cpu", precision="auto")


def test_cli_refuses_int8_on_torch_in_one_line(tmp_path, capsys):
    from m2ort_fast.cli import main

    code = main(["predict", str(DEMO_SLIDE), "--spots", str(DEMO_SPOTS), "--out", str(tmp_path), "--precision", "int8"])
    err = capsys.readouterr().err
    assert code == 2 and "the torch backend cannot run precision int8" in err


def test_int8_onnx_export_quantizes_the_linear_layers(tmp_path):
    import onnx

    from m2ort_fast.export.onnx_export import export_onnx, read_onnx_card, read_onnx_metadata

    model = build_model("tiny", seed=0)
    card = ModelCard.for_variant("tiny", [f"G{i}" for i in range(250)], 0.5)
    path = export_onnx(model, card, tmp_path / "tiny8.onnx", precision="int8")
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    # every Linear quantized (the class-token-only last block still has its q, k, v, proj, fc1, fc2)
    assert ops.count("MatMulInteger") == linears
    assert ops.count("MatMul") == 2 * model.cfg.depth  # the attention matmuls stay float
    assert read_onnx_metadata(path)["precision"] == "int8" and read_onnx_card(path).genes == card.genes
    backend = make_backend(
        "onnxruntime", model, card, device="cpu", precision="int8", onnx_path=path, checkpoint_path=None
    )
    x = [torch.rand(5, 3, s, s, generator=torch.Generator().manual_seed(1)) for s in IMAGE_SIZES_PX]
    with torch.inference_mode():
        ref = model(*x)
    err = (backend(*x) - ref).abs().max()
    assert 0 < err < 0.05  # quantized (not bit-equal), and close


# --- --precision auto -----------------------------------------------------------------------


def test_candidate_pairs_follow_the_table():
    assert candidate_pairs(["torch", "aoti"], "fp32", "cpu") == [("torch", "fp32"), ("aoti", "fp32")]
    pairs = candidate_pairs(["torch", "onnxruntime", "custom"], "auto", "cpu")
    assert ("torch", "bf16") in pairs and ("onnxruntime", "fp32") in pairs and ("custom", "fp32") in pairs
    assert ("onnxruntime", "bf16") not in pairs and ("torch", "int8") not in pairs
    assert ("onnxruntime", "int8") not in pairs  # depends on the batch: never picked by auto
    assert ("custom", "bf16") not in pairs  # an unknown backend is tried at fp32 only
    assert {p for _, p in candidate_pairs(["torch"], "auto", "cuda")} == set(HELD_BOUND["cuda"])


class WrongBackend:
    """Runs, fast, but predicts nonsense: auto's guard must not pick it."""

    name = "wrong"

    def __init__(self, model, card, *, device, precision="fp32"):
        self.device, self.precision, self.n_genes = device, precision, len(card.genes)

    def __call__(self, level1, level2, level3):
        return torch.full((level1.shape[0], self.n_genes), 3.0)


@pytest.fixture
def wrong_backend():
    register_backend("wrong", "test_precision:WrongBackend")
    yield "wrong"
    unregister_backend("wrong")


def test_auto_precision_picks_guards_and_remembers(tmp_path, wrong_backend, monkeypatch):
    """Real backends on an injected clock (every batch 10 ms: all within the noise, so the pick is
    the highest precision) and a quiet load reading: the guard, the record, and its reuse."""
    import itertools

    from m2ort_fast.backends import auto

    class QuietLoad:
        def __init__(self, threads):
            self.threads = threads

        def start(self):
            pass

        def stop(self):
            return LoadReading(0.0, 0.0, 2, self.threads)

    ticks = itertools.count(0.0, 0.01)
    real_run_rounds = auto.run_rounds
    monkeypatch.setattr(auto, "run_rounds", lambda *a, **k: real_run_rounds(*a, **{**k, "clock": ticks.__next__}))
    monkeypatch.setattr(auto, "ProcStatLoad", QuietLoad)
    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    options = dict(
        candidates=["torch", "onnxruntime", "wrong"],
        trial_batch_size=4,
        trial_repeats=1,
        cache_dir=tmp_path,
        checkpoint_path=str(DEFAULT_CHECKPOINT),
    )
    first = make_backend("auto", model, card, device="cpu", precision="auto", **options)
    labels = {t.name: t for t in first.trials}
    assert {"torch:fp32", "torch:bf16", "onnxruntime:fp32", "wrong:fp32"} == set(labels)
    assert labels["wrong:fp32"].spots_per_s is None and "differ from fp32" in labels["wrong:fp32"].error
    assert all(len(labels[name].batch_s) >= 3 for name in ("torch:fp32", "torch:bf16", "onnxruntime:fp32"))
    assert first.precision == "fp32" and "within its noise" in first.reason and first.remembered is None
    assert first.name == f"auto:{first.chosen}:fp32"
    saved = list((tmp_path / "auto").glob("*.json"))
    assert saved == [first.saved_to]

    def no_trials(*args, **kwargs):
        raise AssertionError("a remembered choice must not be timed again")

    monkeypatch.setattr(auto, "run_rounds", no_trials)
    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    again = make_backend("auto", model, card, device="cpu", precision="auto", **options)
    assert again.remembered == saved[0] and (again.chosen, again.precision) == (first.chosen, first.precision)
    x = [torch.rand(3, 3, s, s) for s in IMAGE_SIZES_PX]
    assert torch.allclose(again(*x), first(*x), atol=1e-5)
    # another batch size is another choice: timed again
    with pytest.raises(AssertionError, match="must not be timed"):
        make_backend("auto", model, card, device="cpu", precision="auto", **{**options, "trial_batch_size": 5})


def test_predictor_records_the_precision_auto_picked(tmp_path):
    predictor = Predictor(
        backend="auto",
        precision="auto",
        batch_size=4,
        progress=False,
        device="cpu",
        backend_options={"candidates": ["torch"], "trial_repeats": 1, "cache_dir": str(tmp_path)},
    )
    assert predictor.precision in ("fp32", "bf16") and predictor.precision == predictor.backend.precision


# --- a spot's prediction whatever its batch-mates ----------------------------------------------------

# How far a spot's prediction may move with its batch-mates: the precision's own rounding (measured
# 0 for fp32 and bf16 at batches 4..64 here, 1e-6 for fp32 at batch 1), not int8's per-batch scales
# (0.014-0.025 on the same spots).
BATCH_MATES_TOLERANCE = {"fp32": 1e-4, "fp16": 4e-3, "bf16": 4e-3}


def spot_levels(batch: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, s, s, generator=generator) for s in IMAGE_SIZES_PX]


def batch_mates_moves(backend) -> list[float]:
    """Max abs move of 4 spots' predictions (vs the 4 alone) one by one and among other batch-mates
    at other positions, batch sizes 16 and 37."""
    spots = spot_levels(4, seed=1)
    alone = backend(*spots)
    moves = [float((torch.cat([backend(*(x[i : i + 1] for x in spots)) for i in range(4)]) - alone).abs().max())]
    for batch, seed in ((16, 2), (37, 3)):
        mates = spot_levels(batch, seed)
        for level, mate in zip(spots, mates, strict=True):
            mate[5:9] = level
        moves.append(float((backend(*mates)[5:9] - alone).abs().max()))
    return moves


@pytest.mark.slow  # compiles the aoti candidates (~20 s each on 2 cores)
@pytest.mark.parametrize("pair", candidate_pairs(CPU_CANDIDATES, "auto", "cpu"), ids=lambda pair: ":".join(pair))
def test_what_auto_may_pick_does_not_depend_on_batch_mates(pair, tmp_path_factory):
    name, precision = pair
    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    options = {} if name == "torch" else {"cache_dir": tmp_path_factory.getbasetemp() / "artifacts"}
    backend = make_backend(name, model, card, device="cpu", precision=precision, **options)
    moves = batch_mates_moves(backend)
    assert max(moves) <= BATCH_MATES_TOLERANCE[precision], moves


def test_int8_depends_on_batch_mates_and_says_so(caplog):
    """What the test above guards against: onnxruntime's dynamic int8 fails it, and warns."""
    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    with caplog.at_level("WARNING"):
        backend = make_backend("onnxruntime", model, card, device="cpu", precision="int8")
    assert "a spot's prediction depends on the other spots of its batch" in caplog.text
    assert max(batch_mates_moves(backend)) > max(BATCH_MATES_TOLERANCE.values())


# --- the quality bound on the demo -----------------------------------------------------------


@pytest.fixture(scope="module")
def demo_predictions():
    """Predictions on the demo spots through Predictor: fp32 eager, and each shipped pair."""
    table = pd.read_csv(DEMO_SPOTS, sep="\t")
    centers = table[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    out = {}
    with open_slide(DEMO_SLIDE) as slide:
        for backend, precision in [("torch", "fp32"), *SHIPPED_CPU]:
            predictor = Predictor(backend=backend, precision=precision, device="cpu", progress=False, batch_size=16)
            out[(backend, precision)] = predictor.predict_centers(slide, centers)
    return out


def stand_in_measurement(reference: np.ndarray) -> np.ndarray:
    """The fp32 prediction plus seeded noise of the real residual's size (log1p-CPM)."""
    rng = np.random.default_rng(0)
    return reference + rng.normal(0.0, 2.2, size=reference.shape)


def metric_moves(pred: np.ndarray, reference: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    got, ref = M.summarize(pred, truth), M.summarize(reference, truth)
    return {key: abs(got[key] - ref[key]) for key in BOUND_METRICS}


@pytest.mark.parametrize("pair", SHIPPED_CPU, ids=lambda pair: ":".join(pair))
def test_shipped_precisions_hold_the_bound_on_the_demo(demo_predictions, pair):
    reference = demo_predictions[("torch", "fp32")]
    pred = demo_predictions[pair]
    assert pred.shape == reference.shape and np.isfinite(pred).all()
    diff = np.abs(pred - reference)
    # really another precision, and no blow-up (single predictions moved up to 0.24 here, int8 at batch 16)
    assert 0 < diff.max() < 0.5
    moves = metric_moves(pred, reference, stand_in_measurement(reference))
    assert max(moves.values()) <= QUALITY_BOUND, moves


def test_the_demo_bound_check_fails_a_broken_precision(demo_predictions):
    """Weights rounded to 3 mantissa bits (an fp8-like precision nobody ships) must fail the check."""
    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    with torch.no_grad():
        for p in model.parameters():
            mantissa, exponent = torch.frexp(p)
            p.copy_(torch.ldexp(torch.round(mantissa * 16) / 16, exponent))
    table = pd.read_csv(DEMO_SPOTS, sep="\t")
    centers = table[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    predictor = Predictor(progress=False, device="cpu", batch_size=16)
    predictor.backend = make_backend("torch", model, card, device="cpu")
    with open_slide(DEMO_SLIDE) as slide:
        broken = predictor.predict_centers(slide, centers)
    reference = demo_predictions[("torch", "fp32")]
    moves = metric_moves(broken, reference, stand_in_measurement(reference))
    assert max(moves.values()) > QUALITY_BOUND, moves
