"""Cache of compiled artifacts (ONNX files, AOTInductor packages, TensorRT engines).

An artifact is reusable only when everything that went into it is the same: the weights
(checkpoint sha256), the toolkit that built it (exporter / compiler version), the device it was
built for (GPU name, or CPU model and vector ISA), the precision and the batch profile. Those five
make an :class:`ArtifactKey`; its digest names the artifact's folder under the cache root:

    <root>/<kind>/<checkpoint sha256[:12]>-<key digest>/<file>   (+ key.json, human-readable)

The root is ``$M2ORT_FAST_CACHE`` when set, else ``~/.cache/m2ort-fast``. A folder is built under
a temporary name and renamed into place, so a crash never leaves a half-written artifact that a
later run would trust, and two processes building the same key do not corrupt each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.errors import M2ORTError

CACHE_ENV = "M2ORT_FAST_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/m2ort-fast"
# (min, opt, max) batch sizes an artifact is built for: TensorRT tunes kernels for opt and
# accepts min..max; AOTInductor guards on min..max. 256 is the largest batch `predict` is
# tuned for on a GPU; larger batches are split into chunks by the backends.
DEFAULT_BATCH_PROFILE = (1, 64, 256)


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``root`` if given, else $M2ORT_FAST_CACHE, else ~/.cache/m2ort-fast."""
    if root is None:
        root = os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(root).expanduser()


def parse_batch_profile(profile: str | Sequence[int]) -> tuple[int, int, int]:
    """ "1,64,256" or (1, 64, 256) -> (min, opt, max), checked 1 <= min <= opt <= max."""
    try:
        values = [int(v) for v in (profile.split(",") if isinstance(profile, str) else profile)]
    except (TypeError, ValueError):
        raise M2ORTError(f"batch profile {profile!r} is not three integers MIN,OPT,MAX (e.g. 1,64,256)") from None
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise M2ORTError(f"batch profile {profile!r} must be three integers 1 <= MIN <= OPT <= MAX (e.g. 1,64,256)")
    return values[0], values[1], values[2]


def device_name(device: str | torch.device) -> str:
    """What compiled code depends on: the GPU's name, or the CPU's model and vector ISA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model_name
            )
    except OSError:
        pass
    # Inductor's CPU code is vectorised for the ISA found at compile time (avx2, avx512, ...).
    return f"cpu {model_name} ({torch.backends.cpu.get_cpu_capability()})"


def weights_sha256(model: torch.nn.Module, card: ModelCard) -> str:
    """Hash of the weights (name, dtype, shape, bytes, in name order) and the card.

    Used when no checkpoint file is at hand; the card is included because exported files carry
    it (genes, mpp, normalisation) in their metadata."""
    digest = hashlib.sha256(card.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ArtifactKey:
    """Everything a compiled artifact depends on; equal keys mean the artifact can be reused."""

    kind: str  # "onnx", "aoti" or "tensorrt"
    checkpoint_sha256: str
    toolkit: str  # e.g. "torch 2.13.0+cpu, onnx opset 18" or "tensorrt 10.15.1"
    device_name: str  # "portable" for artifacts that run anywhere (ONNX)
    precision: str
    batch_profile: tuple[int, int, int] | None  # None where the artifact takes any batch size

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["batch_profile"] = list(self.batch_profile) if self.batch_profile else None
        return data

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:20]

    def directory(self, root: str | os.PathLike | None = None) -> Path:
        return cache_root(root) / self.kind / f"{self.checkpoint_sha256[:12]}-{self.digest()}"


def cached_artifact(
    key: ArtifactKey, filename: str, build: Callable[[Path], object], root: str | os.PathLike | None = None
) -> tuple[Path, bool]:
    """Path of ``filename`` in ``key``'s folder, built by ``build(path)`` when absent.

    ``build`` writes the artifact (and any side files) at the path it is given, inside a
    temporary folder that is renamed into place once it succeeds. Returns (path, reused)."""
    final_dir = key.directory(root)
    target = final_dir / filename
    if target.is_file() and (final_dir / "key.json").is_file():
        return target, True
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.partial-", dir=final_dir.parent))
    try:
        build(work_dir / filename)
        (work_dir / "key.json").write_text(json.dumps(key.as_dict(), indent=2) + "\n")
        if final_dir.exists() and not (final_dir / "key.json").is_file():
            shutil.rmtree(final_dir, ignore_errors=True)  # debris of something that was not ours to trust
        try:
            os.replace(work_dir, final_dir)
        except OSError:
            if not target.is_file():  # not a concurrent build of the same key: a real error
                raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return target, False
