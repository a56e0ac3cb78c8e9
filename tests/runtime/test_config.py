from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch

from quantrt import QuantConfig
from quantrt.schemes import resolve_scheme


def test_shorthand_and_group_size():
    config = QuantConfig("int4wo", group_size=64)
    assert config.scheme == resolve_scheme("int4wo", group_size=64)
    assert config.plan("blocks.0.ff").scheme.group_size == 64


def test_quanto_style():
    assert QuantConfig(weights_dtype="int4").scheme == resolve_scheme("qint4")
    with pytest.raises(ValueError, match="not both"):
        QuantConfig("int8wo", weights_dtype="int8")
    with pytest.raises(ValueError, match="needs a scheme"):
        QuantConfig()


@pytest.mark.parametrize("name,skipped", [
    ("proj_out", True),  # full name equals the entry
    ("proj_out.inner", True),  # starts with entry + "."
    ("proj_outer", False),  # a prefix that is not a module boundary
    ("blocks.3.proj_out", True),  # child name equals the entry (quanto)
    ("blocks.3.proj_out_2", False),
])
def test_modules_to_not_convert_both_semantics(name, skipped):
    config = QuantConfig("int8wo", modules_to_not_convert=["proj_out"])
    assert (config.plan(name).scheme is None) == skipped
    if skipped:
        assert "proj_out" in config.plan(name).reason


def test_full_name_prefix_entry():
    config = QuantConfig("int8wo", modules_to_not_convert=["transformer_blocks.0"])
    assert config.plan("transformer_blocks.0.attn.to_q").scheme is None
    assert config.plan("transformer_blocks.01.attn.to_q").scheme is not None


def test_per_module_overrides_exact_then_regex():
    config = QuantConfig("int8wo", modules={
        "blocks.0.ff.net.2": "uint3wo",
        r"re:blocks\.\d+\.ff\..*": QuantConfig("int4wo", group_size=32),
        "norm_out.linear": None,
    })
    assert config.plan("blocks.0.ff.net.2").scheme.name == "uint3wo"
    assert config.plan("blocks.1.ff.net.2").scheme == resolve_scheme("int4wo", group_size=32)
    assert config.plan("norm_out.linear").scheme is None
    assert config.plan("blocks.1.attn.to_q").scheme.name == "int8wo"
    # modules_to_not_convert wins over an override
    config = QuantConfig("int8wo", modules_to_not_convert=["to_q"], modules={"re:.*": "int4wo"})
    assert config.plan("attn.to_q").scheme is None


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        QuantConfig("int8wo", backend="cuda")
    with pytest.raises(ValueError, match="not a valid regex"):
        QuantConfig("int8wo", modules={"re:([": "int4wo"})
    with pytest.raises(TypeError, match="unexpected keyword"):
        QuantConfig("int8wo", groupsize=64)
    with pytest.raises(TypeError, match="only apply to the long names"):
        QuantConfig("int8wo", ebits=3)


def test_dict_round_trip():
    config = QuantConfig(**{"scheme": "uint5wo", "group_size": 32, "modules_to_not_convert": ["a"],
                            "modules": {"re:b.*": "int8wo", "c": None}})
    again = QuantConfig.from_dict(config.to_dict())
    for name in ("a", "b1", "c", "d"):
        assert again.plan(name) == config.plan(name)


@pytest.mark.parametrize("entries", ["proj_out", ("proj_out",), ["proj_out"], (name for name in ["proj_out"])],
                         ids=["a-lone-string", "tuple", "list", "generator"])
def test_a_lone_module_name_is_one_name_not_its_characters(entries):
    config = QuantConfig("int8wo", modules_to_not_convert=entries)
    assert config.modules_to_not_convert == ["proj_out"]
    assert config.plan("proj_out").scheme is None and config.plan("blocks.0.proj_out").scheme is None
    # split into characters, "proj_out" skipped every layer whose own name is one of its letters
    for name in ("o", "blocks.0.p", "t"):
        assert config.plan(name).scheme is not None, name


