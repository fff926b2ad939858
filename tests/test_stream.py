"""The streamed engine (m2ort_fast.engine): the same patches and predictions as the naive path,
bit for bit; interruption and resume; bounded memory on a large pyramid; slide batches."""

from __future__ import annotations

import time
import tracemalloc

import anndata
import numpy as np
import pytest
import torch
from pyramids import synthetic_tissue, write_test_pyramid

from m2ort_fast.convert import write_pyramid
from m2ort_fast.crop import read_spot_patches, spot_squares
from m2ort_fast.engine import iter_streamed_patches, plan_slide_reads, run_stream
from m2ort_fast.errors import M2ORTError
from m2ort_fast.predict import DEMO_SLIDE, DEMO_SPOTS, Predictor, predict_slides
from m2ort_fast.slide import open_slide

SIZES = (224, 112, 56)


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream")
    return {
        layout: write_test_pyramid(folder / f"{layout}.tiff", layout, size_px=1536) for layout in ("svs", "generic")
    }


def streamed_patches(slide, centers, level_mpp, level_source, **plan_options):
    plan = plan_slide_reads(slide, centers, level_mpp, SIZES, level_source=level_source, **plan_options)
    out = [np.zeros((len(centers), s, s, 3), np.uint8) for s in SIZES]
    for spots, patches in iter_streamed_patches(slide, plan, num_threads=2):
        for whole, part in zip(out, patches, strict=True):
            whole[spots] = part
    return out


@pytest.mark.parametrize("layout", ["svs", "generic"])
@pytest.mark.parametrize("level_mpp", [(0.5, 1.0, 2.0), (0.62, 1.24, 2.48), (0.4, 0.8, 1.6)])
@pytest.mark.parametrize("level_source", ["pyramid", "resize"])
def test_streamed_patches_equal_naive_bit_for_bit(pyramids, layout, level_mpp, level_source):
    rng = np.random.default_rng(len(layout))
    centers = rng.uniform(-40, 1576, (120, 2))  # some spots reach past the slide's edges (white there)
    with open_slide(pyramids[layout], reader="tiffslide") as slide:
        naive = read_spot_patches(slide, centers, level_mpp, SIZES, level_source=level_source)
        streamed = streamed_patches(slide, centers, level_mpp, level_source, step_spots=17, max_memory_mb=24)
    for level, (a, b) in enumerate(zip(naive, streamed, strict=True)):
        assert np.array_equal(a, b), f"level {level} differs"


@pytest.mark.parametrize("level_source", ["pyramid", "resize"])
def test_steps_cut_in_cached_pieces_give_the_naive_patches(pyramids, monkeypatch, level_source):
    """A step's spots are cut, resized and handed on CACHED_SPOTS at a time (steps of up to 17 in
    pieces of 5 and the rest here, the arrays reused): each piece holds its own spots' patches."""
    from m2ort_fast.engine import host

    monkeypatch.setattr(host, "CACHED_SPOTS", 5)
    centers = np.random.default_rng(3).uniform(-40, 1576, (60, 2))
    with open_slide(pyramids["svs"], reader="tiffslide") as slide:
        naive = read_spot_patches(slide, centers, (0.62, 1.24, 2.48), SIZES, level_source=level_source)
        plan = plan_slide_reads(slide, centers, (0.62, 1.24, 2.48), SIZES, level_source=level_source, step_spots=17)
        pieces = [
            (spots, [p.copy() for p in patches]) for spots, patches in iter_streamed_patches(slide, plan, reuse=True)
        ]
    assert max(len(spots) for spots, _ in pieces) == 5 and len(pieces) > plan.n_steps
    for spots, patches in pieces:
        for level, (whole, part) in enumerate(zip(naive, patches, strict=True)):
            assert np.array_equal(whole[spots], part), f"level {level} differs"


def test_spot_squares_match_the_naive_reads(pyramids):
    """read_spot_patches reads exactly the squares spot_squares describes (the plan relies on it)."""
    centers = np.array([[100.3, 700.5], [1000.5, 20.49]])
    with open_slide(pyramids["svs"], reader="tiffslide") as slide:
        calls = []
        original = slide.read_level_squares
        slide.read_level_squares = lambda level, top_left, size: (
            calls.append((level, top_left.copy(), size)) or original(level, top_left, size)
        )
        read_spot_patches(slide, centers, (0.62, 1.24, 2.48), SIZES)
        reads = {(level, size): top_left for level, top_left, size in calls}
        for mpp, out_px in zip((0.62, 1.24, 2.48), SIZES, strict=True):
            squares = spot_squares(slide, centers, mpp, out_px)
            assert np.array_equal(squares.top_left_px, reads[squares.level, squares.read_px])


