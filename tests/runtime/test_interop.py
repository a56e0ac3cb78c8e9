"""Bring-your-own configs: torchao config objects (and their serialized form), diffusers TorchAoConfig /
QuantoConfig / PipelineQuantizationConfig map onto the same Scheme as the shorthand."""

import copy
from types import SimpleNamespace

import pytest
import torch

import diffusers
import torchao.quantization as ao
from torchao.core.config import config_to_dict

import quantrt
from quantrt import QuantConfig, to_quant_config

from .backends.cases import linear_model

# the deprecation notices of diffusers' QuantoConfig and torchao's "_default" key are theirs, not ours
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Config Deprecation:UserWarning")

TORCHAO_CASES = [
    (lambda: ao.Int8WeightOnlyConfig(), QuantConfig("int8wo")),
    (lambda: ao.Int8WeightOnlyConfig(granularity=ao.PerGroup(64)), QuantConfig("int8wo", group_size=64)),
    (lambda: ao.Int4WeightOnlyConfig(), QuantConfig("int4wo")),
    (lambda: ao.Int4WeightOnlyConfig(group_size=32), QuantConfig("int4_weight_only", group_size=32)),
    (lambda: ao.Float8WeightOnlyConfig(), QuantConfig("float8_weight_only")),
    (lambda: ao.Float8WeightOnlyConfig(weight_dtype=torch.float8_e5m2), QuantConfig("float8wo")),
    (lambda: ao.Int8DynamicActivationInt8WeightConfig(), QuantConfig("int8dq")),
    (lambda: ao.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=ao.PerGroup(32)),
     QuantConfig("int4dq")),
    (lambda: ao.Float8DynamicActivationFloat8WeightConfig(), QuantConfig("float8dq")),
    (lambda: ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerTensor()),
     QuantConfig("float8dq_e4m3_tensor")),
    (lambda: ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow()), QuantConfig("float8dq_e4m3_row")),
    (lambda: ao.IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=ao.PerGroup(32)),
     QuantConfig("uint2wo", group_size=32)),
    (lambda: ao.IntxWeightOnlyConfig(weight_dtype=torch.int8), QuantConfig("int8wo")),
    (lambda: ao.IntxWeightOnlyConfig(weight_dtype=torch.int5, granularity=ao.PerGroup(64)),
     QuantConfig("uintx_weight_only", dtype=torch.uint5)),
]


@pytest.mark.parametrize("make, expected", TORCHAO_CASES, ids=lambda v: getattr(v, "scheme", None) and repr(v))
def test_torchao_config_maps_to_the_shorthands_scheme(make, expected):
    config = make()
    assert to_quant_config(config).scheme == expected.scheme
    # the serialized form (config_to_dict, what diffusers saves) maps the same way
    assert to_quant_config(config_to_dict(config)).scheme == expected.scheme


@pytest.mark.parametrize("serialized, expected", [
    ({"_type": "FPXWeightOnlyConfig", "_version": 1, "_data": {"ebits": 3, "mbits": 2}}, "fp6_e3m2"),
    ({"_type": "UIntXWeightOnlyConfig", "_version": 1,
      "_data": {"dtype": {"_type": "torch.dtype", "_data": "uint3"}, "group_size": 32}}, "uint3wo"),
    ({"_type": "Int8DynamicActivationInt4WeightConfig", "_version": 1, "_data": {"group_size": 64}}, "int4dq"),
])
def test_configs_of_torchao_versions_that_had_them_map_without_them(serialized, expected):
    # FPX left torchao in 0.16, UIntX and Int8DynamicActivationInt4WeightConfig in 0.17
    scheme = to_quant_config(serialized).scheme
    assert scheme.name == expected
    if "group_size" in serialized["_data"]:
        assert scheme.group_size == serialized["_data"]["group_size"]


def test_static_fp8_config_carries_its_activation_scale():
    config = to_quant_config(ao.Float8StaticActivationFloat8WeightConfig(act_quant_scale=torch.tensor(0.25)))
    assert config.scheme == QuantConfig("float8_static").scheme and config.activation_scale == 0.25


