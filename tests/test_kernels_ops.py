"""The fused blocks as custom ops (kernels/ops.py), the hook AOTInductor packages use on CUDA.

On the CPU: the ops run (interpreter) and equal the reference inside the exported graph;
torch.export keeps them as ops with the batch dynamic; tracing their bodies records the Triton
kernel launches themselves (what Inductor compiles into a CUDA package) with a symbolic batch.
The CUDA package build with the kernels inside is in tests/test_export_aoti.py (GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

from m2ort_fast.export.graph import ExportGraph, sample_inputs  # noqa: E402
from m2ort_fast.kernels import export_ops  # noqa: E402
from m2ort_fast.kernels.icmm import ICMMWeights, icmm  # noqa: E402
from m2ort_fast.kernels.itmm import ITMMWeights, itmm  # noqa: E402
from m2ort_fast.kernels.testing import ERROR_BOUNDS, randomize_, relative_error, triton_compiled, triton_interpreter  # noqa: E402
from m2ort_fast.model import build_model  # noqa: E402


def test_export_graph_through_the_ops_matches_reference_interpreter():
    model = randomize_(build_model("tiny", seed=0), seed=1)
    graph = ExportGraph(model, block_ops=export_ops()).eval()
    levels = sample_inputs(batch=3)
    with triton_interpreter(), torch.inference_mode():
        out = graph(*levels)
    with torch.inference_mode():
        ref = model(*levels)
    assert relative_error(out, ref) < ERROR_BOUNDS[torch.float32]


def test_export_keeps_the_ops_and_a_dynamic_batch():
    model = build_model("tiny", seed=0)
    graph = ExportGraph(model, block_ops=export_ops()).eval()
    batch = torch.export.Dim("batch", min=1, max=256)
    with triton_compiled():
        program = torch.export.export(graph, sample_inputs(batch=2), dynamic_shapes=({0: batch},) * 3)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    blocks_via_ops = model.cfg.depth - 1  # the last block runs for the class token in PyTorch
    assert targets.count("m2ort_fast.itmm.default") == blocks_via_ops
    assert targets.count("m2ort_fast.icmm.default") == blocks_via_ops
    (bound,) = program.range_constraints.values()
    assert (bound.lower, bound.upper) == (1, 256)


def test_op_bodies_trace_to_triton_kernels_with_a_symbolic_batch():
    block = build_model("tiny", seed=0).blocks[0]
    wi, wc = ITMMWeights.from_module(block.itmm), ICMMWeights.from_module(block.icmm)
    itmm_tensors = [wi.gamma, wi.beta, wi.wq, wi.wk, wi.wv, wi.w_proj, wi.b_proj]
    icmm_tensors = [wc.gamma, wc.beta, wc.w1, wc.b1, wc.w2, wc.b2]

    def both_blocks(x, *weights):
        y = itmm(x, ITMMWeights(wi.eps, *weights[:7]))
        return icmm(y, ICMMWeights(wc.eps, *weights[7:]))

    with triton_compiled():
        traced = make_fx(both_blocks, tracing_mode="symbolic")(torch.randn(5, 197, 192), *itmm_tensors, *icmm_tensors)
    launches = [n for n in traced.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(launches) == 6  # row stats + attention + projection; row stats + fc1 + fc2
    x_node = next(n for n in traced.graph.nodes if n.op == "placeholder")
    out_node = next(n for n in traced.graph.nodes if n.op == "output").args[0]
    x_batch, out_batch = x_node.meta["val"].shape[0], out_node.meta["val"].shape[0]
    assert isinstance(x_batch, torch.SymInt) and str(out_batch) == str(x_batch)  # not specialised to 5
