from decimal import Decimal
from fractions import Fraction

from dataclasses import replace

import numpy as np
import pytest
import torch

from quantrt.formats import FORMATS
from quantrt.schemes import (ALIASES, GGUF_SCHEMES, QUANTO_WEIGHTS, SCHEMES, Scheme, resolve_scheme,
                             valid_names, whole_number)

# every shorthand and long name of the seed documents (diffusers TorchAoConfig), with what it must mean
SEED_NAMES = {
    "int4wo": ("uint4", 128, "none"),
    "int4_weight_only": ("uint4", 128, "none"),
    "int4dq": ("uint4", 32, "int8_token"),
    "int8_dynamic_activation_int4_weight": ("uint4", 32, "int8_token"),
    "int8wo": ("int8", None, "none"),
    "int8_weight_only": ("int8", None, "none"),
    "int8dq": ("int8", None, "int8_token"),
    "int8_dynamic_activation_int8_weight": ("int8", None, "int8_token"),
    "float8wo": ("fp8_e5m2", None, "none"),
    "float8wo_e5m2": ("fp8_e5m2", None, "none"),
    "float8wo_e4m3": ("fp8_e4m3", None, "none"),
    "float8_weight_only": ("fp8_e4m3", None, "none"),
    "float8dq": ("fp8_e4m3", None, "fp8_tensor"),
    "float8_dynamic_activation_float8_weight": ("fp8_e4m3", None, "fp8_tensor"),
    "float8dq_e4m3": ("fp8_e4m3", None, "fp8_tensor"),
    "float8dq_e4m3_tensor": ("fp8_e4m3", None, "fp8_tensor"),
    "float8dq_e4m3_row": ("fp8_e4m3", None, "fp8_row"),
    "float8_static_activation_float8_weight": ("fp8_e4m3", None, "fp8_static"),
    **{f"uint{b}wo": (f"uint{b}", 64, "none") for b in range(1, 8)},
    "fp3": ("fp3_e1m1", None, "none"),
    "fp4": ("fp4_e2m1", None, "none"),
    "fp5": ("fp5_e2m2", None, "none"),
    "fp6": ("fp6_e3m2", None, "none"),
    "fp7": ("fp7_e3m3", None, "none"),
}
SEED_NAMES.update({f"fp{x}_e{e}m{x - 1 - e}": (f"fp{x}_e{e}m{x - 1 - e}", None, "none")
                   for x in range(3, 8) for e in range(1, x)})


@pytest.mark.parametrize("name", sorted(SEED_NAMES))
def test_every_seed_name_resolves(name):
    fmt, group, activation = SEED_NAMES[name]
    scheme = resolve_scheme(name)
    assert (scheme.format, scheme.group_size, scheme.activation) == (fmt, group, activation)
    assert resolve_scheme(name.upper()) == scheme  # case does not matter


def test_every_alias_points_at_a_scheme():
    for alias, target in ALIASES.items():
        assert target in SCHEMES, alias


def test_fpx_w_spelling_and_long_name():
    assert resolve_scheme("fp6_e3w2") == resolve_scheme("fp6_e3m2")
    assert resolve_scheme("fpx_weight_only", ebits=2, mbits=3).name == "fp6_e2m3"
    with pytest.raises(ValueError, match="1 \\+ 3 \\+ 3 != 6"):
        resolve_scheme("fp6_e3m3")
    with pytest.raises(ValueError, match="ebits= and mbits="):
        resolve_scheme("fpx_weight_only")


def test_torchao_long_names_take_their_arguments():
    assert resolve_scheme("uintx_weight_only", dtype=torch.uint3).name == "uint3wo"
    assert resolve_scheme("uintx_weight_only", dtype="uint5", group_size=32).group_size == 32
    assert resolve_scheme("float8_weight_only", weight_dtype=torch.float8_e5m2).name == "float8wo_e5m2"
    assert resolve_scheme("float8_dynamic_activation_float8_weight", granularity="row").activation == "fp8_row"
    with pytest.raises(ValueError, match="uint1 .. torch.uint7"):
        resolve_scheme("uintx_weight_only")


@pytest.mark.parametrize("name,fmt,group", [
    ("int8", "int8", None), ("qint8", "int8", None), ("int4", "uint4", 128), ("qint4", "uint4", 128),
    ("int2", "uint2", 128), ("qint2", "uint2", 128), ("float8", "fp8_e4m3", None),
    ("qfloat8_e4m3fn", "fp8_e4m3", None), ("qfloat8_e5m2", "fp8_e5m2", None)])
def test_quanto_weights_dtypes(name, fmt, group):
    scheme = resolve_scheme(name)
    assert (scheme.format, scheme.group_size, scheme.weight_only) == (fmt, group, True)
    assert name in QUANTO_WEIGHTS


def test_group_size_overrides_and_checks():
    assert resolve_scheme("int4wo", group_size=32).group_size == 32
    assert resolve_scheme("int8wo", group_size=64).group_size == 64
    assert resolve_scheme("int8wo", group_size=-1).group_size is None
    with pytest.raises(ValueError, match="power of two"):
        resolve_scheme("int4wo", group_size=48)
    with pytest.raises(ValueError, match="takes no group_size"):
        resolve_scheme("float8wo_e4m3", group_size=128)


def test_unknown_scheme_lists_names_and_suggests():
    with pytest.raises(ValueError) as info:
        resolve_scheme("int4w0")
    message = str(info.value)
    assert "Did you mean 'int4wo'" in message
    assert "int8wo" in message and "fpX_eAmB" in message and "qint4" in message


