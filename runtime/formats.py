"""Storage formats: how a quantized weight is stored, one object per format, and which backend serves it how.

A `Scheme` (schemes.py) names a storage format, its grouping and its activation treatment. The format object
owns the rest:

- its name (int8, uint4, fp6_e3m2, fp8_e4m3, q4_k) and its family (`Scheme.weight`: int8, uintx, fpx, fp8, gguf);
- the tensors it stores, quantize and dequantize (the pure-torch definitions in quantrt.kernels.quantize);
- which K it can pack (`unsupported_reason`), whether it takes a group size, whether it has zero points;
- its kernel format (`kernel`: the quantrt torch op and what the Triton launcher reads of it);
- the facts the backends choose by: the aten kernel, the torchao configs and tensor, the quanto qtype, the
  gemlite builder.

The families and their variants:

| family | formats | stored tensors for an [N, K] weight |
|---|---|---|
| int8 | int8 | qweight int8 [N, K], scale [N, K / g] (g = K per channel) |
| uintx | uint1 .. uint7 | qweight uint8 [N, K * X / 8] (bit planes), scale, zero [N, K / g] |
| fpx | fpX_eAmB, 3 <= X <= 7 | qweight uint8 [N, K * X / 8] (bit planes), scale [N, 1] |
| fp8 | fp8_e4m3, fp8_e5m2 | qweight uint8 [N, K] (the fp8 bits), scale [N, 1] or per tensor [1, 1] |
| gguf | q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k | qweight uint8 [N, K * X / 8] (bit planes; q8_0: int8 [N, K]), block_scales uint8 [N, K / block * param_bytes], scale [N, 0] |

Adding a format: one class here (registered in `FAMILIES`), its section in quantrt.kernels (quantize.py and
the kernels' decode), and the schemes that name it in schemes.py. A backend changes only where the format names
something it has no entry for yet (a torchao config class: backends/torchao.py CONFIG_BUILDERS; a new kernel kind:
backends/triton.py WEIGHT_FORMAT_KINDS).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch

from .kernels import quantize as Q
from .kernels.packing import GGUF_BLOCKS, GgufBlocks, gguf_blocks, k_alignment, packed_bytes

# torch's CPU weight-only kernels (torch.ops.aten), as the aten backend calls them
ATEN_INT8_KERNEL = "_weight_int8pack_mm"
ATEN_INT4_KERNEL = "_weight_int4pack_mm_for_cpu"
# fp8 kind -> (exponent bits, mantissa bits): e4m3fn and e5m2, as quantrt.kernels.floatx.FP8_FORMATS
FP8_BITS = {"e4m3": (4, 3), "e5m2": (5, 2)}

TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class KernelFormat:
    """What quantrt's Triton kernels take for a format: the torch op `quantrt::<kind>_linear` (kind int8, uintx,
    floatx or gguf, the WeightFormat kind of quantrt.kernels.formats), the bits per code and, for floats, the exponent
    and mantissa bits. The op is called as op(x, *stored tensors named in `tensors`, bias, *`arguments`)."""

    kind: str
    bits: int
    ebits: int = 0
    mbits: int = 0
    tensors: tuple[str, ...] = ("qweight", "scale")
    arguments: tuple[int, ...] = ()

    @property
    def op(self) -> str:
        """The quantrt torch op's name (in torch.ops.quantrt)."""
        return f"{self.kind}_linear"


