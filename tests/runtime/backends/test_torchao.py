"""The torchao backend: torchao's weights built from quantrt's codes, against the reference; the configs quantrt
builds; what it cannot serve; the copies it keeps beside the buffers."""

import copy

import pytest
import torch
import torchao.quantization as torchao_quantization

import quantrt
from quantrt import QuantConfig
from quantrt.backends import BackendUnavailable, get_backend
from quantrt.backends.torchao import CONFIG_BUILDERS, torchao_config
from quantrt.formats import FORMATS
from quantrt.schemes import resolve_scheme

from .cases import (
    DYNAMIC, WEIGHT_ONLY, backends_of, case_id, flux_inputs, linear_model, quantized_copies, tiny_flux, tolerance,
)

CPU = torch.device("cpu")
# torch warns that torchao/quanto tensor subclasses cannot be hashed for its AOT autograd cache
COMPILE_WARNINGS = pytest.mark.filterwarnings("ignore:.*_stable_hash_for_caching:UserWarning")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", WEIGHT_ONLY + DYNAMIC, ids=case_id)
def test_linear_matches_reference(case, dtype):
    scheme, group_size = case
    qts = quantized_copies(linear_model(dtype), scheme, group_size, ["reference", "torchao"])
    assert backends_of(qts["torchao"]) == {"torchao"}
    x = torch.randn(3, 11, 256, dtype=dtype)
    expected, actual = qts["reference"](x), qts["torchao"](x)
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **tolerance(scheme, dtype))


@pytest.mark.parametrize("case", [("int8wo", None), ("uint4wo", 16), ("uint3wo", 32), ("float8wo_e5m2", None),
                                  ("int4dq", 32)], ids=case_id)
def test_tiny_flux_matches_reference(case):
    scheme, group_size = case
    dtype = torch.bfloat16
    qts = quantized_copies(tiny_flux(dtype), scheme, group_size, ["reference", "torchao"])
    inputs = flux_inputs(dtype)
    with torch.no_grad():
        expected, actual = qts["reference"](**inputs)[0], qts["torchao"](**inputs)[0]
    torch.testing.assert_close(actual, expected, **tolerance(scheme, dtype))


def test_torchao_weight_holds_quantrt_codes_and_state_dict_stays_quantrt():
    qt = quantrt.QuantizedTransformer.from_model(linear_model(torch.float32), QuantConfig("uint3wo", group_size=32,
                                                 backend="torchao"), progress=False)
    layer = qt.quantized_layers()["0"]
    assert "quantrt's codes" in layer.backend_config
    assert isinstance(layer.backend_weight, torchao_quantization.IntxUnpackedToInt8Tensor)
    torch.testing.assert_close(layer.backend_weight.dequantize().float(), layer.dequantize())
    assert set(qt.state_dict()) == {f"model.{layer}.{name}" for layer in ("0", "2")
                                    for name in ("qweight", "scale", "zero")} | {"model.0.bias"}


# what torchao's quantize_ turns on for the whole process where a config keeps its default set_inductor_config=True
# (torchao.quantization.utils.recommended_inductor_config_setter)
INDUCTOR_SETTINGS = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions",
                     "force_fuse_int_mm_with_mul")


@pytest.mark.parametrize("case", [("int8wo", None), ("int4wo", 32), ("float8wo_e4m3", None), ("int8dq", None),
                                  ("int4dq", 32)], ids=case_id)
def test_quantizing_changes_no_global_inductor_setting(case):
    # off, so that torchao turning them on shows. Inductor's own patch, not monkeypatch: pytest >= 9.1 undoes a
    # setattr of an attribute it cannot find statically (a config module's) by deleting it, for every later test
    with torch._inductor.config.patch({setting: False for setting in INDUCTOR_SETTINGS}):
        before = torch._inductor.config.save_config_portable()
        precision = torch.get_float32_matmul_precision()
        scheme, group_size = case
        qt = quantized_copies(linear_model(torch.float32), scheme, group_size, ["torchao"])["torchao"]
        assert backends_of(qt) == {"torchao"}
        assert torch._inductor.config.save_config_portable() == before
        assert torch.get_float32_matmul_precision() == precision


