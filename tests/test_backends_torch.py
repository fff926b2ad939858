"""The torch backend's chunks: a CPU batch runs through the model in chunks of ``chunk_spots``
spots, with the predictions of the whole batch at once (every op is per spot)."""

from __future__ import annotations

import pytest
import torch

from m2ort_fast.backends import make_backend
from m2ort_fast.checkpoint import load_checkpoint
from m2ort_fast.errors import M2ORTError
from m2ort_fast.model import IMAGE_SIZES_PX
from m2ort_fast.predict import DEFAULT_CHECKPOINT


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 4e-3)])
def test_chunks_predict_what_the_whole_batch_does(precision, tolerance):
    generator = torch.Generator().manual_seed(37)
    levels = [torch.rand(37, 3, s, s, generator=generator) for s in IMAGE_SIZES_PX]  # 16 + 16 + 5
    outputs = {}
    for chunk_spots in (None, 16):
        model, card = load_checkpoint(DEFAULT_CHECKPOINT)
        backend = make_backend("torch", model, card, device="cpu", precision=precision, chunk_spots=chunk_spots)
        assert backend.chunk_spots == chunk_spots
        outputs[chunk_spots] = backend(*levels)
    assert outputs[16].shape == (37, len(card.genes)) and outputs[16].dtype == torch.float32
    assert (outputs[16] - outputs[None]).abs().max() <= tolerance


def test_chunk_spots_below_one_is_refused():
    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    with pytest.raises(M2ORTError, match="chunk_spots must be at least 1, got 0"):
        make_backend("torch", model, card, device="cpu", chunk_spots=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_spots_prediction_is_the_same_bits_in_any_batch_and_on_any_threads(precision):
    """The host path calls the model on one intra-op thread per worker, the naive path on all of
    them, and a slide's last batch is short: a spot must get the same bits either way (a chunk of
    5 on one thread rounded differently from two threads before the last chunk was padded)."""
    import threading

    generator = torch.Generator().manual_seed(5)
    levels = [torch.rand(37, 3, s, s, generator=generator) for s in IMAGE_SIZES_PX]
    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    backend = make_backend("torch", model, card, device="cpu", precision=precision)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        whole = backend(*levels)
        on_one_thread = {}

        def last_five_on_one_thread():
            torch.set_num_threads(1)
            on_one_thread["last five"] = backend(*[x[32:] for x in levels])

        worker = threading.Thread(target=last_five_on_one_thread)
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(threads_before)
    assert torch.equal(on_one_thread["last five"], whole[32:])
    assert torch.equal(backend(*[x[3:4] for x in levels]), whole[3:4])


def test_bf16_on_the_cpu_runs_the_reference_attention_or_the_fused_op():
    """The literal attention (matmul -> softmax -> matmul, in bf16) with torch's LayerNorm is the
    model cast to bf16, bit for bit; the fused op rounds differently but within bf16's error of the
    same function, and so does the extension's LayerNorm (backends.layer_norm)."""
    generator = torch.Generator().manual_seed(11)
    levels = [torch.rand(16, 3, s, s, generator=generator) for s in IMAGE_SIZES_PX]
    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    with torch.inference_mode():
        reference_bf16 = model.to(torch.bfloat16)(*(x.to(torch.bfloat16) for x in levels)).float()
    runs = {}
    for fused, core_norm in ((False, False), (True, False), (False, True)):
        model, card = load_checkpoint(DEFAULT_CHECKPOINT)
        backend = make_backend(
            "torch", model, card, device="cpu", precision="bf16", fused_attention=fused, core_layer_norm=core_norm
        )
        assert all(block.itmm.fused_attention is fused for block in backend.model.encoder_blocks())
        runs[fused, core_norm] = backend(*levels)
    assert torch.equal(runs[False, False], reference_bf16)
    for other in ((True, False), (False, True)):
        assert not torch.equal(runs[other], runs[False, False])
        assert (runs[other] - runs[False, False]).abs().max() < 0.1


@pytest.mark.parametrize("amx", [False, True])
def test_the_cpu_attention_form_follows_amx(amx, monkeypatch):
    """Unasked, a bf16 model on the CPU takes the fused op only where the CPU has AMX (measured
    faster there, slower without: the module's docstring); fp32 keeps the reference's form."""
    import m2ort_fast.backends.torch_backend as torch_backend

    monkeypatch.setattr(torch_backend, "cpu_has_amx", lambda: amx)
    for precision, expected in (("bf16", amx), ("fp32", False)):
        model, card = load_checkpoint(DEFAULT_CHECKPOINT)
        backend = make_backend("torch", model, card, device="cpu", precision=precision)
        assert all(block.itmm.fused_attention is expected for block in backend.model.encoder_blocks())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_ldpe_model_takes_tokens_with_the_images_bits(precision):
    """The torch backend of an LDPE model on the CPU asks for tokens (``input_token_px``: the host
    path assembles them, sparing the model its patchify copies) and gives the bits it gives for the
    images; an encoder model (the default) takes images."""
    from m2ort_fast.backends.workers import backend_inputs
    from m2ort_fast.predict import SHIPPED_MODELS

    generator = torch.Generator().manual_seed(5)
    levels = [torch.rand(9, 3, s, s, generator=generator) for s in IMAGE_SIZES_PX]
    model, card = load_checkpoint(SHIPPED_MODELS["m2ort-her2st-tiny"])
    backend = make_backend("torch", model, card, device="cpu", precision=precision)
    assert backend.input_token_px == (16, 8, 4)
    tokens = backend_inputs(backend, levels)
    assert [tuple(x.shape) for x in tokens] == [(9, 196, 768), (9, 196, 192), (9, 196, 48)]
    assert torch.equal(backend(*tokens), backend(*[x.to(backend.input_dtype) for x in levels]))
    model, card = load_checkpoint(DEFAULT_CHECKPOINT)
    assert make_backend("torch", model, card, device="cpu", precision=precision).input_token_px is None