@pytest.mark.parametrize("entries, error, words", [
    ([5], TypeError, ["modules_to_not_convert", "5 (int)", "strings such as 'proj_out'"]),
    (["proj_out", None], TypeError, ["modules_to_not_convert", "None (NoneType)"]),
    (5, TypeError, ["modules_to_not_convert is a list of module names", "int 5"]),
    ({"proj_out": True}, TypeError, ["modules_to_not_convert is a list of module names", "dict"]),
    (["proj_out", ""], ValueError, ["modules_to_not_convert has an empty name", "matches no layer"]),
], ids=["an-int-entry", "a-None-entry", "an-int", "a-dict", "an-empty-name"])
def test_modules_to_not_convert_that_are_not_names_are_refused(entries, error, words):
    with pytest.raises(error) as info:
        QuantConfig("int8wo", modules_to_not_convert=entries)
    assert all(word in str(info.value) for word in words), str(info.value)


@pytest.mark.parametrize("scale", [0.01, 2, np.float32(0.25), torch.tensor(0.5)],
                         ids=["float", "int", "numpy-float32", "0-d-tensor"])
def test_a_positive_finite_activation_scale_is_kept_as_a_float(scale):
    config = QuantConfig("float8_static", activation_scale=scale)
    assert type(config.activation_scale) is float and config.activation_scale == float(scale)


@pytest.mark.parametrize("scale", [0, 0.0, -0.01, float("nan"), float("inf"), float("-inf"), np.float64("nan"),
                                   torch.tensor(0.0)],
                         ids=["0", "0.0", "negative", "nan", "inf", "-inf", "numpy-nan", "0-d-tensor-0"])
def test_an_activation_scale_that_makes_every_output_non_finite_is_refused(scale):
    # x / 0, x / NaN, x / inf: every activation quantizes to NaN, inf or 0 and every output is non-finite
    with pytest.raises(ValueError, match=r"activation_scale must be a finite number > 0.*quantrt\.calibrate"):
        QuantConfig("float8_static", activation_scale=scale)


@pytest.mark.parametrize("scale", ["0.01", True, [0.01], torch.tensor([0.01, 0.02])],
                         ids=["a-string", "True", "a-list", "a-2-element-tensor"])
def test_an_activation_scale_that_is_not_a_number_is_a_type_error(scale):
    with pytest.raises(TypeError, match="activation_scale is a number"):
        QuantConfig("float8_static", activation_scale=scale)


@pytest.mark.parametrize("group_size", [np.int64(64), torch.tensor(64), Fraction(64), Decimal("64"), 64.0, "64",
                                        torch.tensor(64.0), np.float32(64.0)],
                         ids=["numpy-int", "0-d-int-tensor", "Fraction", "Decimal", "float", "string",
                              "0-d-float-tensor", "numpy-float"])
def test_a_whole_group_size_of_any_number_type_is_taken(group_size):
    config = QuantConfig("int4wo", group_size=group_size)
    assert config.scheme.group_size == 64 and type(config.scheme.group_size) is int


@pytest.mark.parametrize("group_size, words", [
    (np.float64(64.5), "whole number, got np.float64(64.5)"),
    (torch.tensor(64.5), "whole number, got tensor(64.5000)"),
    (Decimal("64.5"), "whole number, got Decimal('64.5')"),
    (Fraction(129, 2), "whole number, got Fraction(129, 2)"),
    (64.5, "whole number, got 64.5"),
    (torch.tensor([64]), "whole number, got tensor([64])"),
    (torch.tensor(True), "whole number"),
    (float("inf"), "whole number, got inf"),
    (float("nan"), "whole number, got nan"),
    (Decimal("Infinity"), "whole number, got Decimal('Infinity')"),
    (2**40, "power of two >= 8 and <= 2**20"),
    (2**21, "power of two >= 8 and <= 2**20"),
], ids=["numpy-64.5", "tensor-64.5", "Decimal-64.5", "Fraction-129/2", "float-64.5", "1-d-tensor", "bool-tensor",
        "inf", "nan", "Decimal-inf", "2**40", "2**21"])
