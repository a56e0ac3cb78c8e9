"""The quanto backend: quanto's weights built from quantrt's codes (8-bit ones as views of the buffers), against the
reference and torchao; what it cannot serve; the copies it keeps; the quanto qtype of each format."""

import copy

import optimum.quanto as quanto
import pytest
import torch

import quantrt
from quantrt import QuantConfig
from quantrt.backends import BackendUnavailable, get_backend
from quantrt.backends.quanto import qtype_name
from quantrt.formats import QUANTO_QTYPES
from quantrt.schemes import QUANTO_WEIGHTS, resolve_scheme

from .cases import backends_of, case_id, flux_inputs, linear_model, quantized_copies, tiny_flux, tolerance

CPU = torch.device("cpu")
# torch warns that torchao/quanto tensor subclasses cannot be hashed for its AOT autograd cache
COMPILE_WARNINGS = pytest.mark.filterwarnings("ignore:.*_stable_hash_for_caching:UserWarning")
SERVED = [("int8wo", None), ("int4wo", 32), ("int4wo", 128), ("uint4wo", 16), ("uint2wo", 32),
          ("float8wo_e4m3", None), ("float8wo_e5m2", None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SERVED, ids=case_id)
def test_linear_matches_reference(case, dtype):
    scheme, group_size = case
    qts = quantized_copies(linear_model(dtype), scheme, group_size, ["reference", "quanto"])
    assert backends_of(qts["quanto"]) == {"quanto"}
    x = torch.randn(3, 11, 256, dtype=dtype)
    expected, actual = qts["reference"](x), qts["quanto"](x)
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **tolerance(scheme, dtype))


@pytest.mark.parametrize("case", [("int8wo", None), ("int4wo", 32), ("uint2wo", 16), ("float8wo_e4m3", None)],
                         ids=case_id)
def test_tiny_flux_matches_reference_and_torchao(case):
    scheme, group_size = case
    dtype = torch.bfloat16
    backends = ["reference", "quanto", "torchao"]
    qts = quantized_copies(tiny_flux(dtype), scheme, group_size, backends)
    inputs = flux_inputs(dtype)
    with torch.no_grad():
        outputs = {backend: qt(**inputs)[0] for backend, qt in qts.items()}
    for backend in backends[1:]:
        torch.testing.assert_close(outputs[backend], outputs["reference"], **tolerance(scheme, dtype))


def test_every_quanto_qtype_quantrt_names_is_quantos_with_the_formats_bits_and_dtype():
    for qtype, storage in QUANTO_QTYPES.items():
        theirs = quanto.qtypes[qtype]
        assert theirs.bits == storage.bits, qtype
        # 8-bit codes are quanto's data as they are (fp8 viewed as quanto's float8 dtype); packed ones are repacked
        assert storage.packed or theirs.dtype == storage.code_dtype, qtype
        scheme = QUANTO_WEIGHTS[qtype]
        assert scheme.storage == storage and scheme.weight_only and QUANTO_WEIGHTS[qtype[1:]] == scheme
    assert set(QUANTO_QTYPES) == set(quanto.qtypes) - {"qfloat8_e4m3fnuz"}  # fnuz: ROCm's fp8, no quantrt format


@pytest.mark.parametrize("name, qtype", [("int8wo", "qint8"), ("int4wo", "qint4"), ("uint4wo", "qint4"),
                                         ("uint2wo", "qint2"), ("float8wo_e4m3", "qfloat8_e4m3fn"),
                                         ("float8wo_e5m2", "qfloat8_e5m2")])
def test_qtype_of_each_served_scheme(name, qtype):
    assert qtype_name(resolve_scheme(name)) == qtype


