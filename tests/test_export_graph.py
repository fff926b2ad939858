"""The exported graph (fused attention op, class-token-only last block) against the reference
model, in eager PyTorch: the rewrites every compiled artifact inherits."""

from __future__ import annotations

import pytest
import torch

from m2ort_fast.export.graph import ExportGraph, export_model
from m2ort_fast.model import IMAGE_SIZES_PX, M2ORT, M2ORTConfig, build_model, set_fused_attention


def random_levels(batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, s, s, generator=g) for s in IMAGE_SIZES_PX]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("variant", ["tiny", "small", "base", "large"])
def test_export_graph_matches_reference(variant):
    model = build_model(variant, seed=1)
    graph = export_model(model, "fp32")
    for batch in (1, 7):
        levels = random_levels(batch, seed=10 + batch)
        with torch.inference_mode():
            ref, out = model(*levels), graph(*levels)
        assert out.shape == ref.shape and out.dtype == torch.float32
        # fp32, another summation order in the attention: ~1e-6 seen
        assert relative_error(out, ref) < 1e-5, variant


def test_literal_attention_graph_is_the_reference_but_for_the_class_token_block():
    """``fused_attention=False`` (AOTInductor on the CPU): every block but the last is the
    reference's own ops, so only the class-token-only last block can round differently."""
    model = build_model("tiny", seed=7)
    levels = random_levels(4, seed=7)
    with torch.inference_mode():
        ref = model(*levels)
        literal, fused = (export_model(model, "fp32", fused_attention=f)(*levels) for f in (False, True))
    assert relative_error(literal, ref) < 1e-5 and relative_error(fused, ref) < 1e-5
    assert not torch.equal(literal, fused)


def test_depth_one_model():
    """The last block is also the first: the class-token-only path alone."""
    torch.manual_seed(2)
    model = M2ORT(M2ORTConfig(dim=96, depth=1, heads=2, mlp_dim=64, n_genes=10)).eval()
    levels = random_levels(3, seed=3)
    with torch.inference_mode():
        assert relative_error(ExportGraph(model)(*levels), model(*levels)) < 1e-5


def test_fused_itmm_rows_equal_the_full_block():
    """Fused attention gives the literal block's output; query_tokens=1 exactly its first row."""
    block = build_model("tiny", seed=4).blocks[0].itmm
    x = torch.randn(5, 197, 192, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = block(x)
        full = block(x, fused=True)
        first = block(x, query_tokens=1, fused=True)
        first_literal = block(x, query_tokens=1)
    assert full.shape == ref.shape and first.shape == (5, 1, 192)
    assert relative_error(full, ref) < 1e-5
    assert relative_error(first, ref[:, :1]) < 1e-5
    assert relative_error(first_literal, ref[:, :1]) < 1e-6  # same ops on fewer rows


def test_set_fused_attention_switches_every_block():
    model = build_model("tiny", seed=9)
    levels = random_levels(2, seed=9)
    with torch.inference_mode():
        ref = model(*levels)
        out = set_fused_attention(model, True)(*levels)
    assert all(b.itmm.fused_attention for b in model.blocks)
    assert relative_error(out, ref) < 1e-5 and not torch.equal(out, ref)


def test_block_ops_run_every_block_but_the_last():
    model = build_model("tiny", seed=6)
    calls = {"itmm": 0, "icmm": 0}

    def counted(name):
        def op(x, module):
            calls[name] += 1
            return module(x)

        return op

    graph = ExportGraph(model, block_ops={"itmm": counted("itmm"), "icmm": counted("icmm")})
    levels = random_levels(2, seed=7)
    with torch.inference_mode():
        assert relative_error(graph(*levels), model(*levels)) < 1e-5
    assert calls == {"itmm": model.cfg.depth - 1, "icmm": model.cfg.depth - 1}


def test_export_model_leaves_the_callers_model_alone():
    model = build_model("tiny", seed=8)
    graph = export_model(model, "fp16")
    assert next(model.parameters()).dtype == torch.float32
    assert next(graph.model.parameters()).dtype == torch.float16
