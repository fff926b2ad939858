"""ONNX export of the whole M2ORT model, ready for onnxruntime and TensorRT's ONNX parser.

The file takes the three levels of a batch of spots and returns expression:

    level1 (batch, 3, 224, 224), level2 (batch, 3, 112, 112), level3 (batch, 3, 56, 56)  float32
        -> expression (batch, n_genes)  float32

``batch`` is a dynamic dimension. Weights are stored inside the file. An fp16/bf16 export keeps
float32 inputs and outputs and casts inside the graph, so the precision lives in the graph (which
is what TensorRT's strongly typed networks require) and callers feed the same tensors whatever
the precision.

An int8 export is the fp32 graph through onnxruntime's dynamic quantizer (:func:`quantize_int8`):
every Linear layer (MatMul/Gemm with a weight) becomes DynamicQuantizeLinear + MatMulInteger, the
weights int8 per output channel, the activations uint8 with a scale computed per batch at run time;
the two attention matmuls, norms, softmax and GELU stay float32. Standard opset-18 ops only, but
for onnxruntime: TensorRT does not build engines from dynamically quantized graphs.

Opset 18, through ``torch.onnx.export(..., dynamo=True)``: 18 is the opset torch's ONNX function
library (onnxscript's torchlib) is written in, so no version conversion runs after export; it has
LayerNormalization as one op (opset 17+); and it lies inside every TensorRT 10.x parser's range
(10.0 parses opsets 9-20, 10.15 parses 9-24) and is fully implemented by onnxruntime's CPU and CUDA
providers. (Opset 23 would turn scaled_dot_product_attention into the fused ``Attention`` op, but
only TensorRT 10.15+ parses that.)

The checkpoint's :class:`ModelCard` is stored in the model's ``metadata_props``: the full card as
JSON under ``m2ort_fast`` (the key the checkpoint uses too), plus the fields a non-Python consumer
needs spelled out: ``genes``, ``level_sizes_px``, ``level_mpp``, ``mpp``, ``pixel_mean``,
``pixel_std``, ``target_transform``, ``variant``, ``precision``, ``checkpoint_sha256``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from m2ort_fast.checkpoint import METADATA_KEY, ModelCard
from m2ort_fast.errors import M2ORTError
from m2ort_fast.export.graph import export_model, sample_inputs
from m2ort_fast.model import M2ORT
from m2ort_fast.precision import is_quantized

if TYPE_CHECKING:  # onnx (the [onnx] extra) is imported by the functions that use it
    import onnx

OPSET = 18
INPUT_NAMES = ("level1", "level2", "level3")
OUTPUT_NAME = "expression"
BATCH_DIM = "batch"

# ONNX operators that TensorRT's ONNX parser supports ("Y" in onnx-tensorrt's docs/operators.md,
# "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"). Per-op
# restrictions listed there (e.g. LayerNormalization: only output Y) are checked separately where
# they matter to this graph.
TENSORRT_OPSET_RANGE = (9, 24)
TENSORRT_ONNX_OPS = frozenset(
    """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN
RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split()
)


def card_metadata(card: ModelCard, *, precision: str, checkpoint_sha256: str | None = None) -> dict[str, str]:
    """The card as ONNX metadata_props (str -> str)."""
    meta = {
        METADATA_KEY: card.to_json(),
        "variant": card.variant,
        "genes": json.dumps(card.genes),
        "level_sizes_px": json.dumps(list(card.patch_sizes_px)),
        "mpp": json.dumps(card.mpp),
        "level_mpp": json.dumps(card.level_mpp),
        "pixel_mean": json.dumps(card.pixel_mean),
        "pixel_std": json.dumps(card.pixel_std),
        "target_transform": card.target_transform,
        "precision": precision,
        "inputs": "level1 (batch,3,224,224), level2 (batch,3,112,112), level3 (batch,3,56,56): "
        "float32 RGB, (x/255 - pixel_mean)/pixel_std",
    }
    if checkpoint_sha256:
        meta["checkpoint_sha256"] = checkpoint_sha256
    return meta