@pytest.mark.parametrize("name, config", [
    ("int8wo", "Int8WeightOnlyConfig"), ("int4wo", "IntxWeightOnlyConfig"), ("uint3wo", "IntxWeightOnlyConfig"),
    ("float8wo_e5m2", "Float8WeightOnlyConfig"), ("int8dq", "Int8DynamicActivationInt8WeightConfig"),
    ("int4dq", "Int8DynamicActivationIntxWeightConfig")])
def test_the_config_each_scheme_maps_onto_on_cpu(name, config):
    # 4 bits on CPU: not tinygemm's Int4WeightOnlyConfig (CUDA only) but the intX config
    built = torchao_config(resolve_scheme(name), CPU)
    assert type(built).__name__ == config
    if config == "Float8WeightOnlyConfig":
        assert built.weight_dtype == torch.float8_e5m2


def test_every_torchao_name_a_format_gives_is_one_quantrt_builds_and_torchao_has():
    for storage in FORMATS.values():
        for activation, config in storage.torchao_configs.items():
            assert config in CONFIG_BUILDERS, (storage.name, activation)
            # X-bit floats' config left torchao in 0.16 (the backend says so, test_says_what_it_cannot_serve_on_cpu)
            assert hasattr(torchao_quantization, config) or config == "FPXWeightOnlyConfig", config
        if storage.torchao_tensor is not None:
            assert hasattr(torchao_quantization, storage.torchao_tensor), storage.name


@pytest.mark.parametrize("name, words", [
    ("fp6_e3m2", ["FPXWeightOnlyConfig", "0.16"]),
    ("float8dq_e4m3_row", ["CUDA", "8.9"]),
    ("float8dq_e4m3_tensor", ["CUDA", "8.9"]),
    ("float8_static_activation_float8_weight", ["calibrat"]),
])
def test_says_what_it_cannot_serve_on_cpu(name, words):
    reason = get_backend("torchao").unavailable_reason(resolve_scheme(name), CPU)
    assert reason is not None and all(word in reason for word in words), reason


def test_grouped_int8dq_is_refused():
    reason = get_backend("torchao").unavailable_reason(resolve_scheme("int8dq", group_size=64), CPU)
    assert reason and "per output channel" in reason


def test_explicit_torchao_that_cannot_serve_raises_naming_layer_scheme_device_reason():
    with pytest.raises(BackendUnavailable) as error:
        quantrt.QuantizedTransformer.from_model(linear_model(torch.float32), QuantConfig("float8dq_e4m3_row",
                                                backend="torchao"), progress=False)
    message = str(error.value)
    assert "'0'" in message and "float8dq_e4m3_row" in message and "cpu" in message and "8.9" in message
    assert "reference" in message  # what can serve instead


def test_moving_the_model_rebuilds_the_torchao_weight():
    model = linear_model(torch.float32)
    qts = quantized_copies(model, "int4wo", 32, ["reference", "torchao"])
    for qt in qts.values():
        qt.to(torch.bfloat16)
    layer = qts["torchao"].quantized_layers()["0"]
    assert layer.backend_weight.dtype == torch.bfloat16
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    torch.testing.assert_close(qts["torchao"](x), qts["reference"](x), **tolerance("int4wo", torch.bfloat16))


def test_loading_a_state_dict_rebuilds_the_torchao_weight():
    source = quantrt.QuantizedTransformer.from_model(linear_model(torch.float32), QuantConfig(
        "int8wo", backend="torchao"), progress=False)
    target = quantrt.QuantizedTransformer.from_model(linear_model(torch.float32), QuantConfig(
        "int8wo", backend="torchao"), progress=False)
    target.load_state_dict(source.state_dict())
    x = torch.randn(4, 256)
    torch.testing.assert_close(target(x), source(x))


@pytest.mark.parametrize("case, dtype", [(("int8wo", None), torch.float32), (("int4wo", 32), torch.float32),
                                         (("float8wo_e4m3", None), torch.bfloat16)],
                         ids=["int8wo-fp32", "int4wo-fp32", "float8wo_e4m3-bf16"])