@pytest.mark.parametrize("make, words", [
    (lambda: ao.Int8WeightOnlyConfig(granularity=ao.PerTensor()), ["PerTensor", "PerRow"]),
    (lambda: ao.IntxWeightOnlyConfig(weight_dtype=torch.int4), ["grouped", "PerGroup"]),
    (lambda: ao.Float8DynamicActivationInt4WeightConfig(), ["no quantrt scheme", "Int8WeightOnlyConfig"]),
])
def test_torchao_configs_without_a_quantrt_scheme_are_refused(make, words):
    with pytest.raises(ValueError) as error:
        to_quant_config(make())
    assert all(word in str(error.value) for word in words), str(error.value)


def test_hqq_is_mapped_with_a_warning():
    with pytest.warns(UserWarning, match="HQQ"):
        config = to_quant_config(ao.Int4WeightOnlyConfig(group_size=64, int4_choose_qparams_algorithm="hqq"))
    assert config.scheme == QuantConfig("int4wo", group_size=64).scheme


def test_fqn_to_config_becomes_per_module_overrides():
    config = to_quant_config(ao.FqnToConfig({
        "_default": ao.Int8WeightOnlyConfig(), "ff.net.2": None,
        "re:.*attn\\.to_[qkv]": ao.Int4WeightOnlyConfig(group_size=32), "proj_out.weight": ao.Float8WeightOnlyConfig()}))
    assert config.plan("context_embedder").scheme.name == "int8wo"
    assert config.plan("ff.net.2").scheme is None
    assert config.plan("blocks.0.attn.to_k").scheme == QuantConfig("int4wo", group_size=32).scheme
    assert config.plan("proj_out").scheme.name == "float8wo_e4m3"
    only_named = to_quant_config(ao.FqnToConfig({"proj_out": ao.Int8WeightOnlyConfig()}))
    assert only_named.plan("proj_out").scheme.name == "int8wo" and only_named.plan("x_embedder").scheme is None


def test_diffusers_torchao_config():
    config = to_quant_config(diffusers.TorchAoConfig(ao.Int4WeightOnlyConfig(group_size=64),
                                                     modules_to_not_convert=["proj_out"]))
    assert config.scheme == QuantConfig("int4wo", group_size=64).scheme
    assert config.plan("proj_out").scheme is None and config.plan("x_embedder").scheme is not None
    saved = diffusers.TorchAoConfig(ao.Float8WeightOnlyConfig()).to_dict()  # as in a model's config.json
    assert to_quant_config(saved).scheme == QuantConfig("float8_weight_only").scheme


@pytest.mark.parametrize("quant_type, kwargs, expected", [
    ("int8wo", {}, QuantConfig("int8wo")),
    ("int4wo", {"group_size": 64}, QuantConfig("int4wo", group_size=64)),
    ("uint3wo", {"group_size": 32}, QuantConfig("uint3wo", group_size=32)),
    ("float8wo_e4m3", {}, QuantConfig("float8wo_e4m3")),
    ("fp6_e3m2", {}, QuantConfig("fpx_weight_only", ebits=3, mbits=2)),
    ("float8dq_e4m3_row", {}, QuantConfig("float8dq_e4m3_row")),
    ("uintx_weight_only", {"dtype": torch.uint2, "group_size": 32}, QuantConfig("uint2wo", group_size=32)),
])
def test_diffusers_string_torchao_config_before_0_38(quant_type, kwargs, expected):
    # diffusers < 0.38 took torchao shorthands: TorchAoConfig("int4wo", group_size=64, modules_to_not_convert=...)
    old = SimpleNamespace(quant_method="torchao", quant_type=quant_type, quant_type_kwargs=kwargs,
                          modules_to_not_convert=["proj_out"])
    config = to_quant_config(old)
    assert config.scheme == expected.scheme and config.modules_to_not_convert == ["proj_out"]
    as_dict = {"quant_method": "torchao", "quant_type": quant_type, "quant_type_kwargs": kwargs}
    assert to_quant_config(as_dict).scheme == expected.scheme


def test_string_torchao_config_with_an_argument_quantrt_cannot_map():
    old = SimpleNamespace(quant_method="torchao", quant_type="int4wo", quant_type_kwargs={"zero_point_dtype": 1})
    with pytest.raises(ValueError, match="zero_point_dtype"):
        to_quant_config(old)


