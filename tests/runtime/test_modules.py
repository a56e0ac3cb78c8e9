"""QuantizedLinear and quantize_: what is quantized and what is refused (no Linear layers, shapes a scheme cannot
take, non-finite weights), inputs checked at run time (dtype, width, strides, empty batches, autocast, under
torch.compile), and forwards from many threads. docs/reliability.md lists these cases and what happens in each."""

from __future__ import annotations

import copy
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn

import quantrt
import quantrt.modules
from quantrt import QuantConfig, QuantizedLinear, QuantizedTransformer
from quantrt.schemes import resolve_scheme

K, N = 128, 48
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# one backend computing the same values twice (other strides or leading dims): accumulation order at most
SAME_BACKEND = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
                torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
# against the float64 oracle F.linear(x, dequantized weight): the output's rounding to its dtype
ORACLE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
          torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}

# (backend, scheme, group_size, activation dtype); triton runs through the interpreter (fp16/fp32 only there)
CASES = [
    ("reference", "int8wo", None, torch.bfloat16), ("reference", "uint4wo", 32, torch.float32),
    ("reference", "int8dq", None, torch.float32), ("reference", "float8dq_e4m3_tensor", None, torch.bfloat16),
    ("reference", "fp6_e3m2", None, torch.float16),
    ("torchao", "int8wo", None, torch.bfloat16), ("torchao", "uint4wo", 32, torch.float32),
    ("torchao", "int8dq", None, torch.float32), ("torchao", "int4dq", 32, torch.float32),
    ("quanto", "int8wo", None, torch.bfloat16), ("quanto", "uint4wo", 32, torch.float32),
    ("quanto", "float8wo_e4m3", None, torch.float32),
    ("triton", "int8wo", None, torch.float16), ("triton", "uint4wo", 32, torch.float32),
    ("triton", "fp6_e3m2", None, torch.float16), ("triton", "float8wo_e5m2", None, torch.float32),
]


def case_id(case) -> str:
    backend, scheme, group_size, dtype = case
    return f"{backend}-{scheme}{'-g' + str(group_size) if group_size else ''}-{DTYPE_IDS[dtype]}"


def one_layer(dtype: torch.dtype, k: int = K, n: int = N) -> nn.Module:
    return nn.Sequential(OrderedDict(up=nn.Linear(k, n, dtype=dtype)))


def quantized(case) -> QuantizedTransformer:
    backend, scheme, group_size, dtype = case
    return QuantizedTransformer.from_model(one_layer(dtype), QuantConfig(scheme, group_size=group_size, backend=backend),
                                           progress=False)


def oracle(qt: QuantizedTransformer, x: torch.Tensor) -> torch.Tensor:
    layer = qt.model.up
    return torch.nn.functional.linear(x.double(), layer.dequantize().double(), layer.bias.double())


