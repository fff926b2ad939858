"""`m2ort-fast export`: a checkpoint -> ONNX file, AOTInductor package or TensorRT engine.

    m2ort-fast export --checkpoint CKPT --format onnx|aoti|tensorrt [--out PATH]
                      [--precision fp32|fp16|bf16] [--batch-profile 1,64,256] [--device auto] [--no-kernels]

Without --out the artifact is built into the cache (the one `predict --backend onnxruntime|aoti|
tensorrt` reuses) and its path printed; with --out it is written there (a TensorRT engine also
gets its JSON sidecar, PATH.json).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from m2ort_fast.errors import M2ORTError
from m2ort_fast.options import device_name
from m2ort_fast.precision import PRECISION_NAMES

FORMATS = ("onnx", "aoti", "tensorrt")
SUFFIXES = {"onnx": ".onnx", "aoti": ".pt2", "tensorrt": ".plan"}


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint to ONNX, an AOTInductor package or a TensorRT engine")
    p.add_argument("--checkpoint", required=True, help="model checkpoint (.safetensors)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", default=None, help="output file (default: build into the cache and print its path)")
    p.add_argument(
        "--precision",
        default=None,
        choices=PRECISION_NAMES,
        help="default: fp32 (onnx, aoti on the CPU), bf16 (aoti on a GPU), fp16 (tensorrt)",
    )
    p.add_argument(
        "--batch-profile",
        default="1,64,256",
        metavar="MIN,OPT,MAX",
        help="batch sizes compiled for (aoti, tensorrt; default %(default)s); ONNX takes any batch",
    )
    p.add_argument(
        "--device",
        type=device_name,
        default="auto",
        help="device to compile for (aoti, tensorrt): cpu, cuda, cuda:N, auto",
    )
    p.add_argument(
        "--no-kernels",
        action="store_true",
        help="aoti on CUDA: let Inductor compile the encoder blocks instead of embedding our Triton kernels",
    )
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from m2ort_fast.checkpoint import file_sha256, load_checkpoint
    from m2ort_fast.device import resolve_device
    from m2ort_fast.export import artifacts
    from m2ort_fast.export.cache import parse_batch_profile

    profile = parse_batch_profile(args.batch_profile)
    device = resolve_device(args.device)
    precision = args.precision or {"onnx": "fp32", "tensorrt": "fp16"}.get(
        args.format, "bf16" if device.type == "cuda" else "fp32"
    )
    model, card = load_checkpoint(args.checkpoint)
    sha = file_sha256(args.checkpoint)
    if args.format == "tensorrt" and device.type != "cuda":
        raise M2ORTError("a TensorRT engine needs a CUDA device (--device cuda)")
    if args.format == "onnx":
        built, reused = artifacts.onnx_artifact(model, card, sha=sha, precision=precision)
    elif args.format == "aoti":
        built, reused = artifacts.aoti_artifact(
            model,
            card,
            sha=sha,
            device=device,
            precision=precision,
            batch_profile=profile,
            use_kernels=not args.no_kernels,
        )
    else:
        built, reused = artifacts.tensorrt_artifact(
            model, card, sha=sha, device=device, precision=precision, batch_profile=profile
        )
    result = {"format": args.format, "precision": precision, "cached": str(built), "reused_from_cache": reused}
    if args.out:
        out = Path(args.out)
        _copy_atomic(built, out)
        sidecar = built.with_name(built.name + ".json")
        if sidecar.is_file():
            _copy_atomic(sidecar, out.with_name(out.name + ".json"))
        result["out"] = str(out)
    print(json.dumps(result))
    return 0


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
    except OSError as exc:
        raise M2ORTError(f"cannot write the exported file ({exc.strerror})", dst) from None
    finally:
        tmp.unlink(missing_ok=True)