def test_a_group_size_that_is_not_a_whole_number_or_too_big_is_never_truncated(group_size, words):
    with pytest.raises(ValueError) as info:
        QuantConfig("int4wo", group_size=group_size)
    message = str(info.value)
    assert "int4wo: group_size" in message and words in message, message
    assert QuantConfig("int4wo", group_size=2**20).scheme.group_size == 2**20  # the largest taken


@pytest.mark.parametrize("kwargs, expected", [
    ({"bits": 3}, "uint3wo"), ({"bits": np.int64(3)}, "uint3wo"), ({"bits": 3.0}, "uint3wo"),
    ({"dtype": torch.uint5}, "uint5wo"), ({"dtype": torch.uint5, "bits": 5}, "uint5wo"),
], ids=["int", "numpy-int", "float-3.0", "dtype", "dtype-and-bits-agree"])
def test_uintx_bits_that_are_whole_numbers_are_taken(kwargs, expected):
    assert QuantConfig("uintx_weight_only", **kwargs).scheme.name == expected


@pytest.mark.parametrize("kwargs, words", [
    ({"bits": 7.9}, "bits must be a whole number from 1 to 7 (the width of the stored codes), got bits=7.9"),
    ({"bits": True}, "bits must be a whole number from 1 to 7 (the width of the stored codes), got bits=True"),
    ({"bits": 0}, "got bits=0"), ({"bits": 8}, "got bits=8"), ({"bits": "three"}, "got bits='three'"),
    ({"dtype": torch.uint8}, "dtype must be torch.uint1 .. torch.uint7, got dtype=torch.uint8"),
    ({"dtype": "garbage"}, "dtype must be torch.uint1 .. torch.uint7, got dtype='garbage'"),
    ({"dtype": torch.uint3, "bits": 4}, "dtype=torch.uint3 and bits=4 disagree"),
], ids=["7.9", "True", "0", "8", "a-word", "uint8", "garbage-dtype", "dtype-and-bits-disagree"])
def test_uintx_bits_that_are_not_whole_numbers_1_to_7_are_refused(kwargs, words):
    with pytest.raises(ValueError) as info:
        QuantConfig("uintx_weight_only", **kwargs)
    assert words in str(info.value), str(info.value)


@pytest.mark.parametrize("ebits, mbits, argument", [(3.7, 2, "ebits=3.7"), (3, 2.5, "mbits=2.5"),
                                                    (True, 1, "ebits=True"), (3, "two", "mbits='two'")],
                         ids=["ebits-3.7", "mbits-2.5", "ebits-True", "mbits-a-word"])
def test_fpx_bits_that_are_not_whole_numbers_are_refused(ebits, mbits, argument):
    # before: int(3.7) made ebits=3.7 an e3 format
    with pytest.raises(ValueError, match=rf"fpx_weight_only: \w+ must be a whole number of bits, got {argument}"):
        QuantConfig("fpx_weight_only", ebits=ebits, mbits=mbits)
    assert QuantConfig("fpx_weight_only", ebits=3.0, mbits=np.int64(2)).scheme.name == "fp6_e3m2"


@pytest.mark.parametrize("weight_dtype", ["garbage", torch.float8_e4m3fnuz, torch.bfloat16, None],
                         ids=["garbage", "e4m3fnuz", "bfloat16", "None"])
def test_a_float8_weight_dtype_that_is_not_e4m3fn_or_e5m2_is_refused(weight_dtype):
    # before: anything without "e5m2" in its name silently became e4m3
    with pytest.raises(ValueError, match=r"weight_dtype must be torch\.float8_e4m3fn or torch\.float8_e5m2, "
                                         r"got weight_dtype="):
        QuantConfig("float8_weight_only", weight_dtype=weight_dtype)