def test_streamed_predictions_and_files_equal_naive(tmp_path):
    predictor = Predictor(progress=False, batch_size=16)
    streamed = predictor.predict_slide(DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=tmp_path / "s", n_heatmaps=1)
    naive = predictor.predict_slide(DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=tmp_path / "n", n_heatmaps=1, streamed=False)
    a, b = anndata.read_h5ad(streamed.outputs.h5ad), anndata.read_h5ad(naive.outputs.h5ad)
    assert a.X.dtype == np.float32 and a.shape == b.shape == (65, len(predictor.genes))
    assert np.array_equal(a.X, b.X), "same backend: predictions bit for bit"
    assert a.obs.equals(b.obs) and list(a.var_names) == list(b.var_names)
    assert np.array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert streamed.outputs.csv.read_text() == naive.outputs.csv.read_text()
    assert [p.name for p in streamed.outputs.heatmaps] == [p.name for p in naive.outputs.heatmaps]
    assert streamed.engine["tiles_decoded_per_spot"] < streamed.engine["naive_tiles_per_spot"]
    assert {"read", "crop", "assemble", "model", "write"} <= set(streamed.seconds)


def test_bf16_streamed_predictions_equal_naive_and_the_device_path(tmp_path):
    """bf16 through the torch backend: the host path assembles bf16 batches (``input_dtype``) and
    runs one model call per core; the naive and device paths hand float32 to the model, which
    casts it. All three give the same bits."""
    predictions = {}
    for name, options in (("naive", {"streamed": False}), ("host", {}), ("device", {})):
        predictor = Predictor(
            progress=False, precision="bf16", batch_size=16, data_path="device" if name == "device" else "host"
        )
        assert predictor.backend.input_dtype == torch.bfloat16
        result = predictor.predict_slide(DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=tmp_path / name, n_heatmaps=0, **options)
        predictions[name] = anndata.read_h5ad(result.outputs.h5ad).X
    assert np.array_equal(predictions["host"], predictions["naive"])
    assert np.array_equal(predictions["host"], predictions["device"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ldpe_model_takes_tokens_from_the_host_path_with_the_naive_bits(tmp_path, precision):
    """An LDPE model on the torch backend: the host path assembles each level as tokens
    (``input_token_px``, model.patchify's layout) and the model skips its own patchify; the naive
    path hands it images. The same bits either way."""
    predictions = {}
    for name, options in (("naive", {"streamed": False}), ("host", {})):
        predictor = Predictor("m2ort-her2st-tiny", progress=False, precision=precision, batch_size=16)
        assert predictor.backend.input_token_px == (16, 8, 4)
        result = predictor.predict_slide(DEMO_SLIDE, spots=DEMO_SPOTS, out_dir=tmp_path / name, n_heatmaps=0, **options)
        predictions[name] = anndata.read_h5ad(result.outputs.h5ad).X
    assert np.array_equal(predictions["host"], predictions["naive"])


def test_streamed_predictions_equal_naive_in_several_stripes(tmp_path):
    """A memory bound that splits the demo slide into four vertical stripes (each stripe's windows
    start afresh; the tile columns neighbouring stripes share are decoded again), ~60 spots each
    at a 110 um pitch (their 154 um patches overlap), batches straddling stripes: the predictions
    still equal the naive path's bit for bit."""
    predictor = Predictor(progress=False, batch_size=16, max_memory_mb=16)
    options = {"spacing_um": 110, "n_heatmaps": 0, "write_csv": False}
    streamed = predictor.predict_slide(DEMO_SLIDE, out_dir=tmp_path / "s", **options)
    naive = predictor.predict_slide(DEMO_SLIDE, out_dir=tmp_path / "n", streamed=False, **options)
    assert streamed.engine["stripes"] > 1, "the bound must force stripes"
    a, b = anndata.read_h5ad(streamed.outputs.h5ad), anndata.read_h5ad(naive.outputs.h5ad)
    assert a.shape == b.shape and a.n_obs > 200 and a.obs.equals(b.obs)
    assert np.array_equal(a.X, b.X), "same backend: predictions bit for bit"


class FailingBackend:
    """Wraps a backend and raises after ``after`` batches (an interruption mid-slide)."""

    def __init__(self, backend, after):
        self.backend, self.after, self.device, self.calls = backend, after, backend.device, 0

    def __call__(self, *levels):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.backend(*levels)


def test_interruption_leaves_nothing_and_resume_gives_the_same_file(tmp_path):
    reference = predict_slides(
        [DEMO_SLIDE],
        spots=[DEMO_SPOTS],
        out_dir=tmp_path / "ref",
        progress=False,
        batch_size=16,
        n_heatmaps=0,
        write_csv=False,
    )[0]
    predictor = Predictor(progress=False, batch_size=16)
    working = predictor.backend
    predictor.backend = FailingBackend(working, after=2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        predict_slides([DEMO_SLIDE], spots=[DEMO_SPOTS], model=predictor, out_dir=out, n_heatmaps=0, write_csv=False)
    assert not out.exists(), "an interrupted slide leaves no partial output (nor the folder the run made)"
    predictor.backend = working
    resumed = predict_slides(
        [DEMO_SLIDE], spots=[DEMO_SPOTS], model=predictor, out_dir=out, overwrite=False, n_heatmaps=0, write_csv=False
    )[0]
    assert resumed.ok and not resumed.skipped
    a, b = anndata.read_h5ad(reference.outputs.h5ad), anndata.read_h5ad(resumed.outputs.h5ad)
    assert np.array_equal(a.X, b.X) and a.obs.equals(b.obs)
    again = predict_slides(
        [DEMO_SLIDE], spots=[DEMO_SPOTS], model=predictor, out_dir=out, overwrite=False, n_heatmaps=0, write_csv=False
    )[0]
    assert again.skipped, "resume skips a slide whose .h5ad exists, made from the same run record"


def test_batch_reports_a_failing_slide_and_goes_on(tmp_path):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"II*\x00" + b"\x00" * 64)
    results = predict_slides(
        [broken, DEMO_SLIDE], spots=[None, DEMO_SPOTS], out_dir=tmp_path, progress=False, n_heatmaps=0, write_csv=False
    )
    assert not results[0].ok and "broken.svs" in results[0].error
    assert results[1].ok and results[1].outputs.h5ad.exists()


class ZeroBackend:
    """Stands in for the model where only the data path is measured."""

    device = torch.device("cpu")

    def __init__(self, n_genes):
        self.n_genes = n_genes

    def __call__(self, l1, l2, l3):
        return torch.zeros((l1.shape[0], self.n_genes))


def test_memory_stays_under_the_bound_on_a_large_pyramid(tmp_path):
    """A 12288^2 generic pyramid: full-width windows would need ~2x the budget; the plan splits
    the slide into stripes and the engine's traced allocations stay under budget + batches."""
    tile = synthetic_tissue(1024)
    image = np.tile(tile, (12, 12, 1))
    path = write_pyramid(image, tmp_path / "big.tiff", mpp=0.5, layout="generic", downsamples=(1, 2, 4), quality=70)
    del image
    budget_mb, batch_size = 40, 8
    with open_slide(path, reader="tiffslide") as slide:
        axis = np.arange(200, 12288, 700.0)
        xx, yy = np.meshgrid(axis, axis)
        centers = np.stack([xx.ravel(), yy.ravel()], 1)
        unbounded = plan_slide_reads(slide, centers, (0.5, 1.0, 2.0), SIZES, max_memory_mb=0)
        assert unbounded.peak_bytes > 1.5 * budget_mb * 2**20, "the test must need the bound"
        plan = plan_slide_reads(slide, centers, (0.5, 1.0, 2.0), SIZES, max_memory_mb=budget_mb)
        assert len(plan.stripe_rows) > 1 and plan.peak_bytes <= budget_mb * 2**20
        seen = np.zeros(len(centers), dtype=int)

        def count(spots, predictions):
            seen[spots] += 1

        tracemalloc.start()
        try:
            run_stream(slide, plan, ZeroBackend(4), [0.0] * 3, [1.0] * 3, count, batch_size=batch_size)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (seen == 1).all()
    # Besides the decoded pixels: batches in flight (uint8 patches + float32 inputs, <= 8 batches).
    per_spot_bytes = sum(3 * s * s * (1 + 4) for s in SIZES)
    allowance = 8 * batch_size * per_spot_bytes + 8 * 2**20
    assert peak <= budget_mb * 2**20 + allowance, f"traced peak {peak / 2**20:.1f} MiB"


class MeanPixelBackend:
    """A prediction per spot: the mean pixel of each of its three inputs (the batch's rows checked
    against the spots the writer is told they are)."""

    device = torch.device("cpu")

    def __call__(self, *levels):
        return torch.stack([level.mean(dim=(1, 2, 3)) for level in levels], dim=1)


@pytest.mark.parametrize("level_source", ["pyramid", "resize"])
def test_batches_straddling_small_steps_hold_each_spots_own_patches(pyramids, level_source):
    """Steps of 7 spots filling batches of 16 (each batch cut from three steps, the step arrays
    reused from step to step): every spot's row holds its own three patches."""
    rng = np.random.default_rng(5)
    centers = rng.uniform(100, 1400, (75, 2))
    with open_slide(pyramids["svs"], reader="tiffslide") as slide:
        plan = plan_slide_reads(slide, centers, (0.5, 1.0, 2.0), SIZES, level_source=level_source, step_spots=7)
        assert plan.n_steps > 10
        rows = np.full((len(centers), 3), np.nan, np.float32)
        stats = run_stream(
            slide, plan, MeanPixelBackend(), [0.0] * 3, [1.0] * 3, lambda s, p: rows.__setitem__(s, p), batch_size=16
        )
        naive = read_spot_patches(slide, centers, (0.5, 1.0, 2.0), SIZES, level_source=level_source)
        reused = list(iter_streamed_patches(slide, plan, reuse=True))
    assert stats.batches == 5
    expected = np.stack([patches.mean(axis=(1, 2, 3)) / 255 for patches in naive], axis=1)
    np.testing.assert_allclose(rows, expected, rtol=1e-5)
    assert np.shares_memory(reused[0][1][0], reused[-1][1][0]), "reuse=True hands out the same buffers"


def test_streamed_engine_reports_a_reader_error(tmp_path, pyramids):
    with open_slide(pyramids["svs"], reader="tiffslide") as slide:
        plan = plan_slide_reads(slide, np.array([[700.0, 700.0]]), (0.5, 1.0, 2.0), SIZES)

        def broken(*args):
            raise M2ORTError("cannot read level 0", slide.path)

        slide.read_level_region = broken
        with pytest.raises(M2ORTError, match="cannot read level 0"):
            run_stream(slide, plan, ZeroBackend(4), [0.0] * 3, [1.0] * 3, lambda *a: None)


class SlowFirstBackend:
    """Concurrent calls on the CPU where the first call finishes last: a prediction is each spot's
    mean level-1 pixel, so the writer's order can be checked against the spots."""

    device = torch.device("cpu")
    concurrent_calls = True

    def __init__(self):
        self.calls = 0
        self.threads_seen: set[int] = set()

    def __call__(self, l1, l2, l3):
        self.calls += 1
        self.threads_seen.add(torch.get_num_threads())
        if self.calls == 1:
            time.sleep(0.5)
        return l1.mean(dim=(1, 2, 3), keepdim=False)[:, None].repeat(1, 2)


def test_model_workers_hand_batches_to_the_writer_in_plan_order(pyramids):
    """Two model workers on one intra-op thread each (a backend with ``concurrent_calls``): the
    first batch finishes last, yet ``on_batch`` sees the batches in plan order with their own
    predictions, and the caller's torch threads are back as they were."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)
    backend = SlowFirstBackend()
    centers = np.array([[300.0 + 90 * (i % 8), 300.0 + 90 * (i // 8)] for i in range(40)])
    with open_slide(pyramids["svs"], reader="tiffslide") as slide:
        plan = plan_slide_reads(slide, centers, (0.5, 1.0, 2.0), SIZES)
        written = []
        stats = run_stream(
            slide, plan, backend, [0.0] * 3, [1.0] * 3, lambda s, p: written.append((s, p)), batch_size=8
        )
        level1 = streamed_patches(slide, centers, (0.5, 1.0, 2.0), "pyramid")[0]
    assert stats.batches == 5 and backend.threads_seen == {1}
    order = np.concatenate([spots for spots, _ in written])
    assert np.array_equal(np.sort(order), np.arange(40))
    expected = np.concatenate([plan.step_spots(step) for step in range(plan.n_steps)])
    assert np.array_equal(order, expected), "batches reached the writer out of plan order"
    for spots, predictions in written:
        np.testing.assert_allclose(predictions[:, 0], level1[spots].mean(axis=(1, 2, 3)) / 255, rtol=1e-5)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(threads_before)
