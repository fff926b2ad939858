"""Cache keys and the get-or-build logic of compiled artifacts (pure Python, fast)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.errors import M2ORTError
from m2ort_fast.export.cache import (
    CACHE_ENV,
    ArtifactKey,
    cache_root,
    cached_artifact,
    device_name,
    parse_batch_profile,
    weights_sha256,
)
from m2ort_fast.model import build_model

KEY = ArtifactKey("aoti", "f" * 64, "torch 2.13.0", "cpu Xeon (AVX512)", "fp32", (1, 64, 256))


def test_cache_root_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root().parts[-2:] == (".cache", "m2ort-fast")


@pytest.mark.parametrize(
    "field, value",
    [
        ("checkpoint_sha256", "e" * 64),
        ("toolkit", "torch 2.11.0"),
        ("device_name", "NVIDIA H100 80GB HBM3"),
        ("precision", "bf16"),
        ("batch_profile", (1, 64, 512)),
        ("kind", "tensorrt"),
    ],
)
def test_every_key_field_changes_the_folder(field, value, tmp_path):
    other = dataclasses.replace(KEY, **{field: value})
    assert other.digest() != KEY.digest()
    assert other.directory(tmp_path) != KEY.directory(tmp_path)


def test_key_is_stable_and_readable(tmp_path):
    same = ArtifactKey("aoti", "f" * 64, "torch 2.13.0", "cpu Xeon (AVX512)", "fp32", (1, 64, 256))
    assert same.digest() == KEY.digest()
    assert KEY.directory(tmp_path) == tmp_path / "aoti" / f"{'f' * 12}-{KEY.digest()}"
    assert json.loads(json.dumps(KEY.as_dict()))["batch_profile"] == [1, 64, 256]


def test_cached_artifact_builds_once_then_reuses(tmp_path):
    calls = []

    def build(path):
        calls.append(path)
        path.write_text("artifact")

    first, reused_first = cached_artifact(KEY, "model.pt2", build, tmp_path)
    second, reused_second = cached_artifact(KEY, "model.pt2", build, tmp_path)
    assert (reused_first, reused_second) == (False, True) and len(calls) == 1
    assert first == second == KEY.directory(tmp_path) / "model.pt2" and first.read_text() == "artifact"
    assert json.loads((first.parent / "key.json").read_text()) == KEY.as_dict()
    other = dataclasses.replace(KEY, precision="bf16")
    cached_artifact(other, "model.pt2", build, tmp_path)
    assert len(calls) == 2


def test_failed_build_leaves_nothing_behind(tmp_path):
    def build(path):
        path.write_text("half")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        cached_artifact(KEY, "model.pt2", build, tmp_path)
    assert not KEY.directory(tmp_path).exists()
    assert list((tmp_path / "aoti").iterdir()) == []


def test_folder_without_key_is_rebuilt(tmp_path):
    folder = KEY.directory(tmp_path)
    folder.mkdir(parents=True)
    (folder / "model.pt2").write_text("stale, never completed")
    path, reused = cached_artifact(KEY, "model.pt2", lambda p: p.write_text("fresh"), tmp_path)
    assert not reused and path.read_text() == "fresh"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,64,256", (1, 64, 256)),
        ([2, 2, 2], (2, 2, 2)),
        (" 1, 8,16", (1, 8, 16)),
    ],
)
def test_parse_batch_profile(text, expected):
    assert parse_batch_profile(text) == expected


@pytest.mark.parametrize("bad", ["1,64", "64,1,256", "0,1,2", "a,b,c", "1,2,3,4"])
def test_parse_batch_profile_rejects(bad):
    with pytest.raises(M2ORTError, match="batch profile"):
        parse_batch_profile(bad)


def test_weights_hash_follows_weights_and_card():
    model = build_model("tiny", seed=0)
    card = ModelCard.for_variant("tiny", [f"G{i}" for i in range(250)], 0.5)
    base = weights_sha256(model, card)
    assert weights_sha256(build_model("tiny", seed=0), card) == base
    assert weights_sha256(model, dataclasses.replace(card, mpp=0.25)) != base
    with torch.no_grad():
        model.head.bias[0] += 1e-3
    assert weights_sha256(model, card) != base


def test_cpu_device_name_names_the_vector_isa():
    name = device_name("cpu")
    assert name.startswith("cpu ") and f"({torch.backends.cpu.get_cpu_capability()})" in name


def test_graph_version_is_in_every_key(monkeypatch):
    """Artifacts built from an older exported graph are not reused after the graph changes."""
    from m2ort_fast.export import aoti, artifacts

    sha, cpu = "f" * 64, torch.device("cpu")
    before = (artifacts.onnx_key(sha, "fp32"), artifacts.aoti_key(sha, cpu, "fp32", (1, 64, 256)))
    monkeypatch.setattr(artifacts, "GRAPH_VERSION", artifacts.GRAPH_VERSION + 1)
    monkeypatch.setattr(aoti, "GRAPH_VERSION", aoti.GRAPH_VERSION + 1)
    after = (artifacts.onnx_key(sha, "fp32"), artifacts.aoti_key(sha, cpu, "fp32", (1, 64, 256)))
    assert all(a.digest() != b.digest() for a, b in zip(before, after, strict=True))