def read_onnx_metadata(model_or_path: onnx.ModelProto | str | os.PathLike) -> dict[str, str]:
    import onnx

    proto = model_or_path
    if not isinstance(proto, onnx.ModelProto):
        proto = onnx.load(str(model_or_path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def read_onnx_card(model_or_path: onnx.ModelProto | str | os.PathLike) -> ModelCard:
    """The ModelCard stored in an exported file."""
    import onnx

    meta = read_onnx_metadata(model_or_path)
    if METADATA_KEY not in meta:
        where = model_or_path if not isinstance(model_or_path, onnx.ModelProto) else None
        raise M2ORTError("ONNX file carries no m2ort_fast metadata (not exported by m2ort-fast)", where)
    return ModelCard.from_json(meta[METADATA_KEY])


def export_onnx(
    model: M2ORT,
    card: ModelCard,
    path: str | os.PathLike,
    *,
    precision: str = "fp32",
    opset: int = OPSET,
    checkpoint_sha256: str | None = None,
) -> Path:
    """Export ``model`` to ``path`` (written under a temporary name, then renamed) and validate it:
    onnx.checker (full check) and the TensorRT operator check. Returns the path."""
    import onnx

    path = Path(path)
    graph = export_model(model, precision)
    batch = torch.export.Dim(BATCH_DIM, min=1)
    tmp = path.with_name(f".{path.name}.partial")
    with _quiet_exporter():
        program = torch.onnx.export(
            graph,
            sample_inputs(),
            dynamo=True,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_shapes={name: {0: batch} for name in ("level1", "level2", "level3")},
            optimize=True,
            verify=False,
            report=False,
            verbose=False,
        )
    if program is None:  # only the legacy (dynamo=False) exporter returns nothing
        raise M2ORTError("torch.onnx.export returned no program", path)
    proto = program.model_proto
    _name_batch_dim(proto)
    for key, value in card_metadata(card, precision=precision, checkpoint_sha256=checkpoint_sha256).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "m2ort-fast"
    proto.doc_string = f"M2ORT {card.variant} ({card.model_id}), {len(card.genes)} genes, {precision}"
    try:
        onnx.save_model(proto, str(tmp))  # weights inside: every variant is far below protobuf's 2 GB
        check_onnx(tmp)
        if is_quantized(precision):
            quantize_int8(tmp, tmp)
            check_onnx(tmp)
        else:
            check_tensorrt_ops(proto, tmp)  # the proto just saved: no need to read it back
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """onnxruntime's dynamic quantization of an fp32 export (``src`` may be ``dst``): the weights
    of every MatMul/Gemm with a constant weight (the Linear layers) int8 per output channel, their
    activations uint8 per batch at run time. The metadata (card) is kept. Chosen over static
    (calibrated QDQ) quantization by measurement: on ``small``, batch 64, a 2-core AMX Xeon, one
    noisy run: dynamic per-channel int8 2.5x fp32 eager, static QDQ 1.9x; and dynamic already
    holds the quality bound (README, "Precision"), so no calibration data is needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    pre = dst.with_name(f".{dst.name}.pre.onnx")
    out = dst.with_name(f".{dst.name}.int8.onnx")
    try:
        with _quiet_exporter():
            # shape inference + onnxruntime's basic graph optimizations, as the quantizer recommends
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_dynamic(
                str(pre),
                str(out),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
        os.replace(out, dst)
    finally:
        pre.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


def check_onnx(path: str | os.PathLike) -> None:
    """onnx.checker with full_check (also runs strict shape inference); one-line error if invalid."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise M2ORTError(f"invalid ONNX model: {str(exc).splitlines()[0]}", path) from None


def tensorrt_op_problems(proto: onnx.ModelProto) -> list[str]:
    """Why TensorRT's ONNX parser would refuse this model (empty: nothing found).

    Checks the default-domain opset against TensorRT's range, every node's domain and op type
    (subgraphs included) against :data:`TENSORRT_ONNX_OPS`, and LayerNormalization's restriction
    that only its first output may be used."""
    problems = []
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not TENSORRT_OPSET_RANGE[0] <= opset.version <= TENSORRT_OPSET_RANGE[1]:
            low, high = TENSORRT_OPSET_RANGE
            problems.append(f"opset {opset.version} outside TensorRT's {low}-{high}")
    local_functions = {(f.domain, f.name) for f in proto.functions}
    nodes = list(_all_nodes(proto.graph))
    for f in proto.functions:  # TensorRT inlines local functions: their bodies must be supported too
        nodes.extend(f.node)
    consumed = {name for node in nodes for name in node.input} | {o.name for o in proto.graph.output}
    for node in nodes:
        if (node.domain, node.op_type) in local_functions:
            continue
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.domain}::{node.op_type} (custom domain)")
        elif node.op_type not in TENSORRT_ONNX_OPS:
            problems.append(f"{node.op_type} (not supported by TensorRT's ONNX parser)")
        elif node.op_type == "LayerNormalization" and any(o and o in consumed for o in node.output[1:]):
            problems.append("LayerNormalization with its Mean/InvStdDev outputs used (TensorRT supports only Y)")
    return sorted(set(problems))


def check_tensorrt_ops(proto: onnx.ModelProto, path: str | os.PathLike | None = None) -> None:
    problems = tensorrt_op_problems(proto)
    if problems:
        raise M2ORTError(f"not parseable by TensorRT: {'; '.join(problems)}", path)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:  # If / Loop / Scan bodies
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(sub)


def _name_batch_dim(proto: onnx.ModelProto) -> None:
    """Give the first dimension of every input and output the one name ``batch`` (the exporter
    names the output's after an internal symbol)."""
    for value in [*proto.graph.input, *proto.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.dim_param = BATCH_DIM


class _quiet_exporter:
    """Silence the exporter's chatter (torchvision-op registration notes, pytree deprecations)
    that says nothing about this model; real errors still raise."""

    LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")

    def __enter__(self):
        self._levels = {name: logging.getLogger(name).level for name in self.LOGGERS}
        for name in self.LOGGERS:  # the optimizer logs every rewrite at INFO
            logging.getLogger(name).setLevel(logging.ERROR)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        return False
