"""GGUF files (llama.cpp's format; city96's FLUX GGUFs and other DiTs in their original layout), loaded into
quantrt's formats without requantizing: `load_gguf_file`, behind QuantizedTransformer.from_single_file("x.gguf")
and `quantrt quantize x.gguf DST`; `gguf_weight` serves diffusers' own from_single_file with a QuantConfig
(quantrt.integrations.diffusers).

    QuantizedTransformer.from_single_file("flux1-dev-Q4_K_S.gguf", config="FLUX.1-dev/transformer")

The file is read with the gguf package's GGUFReader (the format's own reader; `pip install gguf`), its keys go
through diffusers' single-file conversion as safetensors single files do (quantrt.checkpoints.single_file: BFL's
layout, or diffusers' own), and every tensor keeps its numbers:

| GGUF type | quantrt |
|---|---|
| F32, F16, BF16 | a plain tensor, as stored (cast to torch_dtype, default float32) |
| Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, a Linear weight | the scheme of the same name (q4_k, ...): the file's codes, fp16 block scales and integer sub-block scales (quantrt.formats.GgufFormat), dequantizing to gguf.quants.dequantize's float32 values bit for bit |
| any quantized type, not a Linear weight, or a Linear kept in full precision | gguf.quants.dequantize's float32 values, cast to torch_dtype |
| another quantized type (IQ*, TQ*, Q8_1, MXFP4, ...), a Linear weight | refused, naming the tensor, its type and the fix |

A QuantConfig, where given, says which Linear layers stay in full precision (modules_to_not_convert, a None
override: their GGUF weights are dequantized) and which backend serves; its scheme is not used, since nothing is
requantized (a per-module override naming another scheme for a GGUF layer is an error). diffusers' own
from_single_file with quantization_config=QuantConfig(...) loads the same way: diffusers reads the file (its
load_gguf_checkpoint) and converts its keys, quantrt's quantizer installs each GGUF layer from the raw blocks
(`gguf_layer_plan`, `gguf_parameter_tensors`; quantrt.integrations.diffusers). The file is checked
before a tensor is read: its header's counts against its size (so a crafted count cannot make the reader loop
for ever), byte order, tensor types, shapes, and data offsets inside the file without overlaps; tensors are read
with plain reads of their validated byte ranges, nothing is executed, no other file is opened.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import QuantConfig
from ..kernels.packing import GGUF_BLOCKS, gguf_blocks
from ..kernels.quantize import dequantize_gguf_fields, pack_gguf
from ..modules import install_skeleton
from ..schemes import GGUF_SCHEMES, Scheme
from ..serialization import CheckpointError
from .common import check_complete, loaded_quant_config
from .reader import release_freed_memory
from .single_file import planned_shape, single_file_layout

# GGUF's float types -> torch's
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# GGUF's integer types -> torch's (never a Linear weight; kept as they are)
INT_TYPES = {"I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}
# GGUF's value types in the header (gguf.GGUFValueType) -> bytes of one value; STRING = 8 and ARRAY = 9 are sized
# by their contents
_VALUE_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays of arrays: GGUF writers nest none; a deep nesting is a crafted file


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the gguf package (llama.cpp's reader): pip install gguf, or "
                          "pip install 'quantrt[gguf]'") from e
    return gguf


class _HeaderWalk:
    """Walks a GGUF header's counts and lengths without building anything, checking that each fits in the rest of
    the file: GGUFReader loops over the counts a file states, so a crafted count of 2**63 array elements or
    tensors in a small file would keep it looping. Little-endian files only (GGUF's usual byte order)."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        self.file = open(path, "rb")
        self.position = 0

    def close(self) -> None:
        self.file.close()

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a valid GGUF file: {what} (at byte {self.position}); the file "
                               f"is damaged, truncated or crafted")

    def read(self, count: int) -> bytes:
        if count > self.size - self.position:
            raise self.fail(f"it ends inside its header ({count} bytes wanted, {self.size - self.position} left)")
        data = self.file.read(count)
        self.position += count
        return data

    def skip(self, count: int) -> None:
        if count > self.size - self.position:
            raise self.fail(f"a value of {count} bytes does not fit in the file")
        self.file.seek(count, os.SEEK_CUR)
        self.position += count

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def count(self, what: str, least_bytes: int) -> int:
        value = self.u64()
        if value * least_bytes > self.size - self.position:
            raise self.fail(f"it states {value} {what}, more than the rest of the file can hold")
        return value

    def string(self) -> bytes:
        return self.read(self.count("bytes of a string", 1))

    def value(self, kind: int, depth: int = 0) -> None:
        if kind in _VALUE_BYTES:
            self.skip(_VALUE_BYTES[kind])
        elif kind == _STRING:
            self.string()
        elif kind == _ARRAY:
            if depth >= _MAX_NESTING:
                raise self.fail(f"arrays nested {depth} deep")
            item = self.u32()
            if item in _VALUE_BYTES:
                self.skip(self.count("array elements", _VALUE_BYTES[item]) * _VALUE_BYTES[item])
            else:
                for _ in range(self.count("array elements", 8)):
                    self.value(item, depth + 1)
        else:
            raise self.fail(f"unknown value type {kind}")

    def walk(self) -> tuple[list[tuple[str, list[int], int, int]], int, int]:
        """([(tensor name, dims innermost first, ggml type, offset into the data section)], the alignment, the
        data section's first byte)."""
        if self.read(4) != b"GGUF":
            raise CheckpointError(f"{self.path} is not a GGUF file (it does not start with 'GGUF')")
        version = self.u32()
        if version not in (2, 3):
            raise CheckpointError(f"{self.path} is GGUF version {version & 0xFFFFFFFF}; quantrt reads versions 2 and "
                                  f"3 in little-endian byte order (a big-endian file reads as a huge version)")
        tensors = self.count("tensors", 24)  # a name's length, dims, type and offset at least
        alignment = 32  # GGUF's default
        for _ in range(self.count("metadata entries", 13)):
            key, kind = self.string(), self.u32()
            if key == b"general.alignment" and kind == 4:
                alignment = self.u32()
                if alignment == 0 or alignment & (alignment - 1):
                    raise self.fail(f"general.alignment {alignment} is not a power of two")
            else:
                self.value(kind)
        infos = []
        for _ in range(tensors):
            name = self.string().decode("utf-8", errors="replace")
            count = self.u32()
            if not 1 <= count <= _MAX_DIMS:
                raise self.fail(f"tensor {name!r} has {count} dimensions (GGUF has 1 to {_MAX_DIMS})")
            dims = [self.u64() for _ in range(count)]
            infos.append((name, dims, self.u32(), self.u64()))
        return infos, alignment, -(-self.position // alignment) * alignment


class GgufFile:
    """One GGUF file's tensors, checked, read tensor by tensor (or row range by row range) with plain reads.

    `shape(name)` is the torch shape (GGUF lists dimensions innermost first), `kind(name)` GGUF's type name
    (Q4_K, F16, ...), `read(name, rows)` the tensor: a float / integer tensor of its type, or for quantized
    types its raw blocks as uint8 [rows, bytes per row]."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path} does not exist or is not a file: from_single_file loads a local "
                                  f".gguf file; quantrt never downloads")
        self.size = self.path.stat().st_size
        walk = _HeaderWalk(self.path, self.size)
        try:
            infos, self.alignment, data_start = walk.walk()
        finally:
            walk.close()
        gguf = _gguf()
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, dims, kind, offset in infos:
            if name in self._entries:
                raise CheckpointError(f"{self.path} holds tensor {name!r} twice; the file is damaged or crafted")
            self._entries[name] = self._check(name, dims, kind, data_start + offset, gguf)
        self._check_layout()
        try:  # the format's own reader, now that every count and offset is known to fit
            reader = gguf.GGUFReader(self.path)
        except Exception as e:  # it raises ValueError, KeyError, IndexError ... on a malformed file
            raise CheckpointError(f"{self.path} is not a readable GGUF file: gguf's reader says "
                                  f"{type(e).__name__}: {e}") from e
        read = {t.name: (t.tensor_type.name, int(t.data_offset)) for t in reader.tensors}
        if reader.byte_order != "I" or read != {name: (e[0], e[2]) for name, e in self._entries.items()}:
            raise CheckpointError(f"{self.path}: gguf's reader sees other tensors than its header lists (a file in "
                                  f"the other byte order?); quantrt reads little-endian GGUF files, as llama.cpp "
                                  f"writes them")
        del reader  # its memory map: only the header's pages were read

    def _check(self, name: str, dims: list[int], kind_number: int, begin: int, gguf: Any
               ) -> tuple[str, tuple[int, ...], int, int]:
        try:
            kind = gguf.GGMLQuantizationType(kind_number)
        except ValueError:
            raise CheckpointError(f"{self.path}: tensor {name!r} has ggml type {kind_number}, which the gguf package "
                                  f"does not know; the file is damaged, or newer than gguf "
                                  f"{getattr(gguf, '__version__', '')}") from None
        if any(d < 1 for d in dims):
            raise CheckpointError(f"{self.path}: tensor {name!r} has dimensions {dims[::-1]}; the file is damaged")
        block, type_bytes = gguf.GGML_QUANT_SIZES[kind]
        if dims[0] % block:
            raise CheckpointError(f"{self.path}: tensor {name!r} ({kind.name}) has rows of {dims[0]} values, not whole "
                                  f"blocks of {block}; the file is damaged")
        count = 1
        for d in dims:
            count *= d
        nbytes = count // block * type_bytes
        if begin + nbytes > self.size or begin % self.alignment:
            raise CheckpointError(f"{self.path}: tensor {name!r} ({kind.name} {dims[::-1]}) has {nbytes} bytes at "
                                  f"offset {begin}, which do not lie (aligned) in the file's data section; the file is "
                                  f"damaged or truncated")
        return kind.name, tuple(reversed(dims)), begin, nbytes

    def _check_layout(self) -> None:
        """Two tensors must not share bytes (each would silently read as the other)."""
        end, previous = 0, None
        for name, (_, _, begin, nbytes) in sorted(self._entries.items(), key=lambda item: item[1][2]):
            if begin < end:
                raise CheckpointError(f"{self.path}: the bytes of tensor {name!r} overlap those of {previous!r}; the "
                                      f"file is damaged or crafted")
            end, previous = begin + nbytes, name

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def kind(self, name: str) -> str:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def nbytes(self, name: str) -> int:
        return self._entries[name][3]

    def quantized(self, name: str) -> bool:
        return self.kind(name) not in FLOAT_TYPES and self.kind(name) not in INT_TYPES

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` (or its rows [start, stop) along dim 0) as a fresh CPU tensor: float and integer types as
        such, quantized ones as their raw blocks, uint8 [rows, bytes per row]."""
        kind, shape, begin, nbytes = self._entries[name]
        quantized = self.quantized(name)
        start, stop = rows if rows is not None else (0, shape[0])
        if not 0 <= start <= stop <= shape[0] or (quantized and len(shape) == 1 and (start, stop) != (0, shape[0])):
            raise CheckpointError(f"{self.path}: rows {start}:{stop} of tensor {name!r} ({kind} {list(shape)}) cannot "
                                  f"be read on their own")
        row_bytes = nbytes // shape[0] if len(shape) > 1 or not quantized else nbytes
        buffer = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(begin + start * row_bytes)
            got = f.readinto(memoryview(buffer.numpy()))
        if got != buffer.numel():
            raise CheckpointError(f"{self.path} is truncated: tensor {name!r} needs {buffer.numel()} bytes, {got} are "
                                  f"there")
        dtype = FLOAT_TYPES.get(kind) or INT_TYPES.get(kind)
        if dtype is not None:
            return buffer.view(dtype).reshape(stop - start, *shape[1:])
        return buffer.reshape(stop - start if len(shape) > 1 else 1, -1)


def _bits(raw: torch.Tensor, shifts: list[int], width: int) -> torch.Tensor:
    """raw uint8 [..., B] -> uint8 [..., len(shifts), B]: the `width`-bit fields at each shift of every byte."""
    mask = (1 << width) - 1
    return torch.stack([(raw >> shift) & mask for shift in shifts], dim=-2)


def _fp16(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [nb, 2] -> float16 [nb] (little-endian bits)."""
    return raw.contiguous().view(torch.float16).reshape(-1)


def gguf_fields(raw: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """A GGUF tensor's raw blocks, uint8 [N, K / block * type bytes] of GGUF type `kind` (Q4_K, ...), -> the
    fields of quantrt.kernels.quantize.pack_gguf: codes [N, K] in natural order (unsigned, the type's offset
    not taken off; Q8_0 int8), d and dmin float16 [N, K / block], integer sub-block scales and mins. The byte
    layouts are ggml's (its block_q*_* structs), read the way gguf.quants unpacks them."""
    name = kind.lower()
    blocks = gguf_blocks(name)
    n = raw.shape[0]
    b = raw.reshape(-1, blocks.file_bytes)
    count = b.shape[0]
    fields: dict[str, torch.Tensor] = {}

    def nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
        # [count, groups * 32 / 2] bytes: each run of 16 (legacy) or 32 (K) bytes holds a run of weights in its low
        # nibbles, then the next run in its high nibbles
        return _bits(qs.reshape(count, groups, -1), [0, 4], 4).reshape(count, -1)

    if name == "q8_0":
        fields.update(d=_fp16(b[:, 0:2]), codes=b[:, 2:].contiguous().view(torch.int8))
    elif name in ("q4_0", "q4_1", "q5_0", "q5_1"):
        header = 4 if blocks.has_min else 2
        fields["d"] = _fp16(b[:, 0:2])
        if blocks.has_min:
            fields["dmin"] = _fp16(b[:, 2:4])  # m: w = d * q + m
        codes = nibbles(b[:, -16:], 1)
        if blocks.bits == 5:  # qh: bit j of a little-endian uint32 is code j's fifth bit
            qh = b[:, header:header + 4]
            high = _bits(qh, list(range(8)), 1).transpose(1, 2).reshape(count, 32)
            codes = codes | (high << 4)
        fields["codes"] = codes
    elif name == "q2_k":
        scales = b[:, 0:16]
        fields.update(scales=scales & 15, mins=scales >> 4, codes=_bits(b[:, 16:80].reshape(count, 2, 32),
                                                                        [0, 2, 4, 6], 2).reshape(count, 256),
                      d=_fp16(b[:, 80:82]), dmin=_fp16(b[:, 82:84]))
    elif name == "q3_k":
        low = _bits(b[:, 32:96].reshape(count, 2, 32), [0, 2, 4, 6], 2).reshape(count, 256)
        high = _bits(b[:, 0:32], list(range(8)), 1).reshape(count, 256)  # hmask: bit i of byte j is weight 32 i + j
        s = b[:, 96:108]
        scale_low = _bits(s[:, 0:8], [0, 4], 4).reshape(count, 16)
        scale_high = _bits(s[:, 8:12], [0, 2, 4, 6], 2).reshape(count, 16)
        # q = low - 4 (1 - high) = (low | high << 2) - 4: the code is low | high << 2, offset 4
        fields.update(codes=low | (high << 2), scales=(scale_low | (scale_high << 4)).to(torch.int16) - 32,
                      d=_fp16(b[:, 108:110]))
    elif name in ("q4_k", "q5_k"):
        s = b[:, 4:16].reshape(count, 3, 4)
        first, second, rest = s[:, 0], s[:, 1], s[:, 2]
        scales = torch.cat([first & 63, (rest & 15) | ((first >> 2) & 48)], dim=1)
        mins = torch.cat([second & 63, (rest >> 4) | ((second >> 2) & 48)], dim=1)
        codes = nibbles(b[:, -128:], 4)
        if name == "q5_k":
            codes = codes | (_bits(b[:, 16:48], list(range(8)), 1).reshape(count, 256) << 4)
        fields.update(d=_fp16(b[:, 0:2]), dmin=_fp16(b[:, 2:4]), scales=scales, mins=mins, codes=codes)
    else:  # q6_k
        low = nibbles(b[:, 0:128], 2)
        high = _bits(b[:, 128:192].reshape(count, 2, 32), [0, 2, 4, 6], 2).reshape(count, 256)
        fields.update(codes=low | (high << 4), scales=b[:, 192:208].contiguous().view(torch.int8),
                      d=_fp16(b[:, 208:210]))
    k = fields["codes"].numel() // n
    fields["codes"] = fields["codes"].reshape(n, k)
    if not blocks.signed_codes:
        fields["codes"] = fields["codes"].to(torch.uint8)
    for key in ("d", "dmin"):
        if key in fields:
            fields[key] = fields[key].reshape(n, -1)
    for key in ("scales", "mins"):
        if key in fields:
            fields[key] = fields[key].reshape(n, -1)
    return fields


def _pack_fields(values: torch.Tensor, shifts: list[int], width: int) -> torch.Tensor:
    """Inverse of `_bits`: uint8 [..., len(shifts), B] of `width`-bit fields -> uint8 [..., B] bytes."""
    out = values[..., 0, :] & ((1 << width) - 1)
    for index, shift in enumerate(shifts[1:], 1):
        out = out | ((values[..., index, :] & ((1 << width) - 1)) << shift)
    return out


def gguf_block_bytes(fields: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Inverse of `gguf_fields`: a weight's fields -> GGUF's raw blocks, uint8 [N, K / block * type bytes], as a
    GGUF file stores them (what the gguf package's dequantize reads back to `dequantize_gguf_fields`' values).
    For writing GGUF-layout tensors (the benchmark's diffusers GGUF model, the tests' K-quant files: the gguf
    package has no K-quant quantizer)."""
    name = kind.lower()
    blocks = gguf_blocks(name)
    codes = fields["codes"]
    n, k = codes.shape
    count = n * k // blocks.block
    q = codes.reshape(count, blocks.block).view(torch.uint8)

    def fp16(key: str) -> torch.Tensor:
        return fields[key].to(torch.float16).reshape(count, 1).view(torch.uint8)

    def sub(key: str) -> torch.Tensor:
        return fields[key].reshape(count, blocks.sub_blocks).to(torch.int16)

    if name == "q8_0":
        parts = [fp16("d"), q]
    elif name in ("q4_0", "q4_1", "q5_0", "q5_1"):
        parts = [fp16("d")] + ([fp16("dmin")] if blocks.has_min else [])
        if blocks.bits == 5:  # the fifth bits as a little-endian uint32
            parts.append(_pack_fields((q >> 4).reshape(count, 4, 8).transpose(1, 2), list(range(8)), 1))
        parts.append(_pack_fields((q & 15).reshape(count, 2, 16), [0, 4], 4))
    elif name == "q2_k":
        nibbles = (sub("scales") | (sub("mins") << 4)).to(torch.uint8)
        parts = [nibbles, _pack_fields(q.reshape(count, 2, 4, 32), [0, 2, 4, 6], 2).reshape(count, 64),
                 fp16("d"), fp16("dmin")]
    elif name == "q3_k":
        six = sub("scales") + 32
        low = (six[:, :8] & 15) | ((six[:, 8:] & 15) << 4)
        high = six[:, 0:4] >> 4
        for j in range(1, 4):
            high = high | ((six[:, 4 * j:4 * j + 4] >> 4) << (2 * j))
        parts = [_pack_fields((q >> 2).reshape(count, 8, 32), list(range(8)), 1),
                 _pack_fields((q & 3).reshape(count, 2, 4, 32), [0, 2, 4, 6], 2).reshape(count, 64),
                 torch.cat([low, high], dim=1).to(torch.uint8), fp16("d")]
    elif name in ("q4_k", "q5_k"):
        sc, mn = sub("scales"), sub("mins")
        packed = torch.cat([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
                            (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], dim=1).to(torch.uint8)
        parts = [fp16("d"), fp16("dmin"), packed]
        if name == "q5_k":
            parts.append(_pack_fields((q >> 4).reshape(count, 8, 32), list(range(8)), 1))
        parts.append(_pack_fields((q & 15).reshape(count, 4, 2, 32), [0, 4], 4).reshape(count, 128))
    else:  # q6_k
        parts = [_pack_fields((q & 15).reshape(count, 2, 2, 64), [0, 4], 4).reshape(count, 128),
                 _pack_fields((q >> 4).reshape(count, 2, 4, 32), [0, 2, 4, 6], 2).reshape(count, 64),
                 sub("scales").to(torch.int8).view(torch.uint8), fp16("d")]
    return torch.cat(parts, dim=1).reshape(n, k // blocks.block * blocks.file_bytes)


def unmapped_type(what: str, kind: str) -> CheckpointError:
    """The refusal of a Linear weight whose GGUF type quantrt has no format for."""
    return CheckpointError(f"{what} is a Linear weight of GGUF type {kind}, which quantrt has no format for (it serves "
                           f"{', '.join(b.upper() for b in GGUF_BLOCKS)}); keep the layer in full precision to load "
                           f"it dequantized (QuantConfig(..., modules_to_not_convert=[layer name])), or use a file of "
                           f"one of those types")


def gguf_scheme(name: str, kind: str, override: QuantConfig | None, what: str, where: str = "") -> Scheme:
    """The scheme a Linear layer `name` stored as GGUF type `kind` loads as; a CheckpointError where quantrt has no
    format for the type (`what` names the tensor) or a per-module `override` asks for another scheme (`where`
    prefixes the message: the file)."""
    if kind.lower() not in GGUF_SCHEMES:
        raise unmapped_type(what, kind)
    if override is not None and override.scheme.name != kind.lower():
        raise CheckpointError(f"{where}modules[{name!r}] asks for {override.scheme.name}, but the layer is stored as "
                              f"{kind} in the GGUF file, which quantrt loads as it is (it never requantizes GGUF "
                              f"weights): drop the override, or give None to dequantize it")
    return GGUF_SCHEMES[kind.lower()]


def gguf_weight(raw: torch.Tensor, kind: str, shape: tuple[int, int], dtype: torch.dtype, what: str
                ) -> tuple[Scheme, dict[str, torch.Tensor]]:
    """A GGUF Linear weight's raw blocks (uint8 [N, bytes per row]) of type `kind` and torch shape (N, K) ->
    (its scheme, the stored tensors of a QuantizedLinear computing in `dtype`). `what` names the tensor and file
    in errors."""
    name = kind.lower()
    if name not in GGUF_SCHEMES:
        raise unmapped_type(what, kind)
    n, k = shape
    scheme = GGUF_SCHEMES[name]
    blocks = gguf_blocks(name)
    expected = (n, k // blocks.block * blocks.file_bytes)
    if k % blocks.block or tuple(raw.shape) != expected or raw.dtype != torch.uint8:
        raise CheckpointError(f"{what}: {kind} blocks of {raw.dtype} {list(raw.shape)} do not hold a {n}x{k} weight "
                              f"(expected uint8 {list(expected)})")
    fields = gguf_fields(raw, kind)
    for key in ("d", "dmin"):
        if key in fields and not torch.isfinite(fields[key]).all():
            bad = int((~torch.isfinite(fields[key])).sum())
            raise CheckpointError(f"{what}: {bad} of its {kind} block scales ({key}) are NaN/Inf, so its weights would "
                                  f"be; the file is damaged: re-download it")
    qweight, block_scales = pack_gguf(fields, name)
    return scheme, {"qweight": qweight, "scale": torch.empty(n, 0, dtype=dtype), "block_scales": block_scales}


def dequantize_raw(raw: torch.Tensor, kind: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """float32 of a quantized GGUF tensor's raw blocks: quantrt's own decode for the types it stores (equal to
    gguf.quants.dequantize), gguf.quants.dequantize for the others it implements; else refused."""
    name = kind.lower()
    if name in GGUF_BLOCKS:
        return dequantize_gguf_fields(gguf_fields(raw.reshape(-1, raw.shape[-1]) if raw.dim() > 1 else
                                                  raw.reshape(1, -1), kind), name).reshape(shape)
    gguf = _gguf()
    try:
        values = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[kind])
    except NotImplementedError as e:
        raise CheckpointError(f"{what} is of GGUF type {kind}, which neither quantrt nor the gguf package can "
                              f"dequantize") from e
    return torch.from_numpy(values.copy()).reshape(shape)


def _gguf_layers(skeleton: nn.Module, file: GgufFile, plan: dict[str, list[tuple[str, int, int]]],
                 config: QuantConfig | None) -> tuple[dict[str, str], dict[str, str]]:
    """({Linear layer: GGUF type} of the layers that load quantized, {Linear layer kept in full precision: why})."""
    quantized, kept = {}, {}
    for name, module in skeleton.named_modules():
        if type(module) is not nn.Linear or f"{name}.weight" not in plan:
            continue
        kinds = {file.kind(source) for source, _, _ in plan[f"{name}.weight"]}
        if len(kinds) != 1:
            raise CheckpointError(f"{file.path}: the weight of layer {name!r} is built from tensors of GGUF types "
                                  f"{sorted(kinds)}; quantrt loads a Linear weight of one type")
        kind = kinds.pop()
        if not file.quantized(plan[f"{name}.weight"][0][0]):
            kept[name] = f"stored as {kind} in the GGUF file (kept as it is)"
            continue
        skipped = config.skipped(name) if config is not None else None
        matched, override = config.override(name) if config is not None else (False, None)
        if skipped is not None or (matched and override is None):
            why = f"modules_to_not_convert: {skipped!r}" if skipped is not None else "override: keep full precision"
            kept[name] = f"{why} (dequantized from {kind})"
            continue
        gguf_scheme(name, kind, override if matched else None,
                    f"tensor {plan[f'{name}.weight'][0][0]!r} of {file.path.name} (layer {name!r})", f"{file.path}: ")
        quantized[name] = kind
    return quantized, kept


def load_gguf_file(path: str | os.PathLike, quant_config: QuantConfig | None, config: dict | str | os.PathLike | None,
                   device: torch.device, torch_dtype: torch.dtype | None, progress: bool | None = None
                   ) -> tuple[nn.Module, QuantConfig, dict[str, str]]:
    """Build the diffusers model of a GGUF file on the meta device (`single_file_layout`: diffusers' conversion of
    its keys, the config from `config` or quantrt.models.FLUX_SIZES) and fill it tensor by tensor, each Linear
    weight of a GGUF block type as a QuantizedLinear of that scheme (see the module's docstring). Floating
    tensors and the layers' compute dtype are `torch_dtype`, default float32 (GGUF files mix F32 and F16 tensors;
    diffusers' GGUF loader computes in float32 too). Returns (model on `device`, the QuantConfig that describes
    what loaded, {Linear layer kept in full precision: why})."""
    from accelerate.utils import set_module_tensor_to_device
    from tqdm.auto import tqdm

    file = GgufFile(path)
    dtype = torch_dtype or torch.float32
    shapes = {name: file.shape(name) for name in file.keys()}
    dtypes = {name: FLOAT_TYPES.get(file.kind(name), torch.float32) for name in shapes}
    skeleton, plan = single_file_layout(file.path, shapes, dtypes, config)
    expected = {key: tuple(t.shape) for key, t in skeleton.state_dict(keep_vars=True).items()}
    unknown = sorted(set(plan) - set(expected))
    if unknown:
        raise CheckpointError(f"the conversion of {file.path} gives tensors that {type(skeleton).__name__} with this "
                              f"config does not have, e.g. {unknown[:3]}: the config does not match the file")
    for key, segments in plan.items():  # all before any layer is built or a byte of data is read
        kinds = {file.kind(source) for source, _, _ in segments}
        if len(kinds) > 1:
            raise CheckpointError(f"{file.path}: {key!r} is built from tensors of GGUF types {sorted(kinds)}; quantrt "
                                  f"loads each tensor of the model from tensors of one type")
        shape = planned_shape(segments, shapes, key)
        if shape != expected[key]:
            raise CheckpointError(f"{key!r} converted from {file.path.name} has shape {list(shape)}, "
                                  f"{type(skeleton).__name__} with this config expects {list(expected[key])}: the "
                                  f"config does not match the file")
    quantized, kept = _gguf_layers(skeleton, file, plan, quant_config)
    schemes = {}
    for name, kind in quantized.items():  # the file's rows are whole blocks (GgufFile), so the scheme fits
        schemes[name] = GGUF_SCHEMES[kind.lower()]
        install_skeleton(skeleton, name, schemes[name], dtype)
    if not schemes:
        raise CheckpointError(f"{file.path} has no Linear weight of a GGUF block type quantrt loads quantized ("
                              f"{', '.join(b.upper() for b in GGUF_BLOCKS)}): nothing in it is quantized")
    bar = tqdm(plan.items(), desc="loading GGUF", unit="tensor", disable=(not progress) if progress is not None else None)
    for key, segments in bar:
        shape = expected[key]
        what = f"tensor {segments[0][0]!r} of {file.path.name}"
        parts = [file.read(source, (start, stop)) for source, start, stop in segments]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        del parts
        module_name, _, leaf = key.rpartition(".")
        if leaf == "weight" and module_name in schemes:
            # unpacked and repacked where the layer lives (on a GPU, in moments)
            _, tensors = gguf_weight(tensor.to(device), file.kind(segments[0][0]), shape, dtype, what)
            layer = skeleton.get_submodule(module_name)
            for buffer, value in tensors.items():
                setattr(layer, buffer, value.to(device))
        else:
            kind = file.kind(segments[0][0])
            if file.quantized(segments[0][0]):
                tensor = dequantize_raw(tensor, kind, shape, what)
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            set_module_tensor_to_device(skeleton, key, device, value=tensor, dtype=tensor.dtype)
        del tensor
        release_freed_memory()
    check_complete(skeleton, str(file.path))
    backend = quant_config.backend if quant_config is not None else "auto"
    return skeleton.to(device), loaded_quant_config(schemes, kept, backend), kept


def is_gguf_parameter(value: Any) -> bool:
    """Whether `value` is a GGUF tensor as diffusers' GGUF loader hands it out (diffusers' GGUFParameter: the raw
    blocks with their `quant_type`)."""
    return isinstance(value, torch.Tensor) and hasattr(value, "quant_type")


def _raw(value: torch.Tensor) -> torch.Tensor:
    plain = value.as_subclass(torch.Tensor) if type(value) is not torch.Tensor else value
    return plain.view(torch.uint8) if plain.dtype != torch.uint8 else plain


def gguf_parameter_shape(value: torch.Tensor) -> tuple[int, ...]:
    """The torch shape of the weight a diffusers GGUFParameter (raw blocks [..., bytes per row]) holds."""
    gguf = _gguf()
    block, type_bytes = gguf.GGML_QUANT_SIZES[value.quant_type]
    return (*value.shape[:-1], value.shape[-1] // type_bytes * block)


def gguf_layer_plan(model: nn.Module, state_dict: dict[str, Any], config: QuantConfig, skips: list[str]
                    ) -> dict[str, Scheme]:
    """{Linear layer: GGUF scheme} of the layers of `model` whose weights in `state_dict` (diffusers' converted
    GGUF checkpoint) are GGUF block types, except those `config` or the model's own `skips` keep in full
    precision; a kept layer's weight is dequantized (`dequantize_gguf_parameter`). A Linear weight of a GGUF
    type quantrt has no format for is refused, naming it."""
    plan = {}
    for name, module in model.named_modules():
        value = state_dict.get(f"{name}.weight")
        if type(module) is not nn.Linear or not is_gguf_parameter(value) or value.quant_type.name in FLOAT_TYPES:
            continue
        matched, override = config.override(name)
        if config.skipped(name) is not None or (matched and override is None) or any(
                name == entry or name.startswith(entry + ".") or entry in name.split(".") for entry in skips):
            continue
        plan[name] = gguf_scheme(name, value.quant_type.name, override if matched else None,
                                 f"tensor {name + '.weight'!r}")
    return plan


def gguf_parameter_tensors(value: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, what: str
                           ) -> dict[str, torch.Tensor]:
    """The stored tensors of a QuantizedLinear (computing in `dtype`) from a diffusers GGUFParameter."""
    return gguf_weight(_raw(value), value.quant_type.name, shape, dtype, what)[1]


def dequantize_gguf_parameter(value: torch.Tensor, what: str) -> torch.Tensor:
    """float32 values of a diffusers GGUFParameter (gguf.quants.dequantize's, bit for bit)."""
    raw = _raw(value)
    shape = gguf_parameter_shape(value)
    return dequantize_raw(raw.reshape(-1, raw.shape[-1]), value.quant_type.name, shape, what)