def test_quanto_weight_is_a_frozen_quanto_tensor_outside_the_state_dict():
    qt = quantrt.QuantizedTransformer.from_model(linear_model(torch.float32), QuantConfig("int4wo", group_size=32,
                                                 backend="quanto"), progress=False)
    layer = qt.quantized_layers()["0"]
    assert type(layer.backend_weight).__name__ == "WeightQBitsTensor" and layer.backend_config == "qint4"
    torch.testing.assert_close(layer.backend_weight.dequantize(), layer.dequantize())
    assert not any("backend" in key for key in qt.state_dict())


def test_single_output_channel():
    model = torch.nn.Sequential(torch.nn.Linear(64, 1))
    qts = quantized_copies(model, "int8wo", None, ["reference", "quanto"])
    x = torch.randn(5, 64)
    torch.testing.assert_close(qts["quanto"](x), qts["reference"](x))


@pytest.mark.parametrize("name, group_size, words", [
    ("uint3wo", None, ["uint3", "qint2, qint4"]),
    ("fp6_e3m2", None, ["fp6_e3m2"]),
    ("int8wo", 64, ["per output channel"]),
    ("int8dq", None, ["static", "per token"]),
    ("float8dq_e4m3_row", None, ["static"]),
    ("float8_static_activation_float8_weight", None, ["calibrat"]),
])
def test_says_what_it_cannot_serve(name, group_size, words):
    reason = get_backend("quanto").unavailable_reason(resolve_scheme(name, group_size), CPU)
    assert reason is not None and all(word in reason for word in words), reason


def test_explicit_quanto_that_cannot_serve_raises_naming_layer_scheme_device_reason():
    with pytest.raises(BackendUnavailable) as error:
        quantrt.QuantizedTransformer.from_model(linear_model(torch.float32), QuantConfig("int8dq", backend="quanto"),
                                                progress=False)
    message = str(error.value)
    assert "'0'" in message and "int8dq" in message and "cpu" in message and "per token" in message


def test_moving_the_model_rebuilds_the_quanto_weight():
    qts = quantized_copies(linear_model(torch.float32), "uint2wo", 32, ["reference", "quanto"])
    for qt in qts.values():
        qt.to(torch.bfloat16)
    assert qts["quanto"].quantized_layers()["0"].backend_weight.dtype == torch.bfloat16
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    torch.testing.assert_close(qts["quanto"](x), qts["reference"](x), **tolerance("uint2wo", torch.bfloat16))


@pytest.mark.parametrize("case, dtype", [(("int4wo", 128), torch.bfloat16), (("float8wo_e5m2", None), torch.float32)],
                         ids=["int4wo-g128-bf16", "float8wo_e5m2-fp32"])
@COMPILE_WARNINGS
def test_compiles_fullgraph_on_cpu(case, dtype):
    # int4 / group 128 / bf16 is the case quanto's own optimized CPU tensor (tinygemm) fails to compile
    scheme, group_size = case
    qt = quantized_copies(linear_model(dtype), scheme, group_size, ["quanto"])["quanto"]
    x = torch.randn(7, 256, dtype=dtype)
    eager = qt(x)
    torch._dynamo.reset()
    compiled = torch.compile(qt, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, **tolerance(scheme, dtype))


def test_deepcopy_rebuilds_the_quanto_weight():
    # quanto's tensors cannot be deep-copied themselves; the copy rebuilds its own from its buffers
    qt = quantized_copies(linear_model(torch.float32), "int4wo", 32, ["quanto"])["quanto"]
    twin = copy.deepcopy(qt)
    original, copied = qt.quantized_layers()["0"], twin.quantized_layers()["0"]
    assert copied.backend_weight is not original.backend_weight and copied.backend is original.backend
    x = torch.randn(3, 256)
    torch.testing.assert_close(twin(x), qt(x))


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def assert_8bit_weight_views_the_buffers(layer) -> None:
    # quanto's data [N, K] is quantrt's qweight (int8, or fp8 bits viewed as float8), its scale [N, 1] the scale
    weight = layer.backend_weight
    assert type(weight).__name__ == "WeightQBytesTensor"
    assert storage_of(weight._data) == storage_of(layer.qweight)
    assert storage_of(weight._scale) == storage_of(layer.scale)
    assert layer.backend.extra_bytes(layer) == 0


