"""The storage format objects (quantrt.formats): names and registry, stored tensors, quantize / dequantize against a
float64 reference, odd shapes, the reasons a shape is refused, and the facts the backends choose by."""

import pytest
import torch

from quantrt.formats import (ATEN_INT4_KERNEL, ATEN_INT8_KERNEL, FAMILIES, FORMATS, QUANTO_QTYPES, Fp8Format,
                             FpxFormat, GgufFormat, Int8Format, StorageFormat, UintxFormat, storage_format)
from quantrt.kernels.quantize import unpack_gguf
from quantrt.schemes import ACTIVATIONS

NAMES = list(FORMATS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# how far a uintX zero point moves when rounded to its dtype, in quantization steps: half an ulp of a zero point
# up to 2**7 (the code domain of 7 bits). The codes are chosen against the rounded zero point, so only the clamp
# to [0, 2**X - 1] at a group's ends feels it
ZERO_POINT_ROUNDING = {torch.float32: 2**7 * 2**-24, torch.bfloat16: 2**7 * 2**-8, torch.float16: 2**7 * 2**-11}
# dequantize computes in float32: one rounding of each weight
FLOAT32_ROUNDING = 2**-23


def group_size_of(storage, k: int = 256) -> int | None:
    """A group size the format takes for K = `k` (uintX needs one), None for per-channel formats."""
    return 64 if storage.takes_group_size and k % 64 == 0 else 8 if storage.takes_group_size else None


def error_bound(storage, w: torch.Tensor, tensors: dict, dtype: torch.dtype) -> torch.Tensor:
    """float64 bound on |dequantize(quantize(w)) - w| per weight ([N, K]) or, for uintX, on the root mean square
    error per group ([N, groups]): what the format can resolve, from its stored scales and zero points."""
    n, k = w.shape
    if isinstance(storage, GgufFormat):
        return gguf_step(storage, tensors, k) * (1 + 1e-6) + w.double().abs() * FLOAT32_ROUNDING
    w = w.double()
    scale = tensors["scale"].double()
    if isinstance(storage, Int8Format):  # round to the nearest step
        step = scale.repeat_interleave(k // scale.shape[1], dim=1)
        return 0.5 * step * (1 + 1e-6) + w.abs() * FLOAT32_ROUNDING
    if isinstance(storage, UintxFormat):
        # the clip search keeps a group's min / max quantization unless it finds a smaller mean squared error; that
        # one is off by at most half a step of (max - min) / (2**X - 1), plus the zero point's rounding at the ends
        groups = w.reshape(n, scale.shape[1], -1)
        step = (groups.amax(dim=-1) - groups.amin(dim=-1)) / (2**storage.bits - 1)
        return step * (0.5 + ZERO_POINT_ROUNDING[dtype]) * (1 + 1e-6) + groups.abs().amax(dim=-1) * FLOAT32_ROUNDING
    # floats: half an ulp of the code's mantissa, or half the subnormal step near zero
    bias = 2 ** (storage.ebits - 1) - 1
    half_subnormal = scale * 2.0 ** (-bias - storage.mbits)
    return w.abs() * 2.0 ** -(storage.mbits + 1) * (1 + 1e-6) + half_subnormal + w.abs() * FLOAT32_ROUNDING


def gguf_step(storage: GgufFormat, tensors: dict, k: int) -> torch.Tensor:
    """float64 [N, K]: |a| of each weight's group, the step of its codes. quantize rounds every scale up, so a
    weight is off by at most half a step, or, on the side opposite a group's largest magnitude in the symmetric
    types (codes reach one step further below zero than above), by one step."""
    blocks = storage.blocks
    fields = unpack_gguf(tensors["qweight"], tensors["block_scales"], storage.name, k)
    a = fields["d"].double()
    if blocks.sub_block:
        a = a.repeat_interleave(blocks.sub_blocks, dim=1) * fields["scales"].double()
    return a.abs().repeat_interleave(blocks.group, dim=1)


def round_trip_error(storage, w: torch.Tensor, tensors: dict, k: int) -> torch.Tensor:
    """|dequantize - w| in float64, as `error_bound` measures it (uintX: root mean square per group)."""
    error = storage.dequantize(tensors, k).double() - w.double()
    if isinstance(storage, UintxFormat):
        groups = tensors["scale"].shape[1]
        return error.reshape(w.shape[0], groups, -1).square().mean(dim=-1).sqrt()
    return error.abs()


def test_every_format_is_registered_under_its_name_and_ids_read_as_names():
    assert NAMES[:8] == ["int8"] + [f"uint{b}" for b in range(1, 8)]
    assert NAMES[-12:-10] == ["fp8_e4m3", "fp8_e5m2"]
    assert NAMES[-10:] == ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
    assert {name for name in NAMES if name.startswith("fp") and not name.startswith("fp8")} == {
        f"fp{x}_e{e}m{x - 1 - e}" for x in range(3, 8) for e in range(1, x)}
    assert all(FORMATS[name].name == name for name in NAMES)
    assert set(FAMILIES) == {"int8", "uintx", "fpx", "fp8", "gguf"}
    assert repr(FORMATS["uint4"]) == "UintxFormat(bits=4)" and repr(FORMATS["fp6_e3m2"]) == "FpxFormat(ebits=3, mbits=2)"
    assert repr(FORMATS["q4_k"]) == "GgufFormat(gguf='q4_k')"


@pytest.mark.parametrize("name", NAMES)
def test_scheme_fields_name_the_format_back(name):
    storage = FORMATS[name]
    fields = storage.scheme_fields()
    assert fields["weight"] == storage.family and fields["bits"] == storage.bits
    assert storage_format(fields["weight"], fields["bits"], fields.get("ebits", 0), fields.get("mbits", 0),
                          fields.get("fp8", ""), fields.get("gguf", "")) == storage


def test_invalid_formats_are_refused():
    with pytest.raises(ValueError, match="unknown storage format family 'int4'"):
        storage_format("int4", 4)
    with pytest.raises(ValueError, match="1 to 7 bits"):
        UintxFormat(8)
    with pytest.raises(ValueError, match="not a valid X-bit float"):
        FpxFormat(4, 3)
    with pytest.raises(ValueError, match="e4m3 or e5m2"):
        Fp8Format("e4m3fnuz")
    with pytest.raises(ValueError, match="1 \\+ 3 \\+ 3 != 6"):
        storage_format("fpx", 6, 3, 3)
    with pytest.raises(ValueError, match="unknown GGUF block type 'q8_1'"):
        GgufFormat("q8_1")
    with pytest.raises(ValueError, match="q4_k codes have 4 bits, got bits=5"):
        storage_format("gguf", 5, gguf="q4_k")
    with pytest.raises(TypeError):
        StorageFormat()  # abstract


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", NAMES)
def test_specs_match_what_quantize_stores(name, dtype):
    storage = FORMATS[name]
    n, k = 16, 256
    layouts = [(group_size_of(storage), False)] + [(None, True)] * isinstance(storage, Fp8Format)
    for group_size, per_tensor in layouts:
        stored = storage.quantize(torch.randn(n, k, dtype=dtype), group_size, per_tensor)
        specs = storage.tensor_specs(n, k, dtype, group_size, per_tensor)
        assert {key: (tuple(t.shape), t.dtype) for key, t in stored.items()} == specs
        assert stored["qweight"].numel() * stored["qweight"].element_size() == n * k * storage.bits // 8
        assert ("zero" in specs) == storage.has_zero
        if isinstance(storage, GgufFormat):  # the scales are GGUF's bytes; `scale` only carries the dtype
            blocks = storage.blocks
            assert specs["scale"] == ((n, 0), dtype)
            assert specs["block_scales"] == ((n, k // blocks.block * blocks.param_bytes), torch.uint8)
            # within 4% of the bytes a GGUF file stores
            ours = stored["qweight"].numel() * stored["qweight"].element_size() + stored["block_scales"].numel()
            file_bytes = n * k // blocks.block * blocks.file_bytes
            assert file_bytes <= ours <= 1.04 * file_bytes
            continue
        assert specs["scale"][0] == ((1, 1) if per_tensor else (n, storage.groups(k, group_size)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_within_the_formats_resolution_of_a_float64_reference(name, dtype):
    storage = FORMATS[name]
    n, k = 32, 256
    w = torch.randn(n, k, dtype=dtype)
    w[0] *= 1e-3  # a row of small weights: fp8 / fpX subnormals, fine int steps
    w[1, :64] = 0.5  # a constant group
    tensors = storage.quantize(w, group_size_of(storage))
    dequantized = storage.dequantize(tensors, k)
    assert dequantized.dtype == torch.float32 and dequantized.shape == (n, k)
    error, bound = round_trip_error(storage, w, tensors, k), error_bound(storage, w, tensors, dtype)
    assert (error <= bound).all(), f"worst excess {(error - bound).max().item():.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_odd_shapes(name):
    # one row and an odd number of rows; the smallest K the format packs, and an odd multiple of it
    storage = FORMATS[name]
    for n in (1, 3):
        for k in (max(8, storage.k_alignment), 5 * max(8, storage.k_alignment)):
            group_size = group_size_of(storage, k)
            assert storage.unsupported_reason(n, k, group_size) is None
            w = torch.randn(n, k)
            tensors = storage.quantize(w, group_size)
            assert {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()} == storage.tensor_specs(
                n, k, torch.float32, group_size)
            assert (round_trip_error(storage, w, tensors, k) <= error_bound(storage, w, tensors, torch.float32)).all()


@pytest.mark.parametrize("name, k, group_size, reason", [
    ("int8", 37, None, None),
    ("int8", 96, 64, "K=96 is not a multiple of group_size=64"),
    ("uint1", 36, 4, "K=36 is not a multiple of 8, needed to pack 1-bit codes"),
    ("uint3", 36, 4, "K=36 is not a multiple of 8, needed to pack 3-bit codes"),
    ("uint4", 34, 2, None),
    ("uint4", 96, 128, "K=96 is not a multiple of group_size=128"),
    ("uint6", 38, 2, "K=38 is not a multiple of 4, needed to pack 6-bit codes"),
    ("fp6_e3m2", 36, None, None),
    ("fp6_e3m2", 38, None, "K=38 is not a multiple of 4, needed to pack 6-bit codes"),
    ("fp3_e1m1", 36, None, "K=36 is not a multiple of 8, needed to pack 3-bit codes"),
    ("fp8_e4m3", 37, None, None),
    ("q8_0", 96, None, None),
    ("q4_1", 80, None, "K=80 is not a multiple of q4_1's blocks of 32 weights"),
    ("q4_k", 768, None, None),
    ("q6_k", 384, None, "K=384 is not a multiple of q6_k's blocks of 256 weights"),
    ("q4_k", 512, 32, "q4_k groups its weights in GGUF's own blocks, not in groups of 32"),
])
def test_unsupported_reasons(name, k, group_size, reason):
    assert FORMATS[name].unsupported_reason(64, k, group_size) == reason


@pytest.mark.parametrize("name", NAMES)
def test_family_facts(name):
    storage = FORMATS[name]
    family = {Int8Format: "int8", UintxFormat: "uintx", FpxFormat: "fpx", Fp8Format: "fp8",
              GgufFormat: "gguf"}[type(storage)]
    assert storage.family == family
    # (takes a group size, per channel possible, zero points, packed bit planes); GGUF's group_size None is its
    # own blocks, and its codes are packed but for Q8_0's int8
    expected = {"int8": (True, True, False, False), "uintx": (True, False, True, True),
                "fpx": (False, True, False, True), "fp8": (False, True, False, False),
                "gguf": (False, True, False, name != "q8_0")}[family]
    assert (storage.takes_group_size, storage.allows_per_channel, storage.has_zero, storage.packed) == expected
    code_dtype = {"int8": torch.int8, "q8_0": torch.int8, "fp8_e4m3": torch.float8_e4m3fn,
                  "fp8_e5m2": torch.float8_e5m2}.get(name)
    assert storage.code_dtype == (code_dtype or torch.uint8)
    if family == "gguf":  # whole blocks: 32 weights, 256 for the K-quants
        assert storage.k_alignment == (256 if name.endswith("_k") else 32)
        return
    # packed: every bit plane (4, 2, 1 bits) of a row fills whole bytes
    alignment = {1: 8, 2: 4, 3: 8, 4: 2, 5: 8, 6: 4, 7: 8}[storage.bits] if storage.packed else 1
    assert storage.k_alignment == alignment


def test_backend_facts():
    aten = {name for name in NAMES if FORMATS[name].aten_kernel}
    assert aten == {"int8", "uint4"}
    assert FORMATS["int8"].aten_kernel == ATEN_INT8_KERNEL and FORMATS["uint4"].aten_kernel == ATEN_INT4_KERNEL
    assert {name: FORMATS[name].quanto_qtype for name in NAMES if FORMATS[name].quanto_qtype} == {
        "int8": "qint8", "uint2": "qint2", "uint4": "qint4", "fp8_e4m3": "qfloat8_e4m3fn", "fp8_e5m2": "qfloat8_e5m2"}
    assert QUANTO_QTYPES["qfloat8"] == FORMATS["fp8_e4m3"] and len(QUANTO_QTYPES) == 6
    assert {name for name in NAMES if FORMATS[name].gemlite_builder} == {
        "int8", "uint1", "uint2", "uint4", "fp8_e4m3", "fp8_e5m2"}
    for storage in FORMATS.values():  # torchao has nothing for GGUF's block types
        assert ("none" in storage.torchao_configs) == (storage.family != "gguf")
        assert set(storage.torchao_configs) <= set(ACTIVATIONS)
    assert FORMATS["uint4"].torchao_configs["none"] == "Int4WeightOnlyConfig"
    assert FORMATS["uint3"].torchao_configs["none"] == "IntxWeightOnlyConfig"


@pytest.mark.parametrize("name", NAMES)
def test_kernel_format(name):
    storage = FORMATS[name]
    kernel = storage.kernel
    assert kernel.bits == storage.bits
    if isinstance(storage, GgufFormat):  # the op takes the block parameters, and the ggml type by its number
        assert kernel.tensors == ("qweight", "block_scales")
        assert (kernel.kind, kernel.op, kernel.arguments) == ("gguf", "gguf_linear", (storage.blocks.ggml_type,))
        return
    assert kernel.tensors == (("qweight", "scale", "zero") if storage.has_zero else ("qweight", "scale"))
    if isinstance(storage, Int8Format):
        expected = ("int8", "int8_linear", ())
    elif isinstance(storage, UintxFormat):
        expected = ("uintx", "uintx_linear", (storage.bits,))
    else:  # fpX and fp8 share the float kernel
        expected = ("floatx", "floatx_linear", (storage.ebits, storage.mbits))
    assert (kernel.kind, kernel.op, kernel.arguments) == expected
