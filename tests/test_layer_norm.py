"""The extension's bf16 LayerNorm (``_core.layer_norm_bf16``) beside its reference, the same
function in float64, and torch's; and the module the torch backend swaps in for it
(``backends.layer_norm``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cpu_flags import cpu_flags
from torch import nn

from m2ort_fast import _core
from m2ort_fast.backends.layer_norm import CoreLayerNorm, core_layer_norm_available, use_core_layer_norm

# the model's rows (LDPE's 768, 192, 48; its 64-wide outputs; the blocks' 192) and ragged ones
WIDTHS = [768, 192, 64, 48, 1, 15, 16, 17, 31, 33, 100]


def bits(x: torch.Tensor) -> np.ndarray:
    """A bf16 tensor's bit patterns (uint16), without its autograd history."""
    return x.detach().view(torch.uint16).numpy()


def core_layer_norm(x, weight, bias, eps=1e-5, **options) -> torch.Tensor:
    return torch.from_numpy(_core.layer_norm_bf16(bits(x), bits(weight), bits(bias), eps, **options)).view(
        torch.bfloat16
    )


def sample(rows: int, width: int, seed: int, offset: float = 0.0):
    """bf16 rows (offset + N(0, 3)) and a bf16 weight and bias."""
    g = torch.Generator().manual_seed(seed)
    x = (offset + 3 * torch.randn(rows, width, generator=g)).bfloat16()
    weight = (1 + 0.5 * torch.randn(width, generator=g)).bfloat16()
    bias = (0.5 * torch.randn(width, generator=g)).bfloat16()
    return x, weight, bias


def reference(x, weight, bias, eps=1e-5) -> torch.Tensor:
    """The same LayerNorm in float64 on the same bf16 values, not rounded."""
    return F.layer_norm(x.double(), (x.shape[-1],), weight.double(), bias.double(), eps)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_layer_norm_bf16_is_the_function_within_one_bf16_rounding(width, offset):
    """Within a bf16 ulp of the exact result (float64), as torch's own bf16 LayerNorm is; rows far
    from zero (offset 100, where a sum of squares about zero would lose the variance) too."""
    x, weight, bias = sample(301, width, seed=width, offset=offset)
    exact = reference(x, weight, bias)
    ulp = exact.abs() * 2.0**-7 + 1e-4  # one bf16 ulp, plus float32's part in y ~ 0 (t * w ~ -b)
    ours = core_layer_norm(x, weight, bias).double()
    torchs = F.layer_norm(x, (width,), weight, bias).double()
    if width > 1:  # a row of one value is all bias (var 0): both give exactly that
        assert ((torchs - exact).abs() <= ulp).all()  # the bound holds for torch's, so it is a fair one
    assert ((ours - exact).abs() <= ulp).all()
    assert ((ours - torchs).abs() <= 2 * ulp).all()


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("num_threads", [1, 3])
def test_layer_norm_kernels_give_the_same_bits_on_any_threads(width, num_threads):
    x, weight, bias = sample(257, width, seed=7)
    kernels = _core.layer_norm_kernels()
    assert kernels[-1] == "scalar"
    first = core_layer_norm(x, weight, bias, kernel="scalar", num_threads=1)
    for kernel in ["auto", *kernels]:
        out = core_layer_norm(x, weight, bias, kernel=kernel, num_threads=num_threads)
        assert np.array_equal(bits(out), bits(first)), kernel


def test_layer_norm_bf16_keeps_any_leading_shape_writes_out_and_isolates_nan_rows():
    x, weight, bias = sample(2 * 3 * 5, 48, seed=3)
    x = x.reshape(2, 3, 5, 48)
    x[1, 2, 4, 7] = float("nan")
    out = torch.empty_like(x)
    returned = _core.layer_norm_bf16(bits(x), bits(weight), bits(bias), 1e-5, out=bits(out))
    assert np.shares_memory(returned, bits(out))
    assert torch.isnan(out[1, 2, 4]).all()
    rest = torch.ones(2, 3, 5, dtype=torch.bool)
    rest[1, 2, 4] = False
    assert not torch.isnan(out[rest]).any()
    assert np.array_equal(bits(out[rest]), bits(core_layer_norm(x[rest], weight, bias)))