@pytest.mark.parametrize("weights_dtype, shorthand", [("int8", "int8wo"), ("int4", "int4wo"), ("int2", None),
                                                     ("float8", "float8wo_e4m3")])
def test_diffusers_quanto_config(weights_dtype, shorthand):
    config = to_quant_config(diffusers.QuantoConfig(weights_dtype=weights_dtype, modules_to_not_convert=["norm_out"]))
    assert config.scheme == QuantConfig(weights_dtype=weights_dtype).scheme
    if shorthand:
        assert config.scheme == QuantConfig(shorthand, group_size=128 if shorthand == "int4wo" else None).scheme
    assert config.plan("norm_out.linear").scheme is None


def test_transformers_style_quanto_config_with_activations_is_refused():
    with pytest.raises(ValueError, match="activations"):
        to_quant_config({"quant_method": "quanto", "weights": "int8", "activations": "float8"})
    assert to_quant_config({"quant_method": "quanto", "weights": "int4"}).scheme.name == "int4wo"


def test_unknown_objects_and_methods_are_refused():
    with pytest.raises(TypeError, match="cannot use object"):
        to_quant_config(object())
    with pytest.raises(ValueError, match="bitsandbytes"):
        to_quant_config({"quant_method": "bitsandbytes"})
    with pytest.raises(TypeError, match="quantize_pipeline"):
        to_quant_config(diffusers.PipelineQuantizationConfig(quant_mapping={"transformer": diffusers.QuantoConfig()}))


def test_from_model_takes_a_torchao_config():
    model = linear_model(torch.float32)
    by_torchao = quantrt.QuantizedTransformer.from_model(copy.deepcopy(model), ao.Int8WeightOnlyConfig(), progress=False)
    by_name = quantrt.QuantizedTransformer.from_model(model, "int8wo", progress=False)
    assert [r.scheme for r in by_torchao.summary()] == [r.scheme for r in by_name.summary()]
    x = torch.randn(3, 256)
    torch.testing.assert_close(by_torchao(x), by_name(x))


@pytest.mark.parametrize("config, scheme", [
    ({"quant_method": "quanto", "weights_dtype": "int8"}, "int8wo"),
    ({"quant_method": "quanto", "weights_dtype": "float8"}, "float8wo_e4m3"),
    ({"scheme": "int4wo", "group_size": 64}, "int4wo"),
], ids=["quanto-dict-int8", "quanto-dict-float8", "quantconfig-arguments"])
def test_to_quant_config_routes_config_dicts(config, scheme):
    assert to_quant_config(config).scheme.name == scheme


def test_to_quant_config_refuses_what_is_no_config():
    with pytest.raises(TypeError, match="cannot use int as a quantization config"):
        to_quant_config(8)


def serialized(type_name: str, **fields) -> dict:
    """A torchao config in its config_to_dict form, with field values as given (torchao's own constructors
    refuse some of them; a saved config.json is not checked by torchao)."""
    return {"_type": type_name, "_version": 1, "_data": fields}


FNUZ_DTYPE = {"_type": "torch.dtype", "_data": "float8_e4m3fnuz"}  # config_to_dict of torch.float8_e4m3fnuz