def test_a_model_without_linear_layers_is_refused_by_both_entry_points():
    for quantize in (lambda m: QuantizedTransformer.from_model(m, "int8wo", progress=False),
                     lambda m: quantrt.quantize_(m, "int8wo", progress=False)):
        with pytest.raises(ValueError, match="Sequential has no nn.Linear layers"):
            quantize(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    model = one_layer(torch.float32)
    quantrt.quantize_(model, "int8wo", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantrt.quantize_(model, "int8wo", progress=False)


@pytest.mark.parametrize("scheme, group_size, bad_k, reason", [
    ("int4wo", None, 96, "K=96 is not a multiple of group_size=128"),
    ("uint3wo", None, 96, "K=96 is not a multiple of group_size=64"),
    ("int8wo", 64, 96, "K=96 is not a multiple of group_size=64"),
    ("fp6_e3m2", None, 66, "K=66 is not a multiple of 4, needed to pack 6-bit codes"),
    ("fp3_e1m1", None, 100, "K=100 is not a multiple of 8, needed to pack 3-bit codes"),
], ids=["int4wo", "uint3wo", "int8wo-g64", "fp6_e3m2", "fp3_e1m1"])
def test_layers_the_scheme_cannot_take_stay_in_full_precision_and_say_why(scheme, group_size, bad_k, reason):
    model = nn.Sequential(OrderedDict(fits=nn.Linear(128, bad_k), odd=nn.Linear(bad_k, 16)))
    odd = model.odd
    x = torch.randn(5, 128)
    qt = QuantizedTransformer.from_model(model, QuantConfig(scheme, group_size=group_size, backend="reference"),
                                         progress=False)
    reports = {r.name: r for r in qt.summary()}
    assert reports["fits"].scheme == scheme and reports["odd"].scheme == "none"
    assert reports["odd"].why == f"kept in full precision: {reason}"
    assert reason in str(qt.summary())
    assert qt.model.odd is odd  # the very same nn.Linear, untouched
    hidden = qt.model.fits(x)
    torch.testing.assert_close(qt(x), odd(hidden), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused_naming_the_layer(bad):
    model = nn.Sequential(OrderedDict(first=nn.Linear(64, 64), second=nn.Linear(64, 8)))
    with torch.no_grad():
        model.second.weight[3, 5] = bad
    with pytest.raises(ValueError, match=r"layer 'second'.*1 NaN/Inf.*modules_to_not_convert=\['second'\]"):
        QuantizedTransformer.from_model(copy.deepcopy(model), "int8wo", progress=False)
    # the fix the message gives works
    qt = QuantizedTransformer.from_model(model, QuantConfig("int8wo", modules_to_not_convert=["second"]),
                                         progress=False)
    assert [r.scheme for r in qt.summary()] == ["int8wo", "none"]


def other_float(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype != torch.float32 else torch.float16


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_inputs_of_another_dtype_are_refused_naming_layer_dtype_and_fix(case):
    qt = quantized(case)
    dtype = case[3]
    for bad in (torch.int64, torch.int32, torch.float64, other_float(dtype)):
        x = torch.ones(3, K, dtype=bad)
        with pytest.raises(ValueError) as error:
            qt(x)
        message = str(error.value)
        for words in ("layer 'up'", str(bad), str(dtype), f"x.to({dtype})", f"(3, {K})"):
            assert words in message, message


def test_under_autocast_floating_inputs_are_cast_to_the_layer_dtype():
    qt = quantized(("reference", "uint4wo", 32, torch.bfloat16))
    x = torch.randn(4, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = qt(x)
        with pytest.raises(ValueError, match="cast the input"):
            qt(x.long())
    torch.testing.assert_close(y, qt(x.bfloat16()), rtol=0, atol=0)


def test_inputs_of_the_wrong_width_or_rank_are_refused_naming_the_layer():
    qt = quantized(("reference", "int8wo", None, torch.float32))
    with pytest.raises(ValueError, match=rf"layer 'up' takes inputs of shape \[\.\.\., {K}\], got \(3, 64\)"):
        qt(torch.randn(3, 64))
    with pytest.raises(ValueError, match=rf"layer 'up' takes inputs of shape \[\.\.\., {K}\], got \(\)"):
        qt(torch.tensor(1.0))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_leading_dimensions_and_strides_do_not_change_the_result(case):
    qt = quantized(case)
    dtype = case[3]
    x = torch.randn(2, 3, 5, K, dtype=dtype)
    flat = qt(x.reshape(30, K))
    assert flat.shape == (30, N) and flat.dtype == dtype
    torch.testing.assert_close(qt(x), flat.reshape(2, 3, 5, N), **SAME_BACKEND[dtype])
    if resolve_scheme(case[1]).activation != "fp8_tensor":  # one activation scale per call: rows interact
        torch.testing.assert_close(qt(x[0]), flat[:15].reshape(3, 5, N), **SAME_BACKEND[dtype])
    if case[1] in ("int8wo", "uint4wo", "fp6_e3m2", "float8wo_e4m3", "float8wo_e5m2"):  # weight-only: exact math
        torch.testing.assert_close(qt(x).double(), oracle(qt, x), **ORACLE[dtype])
    strided = [torch.randn(K, 7, dtype=dtype).t(),  # [7, K], stride (1, 7)
               torch.randn(7, 2 * K, dtype=dtype)[:, ::2],  # every other column
               torch.randn(3, K, 4, dtype=dtype).transpose(1, 2),  # [3, 4, K], not contiguous
               torch.randn(2 * K, dtype=dtype).as_strided((5, K), (0, 1))]  # one row broadcast 5 times
    for x in strided:
        assert not x.is_contiguous()
        torch.testing.assert_close(qt(x), qt(x.contiguous()), **SAME_BACKEND[dtype])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_an_empty_batch_gives_an_empty_output(case):
    qt = quantized(case)
    for shape in [(0, K), (2, 0, K), (0, 3, K)]:
        y = qt(torch.randn(shape, dtype=case[3]))
        assert y.shape == (*shape[:-1], N) and y.dtype == case[3]


def test_the_input_check_compiles_without_graph_breaks():
    qt = quantized(("reference", "uint4wo", 32, torch.bfloat16))
    x = torch.randn(3, 5, K, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(qt.model, fullgraph=True)
    torch.testing.assert_close(compiled(x), qt(x), **SAME_BACKEND[torch.bfloat16])
    with pytest.raises(Exception, match="computes in torch.bfloat16 but got a torch.float32 input"):
        compiled(x.float())  # under fullgraph Dynamo reports the ValueError as the graph's exception


def mlp(seed: int | None = None) -> nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64))


@pytest.mark.parametrize("backend, scheme", [("reference", "uint4wo"), ("torchao", "uint4wo"), ("torchao", "int8dq"),
                                             ("quanto", "int8wo")])
def test_forward_from_many_threads_matches_serial(backend, scheme):
    qt = QuantizedTransformer.from_model(mlp(), QuantConfig(scheme, group_size=32 if scheme == "uint4wo" else None,
                                                            backend=backend), progress=False)
    inputs = [torch.randn(1 + i % 5, 256) for i in range(32)]
    with torch.no_grad():
        serial = [qt(x) for x in inputs]
        with ThreadPoolExecutor(8) as pool:
            threaded = list(pool.map(qt, inputs))
    for a, b in zip(threaded, serial):
        torch.testing.assert_close(a, b, **SAME_BACKEND[torch.float32])


@pytest.mark.parametrize("scheme", ["int8wo", "int4wo", "uint3wo", "fp6_e3m2", "float8wo_e4m3",
                                    "float8dq_e4m3_tensor"])
def test_set_weight_in_row_chunks_is_the_whole_quantization(monkeypatch, scheme):
    """QuantizedLinear.set_weight quantizes ~1M weights at a time (bounded temporaries while streaming);
    row chunks (of 3 rows here, the last one short) must give exactly the tensors of one whole call."""
    monkeypatch.setattr(quantrt.modules, "QUANTIZE_CHUNK", 3 * 128)
    weight = torch.randn(10, 128)
    layer = QuantizedLinear(128, 10, resolve_scheme(scheme), dtype=torch.float32)
    layer.set_weight(weight)
    whole = layer.scheme.quantize(weight)
    for key, tensor in whole.items():
        torch.testing.assert_close(getattr(layer, key), tensor, rtol=0, atol=0, msg=key)
