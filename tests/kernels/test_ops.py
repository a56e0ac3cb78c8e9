import copy

import pytest
import torch
from torch import nn

import quantrt
from quantrt.backends import BackendUnavailable, get_backend
from quantrt.kernels import ops  # noqa: F401  (registers the quantrt:: ops)
from quantrt.kernels import quantize as Q
from quantrt.kernels.int8 import int8_linear
from quantrt.schemes import resolve_scheme

from .helpers import N, TOLERANCES, assert_linear_close, inputs


def _int8(x, weight, bias):
    q, s = Q.quantize_int8(weight, 16)
    return torch.ops.quantrt.int8_linear.default, (x, q, s, bias), Q.dequantize_int8(q, s)


def _uint4(x, weight, bias):
    q, s, z = Q.quantize_uintx(weight, 4, 32)
    return torch.ops.quantrt.uintx_linear.default, (x, q, s, z, bias, 4), Q.dequantize_uintx(q, s, z, 4, x.shape[1])


def _uint3(x, weight, bias):
    q, s, z = Q.quantize_uintx(weight, 3, 16)
    return torch.ops.quantrt.uintx_linear.default, (x, q, s, z, bias, 3), Q.dequantize_uintx(q, s, z, 3, x.shape[1])


def _fp6(x, weight, bias):
    q, s = Q.quantize_floatx(weight, 3, 2)
    return torch.ops.quantrt.floatx_linear.default, (x, q, s, bias, 3, 2), Q.dequantize_floatx(q, s, 3, 2, x.shape[1])


def _fp8_e4m3_tensor(x, weight, bias):
    q, s = Q.quantize_fp8(weight, "e4m3", per_tensor=True)
    return torch.ops.quantrt.floatx_linear.default, (x, q.view(torch.uint8), s, bias, 4, 3), Q.dequantize_fp8(q, s)


def _fp8_e5m2(x, weight, bias):
    q, s = Q.quantize_fp8(weight, "e5m2")
    return torch.ops.quantrt.floatx_linear.default, (x, q.view(torch.uint8), s, bias, 5, 2), Q.dequantize_fp8(q, s)


def _q4_1(x, weight, bias):
    q, p = Q.quantize_gguf(weight, "q4_1")
    return (torch.ops.quantrt.gguf_linear.default, (x, q, p, bias, 3),
            Q.dequantize_gguf(q, p, "q4_1", x.shape[1]))


OPS = [_int8, _uint4, _uint3, _fp6, _fp8_e4m3_tensor, _fp8_e5m2, _q4_1]
OP_IDS = ["int8-g16", "uint4-g32", "uint3-g16", "fp6_e3m2", "fp8_e4m3-tensor", "fp8_e5m2", "gguf-q4_1"]


@pytest.mark.parametrize("dtype, bias", [(torch.float16, True), (torch.float32, False)],
                         ids=["fp16-bias", "fp32-nobias"])
@pytest.mark.parametrize("make", OPS, ids=OP_IDS)
def test_opcheck_on_the_reference_path(monkeypatch, make, dtype, bias):
    """Schema, fake tensors, AOT dispatch: on CPU with the interpreter off the ops run the reference
    (the interpreter cannot run on fake tensors; the compiled Triton path is a GPU check)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight, b = inputs(5, N, 96, dtype, bias)
    op, args, dequantized = make(x, weight, b)
    torch.library.opcheck(op, args)
    assert_linear_close(op(*args), x, dequantized, b)


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("make", OPS, ids=OP_IDS)
def test_ops_run_the_kernels_under_the_interpreter(make, m):
    x, weight, b = inputs(m, N, 96, torch.float16, m != 7)
    op, args, dequantized = make(x, weight, b)
    assert_linear_close(op(*args), x, dequantized, b)


def test_fake_tensors_get_shapes_under_the_interpreter():
    x, weight, b = inputs(5, N, 96, torch.float16, True)
    op, args, _ = _uint4(x, weight, b)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        y = op(*fake)
    assert y.shape == (5, N) and y.dtype == torch.float16


@pytest.mark.parametrize("make", [_int8, _uint4, _fp8_e5m2, _q4_1], ids=["int8-g16", "uint4-g32", "fp8_e5m2", "gguf-q4_1"])
def test_bf16_under_the_interpreter_is_computed_in_fp32(make):
    x, weight, b = inputs(7, N, 96, torch.bfloat16, True)
    op, args, dequantized = make(x, weight, b)
    y = op(*args)
    ref = x.double() @ dequantized.double().T + b.double()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, atol=1e-2, rtol=1e-2)


def test_empty_batch():
    x, weight, b = inputs(0, N, 96, torch.float16, True)
    for make in OPS:
        op, args, _ = make(x, weight, b)
        assert op(*args).shape == (0, N)


def _models(dtype):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 40)).to(dtype)
    return model, copy.deepcopy(model)


def _quantize(model, scheme, group_size, backend):
    config = quantrt.QuantConfig(scheme, group_size=group_size, backend=backend)
    return quantrt.QuantizedTransformer.from_model(model, config)


SCHEMES = [("int8wo", None), ("int4wo", 32), ("uint2wo", 32), ("fp6_e3m2", None), ("float8wo_e4m3", None),
           ("float8wo_e5m2", None)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("scheme, group_size", SCHEMES, ids=[s for s, _ in SCHEMES])
def test_triton_backend_matches_reference(scheme, group_size, dtype):
    model, twin = _models(dtype)
    qt = _quantize(model, scheme, group_size, "triton")
    ref = _quantize(twin, scheme, group_size, "reference")
    assert {r.backend for r in qt.summary()} == {"triton"}
    x = torch.randn(2, 5, 64, dtype=dtype)
    tolerance = {k: 2 * v for k, v in TOLERANCES[dtype].items()}  # two layers
    torch.testing.assert_close(qt(x), ref(x), **tolerance)
    strided = torch.randn(64, 3, dtype=dtype).T  # [3, 64], not contiguous
    torch.testing.assert_close(qt(strided), ref(strided), **tolerance)
    assert qt(x[:0]).shape == (0, 5, 40)


def test_triton_backend_bf16_on_cpu():
    model, twin = _models(torch.bfloat16)
    qt, ref = _quantize(model, "int4wo", 32, "triton"), _quantize(twin, "int4wo", 32, "reference")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = qt(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y, ref(x), atol=3e-2, rtol=3e-2)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    backend = get_backend("triton")
    assert "TRITON_INTERPRET=1" in backend.unavailable_reason(resolve_scheme("int8wo"), torch.device("cpu"))
    model, _ = _models(torch.float32)
    with pytest.raises(BackendUnavailable, match="Triton kernels need a CUDA device"):
        quantrt.QuantizedTransformer.from_model(model, quantrt.QuantConfig("int8wo", backend="triton"))


@pytest.mark.parametrize("scheme", ["int8dq", "float8dq_e4m3_row"])
def test_triton_serves_weight_only_schemes_only(scheme):
    reason = get_backend("triton").unavailable_reason(resolve_scheme(scheme), torch.device("cpu"))
    assert reason is not None and "no own kernel yet" in reason


def test_launcher_and_op_agree():
    x, weight, b = inputs(7, N, 96, torch.float32, True)
    q, s = Q.quantize_int8(weight)
    torch.testing.assert_close(torch.ops.quantrt.int8_linear(x, q, s, b), int8_linear(x, q, s, b), rtol=0, atol=0)