def test_unsupported_shapes_say_why():
    assert "group_size=128" in resolve_scheme("int4wo").unsupported_reason(64, 96)
    assert "multiple of 8" in resolve_scheme("fp3_e1m1").unsupported_reason(64, 36)
    assert resolve_scheme("int8wo").unsupported_reason(64, 37) is None


@pytest.mark.parametrize("name,bits_per_weight", [
    ("int8wo", 8), ("int4wo", 4), ("uint3wo", 3), ("uint7wo", 7), ("fp6_e3m2", 6), ("fp5_e2m2", 5),
    ("float8wo_e4m3", 8)])
def test_tensor_specs_match_quantize(name, bits_per_weight):
    scheme = resolve_scheme(name)
    w = torch.randn(16, 256, dtype=torch.bfloat16)
    stored = scheme.quantize(w)
    specs = scheme.tensor_specs(16, 256, torch.bfloat16)
    assert {k: (tuple(t.shape), t.dtype) for k, t in stored.items()} == specs
    assert stored["qweight"].numel() * stored["qweight"].element_size() == 16 * 256 * bits_per_weight // 8


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_a_scheme_delegates_to_its_storage_format(name):
    scheme = SCHEMES[name]
    storage = scheme.storage
    assert FORMATS[scheme.format] == storage and storage.family == scheme.weight
    w = torch.randn(8, 256)
    specs = storage.tensor_specs(8, 256, torch.float32, scheme.group_size, scheme.per_tensor)
    if scheme.activation == "fp8_static":  # the calibrated activation scale, beside the format's tensors
        specs["act_scale"] = ((1, 1), torch.float32)
    assert scheme.tensor_specs(8, 256, torch.float32) == specs
    stored = scheme.quantize(w)
    assert all(torch.equal(stored[key], t) for key, t in storage.quantize(w, scheme.group_size, scheme.per_tensor).items())
    assert torch.equal(scheme.dequantize(stored, 256), storage.dequantize(stored, 256))
    assert scheme.unsupported_reason(8, 36) == storage.unsupported_reason(8, 36, scheme.group_size)


def test_the_storage_object_is_derived_not_compared_or_shown():
    scheme = resolve_scheme("uint3wo", group_size=32)
    assert scheme.storage == FORMATS["uint3"] and "storage" not in repr(scheme)
    assert replace(scheme, group_size=128).storage == scheme.storage
    assert Scheme("uint3wo", "uintx", 3, group_size=64) == SCHEMES["uint3wo"]
    with pytest.raises(ValueError, match="unknown storage format family"):
        Scheme("x", "int3", 3)


@pytest.mark.parametrize("name", ["int8wo", "int8dq", "fp6_e3m2", "float8wo_e4m3", "float8dq_e4m3_tensor"])
def test_group_size_minus_one_means_per_channel(name):
    assert resolve_scheme(name, group_size=-1) == replace(SCHEMES[name], group_size=None)


@pytest.mark.parametrize("name", ["uint3wo", "int4wo", "int4dq"])
def test_group_size_minus_one_is_refused_for_uintx_codes(name):
    with pytest.raises(ValueError, match="codes in groups; group_size=-1"):
        resolve_scheme(name, group_size=-1)


@pytest.mark.parametrize("value, expected", [
    (64, 64), (-1, -1), (2**70, 2**70), (np.int64(64), 64), (np.array(64), 64), (torch.tensor(64), 64),
    (torch.tensor(64.0), 64), (64.0, 64), (np.float32(64.0), 64), (Fraction(64), 64), (Decimal("64"), 64),
    (Decimal("64.000"), 64), ("64", 64), (" 64 ", 64),
    (64.5, None), (np.float64(64.5), None), (np.array(64.5), None), (torch.tensor(64.5), None),
    (Fraction(129, 2), None), (Decimal("64.5"), None), ("64.5", None), ("abc", None), (float("inf"), None),
    (float("-inf"), None), (float("nan"), None), (Decimal("NaN"), None), (Decimal("Infinity"), None),
    (True, None), (np.True_, None), (torch.tensor(True), None), (torch.tensor([64]), None),
    (np.array([64, 64]), None), ([64], None), (None, None), (complex(64, 0), None),
], ids=lambda v: repr(v) if not isinstance(v, int) or abs(v) < 2**20 else "2**70")
def test_whole_number_takes_every_integral_number_type_and_never_truncates(value, expected):
    result = whole_number(value)
    assert result == expected and (result is None or type(result) is int)


@pytest.mark.parametrize("name", sorted(GGUF_SCHEMES))
def test_gguf_block_types_are_schemes_by_their_names(name):
    """What a GGUF file's tensors load as (quantrt.checkpoints.gguf), by GGUF's own names in any case; their blocks
    are the format's own, so no group size (group_size=-1, from_pretrained's "none recorded", is the same)."""
    scheme = resolve_scheme(name.upper())
    assert scheme is GGUF_SCHEMES[name] and scheme.format == name and scheme.weight == "gguf"
    assert scheme.gguf == name and scheme.group_size is None and scheme.weight_only
    assert resolve_scheme(name, group_size=-1) == scheme
    assert scheme.describe().startswith(f"{name} weights, GGUF blocks of ")
    assert name in valid_names() and name not in SCHEMES  # not every model takes them (K-quants: K % 256)
    with pytest.raises(ValueError, match="GGUF's own blocks and takes no group_size"):
        resolve_scheme(name, group_size=64)
    w = torch.randn(8, 256)
    assert torch.equal(scheme.dequantize(scheme.quantize(w), 256),
                       scheme.storage.dequantize(scheme.storage.quantize(w), 256))
