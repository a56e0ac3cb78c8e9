"""Bit packing of unsigned integer codes along the last (K) dimension.

An X-bit code is split into bit planes of 4, 2 and 1 bits (uint3 = 2 + 1, uint5 = 4 + 1, uint6 = 4 + 2,
uint7 = 4 + 2 + 1; 1, 2, 4 and 8 bits are one plane), so that every plane packs a whole number of codes
into a byte and an X-bit weight really takes X bits. The planes are stored one after another along the
last dimension of one uint8 tensor, most significant plane first:

    packed[..., plane_offset(p) + k // per] bit (k % per) * width  holds plane p of code k,  per = 8 // width

so a row of K codes takes K * X / 8 bytes. Kernels read a plane with
`(byte >> ((k % per) * width)) & (2**width - 1)` and reassemble `code = sum(plane_p << shift_p)`.

The GGUF block types (`GGUF_BLOCKS`) keep their codes in these planes and their per-block scales in one more
uint8 tensor, laid out below.
"""

from dataclasses import dataclass

import torch

_PLANES: dict[int, tuple[int, ...]] = {
    1: (1,),
    2: (2,),
    3: (2, 1),
    4: (4,),
    5: (4, 1),
    6: (4, 2),
    7: (4, 2, 1),
    8: (8,),
}


def plane_widths(bits: int) -> tuple[int, ...]:
    """Widths of the bit planes of a `bits`-bit code, most significant first."""
    if bits not in _PLANES:
        raise ValueError(f"codes of {bits} bits cannot be packed; bits must be in 1..8")
    return _PLANES[bits]


