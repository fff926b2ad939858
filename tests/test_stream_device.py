"""The device data path (m2ort_fast.engine.device) on CPU tensors against the host path
(m2ort_fast.engine): the model's input batches equal bit for bit (so the predictions too), for
each assemble kernel (the host C++ kernels, the PyTorch reference, the Triton kernel in the
interpreter); the memory bound holds; --data-path in the CLI and in the .h5ad. GPU tests (marked
gpu) run the same checks on CUDA tensors and skip, with their reason, where there is no GPU.
"""

from __future__ import annotations

import functools
import json

import anndata
import numpy as np
import pytest
import torch
from pyramids import write_test_pyramid
from real_data import her2st_section

from m2ort_fast.cli import main
from m2ort_fast.engine import (
    DeviceMemory,
    plan_slide_reads,
    reserved_bytes,
    resolve_data_path,
    run_stream,
    run_stream_on_device,
)
from m2ort_fast.errors import M2ORTError
from m2ort_fast.kernels.testing import triton_interpreter
from m2ort_fast.predict import DEMO_SLIDE, DEMO_SPOTS, Predictor
from m2ort_fast.slide import open_slide

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SIZES = (224, 112, 56)
MEAN, STD = (0.7, 0.6, 0.75), (0.15, 0.2, 0.1)


class RecordingBackend:
    """Keeps a copy of every input batch; predicts the mean of each spot's first input."""

    name = "recording"

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.batches: list[list[np.ndarray]] = []

    def forward_on_device(self, *levels):
        self.batches.append([level.cpu().numpy().copy() for level in levels])
        return levels[0].mean(dim=(1, 2, 3))[:, None].float()

    def __call__(self, *levels):
        return self.forward_on_device(*levels).cpu()


def _inputs_by_spot(
    slide, centers, level_mpp, level_source, *, device_path, kernel="auto", batch_size=16, device="cpu", **plan
):
    """{spot: [its input per model input]}, the ledger and the plan, from one run of either path."""
    backend = RecordingBackend(device)
    order: list[np.ndarray] = []
    memory = DeviceMemory(torch.device(device))
    if device_path:
        plan["reserved_bytes"] = functools.partial(
            reserved_bytes, batch_size=batch_size, kernel=kernel, device=torch.device(device)
        )
    read_plan = plan_slide_reads(slide, centers, level_mpp, SIZES, level_source=level_source, **plan)
    run = functools.partial(run_stream_on_device, kernel=kernel, memory=memory) if device_path else run_stream
    run(slide, read_plan, backend, MEAN, STD, lambda spots, _: order.append(spots), batch_size=batch_size)
    by_spot = {}
    for spots, batch in zip(order, backend.batches, strict=True):
        for row, spot in enumerate(spots):
            by_spot[int(spot)] = [level[row] for level in batch]
    assert sorted(by_spot) == list(range(len(centers)))
    return by_spot, memory, read_plan


def _assert_equal(host: dict, device: dict) -> None:
    for spot, levels in host.items():
        for i, (a, b) in enumerate(zip(levels, device[spot], strict=True)):
            assert np.array_equal(a, b), f"spot {spot}, input {i} differs"


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    return write_test_pyramid(tmp_path_factory.mktemp("device") / "svs.tiff", "svs", size_px=1536)


# 0.5: every input read at its size; 0.62: read larger and resized; 0.4: read smaller and enlarged
@pytest.mark.parametrize("level_mpp", [(0.5, 1.0, 2.0), (0.62, 1.24, 2.48), (0.4, 0.8, 1.6)])
@pytest.mark.parametrize("level_source", ["pyramid", "resize"])
@pytest.mark.parametrize("kernel", ["host", "torch"])
def test_device_path_batches_equal_host_path_bit_for_bit(pyramid, level_mpp, level_source, kernel):
    rng = np.random.default_rng(3)
    centers = rng.uniform(-40, 1576, (50 if kernel == "torch" else 120, 2))  # some reach past the edges
    plan = {"step_spots": 17, "max_memory_mb": 64}
    with open_slide(pyramid, reader="tiffslide") as slide:
        host, _, _ = _inputs_by_spot(slide, centers, level_mpp, level_source, device_path=False, **plan)
        device, _, read_plan = _inputs_by_spot(
            slide, centers, level_mpp, level_source, device_path=True, kernel=kernel, **plan
        )
    assert read_plan.n_steps > 2  # batches straddle steps
    _assert_equal(host, device)