@pytest.mark.parametrize("granularity", ["garbage", "channel", ["row", "tensor"], []],
                         ids=["garbage", "channel", "row-and-tensor", "empty-list"])
def test_a_float8_dynamic_granularity_that_is_not_tensor_or_row_is_refused(granularity):
    # before: anything without "row" in its name silently became per tensor
    with pytest.raises(ValueError, match=r"granularity must be 'tensor' or 'row'.*got granularity="):
        QuantConfig("float8_dynamic_activation_float8_weight", granularity=granularity)


@pytest.mark.parametrize("granularity, expected", [("row", "float8dq_e4m3_row"), ("per_row", "float8dq_e4m3_row"),
                                                   ("PerTensor", "float8dq_e4m3_tensor"), (("row", "row"), "float8dq_e4m3_row")],
                         ids=["row", "per_row", "PerTensor", "a-pair"])
def test_float8_dynamic_granularity_spellings(granularity, expected):
    assert QuantConfig("float8_dynamic_activation_float8_weight", granularity=granularity).scheme.name == expected


@pytest.mark.parametrize("modules, error, words", [
    ({5: "int4wo"}, TypeError, ["modules keys are module names", "got the key 5 (int)"]),
    ({None: "int4wo"}, TypeError, ["modules keys are module names", "got the key None"]),
    ({"blocks.0.ff": ["int4wo"]}, TypeError, ["modules['blocks.0.ff'] must be a scheme name", "got list ['int4wo']"]),
    ({"blocks.0.ff": 4}, TypeError, ["modules['blocks.0.ff'] must be a scheme name", "got int 4"]),
    ({"blocks.0.ff": "int4w0"}, ValueError, ["modules['blocks.0.ff']: unknown quantization scheme 'int4w0'",
                                             "Did you mean 'int4wo'"]),
    (["blocks.0.ff"], TypeError, ["modules maps module names to schemes", "got a list"]),
    ({"": "int4wo"}, ValueError, ["modules has an empty key, which names no layer"]),
], ids=["an-int-key", "a-None-key", "a-list-as-scheme", "an-int-as-scheme", "a-misspelt-scheme", "a-list",
        "an-empty-key"])
def test_modules_overrides_of_the_wrong_type_name_the_entry_and_the_fix(modules, error, words):
    with pytest.raises(error) as info:
        QuantConfig("int8wo", modules=modules)
    assert all(word in str(info.value) for word in words), str(info.value)


@pytest.mark.parametrize("name, suggestion", [
    ("int4w0", "'int4wo'"), ("uint3_wo", "'uint3wo'"), ("int8_weight_onyl", "'int8_weight_only'"),
    ("flaot8wo", "'float8wo'")])
def test_unknown_schemes_suggest_the_closest(name, suggestion):
    with pytest.raises(ValueError, match="unknown quantization scheme") as error:
        QuantConfig(name)
    assert f"Did you mean {suggestion}" in str(error.value)


@pytest.mark.parametrize("scheme, group_size, message", [
    ("int4wo", 100, "power of two >= 8"), ("int4wo", 0, "power of two >= 8"), ("int4wo", -5, "power of two >= 8"),
    ("int4wo", 7, "power of two >= 8"), ("uint3wo", 12, "power of two >= 8"), ("int8wo", 48, "power of two >= 8"),
    ("int4wo", 1.5, "whole number, got 1.5"), ("int4wo", "abc", "whole number"), ("int4wo", True, "whole number"),
    ("int4wo", -1, "stores its 4-bit codes in groups"), ("fp6_e3m2", 64, "takes no group_size"),
    ("float8wo_e4m3", 32, "takes no group_size")])
def test_group_sizes_the_scheme_cannot_take_fail_at_config_time(scheme, group_size, message):
    with pytest.raises(ValueError, match=message) as error:
        QuantConfig(scheme, group_size=group_size)
    assert scheme in str(error.value)
