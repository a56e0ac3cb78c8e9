"""The triton backend on CPU, through Triton's interpreter (tests/conftest.py turns it on): each format's op against
a float64 product with the layer's dequantized weight, the kernel format each storage format names, what it refuses,
and a forward that torch.compile traces without graph breaks. fp16 and fp32 only: the interpreter gets bf16 wrong
(the ops compute bf16 in fp32 there, which tests/kernels checks)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantrt.backends import get_backend
from quantrt.backends.triton import weight_format
from quantrt.formats import FORMATS, FP8_BITS
from quantrt.kernels.floatx import FP8_FORMATS
from quantrt.kernels.formats import FLOATX, GGUF, INT8, UINTX
from quantrt.kernels.ops import use_reference
from quantrt.modules import QuantizedLinear
from quantrt.schemes import resolve_scheme

from .cases import backends_of, case_id, quantized_copies

CPU = torch.device("cpu")
DTYPES = [torch.float16, torch.float32]
DTYPE_IDS = {torch.float16: "fp16", torch.float32: "fp32"}
# one scheme of every kernel path: int8 per channel and grouped, uintX (4 bits: word loads; 3 bits: two planes),
# fpX, fp8 e4m3 / e5m2, GGUF's blocks of 32 with a min (the K-quants need K = 256: tests/kernels/test_gguf.py)
CASES = [("int8wo", None), ("int8wo", 32), ("int4wo", 32), ("uint3wo", 32), ("fp6_e3m2", None), ("fp4_e2m1", None),
         ("float8wo_e4m3", None), ("float8wo_e5m2", None), ("q5_1", None)]
# against float64: fp32 accumulation order; fp16 rounds x's products (the weight tile in fp16) and the output
TOLERANCE = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 1e-2, "rtol": 1e-2}}


def one_linear(dtype: torch.dtype, k: int = 128, n: int = 48) -> nn.Module:
    return nn.Sequential(nn.Linear(k, n, dtype=dtype))


@pytest.mark.parametrize("name", list(FORMATS))
def test_weight_format_is_the_kernels_view_of_each_format(name):
    storage = FORMATS[name]
    fmt = weight_format(storage)
    assert fmt.name == storage.name and fmt.bits == storage.bits
    kind = {"int8": INT8, "uintx": UINTX, "gguf": GGUF}.get(storage.family, FLOATX)
    assert fmt.kind == kind and fmt.has_zero == storage.has_zero
    assert fmt.gguf == (storage.name if storage.family == "gguf" else "")


def test_fp8_bits_are_the_kernels():
    assert FP8_BITS == FP8_FORMATS


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_linear_matches_a_float64_product_with_the_dequantized_weight(case, dtype):
    scheme, group_size = case
    qt = quantized_copies(one_linear(dtype), scheme, group_size, ["triton"])["triton"]
    assert backends_of(qt) == {"triton"}
    layer = qt.quantized_layers()["0"]
    x = torch.randn(2, 3, 128, dtype=dtype)
    y = qt(x)
    expected = F.linear(x.double(), layer.dequantize().double(), layer.bias.double())
    assert y.dtype == dtype and y.shape == (2, 3, 48)
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])


def test_a_non_contiguous_input_is_served():
    qt = quantized_copies(one_linear(torch.float32), "int4wo", 32, ["triton"])["triton"]
    layer = qt.quantized_layers()["0"]
    x = torch.randn(128, 5).t()  # rows strided
    expected = F.linear(x.double(), layer.dequantize().double(), layer.bias.double())
    torch.testing.assert_close(qt(x).double(), expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("name, words", [("int8dq", ["int8_token", "weight-only"]),
                                         ("float8dq_e4m3_row", ["fp8_row"]),
                                         ("float8_static_activation_float8_weight", ["fp8_static"])])
def test_refuses_activation_quantizing_schemes(name, words):
    reason = get_backend("triton").unavailable_reason(resolve_scheme(name), CPU)
    assert reason is not None and all(word in reason for word in words), reason


def test_refuses_what_the_kernels_cannot_run():
    triton = get_backend("triton")
    scheme = resolve_scheme("int8wo")
    assert triton.unavailable_reason(scheme, CPU) is None
    assert "float64" in triton.layer_unavailable_reason(scheme, CPU, (48, 128), torch.float64)
    assert triton.layer_unavailable_reason(scheme, CPU, (48, 128), torch.float16) is None
    assert "CUDA device" in triton.unavailable_reason(scheme, torch.device("meta"))


def test_needs_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    reason = get_backend("triton").unavailable_reason(resolve_scheme("int8wo"), CPU)
    assert reason is not None and "TRITON_INTERPRET=1" in reason


@pytest.mark.parametrize("case", [("uint3wo", 32), ("float8wo_e5m2", None), ("q4_0", None)], ids=case_id)
def test_forward_traces_without_graph_breaks(case):
    # Dynamo traces the format's kernel op and arguments (StorageFormat.kernel); "eager" runs the captured graph
    # without Inductor, so only tracing is tested
    scheme, group_size = case
    qt = quantized_copies(one_linear(torch.float32), scheme, group_size, ["triton"])["triton"]
    x = torch.randn(3, 128)
    torch._dynamo.reset()
    compiled = torch.compile(qt, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), qt(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("scheme", ["int8wo", "uint4wo", "fp6_e3m2", "float8wo_e4m3"])
def test_the_ops_take_an_empty_batch(scheme, dtype):
    # QuantizedLinear answers M = 0 before any backend runs; the kernels must take it too (interpreter path)
    linear = nn.Linear(128, 48, dtype=dtype)
    layer = QuantizedLinear.from_linear(linear, resolve_scheme(scheme, 32 if scheme == "uint4wo" else None),
                                        get_backend("triton"), "up")
    x = torch.randn(0, 128, dtype=dtype)
    assert not use_reference(x)
    y = layer.backend.linear(layer, x)
    assert y.shape == (0, 48) and y.dtype == dtype