@pytest.mark.parametrize("level_source", ["pyramid", "resize"])
def test_device_path_batches_equal_host_path_in_several_stripes(pyramid, level_source):
    """A bound tight enough to split both paths' plans into stripes: the batches still equal."""
    centers = np.random.default_rng(7).uniform(-40, 1576, (150, 2))
    level_mpp = (0.4, 0.8, 1.6)
    with open_slide(pyramid, reader="tiffslide") as slide:
        host, _, host_plan = _inputs_by_spot(
            slide, centers, level_mpp, level_source, device_path=False, step_spots=17, max_memory_mb=12
        )
        device, _, device_plan = _inputs_by_spot(  # the bound covers the batches too (about 28 MB)
            slide, centers, level_mpp, level_source, device_path=True, kernel="host", step_spots=17, max_memory_mb=42
        )
    assert len(host_plan.stripe_rows) > 1 and len(device_plan.stripe_rows) > 1, "the bound must force stripes"
    _assert_equal(host, device)


@pytest.mark.parametrize("level_mpp,level_source", [((0.62, 1.24, 2.48), "resize"), ((0.4, 0.8, 1.6), "pyramid")])
def test_triton_step_in_the_interpreter_equals_host_path(pyramid, level_mpp, level_source):
    centers = np.array([[30.0, 40.0], [700.0, 800.0], [1500.0, 1530.0]])  # two steps: batches of 2 straddle them
    with open_slide(pyramid, reader="tiffslide") as slide:
        host, _, _ = _inputs_by_spot(
            slide, centers, level_mpp, level_source, device_path=False, batch_size=2, step_spots=2
        )
        with triton_interpreter():
            device, _, _ = _inputs_by_spot(
                slide, centers, level_mpp, level_source, device_path=True, kernel="triton", batch_size=2, step_spots=2
            )
    _assert_equal(host, device)


@pytest.mark.parametrize("max_gpu_memory_mb", [44, 50, 200])
def test_device_memory_stays_under_the_bound(pyramid, max_gpu_memory_mb):
    """Every buffer the path holds (windows, decoded steps, batches, scratch) is counted as it is
    allocated and freed; the peak stays under the bound, and a tight bound makes the plan narrower."""
    centers = np.random.default_rng(4).uniform(0, 1536, (300, 2))
    with open_slide(pyramid, reader="tiffslide") as slide:
        _, memory, plan = _inputs_by_spot(
            slide, centers, (0.5, 1.0, 2.0), "pyramid", device_path=True, max_memory_mb=max_gpu_memory_mb
        )
    assert 0 < memory.peak_bytes <= max_gpu_memory_mb * 2**20
    assert memory.bytes == 0  # everything released at the end
    assert (len(plan.stripe_rows) > 1) == (max_gpu_memory_mb < 200)


def test_a_bound_below_the_batches_is_one_line(pyramid):
    with open_slide(pyramid, reader="tiffslide") as slide, pytest.raises(M2ORTError, match="--max-gpu-memory-mb 8 "):
        plan_slide_reads(
            slide,
            np.array([[500.0, 500.0]]),
            (0.5, 1.0, 2.0),
            SIZES,
            max_memory_mb=8,
            reserved_bytes=functools.partial(reserved_bytes, batch_size=64, kernel="host", device=torch.device("cpu")),
            bound_option="--max-gpu-memory-mb",
        )


def test_auto_takes_the_device_path_only_where_the_gpu_decodes():
    class Decoding:
        decodes_on_gpu = True

    assert resolve_data_path("auto", Decoding(), torch.device("cuda")) == "device"
    assert resolve_data_path("auto", Decoding(), torch.device("cpu")) == "host"
    assert resolve_data_path("auto", object(), torch.device("cuda")) == "host"  # a CPU reader
    assert resolve_data_path("device", object(), torch.device("cpu")) == "device"
    with pytest.raises(M2ORTError, match="unknown data path"):
        resolve_data_path("gpu", object(), torch.device("cpu"))


def test_demo_predictions_equal_and_the_h5ad_says_which_path(tmp_path):
    results = {}
    for data_path in ("host", "device"):
        predictor = Predictor(device="cpu", progress=False, data_path=data_path)
        result = predictor.predict_slide(DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=tmp_path / data_path, n_heatmaps=0)
        assert result.engine["data_path"] == data_path
        adata = anndata.read_h5ad(result.outputs.h5ad)
        assert adata.uns["m2ort_fast"]["data_path"] == data_path
        results[data_path] = adata.X
    assert np.array_equal(results["host"], results["device"])