def k_alignment(bits: int) -> int:
    """K must be a multiple of this for `bits`-bit codes to fill whole bytes in every plane."""
    return max(8 // w for w in plane_widths(bits))


def packed_bytes(k: int, bits: int) -> int:
    """Bytes that one row of `k` codes of `bits` bits takes."""
    return k * bits // 8


def _check_k(k: int, bits: int) -> None:
    if k % k_alignment(bits):
        raise ValueError(
            f"cannot pack {k} codes of {bits} bits per row: K must be a multiple of {k_alignment(bits)}"
        )


def pack_uintx(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit codes [..., K] (any integer dtype, values in [0, 2**bits)) into uint8
    [..., K * bits / 8] in the plane layout of this module."""
    k = codes.shape[-1]
    _check_k(k, bits)
    codes = codes.to(torch.uint8)  # byte-wide shifts and ors: a pass over the codes per lane, no wider temporaries
    planes = []
    shift = bits
    for width in plane_widths(bits):
        shift -= width
        plane = (codes >> shift) & ((1 << width) - 1) if width < 8 else codes
        per = 8 // width
        packed = plane[..., 0::per].clone()
        for lane in range(1, per):
            packed |= plane[..., lane::per] << (lane * width)
        planes.append(packed)
    return planes[0] if len(planes) == 1 else torch.cat(planes, dim=-1)


def unpack_uintx(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_uintx`: uint8 [..., K * bits / 8] -> uint8 codes [..., K]."""
    _check_k(k, bits)
    if packed.shape[-1] != packed_bytes(k, bits):
        raise ValueError(
            f"packed rows of {packed.shape[-1]} bytes do not hold {k} codes of {bits} bits "
            f"(expected {packed_bytes(k, bits)} bytes)"
        )
    codes = torch.zeros(*packed.shape[:-1], k, dtype=torch.uint8, device=packed.device)
    offset = 0
    shift = bits
    for width in plane_widths(bits):
        shift -= width
        per = 8 // width
        nbytes = k // per
        plane_bytes = packed[..., offset : offset + nbytes]
        mask = (1 << width) - 1
        for lane in range(per):
            codes[..., lane::per] |= ((plane_bytes >> (lane * width)) & mask) << shift
        offset += nbytes
    return codes

# GGUF block types (llama.cpp's ggml quantizations), as quantrt stores them: the codes of a row in the plane layout
# above (Q8_0: the int8 codes as they are), and per block of `block` weights one row of `param_bytes` bytes:
#
#     bytes 0, 1   d, the block's fp16 scale (little-endian bits)
#     bytes 2, 3   dmin (K-quants) or m (Q4_1, Q5_1), fp16, where `has_min`
#     then         the sub-block scales, one byte each (SUB_SIGNED: int8; SUB_NIBBLES: scale | min << 4), and
#                  for SUB_SCALE_MIN the sub-block mins after them, one byte each
#
#     w = (q - offset) * a - b,   a = d * scale[j] (d without sub-blocks),
#                                 b = dmin * min[j] (K-quants), -m (Q4_1, Q5_1), 0 (no min)
#
# for the weight's code q in sub-block j (or block). These are GGUF's own numbers: the fp16 scales are never
# rounded to another dtype, the K-quants' sub-block scales stay the small integers GGUF stores.
SUB_NONE, SUB_SIGNED, SUB_SCALE_MIN, SUB_NIBBLES = 0, 1, 2, 3


@dataclass(frozen=True)
class GgufBlocks:
    """One GGUF block type: its name (q4_k), ggml type number, bytes of one block in a GGUF file, code bits, the
    offset subtracted from each code, weights per block (super-block) and per sub-block (0: none), whether it has
    a min, and how the sub-block scales are laid out (SUB_*)."""

    name: str
    ggml_type: int
    file_bytes: int
    bits: int
    offset: int
    block: int
    sub_block: int
    has_min: bool
    sub_layout: int

    @property
    def group(self) -> int:
        """Weights that share one (a, b): the sub-block, else the block."""
        return self.sub_block or self.block

    @property
    def sub_blocks(self) -> int:
        """Sub-blocks per block (0 without sub-blocks)."""
        return self.block // self.sub_block if self.sub_block else 0

    @property
    def header_bytes(self) -> int:
        """Bytes of d (and dmin / m) at the start of a block's parameters."""
        return 4 if self.has_min else 2

    @property
    def param_bytes(self) -> int:
        """Bytes of one block's parameters."""
        return self.header_bytes + self.sub_blocks * (2 if self.sub_layout == SUB_SCALE_MIN else 1)

    @property
    def signed_codes(self) -> bool:
        """Q8_0's codes are int8, stored as they are; the others unsigned, in bit planes."""
        return self.bits == 8

    def code_bytes(self, k: int) -> int:
        """Bytes of one row of `k` codes."""
        return k if self.signed_codes else packed_bytes(k, self.bits)


GGUF_BLOCKS: dict[str, GgufBlocks] = {blocks.name: blocks for blocks in (
    GgufBlocks("q8_0", 8, 34, 8, 0, 32, 0, False, SUB_NONE),
    GgufBlocks("q4_0", 2, 18, 4, 8, 32, 0, False, SUB_NONE),
    GgufBlocks("q4_1", 3, 20, 4, 0, 32, 0, True, SUB_NONE),
    GgufBlocks("q5_0", 6, 22, 5, 16, 32, 0, False, SUB_NONE),
    GgufBlocks("q5_1", 7, 24, 5, 0, 32, 0, True, SUB_NONE),
    GgufBlocks("q2_k", 10, 84, 2, 0, 256, 16, True, SUB_NIBBLES),
    GgufBlocks("q3_k", 11, 110, 3, 4, 256, 16, False, SUB_SIGNED),
    GgufBlocks("q4_k", 12, 144, 4, 0, 256, 32, True, SUB_SCALE_MIN),
    GgufBlocks("q5_k", 13, 176, 5, 0, 256, 32, True, SUB_SCALE_MIN),
    GgufBlocks("q6_k", 14, 210, 6, 32, 256, 16, False, SUB_SIGNED),
)}
GGUF_BY_TYPE: dict[int, GgufBlocks] = {blocks.ggml_type: blocks for blocks in GGUF_BLOCKS.values()}


def gguf_blocks(name: str) -> GgufBlocks:
    """The GGUF block type `name` (q8_0, ..., q6_k)."""
    if name not in GGUF_BLOCKS:
        raise ValueError(f"unknown GGUF block type {name!r}; quantrt stores {', '.join(GGUF_BLOCKS)}")
    return GGUF_BLOCKS[name]


def pack_block_params(blocks: GgufBlocks, d: torch.Tensor, dmin: torch.Tensor | None = None,
                      scales: torch.Tensor | None = None, mins: torch.Tensor | None = None) -> torch.Tensor:
    """A weight's block parameters as `GGUF_BLOCKS` lays them out: d, dmin float16 [N, B] (B blocks per row),
    scales, mins [N, B * sub_blocks] (integers in the layout's range) -> uint8 [N, B * param_bytes]."""
    n, count = d.shape
    parts = [d.to(torch.float16).reshape(n, count, 1).view(torch.uint8)]
    if blocks.has_min:
        parts.append(dmin.to(torch.float16).reshape(n, count, 1).view(torch.uint8))
    if blocks.sub_layout == SUB_SIGNED:
        parts.append(scales.to(torch.int8).reshape(n, count, -1).view(torch.uint8))
    elif blocks.sub_layout == SUB_NIBBLES:
        parts.append((scales.to(torch.uint8) | (mins.to(torch.uint8) << 4)).reshape(n, count, -1))
    elif blocks.sub_layout == SUB_SCALE_MIN:
        parts += [scales.to(torch.uint8).reshape(n, count, -1), mins.to(torch.uint8).reshape(n, count, -1)]
    return torch.cat(parts, dim=-1).reshape(n, count * blocks.param_bytes)


def unpack_block_params(blocks: GgufBlocks, params: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of `pack_block_params`: uint8 [N, B * param_bytes] -> {"d", "dmin": float16 [N, B], "scales",
    "mins": int16 [N, B * sub_blocks]}, those the type has."""
    n = params.shape[0]
    rows = params.reshape(n, -1, blocks.param_bytes)
    count = rows.shape[1]

    def fp16(at: int) -> torch.Tensor:
        return rows[..., at:at + 2].contiguous().view(torch.float16).reshape(n, count)

    fields = {"d": fp16(0)}
    if blocks.has_min:
        fields["dmin"] = fp16(2)
    sub = rows[..., blocks.header_bytes:]
    if blocks.sub_layout == SUB_SIGNED:
        fields["scales"] = sub.contiguous().view(torch.int8).to(torch.int16).reshape(n, -1)
    elif blocks.sub_layout == SUB_NIBBLES:
        fields["scales"] = (sub & 15).to(torch.int16).reshape(n, -1)
        fields["mins"] = (sub >> 4).to(torch.int16).reshape(n, -1)
    elif blocks.sub_layout == SUB_SCALE_MIN:
        fields["scales"] = sub[..., :blocks.sub_blocks].to(torch.int16).reshape(n, -1)
        fields["mins"] = sub[..., blocks.sub_blocks:].to(torch.int16).reshape(n, -1)
    return fields