@pytest.mark.parametrize("make, words", [
    (lambda: ao.Float8WeightOnlyConfig(weight_dtype="garbage"),
     ["Float8WeightOnlyConfig(weight_dtype='garbage')", "weight_dtype is not a float8 dtype", "torch.float8_e5m2"]),
    (lambda: serialized("Float8WeightOnlyConfig", weight_dtype="garbage"),
     ["Float8WeightOnlyConfig(weight_dtype='garbage')", "weight_dtype is not a float8 dtype"]),
    (lambda: serialized("Float8WeightOnlyConfig", weight_dtype=FNUZ_DTYPE),
     ["weight_dtype=torch.float8_e4m3fnuz", "ROCm", "torch.float8_e4m3fn"]),
    (lambda: ao.Float8DynamicActivationFloat8WeightConfig(activation_dtype="garbage"),
     ["Float8DynamicActivationFloat8WeightConfig(activation_dtype='garbage')", "activation_dtype is not a float8"]),
    (lambda: SimpleNamespace(quant_method="torchao", quant_type="float8wo", quant_type_kwargs={"weight_dtype": "garbage"}),
     ["weight_dtype must be torch.float8_e4m3fn or torch.float8_e5m2", "got weight_dtype='garbage'"]),
    (lambda: serialized("Int8WeightOnlyConfig", granularity="garbage"),
     ["Int8WeightOnlyConfig: granularity='garbage' has no quantrt scheme", "PerRow()"]),
    (lambda: serialized("Int8WeightOnlyConfig", granularity=serialized("PerBlock", block_size=[1, 128])),
     ["Int8WeightOnlyConfig: granularity=PerBlock(", "has no quantrt scheme", "PerGroup(group_size)"]),
    (lambda: SimpleNamespace(quant_method="torchao", quant_type="float8_dynamic_activation_float8_weight",
                             quant_type_kwargs={"granularity": "garbage"}),
     ["granularity must be 'tensor' or 'row'", "got granularity='garbage'"]),
], ids=["fp8wo-object-garbage-dtype", "fp8wo-saved-garbage-dtype", "fp8wo-saved-fnuz", "fp8dq-garbage-activation-dtype",
        "string-float8wo-garbage-dtype", "int8wo-garbage-granularity", "int8wo-PerBlock", "string-fp8dq-garbage-granularity"])
def test_torchao_configs_with_an_unknown_dtype_or_granularity_name_the_field(make, words):
    # before: a weight_dtype without "e5m2" in it became e4m3 and a granularity without "row" per tensor
    with pytest.raises(ValueError) as error:
        to_quant_config(make())
    assert all(word in str(error.value) for word in words), str(error.value)


@pytest.mark.parametrize("make, words", [
    (lambda: ao.Int8WeightOnlyConfig(granularity=ao.PerGroup(64.5)), "int8wo: group_size must be a whole number, got 64.5"),
    (lambda: config_to_dict(ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=ao.PerGroup(64.5))),
     "uint4wo: group_size must be a whole number, got 64.5"),
    (lambda: ao.Int4WeightOnlyConfig(group_size=64.5), "int4wo: group_size must be a whole number, got 64.5"),
    (lambda: serialized("FPXWeightOnlyConfig", ebits=3.7, mbits=2), "ebits must be a whole number of bits, got ebits=3.7"),
    (lambda: SimpleNamespace(quant_method="torchao", quant_type="uintx_weight_only", quant_type_kwargs={"bits": 7.9}),
     "bits must be a whole number from 1 to 7 (the width of the stored codes), got bits=7.9"),
    (lambda: ao.Float8StaticActivationFloat8WeightConfig(act_quant_scale=torch.tensor(0.0)),
     "activation_scale must be a finite number > 0"),
], ids=["int8wo-PerGroup-64.5", "intx-PerGroup-64.5-saved", "int4wo-group-64.5", "fpx-ebits-3.7", "string-uintx-bits-7.9",
        "static-fp8-scale-0"])
def test_torchao_numbers_that_are_not_whole_or_usable_are_refused_not_truncated(make, words):
    with pytest.raises(ValueError) as error:
        to_quant_config(make())
    assert words in str(error.value), str(error.value)


@pytest.mark.parametrize("config", [
    {"quant_method": "quanto", "weights_dtype": "int8", "modules_to_not_convert": "proj_out"},
    {"quant_method": "torchao", "quant_type": "int8wo", "modules_to_not_convert": "proj_out"},
    SimpleNamespace(quant_method="torchao", quant_type=ao.Int8WeightOnlyConfig(), modules_to_not_convert="proj_out"),
], ids=["quanto-dict", "torchao-string-dict", "torchao-object"])
def test_a_lone_string_modules_to_not_convert_from_a_library_config_is_one_name(config):
    mapped = to_quant_config(config)
    assert mapped.modules_to_not_convert == ["proj_out"]
    assert mapped.plan("proj_out").scheme is None and mapped.plan("o").scheme is not None


def test_quantrts_own_config_in_a_librarys_dict_form_maps_back():
    config = QuantConfig("int4wo", group_size=64, modules_to_not_convert=["proj_out"], backend="reference")
    data = {"quant_method": "quantrt", **config.to_dict()}
    mapped = to_quant_config(data)
    assert mapped.to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="a quantrt quantization config names its scheme"):
        to_quant_config({"quant_method": "quantrt", "group_size": 64})
