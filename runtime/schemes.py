"""Quantization schemes: what a name means, how a weight is stored, and how to get it back.

A `Scheme` is data: the weight format (int8, uintX, fpX, fp8), its parameters, and the activation
treatment. `resolve_scheme` turns any accepted spelling (torchao/diffusers shorthand or long name, quanto
weights dtype or qtype) into one. How each format is stored, quantized and served is its format object
(`Scheme.storage`, quantrt.formats).
"""

from __future__ import annotations

import difflib
import operator
import re
from dataclasses import dataclass, field, replace

import torch

from .formats import FAMILIES, QUANTO_QTYPES, Fp8Format, FpxFormat, GgufFormat, Int8Format, StorageFormat, \
    TensorSpecs, UintxFormat, storage_format

WEIGHT_KINDS = tuple(FAMILIES)
ACTIVATIONS = ("none", "int8_token", "fp8_tensor", "fp8_row", "fp8_static")
# tensors an activation treatment stores beside the weight's: fp8_static's calibrated activation scale
ACTIVATION_TENSORS: dict[str, TensorSpecs] = {"fp8_static": {"act_scale": ((1, 1), torch.float32)}}


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme. `group_size` None means one scale per output channel (or per tensor for
    the fp8 per-tensor schemes, see `per_tensor`)."""

    name: str
    weight: str
    bits: int
    group_size: int | None = None
    ebits: int = 0
    mbits: int = 0
    fp8: str = ""
    per_tensor: bool = False
    activation: str = "none"
    gguf: str = ""  # the GGUF block type of a gguf scheme (q4_k)
    # the format object that weight, bits, ebits, mbits, fp8 and gguf name: derived, so not compared, hashed or shown
    storage: StorageFormat = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "storage", storage_format(self.weight, self.bits, self.ebits, self.mbits, self.fp8,
                                                           self.gguf))

    @property
    def weight_only(self) -> bool:
        return self.activation == "none"

    @property
    def format(self) -> str:
        """The storage format's name: int8, uint4, fp6_e3m2, fp8_e4m3."""
        return self.storage.name

    def describe(self) -> str:
        """A human-readable one-liner: format, grouping and activations."""
        grouping = "per tensor" if self.per_tensor else (
            f"group {self.group_size}" if self.group_size else "per channel")
        if isinstance(self.storage, GgufFormat):
            blocks = self.storage.blocks
            grouping = f"GGUF blocks of {blocks.block}" + (f", sub-blocks of {blocks.sub_block}" if blocks.sub_block
                                                           else "")
        act = {"none": "bf16/fp16 activations", "int8_token": "int8 per-token activations",
               "fp8_tensor": "fp8 per-tensor activations", "fp8_row": "fp8 per-row activations",
               "fp8_static": "fp8 static-scale activations"}[self.activation]
        return f"{self.format} weights, {grouping}, {act}"

    def unsupported_reason(self, n: int, k: int) -> str | None:
        """Why a [n, k] weight cannot be stored in this scheme, or None if it can."""
        return self.storage.unsupported_reason(n, k, self.group_size)

    def tensor_specs(self, n: int, k: int, dtype: torch.dtype) -> TensorSpecs:
        """Name -> (shape, dtype) of every tensor this scheme stores for an [n, k] weight whose group
        parameters are kept in `dtype`: the format's (fp8 codes as uint8, their bits, so that
        `module.to(dtype)` never converts them), then the activation treatment's."""
        specs = self.storage.tensor_specs(n, k, dtype, self.group_size, self.per_tensor)
        specs.update(ACTIVATION_TENSORS.get(self.activation, {}))
        return specs

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """weight [N, K] (float) -> the stored tensors of the format's `tensor_specs`."""
        return self.storage.quantize(weight, self.group_size, self.per_tensor)

    def dequantize(self, tensors: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        """The stored tensors -> float32 weight [N, K]."""
        return self.storage.dequantize(tensors, k)

    def to_dict(self) -> dict:
        return {"name": self.name, "group_size": self.group_size}


def _scheme(name: str, storage: StorageFormat, group_size: int | None = None, per_tensor: bool = False,
            activation: str = "none") -> Scheme:
    return Scheme(name, **storage.scheme_fields(), group_size=group_size, per_tensor=per_tensor,
                  activation=activation)


def _int8(name: str, group_size: int | None, activation: str = "none") -> Scheme:
    return _scheme(name, Int8Format(), group_size, activation=activation)


def _uintx(name: str, bits: int, group_size: int, activation: str = "none") -> Scheme:
    return _scheme(name, UintxFormat(bits), group_size, activation=activation)


def _fpx(ebits: int, mbits: int) -> Scheme:
    storage = FpxFormat(ebits, mbits)
    return _scheme(storage.name, storage)


def _fp8(name: str, fp8: str, per_tensor: bool = False, activation: str = "none") -> Scheme:
    return _scheme(name, Fp8Format(fp8), per_tensor=per_tensor, activation=activation)


def _default_fpx(bits: int) -> tuple[int, int]:
    # diffusers' convention: fpX alone takes ceil((X - 1) / 2) exponent bits
    ebits = bits // 2
    return ebits, bits - 1 - ebits


# Canonical schemes by name, with their defaults. Aliases below map onto these names.
SCHEMES: dict[str, Scheme] = {
    "int8wo": _int8("int8wo", None),
    "int4wo": _uintx("int4wo", 4, 128),
    **{f"uint{b}wo": _uintx(f"uint{b}wo", b, 64) for b in range(1, 8)},
    "float8wo_e5m2": _fp8("float8wo_e5m2", "e5m2"),
    "float8wo_e4m3": _fp8("float8wo_e4m3", "e4m3"),
    **{storage.name: _scheme(storage.name, storage) for storage in FpxFormat.variants()},
    "int8dq": _int8("int8dq", None, "int8_token"),
    "int4dq": _uintx("int4dq", 4, 32, "int8_token"),
    "float8dq_e4m3_tensor": _fp8("float8dq_e4m3_tensor", "e4m3", True, "fp8_tensor"),
    "float8dq_e4m3_row": _fp8("float8dq_e4m3_row", "e4m3", False, "fp8_row"),
    "float8_static_activation_float8_weight": _fp8(
        "float8_static_activation_float8_weight", "e4m3", True, "fp8_static"),
}

ALIASES: dict[str, str] = {
    "int8_weight_only": "int8wo",
    "int_a16w8": "int8wo",
    "int4_weight_only": "int4wo",
    "int_a16w4": "int4wo",
    **{f"uint_a16w{b}": f"uint{b}wo" for b in range(1, 8)},
    "float8wo": "float8wo_e5m2",  # diffusers' legacy meaning
    "float8_weight_only": "float8wo_e4m3",  # torchao's default weight dtype
    "float8wo_e4m3fn": "float8wo_e4m3",
    **{f"fp{b}": _fpx(*_default_fpx(b)).name for b in range(3, 8)},
    **{f"fp{b}wo": _fpx(*_default_fpx(b)).name for b in range(3, 8)},
    "int8_dynamic_activation_int8_weight": "int8dq",
    "int_a8w8": "int8dq",
    "int8_dynamic_activation_int4_weight": "int4dq",
    "int_a8w4": "int4dq",
    "float8dq": "float8dq_e4m3_tensor",
    "float8dq_e4m3": "float8dq_e4m3_tensor",
    "float8_dynamic_activation_float8_weight": "float8dq_e4m3_tensor",
    "float8_static": "float8_static_activation_float8_weight",
    "float8sq": "float8_static_activation_float8_weight",
}

# GGUF's block types (llama.cpp's ggml quantizations), by their lowercase names: what a GGUF file's tensors load as
# (quantrt.checkpoints.gguf), and formats to quantize into. Kept apart from SCHEMES, the schemes every model takes:
# the K-quants need K to be a multiple of 256
GGUF_SCHEMES: dict[str, Scheme] = {storage.name: _scheme(storage.name, storage) for storage in GgufFormat.variants()}

# quanto's group size for its packed qtypes (qint4, qint2), where it divides K
QUANTO_GROUP_SIZE = 128


def _quanto_scheme(storage: StorageFormat) -> Scheme:
    """The weight-only scheme that stores a quanto qtype's numbers: the first of SCHEMES in its format, grouped as
    quanto groups it by default."""
    scheme = next(s for s in SCHEMES.values() if s.storage == storage and s.weight_only)
    return replace(scheme, group_size=QUANTO_GROUP_SIZE if storage.packed else None)


# optimum-quanto weights dtypes (a qtype's name without its q, as diffusers' QuantoConfig spells them) and qtypes
QUANTO_WEIGHTS: dict[str, Scheme] = {
    name: _quanto_scheme(storage) for qtype, storage in QUANTO_QTYPES.items() for name in (qtype[1:], qtype)}

# long names that take their variant from keyword arguments (torchao's signatures)
PARAMETRIZED = ("uintx_weight_only", "fpx_weight_only", "float8_weight_only",
                "float8_dynamic_activation_float8_weight")

_FPX = re.compile(r"^fp(\d)_e(\d)[mw](\d)$")
# a group spans at most one row of K weights, and no layer's K comes near 2**20; larger values are typos
# (2**40, inf) that would keep every layer in full precision or overflow the kernels' int32 arguments
MAX_GROUP_SIZE = 2**20
# the spellings of float8_weight_only's weight_dtype= (torch.float8_e4m3fn or the name) -> quantrt's fp8 kind;
# the ROCm "fnuz" variants are other formats, so they are not here
FP8_WEIGHT_DTYPES = {"float8_e4m3fn": "e4m3", "e4m3fn": "e4m3", "e4m3": "e4m3",
                     "float8_e5m2": "e5m2", "e5m2": "e5m2"}


def valid_names() -> list[str]:
    """Every accepted scheme spelling, canonical names first."""
    names = list(SCHEMES) + list(ALIASES) + list(PARAMETRIZED) + list(QUANTO_WEIGHTS) + list(GGUF_SCHEMES)
    return list(dict.fromkeys(names))


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, valid_names(), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    # the fpX_eAmB family is listed once, as its pattern
    listing = ", ".join([n for n in SCHEMES if not n.startswith("fp")][:11] + ["fpX_eAmB (3 <= X <= 7)"]
                        + [n for n in SCHEMES if not n.startswith("fp")][11:])
    return ValueError(
        f"unknown quantization scheme {name!r}.{hint} Valid schemes: {listing}; aliases: "
        f"{', '.join(sorted(set(ALIASES) - {a for a in ALIASES if a.startswith('fp')}))}, fpX; "
        f"quanto weights dtypes: {', '.join(QUANTO_WEIGHTS)}; GGUF block types: {', '.join(GGUF_SCHEMES)}."
    )


def _dtype_name(value) -> str:
    return str(value).replace("torch.", "").lower()


def whole_number(value: object) -> int | None:
    """`value` as an int when it is a whole number, else None. Whole numbers: ints (also numpy's and 0-d
    integer tensors), floats / Decimals / Fractions / 0-d float tensors with no fractional part (64.0,
    Fraction(64), Decimal("64")) and decimal strings ("64", from a JSON file or a command line). Never a
    bool, and never truncated: 64.5, Decimal("64.5"), inf and NaN are None."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            return None
        value = value.item()
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    try:
        return operator.index(value)  # exact for ints of any size, numpy's ints and 0-d integer arrays
    except TypeError:
        pass
    try:
        integral = int(value)  # floats, Decimals, Fractions: truncates, so compare below
    except (TypeError, ValueError, OverflowError):  # not a number, NaN, inf
        return None
    try:
        return integral if bool(integral == value) else None
    except (TypeError, ValueError):  # an array of several values
        return None


def _uintx_bits(kwargs: dict) -> int:
    """uintx_weight_only's code width from dtype= (torch.uint1 .. torch.uint7, or its name) and/or bits=."""
    dtype, bits = kwargs.pop("dtype", None), kwargs.pop("bits", None)
    width = None
    if dtype is not None:
        match = re.fullmatch(r"uint(\d)", _dtype_name(dtype).strip())
        width = int(match.group(1)) if match else None
        if width is None or not 1 <= width <= 7:
            raise ValueError(f"uintx_weight_only: dtype must be torch.uint1 .. torch.uint7, got dtype={dtype!r}; "
                             f"e.g. QuantConfig('uintx_weight_only', dtype=torch.uint4)")
    if bits is not None:
        count = whole_number(bits)
        if count is None or not 1 <= count <= 7:
            raise ValueError(f"uintx_weight_only: bits must be a whole number from 1 to 7 (the width of the "
                             f"stored codes), got bits={bits!r}; e.g. bits=4 for uint4wo")
        if width is not None and width != count:
            raise ValueError(f"uintx_weight_only: dtype={dtype!r} and bits={bits!r} disagree; give one of them")
        width = count
    if width is None:
        raise ValueError("uintx_weight_only needs dtype=torch.uint1 .. torch.uint7 (or bits=1..7), e.g. "
                         "QuantConfig('uintx_weight_only', dtype=torch.uint4)")
    return width


def _fpx_bits(kwargs: dict) -> tuple[int, int]:
    """fpx_weight_only's (ebits, mbits), each a whole number."""
    if "ebits" not in kwargs or "mbits" not in kwargs:
        raise ValueError("fpx_weight_only needs ebits= and mbits=, e.g. QuantConfig('fpx_weight_only', ebits=3, mbits=2)")
    counts = []
    for argument in ("ebits", "mbits"):
        value = kwargs.pop(argument)
        count = whole_number(value)
        if count is None:
            raise ValueError(f"fpx_weight_only: {argument} must be a whole number of bits, got {argument}={value!r}; "
                             f"e.g. ebits=3, mbits=2 for fp6_e3m2")
        counts.append(count)
    return counts[0], counts[1]


def _fp8_weight_kind(weight_dtype) -> str:
    """float8_weight_only's weight_dtype= -> 'e4m3' or 'e5m2'."""
    kind = FP8_WEIGHT_DTYPES.get(_dtype_name(weight_dtype).strip())
    if kind is None:
        raise ValueError(f"float8_weight_only: weight_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got "
                         f"weight_dtype={weight_dtype!r}")
    return kind


def _fp8_granularity(granularity) -> str:
    """float8_dynamic_activation_float8_weight's granularity= -> 'tensor' or 'row'. Takes 'tensor' / 'row'
    ('per_tensor', 'PerRow', ...), torchao's PerTensor() / PerRow(), or a pair of them (activation, weight)
    that agree."""
    if isinstance(granularity, (tuple, list)):
        kinds = {_fp8_granularity(g) for g in granularity}
        if len(kinds) == 1:
            return kinds.pop()
    else:
        name = granularity if isinstance(granularity, str) else type(granularity).__name__
        kind = name.strip().lower().replace("_", "").removesuffix("()").removeprefix("per")
        if kind in ("tensor", "row"):
            return kind
    raise ValueError(f"float8_dynamic_activation_float8_weight: granularity must be 'tensor' or 'row' (or torchao's "
                     f"PerTensor() / PerRow(), the same for activations and weights), got granularity={granularity!r}")


def _parametrized(name: str, kwargs: dict) -> Scheme:
    if name == "uintx_weight_only":
        return SCHEMES[f"uint{_uintx_bits(kwargs)}wo"]
    if name == "fpx_weight_only":
        return _fpx(*_fpx_bits(kwargs))
    if name == "float8_weight_only":
        kind = _fp8_weight_kind(kwargs.pop("weight_dtype", "float8_e4m3fn"))
        return SCHEMES[f"float8wo_{kind}"]
    kind = _fp8_granularity(kwargs.pop("granularity", "tensor"))
    return SCHEMES[f"float8dq_e4m3_{kind}"]


def _check_group_size(scheme: Scheme, group_size: int) -> None:
    if isinstance(scheme.storage, GgufFormat):
        raise ValueError(f"{scheme.name} groups its weights in GGUF's own blocks and takes no group_size (got "
                         f"{group_size})")
    if not scheme.storage.takes_group_size:
        raise ValueError(f"{scheme.name} uses one scale per output channel and takes no group_size "
                         f"(got {group_size}); use int8wo, int4wo or uintXwo for grouped scales")
    if group_size < 8 or group_size & (group_size - 1) or group_size > MAX_GROUP_SIZE:
        raise ValueError(f"{scheme.name}: group_size must be a power of two >= 8 and <= 2**20 (32, 64, 128, 256 "
                         f"are usual), got {group_size}")


def _whole_group_size(scheme: Scheme, group_size) -> int:
    """group_size as an int (see `whole_number`), else a ValueError."""
    value = whole_number(group_size)
    if value is None:
        raise ValueError(f"{scheme.name}: group_size must be a whole number, got {group_size!r}; give a power of "
                         f"two >= 8 such as 64 (or None for the scheme's default)")
    return value


def resolve_scheme(name: str | Scheme, group_size: int | None = None, **kwargs) -> Scheme:
    """Any accepted spelling -> Scheme. `group_size` overrides the scheme's default; keyword arguments
    carry the variant of torchao's long names (dtype=, ebits=/mbits=, weight_dtype=, granularity=)."""
    if isinstance(name, Scheme):
        scheme = name
    else:
        if not isinstance(name, str):
            raise TypeError(f"a scheme is a string such as 'int8wo', got {type(name).__name__}")
        key = name.strip().lower()
        fpx = _FPX.match(key)
        if kwargs and key not in PARAMETRIZED:
            raise TypeError(f"{sorted(kwargs)} only apply to the long names {', '.join(PARAMETRIZED)}, not {name!r}")
        if key in PARAMETRIZED and (kwargs or key not in ALIASES):
            kwargs = dict(kwargs)
            scheme = _parametrized(key, kwargs)
            if kwargs:
                raise TypeError(f"{name!r} got unexpected arguments {sorted(kwargs)}")
        elif key in SCHEMES:
            scheme = SCHEMES[key]
        elif key in ALIASES:
            scheme = SCHEMES[ALIASES[key]]
        elif key in QUANTO_WEIGHTS:
            scheme = QUANTO_WEIGHTS[key]
        elif key in GGUF_SCHEMES:
            scheme = GGUF_SCHEMES[key]
        elif fpx:
            bits, ebits, mbits = map(int, fpx.groups())
            if bits != 1 + ebits + mbits:
                raise ValueError(f"{name!r}: an X-bit float has X = 1 + exponent + mantissa bits, "
                                 f"but 1 + {ebits} + {mbits} != {bits}")
            scheme = _fpx(ebits, mbits)
        else:
            raise _unknown(name)
    if group_size is not None:
        group_size = _whole_group_size(scheme, group_size)
    if group_size == -1 and not scheme.storage.allows_per_channel:
        raise ValueError(f"{scheme.name} stores its {scheme.bits}-bit codes in groups; group_size=-1 (one scale "
                         f"per output channel) is for int8wo: give a power of two >= 8, e.g. "
                         f"{SCHEMES['int4wo'].group_size}")
    if group_size is not None and group_size != -1:
        _check_group_size(scheme, group_size)
        scheme = replace(scheme, group_size=group_size)
    elif group_size == -1:  # one scale per output channel
        scheme = replace(scheme, group_size=None)
    return scheme
