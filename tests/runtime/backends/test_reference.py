"""The reference backend, the oracle of the other backends' tests, against float64 arithmetic written out here: the
weight-only product with the dequantized weight, and the activation-quantizing schemes with their activations
quantized per token (int8), per tensor or row (fp8 dynamic) or with the calibrated scale (fp8 static)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantrt.backends import get_backend
from quantrt.schemes import SCHEMES, resolve_scheme

from .cases import backends_of, case_id, quantized_copies

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
WEIGHT_ONLY = [("int8wo", None), ("int8wo", 32), ("int4wo", 32), ("uint3wo", 32), ("uint7wo", 64),
               ("fp6_e3m2", None), ("fp3_e1m1", None), ("float8wo_e4m3", None), ("float8wo_e5m2", None)]
# against float64: the weight is rounded to x's dtype before F.linear (bf16 keeps 8 significant bits), and the
# output is rounded to it
TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 5e-2, "rtol": 2e-2},
             torch.float16: {"atol": 5e-3, "rtol": 2e-3}}
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def one_layer(scheme: str, group_size: int | None, dtype: torch.dtype = torch.float32, **config):
    qt = quantized_copies(nn.Sequential(nn.Linear(128, 48, dtype=dtype)), scheme, group_size, ["reference"],
                          **config)["reference"]
    assert backends_of(qt) == {"reference"}
    return qt, qt.quantized_layers()["0"]


def float64_linear(x: torch.Tensor, layer) -> torch.Tensor:
    return F.linear(x.double(), layer.dequantize().double(), layer.bias.double())


def test_serves_every_scheme_on_cpu():
    reference = get_backend("reference")
    assert all(reference.unavailable_reason(scheme, CPU) is None for scheme in SCHEMES.values())


@pytest.mark.parametrize("name, reason", [("float8wo_e4m3", "MPS has no float8 dtypes"),
                                          ("float8dq_e4m3_row", "MPS has no float8 dtypes"),
                                          ("int8wo", None), ("uint4wo", None), ("fp6_e3m2", None)])
def test_on_mps_only_float8_codes_are_refused(name, reason):
    assert get_backend("reference").unavailable_reason(resolve_scheme(name), torch.device("mps")) == reason


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", WEIGHT_ONLY, ids=case_id)
def test_weight_only_is_the_float64_product_with_the_dequantized_weight(case, dtype):
    qt, layer = one_layer(*case, dtype=dtype)
    x = torch.randn(2, 5, 128, dtype=dtype)
    y = qt(x)
    assert y.dtype == dtype and y.shape == (2, 5, 48)
    torch.testing.assert_close(y.double(), float64_linear(x, layer), **TOLERANCE[dtype])


@pytest.mark.parametrize("case", [("int8dq", None), ("int8dq", 64), ("int4dq", 32)], ids=case_id)
def test_int8_activations_are_quantized_per_token(case):
    qt, layer = one_layer(*case)
    x = torch.randn(6, 128, dtype=torch.float64)
    x[2] = 0  # an all-zero row keeps scale 1
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    scale[2] = 1
    codes = torch.round(x / scale).clamp(-127, 127)
    expected = F.linear(codes * scale, layer.dequantize().double(), layer.bias.double())
    torch.testing.assert_close(qt(x.float()).double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, float64_linear(x, layer), atol=1e-4)  # the activations' rounding shows


@pytest.mark.parametrize("name, per_row", [("float8dq_e4m3_tensor", False), ("float8dq_e4m3_row", True)])
def test_fp8_dynamic_activations_are_quantized_per_tensor_or_row(name, per_row):
    qt, layer = one_layer(name, None)
    x = torch.randn(6, 128)
    x[1] *= 100  # a large row: per tensor, the other rows lose precision to it
    absmax = x.abs().amax(dim=-1, keepdim=True) if per_row else x.abs().amax().reshape(1, 1)
    scale = absmax / FP8_MAX
    codes = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    expected = F.linear(codes.double() * scale.double(), layer.dequantize().double(), layer.bias.double())
    torch.testing.assert_close(qt(x).double(), expected, atol=1e-4, rtol=1e-5)


def test_fp8_static_activations_use_the_calibrated_scale_and_refuse_without_it():
    name = "float8_static_activation_float8_weight"
    qt, layer = one_layer(name, None)
    with pytest.raises(RuntimeError, match="calibrate"):
        qt(torch.randn(2, 128))
    qt, layer = one_layer(name, None, activation_scale=0.01)
    x = torch.randn(6, 128)
    x[0, 0] = 10.0  # beyond 448 * 0.01: clamped to the largest fp8 code
    codes = (x / 0.01).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    expected = F.linear(codes.double() * layer.act_scale.double(), layer.dequantize().double(), layer.bias.double())
    torch.testing.assert_close(qt(x).double(), expected, atol=1e-4, rtol=1e-5)