def test_demo_predictions_equal_in_several_stripes(tmp_path):
    """Bounds that split the demo slide into four stripes on both paths, ~60 spots each at a
    110 um pitch (their 154 um patches overlap): the device path's predictions equal the host
    path's bit for bit."""
    options = {"spacing_um": 110, "n_heatmaps": 0, "write_csv": False}
    bounds = {"host": {"max_memory_mb": 16}, "device": {"max_gpu_memory_mb": 44}}  # device: 28 MB are batches
    predictions = {}
    for data_path, bound in bounds.items():
        predictor = Predictor(device="cpu", progress=False, batch_size=16, data_path=data_path, **bound)
        result = predictor.predict_slide(DEMO_SLIDE, out_dir=tmp_path / data_path, **options)
        assert result.engine["data_path"] == data_path
        assert result.engine["stripes"] > 1, f"{data_path}: the bound must force stripes"
        predictions[data_path] = anndata.read_h5ad(result.outputs.h5ad).X
    assert len(predictions["device"]) > 200
    assert np.array_equal(predictions["host"], predictions["device"])


def test_her2st_section_predictions_equal(tmp_path):
    section = her2st_section("C3")
    image, spots = next(section.glob("*.jpg")), next(section.glob("*_selection.tsv"))
    predictions = {}
    for data_path in ("host", "device"):
        predictor = Predictor(device="cpu", progress=False, data_path=data_path)
        predictions[data_path] = predictor.predict(image, spots=spots).X
    assert np.array_equal(predictions["host"], predictions["device"])


def test_cli_refuses_the_device_path_with_the_naive_engine(tmp_path, capsys):
    code = main(["predict", "--engine", "naive", "--data-path", "device", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        "m2ort-fast: error: the device data path is the streamed engine's; it does not run with the naive engine"
    ]
    assert not (tmp_path / "out").exists()


def test_cli_records_the_device_path_in_the_profile(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    argv = ["predict", "--quiet", "--no-csv", "--heatmaps", "0", "--data-path", "device"]
    code = main([*argv, "--max-gpu-memory-mb", "300", "--profile", str(profile), "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    engine = json.loads(profile.read_text())["slides"][0]["engine"]
    assert engine["data_path"] == "device" and 0 < engine["device_peak_mb"] <= 300


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("level_source", ["pyramid", "resize"])
def test_device_path_on_the_gpu_equals_host_path(pyramid, level_source):
    centers = np.random.default_rng(5).uniform(-40, 1576, (200, 2))
    level_mpp = (0.62, 1.24, 2.48)
    with open_slide(pyramid, reader="tiffslide") as slide:
        host, _, _ = _inputs_by_spot(slide, centers, level_mpp, level_source, device_path=False)
        device, _, _ = _inputs_by_spot(slide, centers, level_mpp, level_source, device_path=True, device="cuda")
    _assert_equal(host, device)


@needs_gpu
@pytest.mark.gpu
def test_cucim_reads_stay_on_the_gpu(pyramid):
    pytest.importorskip("cucim")
    with open_slide(pyramid, reader="cucim") as slide:
        if not getattr(slide, "decodes_on_gpu", False):
            pytest.skip("cuCIM decodes on the CPU here")
        region = slide.read_level_region_tensor(0, -10, 5, 300, 200)
        assert region.device.type == "cuda" and region.shape == (200, 300, 3)
        assert np.array_equal(region.cpu().numpy(), slide.read_level_region(0, -10, 5, 300, 200))


@needs_gpu
@pytest.mark.gpu
def test_gpu_memory_stays_under_the_bound(pyramid):
    centers = np.random.default_rng(6).uniform(0, 1536, (400, 2))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    bound_mb = 150
    with open_slide(pyramid, reader="tiffslide") as slide:
        plan = plan_slide_reads(
            slide,
            centers,
            (0.5, 1.0, 2.0),
            SIZES,
            max_memory_mb=bound_mb,
            reserved_bytes=functools.partial(reserved_bytes, batch_size=16, kernel="auto", device=torch.device("cuda")),
        )
        run_stream_on_device(slide, plan, RecordingBackend("cuda"), MEAN, STD, lambda *_: None, batch_size=16)
    assert torch.cuda.max_memory_allocated() - before <= bound_mb * 2**20


def test_backends_hand_the_device_path_their_predictions_on_the_device():
    """The torch backend (and auto, when it picks it) gives the device path predictions without a
    copy to the host; the same values as its ordinary call."""
    from m2ort_fast.backends import make_backend
    from m2ort_fast.checkpoint import load_checkpoint
    from m2ort_fast.predict import DEFAULT_CHECKPOINT

    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    levels = [torch.rand(3, 3, s, s, generator=torch.Generator().manual_seed(s)) for s in SIZES]
    backend = make_backend("torch", model, card, device="cpu")
    assert torch.equal(backend.forward_on_device(*levels), backend(*levels))
    auto = make_backend("auto", model, card, device="cpu", candidates=["torch"], trial_repeats=1)
    assert auto.forward_on_device is not None and torch.equal(auto.forward_on_device(*levels), backend(*levels))
