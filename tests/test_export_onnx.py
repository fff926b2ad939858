"""ONNX export: parity with the reference through onnxruntime (every variant, batch 1, 7 and 64),
metadata, checker, TensorRT operator check, CLI. Each variant is exported once per module
(module-scoped fixture)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from m2ort_fast.checkpoint import ModelCard, save_checkpoint
from m2ort_fast.errors import M2ORTError
from m2ort_fast.export.onnx_export import (
    INPUT_NAMES,
    OPSET,
    OUTPUT_NAME,
    check_onnx,
    check_tensorrt_ops,
    export_onnx,
    read_onnx_card,
    read_onnx_metadata,
    tensorrt_op_problems,
)
from m2ort_fast.model import IMAGE_SIZES_PX, build_model

ort = pytest.importorskip("onnxruntime")

BATCHES = {variant: (1, 7, 64) for variant in ("tiny", "small", "base", "large")}
GENES = [f"GENE{i}" for i in range(250)]


def make_card(variant: str) -> ModelCard:
    return ModelCard.for_variant(variant, GENES, mpp=0.5, pixel_mean=[0.7, 0.5, 0.6], pixel_std=[0.2, 0.25, 0.2])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """variant -> (model, card, path of its fp32 ONNX), exported on first use."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            model = build_model(variant, seed=0)
            card = make_card(variant)
            path = tmp_path_factory.mktemp("onnx") / f"{variant}.onnx"
            export_onnx(model, card, path, checkpoint_sha256="ab" * 32)
            cache[variant] = (model, card, path)
        return cache[variant]

    return get


def run_onnx(path, levels):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {n: x.numpy() for n, x in zip(INPUT_NAMES, levels, strict=True)})[0]


def random_levels(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, s, s, generator=g) for s in IMAGE_SIZES_PX]


@pytest.mark.parametrize("variant", list(BATCHES))
def test_onnx_matches_reference_fp32(exported, variant):
    model, card, path = exported(variant)
    for batch in BATCHES[variant]:
        levels = random_levels(batch, seed=batch)
        with torch.inference_mode():
            ref = model(*levels).numpy()
        out = run_onnx(path, levels)
        assert out.shape == (batch, len(GENES)) and out.dtype == np.float32
        # fp32 vs fp32, different kernels/summation order: ~1e-6 relative seen; 1e-4 of the scale
        err = np.abs(out - ref).max() / np.abs(ref).max()
        assert err < 1e-4, f"{variant} batch {batch}: relative error {err:.2e}"


def test_file_is_self_contained_and_valid(exported):
    _, card, path = exported("tiny")
    check_onnx(path)  # full_check: raises on an invalid model
    proto = onnx.load(str(path))
    assert not any(init.data_location == TensorProto.EXTERNAL for init in proto.graph.initializer)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}
    for value in [*proto.graph.input, *proto.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [i.name for i in proto.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]


def test_metadata_round_trip(exported):
    _, card, path = exported("tiny")
    assert read_onnx_card(path) == card
    meta = read_onnx_metadata(path)
    assert json.loads(meta["genes"]) == GENES
    assert json.loads(meta["level_mpp"]) == pytest.approx([0.5, 1.0, 2.0])
    assert json.loads(meta["pixel_mean"]) == [0.7, 0.5, 0.6] and json.loads(meta["pixel_std"]) == [0.2, 0.25, 0.2]
    assert meta["precision"] == "fp32" and meta["checkpoint_sha256"] == "ab" * 32


def test_checker_rejects_a_broken_model(exported, tmp_path):
    _, _, path = exported("tiny")
    proto = onnx.load(str(path))
    proto.graph.node[0].input[0] = "no_such_tensor"
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    with pytest.raises(M2ORTError, match="broken.onnx: invalid ONNX model"):
        check_onnx(broken)


def test_exported_graph_uses_only_tensorrt_ops(exported):
    _, _, path = exported("small")
    assert tensorrt_op_problems(onnx.load(str(path))) == []


def _one_node_model(op_type: str, domain: str = "", opset: int = OPSET) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    node = helper.make_node(op_type, ["x"], ["y"], domain=domain)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=imports)


def test_tensorrt_op_check_fails_on_unsupported_ops():
    assert tensorrt_op_problems(_one_node_model("Relu")) == []
    assert tensorrt_op_problems(_one_node_model("Det")) == ["Det (not supported by TensorRT's ONNX parser)"]
    assert "com.example::Fancy (custom domain)" in tensorrt_op_problems(_one_node_model("Fancy", "com.example"))
    assert any("opset 8" in p for p in tensorrt_op_problems(_one_node_model("Relu", opset=8)))
    with pytest.raises(M2ORTError, match="not parseable by TensorRT: Det"):
        check_tensorrt_ops(_one_node_model("Det"), "m.onnx")


def test_fp16_export_runs_in_onnxruntime(tmp_path):
    model, card = build_model("tiny", seed=0), make_card("tiny")
    path = export_onnx(model, card, tmp_path / "tiny16.onnx", precision="fp16")
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left as it was
    levels = random_levels(3, seed=0)
    with torch.inference_mode():
        ref = model(*levels).numpy()
    out = run_onnx(path, levels)
    assert out.dtype == np.float32  # float32 in and out, fp16 inside
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-2  # fp16 rounding through 2 blocks
    assert read_onnx_metadata(path)["precision"] == "fp16"


def test_cli_export_onnx_and_errors(tmp_path, monkeypatch, capsys):
    from m2ort_fast.cli import main

    monkeypatch.setenv("M2ORT_FAST_CACHE", str(tmp_path / "cache"))
    model, card = build_model("tiny", seed=3), make_card("tiny")
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, model, card)
    out = tmp_path / "exported.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["out"] == str(out) and not report["reused_from_cache"]
    assert read_onnx_card(out) == card
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx"]) == 0  # second time: the cache
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reused_from_cache"]
    assert main(["export", "--checkpoint", str(tmp_path / "missing.safetensors"), "--format", "onnx"]) == 2
    assert "missing.safetensors: no such checkpoint file" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--format", "aoti", "--batch-profile", "64,1,256"]) == 2
    assert main(["export", "--checkpoint", str(ckpt), "--format", "tensorrt", "--device", "cpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