LAYER_NORM_ERRORS = [
    (dict(x=np.zeros((2, 4), np.float32)), "layer_norm_bf16: x must have dtype uint16, got float32"),
    (dict(x=np.zeros((4, 2), np.uint16).T), "layer_norm_bf16: x must be C-contiguous"),
    (dict(x=np.zeros((2, 0), np.uint16)), r"layer_norm_bf16: x must have a non-empty last axis, got \(2, 0\)"),
    (dict(weight=np.zeros(3, np.uint16)), r"layer_norm_bf16: weight must have shape \(4,\), got \(3,\)"),
    (dict(bias=[0, 0, 0, 0]), "layer_norm_bf16: bias must be a numpy.ndarray, got list"),
    (dict(eps=-1.0), "layer_norm_bf16: eps must be finite and >= 0"),
    (dict(eps=float("nan")), "layer_norm_bf16: eps must be finite and >= 0"),
    (dict(num_threads=-1), "layer_norm_bf16: num_threads must be >= 0"),
    (dict(kernel="avx9000"), r"layer_norm_bf16: kernel 'avx9000' cannot run on this CPU \(available: auto"),
    (dict(out=np.zeros((2, 5), np.uint16)), r"layer_norm_bf16: out must have shape \(2, 4\), got \(2, 5\)"),
]


@pytest.mark.parametrize("change, message", LAYER_NORM_ERRORS)
def test_layer_norm_bf16_rejects_bad_arguments(change, message):
    arguments = dict(
        x=np.zeros((2, 4), np.uint16), weight=np.zeros(4, np.uint16), bias=np.zeros(4, np.uint16), eps=1e-5
    )
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        _core.layer_norm_bf16(**arguments)


def test_layer_norm_bf16_refuses_out_aliasing_x():
    x = np.zeros((2, 4), np.uint16)
    with pytest.raises(ValueError, match="out must not share memory with the input"):
        _core.layer_norm_bf16(x, np.zeros(4, np.uint16), np.zeros(4, np.uint16), 1e-5, out=x)


def test_core_layer_norm_runs_the_kernel_where_autograd_records_nothing():
    """The swapped module keeps the parameters (the same tensors, so loading a state dict still
    reaches them) and state-dict keys; without autograd it is the kernel, on a strided input too;
    with autograd recording it is torch's, so training through it still has gradients."""
    norm = nn.LayerNorm(48).bfloat16()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    core = CoreLayerNorm.sharing(norm)
    assert core.weight is norm.weight and core.bias is norm.bias and core.eps == norm.eps
    assert list(core.state_dict()) == list(norm.state_dict())
    x, _, _ = sample(40, 96, seed=1)
    x = x[:, ::2]  # strided rows
    with torch.inference_mode():
        assert np.array_equal(bits(core(x)), bits(core_layer_norm(x.contiguous(), norm.weight, norm.bias)))
    with torch.no_grad():
        assert np.array_equal(bits(core(x)), bits(core_layer_norm(x.contiguous(), norm.weight, norm.bias)))
    out = core(x)
    assert np.array_equal(bits(out), bits(norm(x)))
    out.float().sum().backward()
    assert norm.weight.grad is not None
    float_norm = nn.LayerNorm(48)
    with torch.inference_mode():  # not bf16: torch's
        assert torch.equal(CoreLayerNorm.sharing(float_norm)(x.float()), float_norm(x.float()))


def test_use_core_layer_norm_swaps_every_norm_of_the_model():
    from m2ort_fast.model import build_model

    model = build_model("tiny", 10, seed=0)
    before = {name: p for name, p in model.named_parameters()}
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert use_core_layer_norm(model) == len(norms) == 2 * 3 + 2 * model.cfg.depth + 1
    assert all(type(m) is CoreLayerNorm for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert {name: p for name, p in model.named_parameters()} == before
    assert use_core_layer_norm(model) == 0  # already swapped


@pytest.mark.parametrize("available", [False, True])
def test_the_torch_backend_takes_the_kernel_for_bf16_on_the_cpu_where_it_is_fast(available, monkeypatch):
    import m2ort_fast.backends.torch_backend as torch_backend
    from m2ort_fast.backends import make_backend
    from m2ort_fast.checkpoint import load_checkpoint
    from m2ort_fast.predict import SHIPPED_MODELS

    monkeypatch.setattr(torch_backend, "core_layer_norm_available", lambda: available)
    for precision, expected in (("bf16", available), ("fp32", False)):
        model, card = load_checkpoint(SHIPPED_MODELS["m2ort-her2st-tiny"])
        backend = make_backend("torch", model, card, device="cpu", precision=precision)
        assert backend.core_layer_norm is expected
        swapped = [type(m) is CoreLayerNorm for m in backend.model.modules() if isinstance(m, nn.LayerNorm)]
        assert all(swapped) if expected else not any(swapped)


def test_layer_norm_kernels_list_what_the_cpu_runs():
    """The vector kernel wherever /proc/cpuinfo shows its instructions (a build without AVX-512,
    ``-DM2ORT_NO_AVX512``, fails here on such a CPU), and then the torch backend takes it."""
    flags = cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    vector = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags
    assert _core.layer_norm_kernels() == (["avx512_bw", "scalar"] if vector else ["scalar"])
    assert core_layer_norm_available() is vector