@COMPILE_WARNINGS
def test_compiles_fullgraph_on_cpu(case, dtype):
    scheme, group_size = case
    qt = quantized_copies(linear_model(dtype), scheme, group_size, ["torchao"])["torchao"]
    x = torch.randn(7, 256, dtype=dtype)
    eager = qt(x)
    torch._dynamo.reset()
    compiled = torch.compile(qt, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, **tolerance(scheme, dtype))


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def torchao_copy_bytes(layer, dtype: torch.dtype) -> int:
    """The bytes torchao 0.18 keeps beside a CPU layer's buffers, from its layouts: its scales are float32 for int8
    and fp8 (a view of quantrt's only in float32 layers), int8 keeps int8 zero points, intX keeps one int8 code
    per weight (quantrt packs them) and float zero points in the layer's dtype (quantrt's shifted by 2^(X-1))."""
    scheme, n, k = layer.scheme, layer.out_features, layer.in_features
    groups = 1 if scheme.group_size is None else k // scheme.group_size
    scale_copy = 0 if dtype == torch.float32 else n * groups * 4
    if scheme.format == "int8":
        return scale_copy + n * groups
    if scheme.format.startswith("fp8"):
        return scale_copy
    return n * k + n * groups * dtype.itemsize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [("int8wo", None), ("int8wo", 64), ("int8dq", None), ("float8wo_e4m3", None),
                                  ("float8wo_e5m2", None), ("uint4wo", 32)], ids=case_id)
def test_codes_in_quantrts_layout_are_views_of_the_buffers(case, dtype):
    scheme, group_size = case
    qts = quantized_copies(linear_model(dtype), scheme, group_size, ["reference", "torchao"])
    twin = copy.deepcopy(qts["torchao"])
    x = torch.randn(4, 256, dtype=dtype)
    for qt in (qts["torchao"], twin):
        for layer in qt.quantized_layers().values():
            weight = layer.backend_weight
            assert "quantrt's codes" in layer.backend_config
            # int8 qdata [N, K] is quantrt's qweight, fp8 qdata its uint8 codes viewed as float8; intX codes are
            # unpacked (a copy), their scale in the layer's dtype a view
            shared = [weight.scale] if scheme == "uint4wo" else [weight.qdata]
            assert all(storage_of(t) in {storage_of(b) for b in layer.buffers()} for t in shared)
            assert (storage_of(weight.scale) == storage_of(layer.scale)) == (dtype == torch.float32 or
                                                                            scheme == "uint4wo")
            assert layer.backend.extra_bytes(layer) == torchao_copy_bytes(layer, dtype)
        torch.testing.assert_close(qt(x), qts["reference"](x), **tolerance(scheme, dtype))


def test_fp8_views_follow_to_and_load_state_dict():
    qts = quantized_copies(linear_model(torch.float32), "float8wo_e4m3", None, ["reference", "torchao"])
    for qt in qts.values():
        qt.to(torch.bfloat16)
    target = quantized_copies(linear_model(torch.bfloat16), "float8wo_e4m3", None, ["torchao"])["torchao"]
    target.load_state_dict(qts["torchao"].state_dict())
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    for qt in (qts["torchao"], target):
        layer = qt.quantized_layers()["0"]
        assert storage_of(layer.backend_weight.qdata) == storage_of(layer.qweight)
        assert layer.backend.extra_bytes(layer) == torchao_copy_bytes(layer, torch.bfloat16)
        torch.testing.assert_close(qt(x), qts["reference"](x), **tolerance("float8wo_e4m3", torch.bfloat16))


@pytest.mark.parametrize("case", [("int8wo", None), ("float8wo_e4m3", None), ("int4wo", 32)], ids=case_id)
def test_memory_footprint_counts_torchaos_copies_beside_the_buffers(case):
    scheme, group_size = case
    dtype = torch.bfloat16
    qts = quantized_copies(tiny_flux(dtype), scheme, group_size, ["reference", "torchao"])
    copies = sum(torchao_copy_bytes(layer, dtype) for layer in qts["torchao"].quantized_layers().values())
    assert copies > 0
    assert qts["torchao"].memory_footprint() == qts["reference"].memory_footprint() + copies
    summary_bytes = {backend: sum(r.bytes for r in qt.summary()) for backend, qt in qts.items()}
    assert summary_bytes["torchao"] == summary_bytes["reference"] + copies