@dataclass(frozen=True)
class StorageFormat(ABC):
    """One storage format. Subclasses set the class attributes below and implement the abstract methods;
    `bits` (per stored code) is a field, property or class attribute of each."""

    # Scheme.weight for this format's family
    family: ClassVar[str] = ""
    # whether scales come in groups of K (Scheme.group_size); else one per output channel (or per tensor)
    takes_group_size: ClassVar[bool] = False
    # whether one scale per output channel (group_size None) is a layout of this format
    allows_per_channel: ClassVar[bool] = True
    # whether it stores zero points (w = (q - z) * s)
    has_zero: ClassVar[bool] = False
    # whether codes are sub-byte, packed in packing.py's bit planes (K must then fill whole bytes)
    packed: ClassVar[bool] = False
    # the torchao tensor class whose qdata / scale (/ zero_point) can hold this format's codes as they are
    torchao_tensor: ClassVar[str | None] = None

    @property
    @abstractmethod
    def name(self) -> str:
        """int8, uint4, fp6_e3m2, fp8_e4m3."""

    @property
    @abstractmethod
    def code_dtype(self) -> torch.dtype:
        """The dtype a code is read as: int8, uint8 bytes of packed codes, the float8 dtype of fp8 codes."""

    @property
    @abstractmethod
    def kernel(self) -> KernelFormat:
        """What the Triton kernels take for this format."""

    @property
    def aten_kernel(self) -> str | None:
        """The torch.ops.aten CPU weight-only kernel that reads these codes (ATEN_INT8_KERNEL, ATEN_INT4_KERNEL),
        or None."""
        return None

    @property
    def torchao_configs(self) -> dict[str, str]:
        """Scheme.activation -> the torchao config class that quantizes this format with those activations."""
        return {}

    @property
    def quanto_qtype(self) -> str | None:
        """The optimum-quanto weight qtype that stores the same numbers, or None."""
        return None

    @property
    def gemlite_builder(self) -> str | None:
        """The gemlite.helper builder that takes these codes as they are (A16W8_INT8, A16W8_FP8, A16Wn), or None."""
        return None

    @property
    def k_alignment(self) -> int:
        """K must be a multiple of this (packed codes fill whole bytes in every bit plane)."""
        return k_alignment(self.bits) if self.packed else 1

    @abstractmethod
    def scheme_fields(self) -> dict[str, object]:
        """The Scheme fields that name this format: weight (the family), bits, and ebits / mbits / fp8 / gguf where
        used."""

    @classmethod
    @abstractmethod
    def from_scheme_fields(cls, bits: int, ebits: int, mbits: int, fp8: str, gguf: str = "") -> StorageFormat:
        """The format of this family that a Scheme's fields name."""

    @classmethod
    @abstractmethod
    def variants(cls) -> Iterator[StorageFormat]:
        """Every format of this family that quantrt stores."""

    def unsupported_reason(self, n: int, k: int, group_size: int | None = None) -> str | None:
        """Why an [n, k] weight cannot be stored in this format with `group_size`, or None if it can."""
        if group_size is not None and k % group_size:
            return f"K={k} is not a multiple of group_size={group_size}"
        if k % self.k_alignment:
            return f"K={k} is not a multiple of {self.k_alignment}, needed to pack {self.bits}-bit codes"
        return None

    @abstractmethod
    def tensor_specs(self, n: int, k: int, dtype: torch.dtype, group_size: int | None = None,
                     per_tensor: bool = False) -> TensorSpecs:
        """Name -> (shape, dtype) of every tensor stored for an [n, k] weight whose scales (and zero points) are
        kept in `dtype`, grouped by `group_size` (None: per output channel; `per_tensor`: one scale, fp8 only)."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor, group_size: int | None = None,
                 per_tensor: bool = False) -> dict[str, torch.Tensor]:
        """weight [N, K] (float) -> the stored tensors of `tensor_specs`, scales in the weight's dtype."""

    @abstractmethod
    def dequantize(self, tensors: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        """The stored tensors of a weight with K = `k` -> float32 weight [N, K]."""

    @staticmethod
    def groups(k: int, group_size: int | None) -> int:
        """Scales per output channel: K / group_size, or 1 per channel."""
        return 1 if group_size is None else k // group_size


@dataclass(frozen=True)
class Int8Format(StorageFormat):
    """Symmetric int8: w = q * s, q in [-127, 127], scales per group or per output channel."""

    family: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8
    takes_group_size: ClassVar[bool] = True
    torchao_tensor: ClassVar[str | None] = "Int8Tensor"

    @property
    def name(self) -> str:
        return "int8"

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8

    @property
    def kernel(self) -> KernelFormat:
        return KernelFormat("int8", 8)

    @property
    def aten_kernel(self) -> str | None:
        return ATEN_INT8_KERNEL

    @property
    def torchao_configs(self) -> dict[str, str]:
        return {"none": "Int8WeightOnlyConfig", "int8_token": "Int8DynamicActivationInt8WeightConfig"}

    @property
    def quanto_qtype(self) -> str | None:
        return "qint8"

    @property
    def gemlite_builder(self) -> str | None:
        return "A16W8_INT8"

    def scheme_fields(self) -> dict[str, object]:
        return {"weight": self.family, "bits": 8}

    @classmethod
    def from_scheme_fields(cls, bits: int, ebits: int, mbits: int, fp8: str, gguf: str = "") -> StorageFormat:
        if bits != 8:
            raise ValueError(f"int8 codes have 8 bits, got bits={bits}")
        return cls()

    @classmethod
    def variants(cls) -> Iterator[StorageFormat]:
        yield cls()

    def tensor_specs(self, n: int, k: int, dtype: torch.dtype, group_size: int | None = None,
                     per_tensor: bool = False) -> TensorSpecs:
        return {"qweight": ((n, k), torch.int8), "scale": ((n, self.groups(k, group_size)), dtype)}

    def quantize(self, weight: torch.Tensor, group_size: int | None = None,
                 per_tensor: bool = False) -> dict[str, torch.Tensor]:
        q, s = Q.quantize_int8(weight, group_size)
        return {"qweight": q, "scale": s}

    def dequantize(self, tensors: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        return Q.dequantize_int8(tensors["qweight"], tensors["scale"])


@dataclass(frozen=True)
class UintxFormat(StorageFormat):
    """Asymmetric X-bit codes, 1 <= X <= 7: w = (q - z) * s, q in [0, 2**X), z a float zero point, packed in bit
    planes along K, scales and zero points per group (never per channel: the codes are too coarse for a row)."""

    family: ClassVar[str] = "uintx"
    takes_group_size: ClassVar[bool] = True
    allows_per_channel: ClassVar[bool] = False
    has_zero: ClassVar[bool] = True
    packed: ClassVar[bool] = True
    torchao_tensor: ClassVar[str | None] = "IntxUnpackedToInt8Tensor"

    bits: int

    def __post_init__(self):
        if not 1 <= self.bits <= 7:
            raise ValueError(f"uintX codes have 1 to 7 bits, got {self.bits}")

    @property
    def name(self) -> str:
        return f"uint{self.bits}"

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def kernel(self) -> KernelFormat:
        return KernelFormat("uintx", self.bits, tensors=("qweight", "scale", "zero"), arguments=(self.bits,))

    @property
    def aten_kernel(self) -> str | None:
        return ATEN_INT4_KERNEL if self.bits == 4 else None

    @property
    def torchao_configs(self) -> dict[str, str]:
        # 4 bits: tinygemm's Int4WeightOnlyConfig where it runs (CUDA), else the intX config as for other widths
        weight_only = "Int4WeightOnlyConfig" if self.bits == 4 else "IntxWeightOnlyConfig"
        return {"none": weight_only, "int8_token": "Int8DynamicActivationIntxWeightConfig"}

    @property
    def quanto_qtype(self) -> str | None:
        return {4: "qint4", 2: "qint2"}.get(self.bits)

    @property
    def gemlite_builder(self) -> str | None:
        return "A16Wn" if self.bits in (1, 2, 4) else None

    def scheme_fields(self) -> dict[str, object]:
        return {"weight": self.family, "bits": self.bits}

    @classmethod
    def from_scheme_fields(cls, bits: int, ebits: int, mbits: int, fp8: str, gguf: str = "") -> StorageFormat:
        return cls(bits)

    @classmethod
    def variants(cls) -> Iterator[StorageFormat]:
        for bits in range(1, 8):
            yield cls(bits)

    def tensor_specs(self, n: int, k: int, dtype: torch.dtype, group_size: int | None = None,
                     per_tensor: bool = False) -> TensorSpecs:
        groups = self.groups(k, group_size)
        return {"qweight": ((n, packed_bytes(k, self.bits)), torch.uint8),
                "scale": ((n, groups), dtype), "zero": ((n, groups), dtype)}

    def quantize(self, weight: torch.Tensor, group_size: int | None = None,
                 per_tensor: bool = False) -> dict[str, torch.Tensor]:
        q, s, z = Q.quantize_uintx(weight, self.bits, group_size)
        return {"qweight": q, "scale": s, "zero": z}

    def dequantize(self, tensors: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        return Q.dequantize_uintx(tensors["qweight"], tensors["scale"], tensors["zero"], self.bits, k)


@dataclass(frozen=True)
class FpxFormat(StorageFormat):
    """X-bit floats fpX_eAmB, X = 1 + A + B in 3..7 (1 sign, A exponent, B mantissa bits, bias 2**(A-1) - 1,
    subnormals, no inf/nan), packed in bit planes along K, one scale per output channel."""

    family: ClassVar[str] = "fpx"
    packed: ClassVar[bool] = True

    ebits: int
    mbits: int

    def __post_init__(self):
        Q.check_floatx(self.ebits, self.mbits)

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def name(self) -> str:
        return f"fp{self.bits}_e{self.ebits}m{self.mbits}"

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def kernel(self) -> KernelFormat:
        return KernelFormat("floatx", self.bits, self.ebits, self.mbits, arguments=(self.ebits, self.mbits))

    @property
    def torchao_configs(self) -> dict[str, str]:
        return {"none": "FPXWeightOnlyConfig"}

    def scheme_fields(self) -> dict[str, object]:
        return {"weight": self.family, "bits": self.bits, "ebits": self.ebits, "mbits": self.mbits}

    @classmethod
    def from_scheme_fields(cls, bits: int, ebits: int, mbits: int, fp8: str, gguf: str = "") -> StorageFormat:
        if bits != 1 + ebits + mbits:
            raise ValueError(f"an X-bit float has X = 1 + exponent + mantissa bits, but 1 + {ebits} + {mbits} != "
                             f"{bits}")
        return cls(ebits, mbits)

    @classmethod
    def variants(cls) -> Iterator[StorageFormat]:
        for bits in range(3, 8):
            for ebits in range(1, bits):
                yield cls(ebits, bits - 1 - ebits)

    def tensor_specs(self, n: int, k: int, dtype: torch.dtype, group_size: int | None = None,
                     per_tensor: bool = False) -> TensorSpecs:
        return {"qweight": ((n, packed_bytes(k, self.bits)), torch.uint8), "scale": ((n, 1), dtype)}

    def quantize(self, weight: torch.Tensor, group_size: int | None = None,
                 per_tensor: bool = False) -> dict[str, torch.Tensor]:
        q, s = Q.quantize_floatx(weight, self.ebits, self.mbits)
        return {"qweight": q, "scale": s}

    def dequantize(self, tensors: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        return Q.dequantize_floatx(tensors["qweight"], tensors["scale"], self.ebits, self.mbits, k)


@dataclass(frozen=True)
class Fp8Format(StorageFormat):
    """fp8 e4m3fn / e5m2 codes stored as their uint8 bits (so that `module.to(dtype)` never converts them), one
    scale per output channel or per tensor."""

    family: ClassVar[str] = "fp8"
    bits: ClassVar[int] = 8
    torchao_tensor: ClassVar[str | None] = "Float8Tensor"

    kind: str  # "e4m3" or "e5m2"

    def __post_init__(self):
        if self.kind not in FP8_BITS:
            raise ValueError(f"fp8 codes are {' or '.join(FP8_BITS)}, got {self.kind!r}")

    @property
    def ebits(self) -> int:
        return FP8_BITS[self.kind][0]

    @property
    def mbits(self) -> int:
        return FP8_BITS[self.kind][1]

    @property
    def name(self) -> str:
        return f"fp8_{self.kind}"

    @property
    def code_dtype(self) -> torch.dtype:
        return Q.FP8_DTYPES[self.kind]

    @property
    def kernel(self) -> KernelFormat:
        return KernelFormat("floatx", 8, self.ebits, self.mbits, arguments=(self.ebits, self.mbits))

    @property
    def torchao_configs(self) -> dict[str, str]:
        dynamic = "Float8DynamicActivationFloat8WeightConfig"
        return {"none": "Float8WeightOnlyConfig", "fp8_tensor": dynamic, "fp8_row": dynamic,
                "fp8_static": "Float8StaticActivationFloat8WeightConfig"}

    @property
    def quanto_qtype(self) -> str | None:
        # quanto names its fp8 qtypes after torch's dtypes: qfloat8_e4m3fn, qfloat8_e5m2
        return "q" + str(self.code_dtype).removeprefix("torch.")

    @property
    def gemlite_builder(self) -> str | None:
        return "A16W8_FP8"

    def scheme_fields(self) -> dict[str, object]:
        return {"weight": self.family, "bits": 8, "fp8": self.kind}

    @classmethod
    def from_scheme_fields(cls, bits: int, ebits: int, mbits: int, fp8: str, gguf: str = "") -> StorageFormat:
        if bits != 8:
            raise ValueError(f"fp8 codes have 8 bits, got bits={bits}")
        return cls(fp8)

    @classmethod
    def variants(cls) -> Iterator[StorageFormat]:
        for kind in FP8_BITS:
            yield cls(kind)

    def tensor_specs(self, n: int, k: int, dtype: torch.dtype, group_size: int | None = None,
                     per_tensor: bool = False) -> TensorSpecs:
        return {"qweight": ((n, k), torch.uint8), "scale": ((1 if per_tensor else n, 1), dtype)}

    def quantize(self, weight: torch.Tensor, group_size: int | None = None,
                 per_tensor: bool = False) -> dict[str, torch.Tensor]:
        q, s = Q.quantize_fp8(weight, self.kind, per_tensor=per_tensor)
        return {"qweight": q.view(torch.uint8), "scale": s}

    def dequantize(self, tensors: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        return Q.dequantize_fp8(tensors["qweight"].view(self.code_dtype), tensors["scale"])


@dataclass(frozen=True)
class GgufFormat(StorageFormat):
    """A GGUF block type (llama.cpp's ggml quantizations Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K),
    holding the numbers a GGUF file stores: w = (q - offset) * a - b per group, a and b from the block's fp16 d
    (and dmin / m) and, in the K-quants, the sub-block's integer scale (and min), each weight rounded once
    (quantrt.kernels.packing.GGUF_BLOCKS has the layout). The codes are in bit planes (Q8_0: int8), the
    parameters in `block_scales` as GGUF's own bytes (fp16 bits, integer sub-scales: 6-bit ones one byte each),
    so they are never rounded to the layer's dtype and the bytes stay within 4% of the file's (Q3_K +3.6%,
    Q4_K +2.8%, Q5_K +2.3%, the others equal). Rows are whole blocks (K a multiple of 32, K-quants 256).

    `scale` is empty, [N, 0] in the layer's dtype: the rest of quantrt reads a layer's compute dtype from its
    scale (`layer.scale.dtype`), and `module.to(dtype)` converts it (and only it: the codes and block_scales are
    integers)."""

    family: ClassVar[str] = "gguf"

    gguf: str  # the block type: q8_0 ... q6_k

    def __post_init__(self):
        gguf_blocks(self.gguf)

    @property
    def blocks(self) -> GgufBlocks:
        return GGUF_BLOCKS[self.gguf]

    @property
    def bits(self) -> int:
        return self.blocks.bits

    @property
    def packed(self) -> bool:  # Q8_0's int8 codes are stored as they are
        return not self.blocks.signed_codes

    @property
    def name(self) -> str:
        return self.gguf

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.blocks.signed_codes else torch.uint8

    @property
    def kernel(self) -> KernelFormat:
        return KernelFormat("gguf", self.bits, tensors=("qweight", "block_scales"),
                            arguments=(self.blocks.ggml_type,))

    @property
    def k_alignment(self) -> int:
        return self.blocks.block

    def scheme_fields(self) -> dict[str, object]:
        return {"weight": self.family, "bits": self.bits, "gguf": self.gguf}

    @classmethod
    def from_scheme_fields(cls, bits: int, ebits: int, mbits: int, fp8: str, gguf: str = "") -> StorageFormat:
        storage = cls(gguf)
        if bits != storage.bits:
            raise ValueError(f"{gguf} codes have {storage.bits} bits, got bits={bits}")
        return storage

    @classmethod
    def variants(cls) -> Iterator[StorageFormat]:
        for name in GGUF_BLOCKS:
            yield cls(name)

    def unsupported_reason(self, n: int, k: int, group_size: int | None = None) -> str | None:
        if group_size is not None:
            return f"{self.gguf} groups its weights in GGUF's own blocks, not in groups of {group_size}"
        if k % self.blocks.block:
            return f"K={k} is not a multiple of {self.gguf}'s blocks of {self.blocks.block} weights"
        return None

    def tensor_specs(self, n: int, k: int, dtype: torch.dtype, group_size: int | None = None,
                     per_tensor: bool = False) -> TensorSpecs:
        blocks = self.blocks
        return {"qweight": ((n, blocks.code_bytes(k)), self.code_dtype), "scale": ((n, 0), dtype),
                "block_scales": ((n, k // blocks.block * blocks.param_bytes), torch.uint8)}

    def quantize(self, weight: torch.Tensor, group_size: int | None = None,
                 per_tensor: bool = False) -> dict[str, torch.Tensor]:
        qweight, block_scales = Q.quantize_gguf(weight, self.gguf)
        return {"qweight": qweight, "scale": weight.new_empty((weight.shape[0], 0)), "block_scales": block_scales}

    def dequantize(self, tensors: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        return Q.dequantize_gguf(tensors["qweight"], tensors["block_scales"], self.gguf, k)


# Scheme.weight -> the family's class
FAMILIES: dict[str, type[StorageFormat]] = {cls.family: cls for cls in (Int8Format, UintxFormat, FpxFormat, Fp8Format,
                                                                         GgufFormat)}
# every format quantrt stores, by name
FORMATS: dict[str, StorageFormat] = {fmt.name: fmt for cls in FAMILIES.values() for fmt in cls.variants()}
# optimum-quanto's weight qtypes -> the format that stores the same numbers: each format's own qtype, and quanto's
# alias qfloat8 (its qfloat8_e4m3fn). The one table of quanto names: schemes.QUANTO_WEIGHTS and the quanto
# backend derive from it
QUANTO_QTYPES: dict[str, StorageFormat] = {
    **{fmt.quanto_qtype: fmt for fmt in FORMATS.values() if fmt.quanto_qtype},
    "qfloat8": FORMATS["fp8_e4m3"],
}


def storage_format(family: str, bits: int, ebits: int = 0, mbits: int = 0, fp8: str = "",
                   gguf: str = "") -> StorageFormat:
    """The format that a Scheme's weight (family), bits, ebits, mbits, fp8 and gguf fields name."""
    cls = FAMILIES.get(family)
    if cls is None:
        raise ValueError(f"unknown storage format family {family!r}; one of {', '.join(FAMILIES)}")
    return cls.from_scheme_fields(bits=bits, ebits=ebits, mbits=mbits, fp8=fp8, gguf=gguf)