SHARED_8BIT = [("int8wo", None), ("float8wo_e4m3", None), ("float8wo_e5m2", None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SHARED_8BIT, ids=case_id)
def test_8bit_weight_is_a_view_of_the_buffers(case, dtype):
    scheme, group_size = case
    qts = quantized_copies(linear_model(dtype), scheme, group_size, ["reference", "quanto"])
    twin = copy.deepcopy(qts["quanto"])
    x = torch.randn(4, 256, dtype=dtype)
    for qt in (qts["quanto"], twin):
        for layer in qt.quantized_layers().values():
            assert_8bit_weight_views_the_buffers(layer)
        torch.testing.assert_close(qt(x), qts["reference"](x), **tolerance(scheme, dtype))
    # the copy's weight views the copy's own buffers
    assert storage_of(twin.model[0].qweight) != storage_of(qts["quanto"].model[0].qweight)


@pytest.mark.parametrize("case", [("int8wo", None), ("float8wo_e4m3", None)], ids=case_id)
def test_8bit_views_follow_to_load_state_dict_and_from_pretrained(case, tmp_path):
    scheme, group_size = case
    qts = quantized_copies(linear_model(torch.float32), scheme, group_size, ["reference", "quanto"])
    for qt in qts.values():
        qt.to(torch.bfloat16)  # new scale buffers: prepare rebuilds the views on them
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    expected = qts["reference"](x)
    target = quantized_copies(linear_model(torch.bfloat16), scheme, group_size, ["quanto"])["quanto"]
    target.load_state_dict(qts["quanto"].state_dict())
    qts["quanto"].save_pretrained(tmp_path / "q")
    loaded = quantrt.QuantizedTransformer.from_pretrained(tmp_path / "q", backend="quanto",
                                                          model=lambda: linear_model(torch.bfloat16))
    assert backends_of(loaded) == {"quanto"}
    for qt in (qts["quanto"], target, loaded):
        for layer in qt.quantized_layers().values():
            assert_8bit_weight_views_the_buffers(layer)
        torch.testing.assert_close(qt(x), expected, **tolerance(scheme, torch.bfloat16))


@pytest.mark.parametrize("case", [("int8wo", None), ("float8wo_e4m3", None), ("int4wo", 32), ("uint2wo", 16)],
                         ids=case_id)
def test_memory_footprint_counts_quantos_copies_beside_the_buffers(case):
    scheme, group_size = case
    qts = quantized_copies(tiny_flux(torch.bfloat16), scheme, group_size, ["reference", "quanto"])
    copies = 0
    for layer in qts["quanto"].quantized_layers().values():
        buffers = {storage_of(b) for b in layer.buffers()}
        weight = layer.backend_weight
        if group_size is None:
            inner = [weight._data, weight._scale]
        else:  # packed codes (quanto's PackedTensor holds them in _data._data) and the shift
            inner = [weight._data._data, weight._scale, weight._shift]
            bits = 4 if scheme == "int4wo" else 2
            n, k = layer.out_features, layer.in_features
            # codes packed 8 / bits to a byte; one bf16 shift per group; the scale is a view of quantrt's
            assert layer.backend.extra_bytes(layer) == n * k * bits // 8 + n * (k // group_size) * 2
        layer_copies = sum(t.numel() * t.element_size() for t in inner if storage_of(t) not in buffers)
        assert layer.backend.extra_bytes(layer) == layer_copies
        copies += layer_copies
    assert (copies == 0) == (group_size is None)
    footprint = {backend: qt.memory_footprint() for backend, qt in qts.items()}
    assert footprint["quanto"] == footprint["reference"] + copies
    summary_bytes = {backend: sum(r.bytes for r in qt.summary()) for backend, qt in qts.items()}
    assert summary_bytes["quanto"] == summary_bytes["reference"] + copies
