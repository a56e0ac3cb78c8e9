"""The storage formats as the kernels read them: one section per format, each with its decode and its
exactness rule, then the group parameters every format shares.

    int8    code = q, the int8 byte itself (signed); W = q * s
    uintX   code = q in [0, 2**X), X in 1..8, in the bit-plane layout of packing.py; W = (q - z) * s
    fpX     code = an X-bit float (1 sign, E exponent, M mantissa bits, bias 2**(E-1) - 1, subnormals, no
            inf/nan), X in 3..7 in the bit-plane layout, X = 8 for fp8 e4m3fn / e5m2 bytes; W = decode * s
    GGUF    code = q in the bit-plane layout (Q8_0: the int8 byte); W = (q - offset) * a - b, a and b per
            group from the block parameters of packing.GGUF_BLOCKS (`apply_gguf_params`)

The pure-torch definition of each format is quantize.py; the kernels read exactly what it writes. A weight
tile is always produced in natural K order ([BLOCK_N, BLOCK_K], column k is code k), so x never has to be
reordered and one tl.dot covers a whole K tile.

Sub-byte planes are read as words of 8 codes where the layout allows it (`WeightFormat.word_loads`: K % 32
== 0 makes every plane of every row start on a 4-byte boundary): uint32 words of the 4-bit plane, uint16 of
the 2-bit, bytes of the 1-bit, so that a thread's 16-byte load carries 32 int4 codes; the words are then
unpacked in registers, in the thread that loaded them. Otherwise (K % 32 != 0) each code's byte is read on
its own.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .packing import SUB_NIBBLES, SUB_SCALE_MIN, SUB_SIGNED, GgufBlocks, gguf_blocks

# the FORMAT constexpr; fp8 is FLOATX with BITS == 8
INT8: tl.constexpr = tl.constexpr(0)
UINTX: tl.constexpr = tl.constexpr(1)
FLOATX: tl.constexpr = tl.constexpr(2)
GGUF: tl.constexpr = tl.constexpr(3)
# the GGUF_SUB_LAYOUT constexpr: packing.py's sub-block scale layouts
_SUB_SIGNED: tl.constexpr = tl.constexpr(SUB_SIGNED)
_SUB_SCALE_MIN: tl.constexpr = tl.constexpr(SUB_SCALE_MIN)
_SUB_NIBBLES: tl.constexpr = tl.constexpr(SUB_NIBBLES)


def mantissa_bits(dtype: torch.dtype) -> int:
    """Explicit mantissa bits of a float dtype: fp32 23, fp16 10, bf16 7."""
    return round(-math.log2(torch.finfo(dtype).eps))


@dataclass(frozen=True)
class WeightFormat:
    """What the kernels need to know of a storage format: kind (INT8, UINTX, FLOATX, GGUF), bits per code,
    for floats the exponent and mantissa bits (fp8 e4m3fn: 4, 3; e5m2: 5, 2), for GGUF the block type's name
    (q8_0 ... q6_k, packing.GGUF_BLOCKS)."""

    kind: int
    bits: int
    ebits: int = 0
    mbits: int = 0
    gguf: str = ""

    @property
    def name(self) -> str:
        if self.kind == INT8:
            return "int8"
        if self.kind == UINTX:
            return f"uint{self.bits}"
        if self.kind == GGUF:
            return self.gguf
        return f"fp{self.bits}_e{self.ebits}m{self.mbits}"

    @property
    def blocks(self) -> GgufBlocks | None:
        """The GGUF block type, for GGUF formats."""
        return gguf_blocks(self.gguf) if self.kind == GGUF else None

    @property
    def group_size(self) -> int | None:
        """Weights that share one set of group parameters where the format fixes it (GGUF), else None (the
        scale's shape says)."""
        return self.blocks.group if self.kind == GGUF else None

    @property
    def has_zero(self) -> bool:
        return self.kind == UINTX

    @functools.lru_cache(maxsize=None)  # on every launch: a format and dtype's answer never changes
    def codes_exact_in(self, dtype: torch.dtype) -> bool:
        """Whether every decoded code (before scale and zero point) is exact in `dtype`, so that a
        per-channel scale may multiply the fp32 accumulator after the K loop instead of every weight.

        int8: |q| <= 128 needs 8 significant bits (bf16 has 8). uintX: q - z is not an integer. Floats:
        the mantissa fits, the largest code is finite and the smallest subnormal is representable."""
        if self.kind == INT8:
            return True
        if self.kind in (UINTX, GGUF):
            return False
        bias = 2 ** (self.ebits - 1) - 1
        if self.bits == 8:  # fp8 keeps its inf/nan codes (quantize never writes them)
            largest = torch.finfo(torch.float8_e4m3fn if self.ebits == 4 else torch.float8_e5m2).max
        else:
            largest = 2.0 ** (2**self.ebits - 1 - bias) * (2 - 2.0**-self.mbits)
        smallest = 2.0 ** (1 - bias - self.mbits)
        info = torch.finfo(dtype)
        return (self.mbits <= mantissa_bits(dtype) and largest <= info.max
                and smallest >= info.smallest_normal * info.eps)

    def word_loads(self, k: int) -> bool:
        """Whether sub-byte planes are read as aligned 32-bit words (every plane of a row of K codes then
        starts on a 4-byte boundary, given a 4-byte aligned tensor)."""
        return self.bits < 8 and k % 32 == 0


@triton.jit
def _unpack_octets(words, WIDTH: tl.constexpr):
    """[R, O] words of 8 WIDTH-bit codes each (code j in bits j * WIDTH and up) -> int32 [R, 8 * O], code j
    of word o at column 8o + j. The codes of a word stay in the thread that loaded it: interleaving
    joins them in registers (codes 0, 4 | 2, 6 | 1, 5 | 3, 7, then pairs of those, then the halves)."""
    MASK: tl.constexpr = (1 << WIDTH) - 1
    words = words.to(tl.int32)
    c0 = words & MASK
    c1 = (words >> WIDTH) & MASK
    c2 = (words >> (2 * WIDTH)) & MASK
    c3 = (words >> (3 * WIDTH)) & MASK
    c4 = (words >> (4 * WIDTH)) & MASK
    c5 = (words >> (5 * WIDTH)) & MASK
    c6 = (words >> (6 * WIDTH)) & MASK
    c7 = (words >> (7 * WIDTH)) & MASK
    even = tl.interleave(tl.interleave(c0, c4), tl.interleave(c2, c6))
    odd = tl.interleave(tl.interleave(c1, c5), tl.interleave(c3, c7))
    return tl.interleave(even, odd)


@triton.jit
def _plane_codes(row_ptr, k0, K, n_mask, BITS: tl.constexpr, WIDTH: tl.constexpr, WORDS: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The WIDTH-bit plane of codes k0 .. k0 + BLOCK_K of rows row_ptr ([BLOCK_N, 1] uint8 pointers),
    shifted to its place in the code: int32 [BLOCK_N, BLOCK_K].

    Planes are stored widest first (packing.py): this one starts (BITS - BITS % (2 * WIDTH)) * K / 8
    bytes into the row, and holds code k in bits (k % per) * WIDTH of its byte k // per, per = 8 / WIDTH.
    With WORDS, the 8 codes 8o .. 8o + 7 ("octet" o) are one little-endian word of WIDTH bytes (uint32,
    uint16, uint8 for the 4-, 2- and 1-bit planes), read 16 bytes per thread and unpacked in registers."""
    plane = row_ptr + (BITS - BITS % (2 * WIDTH)) * (K // 8)
    if WORDS:
        o = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        if WIDTH == 4:
            plane_words = plane.to(tl.pointer_type(tl.uint32))
        elif WIDTH == 2:
            plane_words = plane.to(tl.pointer_type(tl.uint16))
        else:
            plane_words = plane
        if EVEN_K:
            words = tl.load(plane_words + o[None, :], mask=n_mask, other=0, eviction_policy="evict_first")
        else:
            words = tl.load(plane_words + o[None, :], mask=n_mask & (o[None, :] < K // 8), other=0,
                            eviction_policy="evict_first")
        codes = _unpack_octets(words, WIDTH)
    else:
        PER: tl.constexpr = 8 // WIDTH
        k = k0 + tl.arange(0, BLOCK_K)
        byte = tl.load(plane + (k // PER)[None, :], mask=n_mask & (k < K)[None, :], other=0,
                       eviction_policy="evict_first").to(tl.int32)
        codes = (byte >> ((k % PER) * WIDTH)[None, :]) & ((1 << WIDTH) - 1)
    return codes << (BITS % WIDTH)


@triton.jit
def load_codes(w_ptr, n, k0, n_mask, stride_wn, K, BITS: tl.constexpr, WORDS: tl.constexpr,
               EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 codes [BLOCK_N, BLOCK_K] of W's rows n ([BLOCK_N, 1] int64, valid where n_mask) and columns
    k0 .. k0 + BLOCK_K (columns from K on read 0; EVEN_K: K is a multiple of BLOCK_K, no column mask),
    weights loaded evict-first (each is read once).

    w_ptr: int8 [N, K] (BITS == 8, int8 keeps its sign) or uint8 [N, K * BITS / 8] in the plane layout
    of packing.py (BITS in 1..8: planes of 4, 2 and 1 bits, the binary digits of BITS)."""
    row = w_ptr + n * stride_wn
    if BITS == 8:
        k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            code = tl.load(row + k[None, :], mask=n_mask, other=0, eviction_policy="evict_first")
        else:
            code = tl.load(row + k[None, :], mask=n_mask & (k < K)[None, :], other=0, eviction_policy="evict_first")
        code = code.to(tl.int32)
    else:
        code = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
        if BITS % 8 >= 4:
            code = code | _plane_codes(row, k0, K, n_mask, BITS, 4, WORDS, EVEN_K, BLOCK_N, BLOCK_K)
        if BITS % 4 >= 2:
            code = code | _plane_codes(row, k0, K, n_mask, BITS, 2, WORDS, EVEN_K, BLOCK_N, BLOCK_K)
        if BITS % 2 == 1:
            code = code | _plane_codes(row, k0, K, n_mask, BITS, 1, WORDS, EVEN_K, BLOCK_N, BLOCK_K)
    return code


@triton.jit
def decode_float(code, BITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr):
    """fpX: int32 codes of a BITS-bit float (1 sign, EBITS exponent, MBITS mantissa bits, bias
    2**(EBITS-1) - 1, subnormals, no inf/nan: quantize.floatx_magnitudes) -> float32 values."""
    BIAS: tl.constexpr = (1 << (EBITS - 1)) - 1
    mag = code & ((1 << (EBITS + MBITS)) - 1)
    # normal numbers: exponent and mantissa shifted into float32's fields, the exponent rebiased
    normal = ((mag << (23 - MBITS)) + ((127 - BIAS) << 23)).to(tl.float32, bitcast=True)
    # exponent 0: mantissa * 2**(1 - bias - mbits)
    UNIT: tl.constexpr = 2.0 ** (1 - BIAS - MBITS)
    subnormal = (mag & ((1 << MBITS) - 1)).to(tl.float32) * UNIT
    value = tl.where((mag >> MBITS) == 0, subnormal, normal)
    return tl.where(((code >> (BITS - 1)) & 1) != 0, -value, value)


@triton.jit
def decode(code, FORMAT: tl.constexpr, BITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr,
           NATIVE_FP8: tl.constexpr):
    """int32 codes -> float32 values before scale and zero point. int8 and uintX codes are their
    values; fp8 codes go through the hardware conversion where NATIVE_FP8 (CUDA, SM >= 8.9), other
    floats bit by bit (`decode_float`)."""
    if FORMAT == FLOATX:
        if NATIVE_FP8:
            if EBITS == 4:
                value = code.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                value = code.to(tl.uint8).to(tl.float8e5, bitcast=True).to(tl.float32)
        else:
            value = decode_float(code, BITS, EBITS, MBITS)
    else:
        value = code.to(tl.float32)
    return value


@triton.jit
def _group_params(s_ptr, z_ptr, n, g, mask, stride_sn, HAS_ZERO: tl.constexpr):
    """float32 scale and zero point of rows n, groups g (broadcastable; zero is 0 without HAS_ZERO)."""
    s = tl.load(s_ptr + n * stride_sn + g, mask=mask, other=1.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(z_ptr + n * stride_sn + g, mask=mask, other=0.0).to(tl.float32)
    else:
        z = 0.0
    return s, z


@triton.jit
def apply_group_params(w, s_ptr, z_ptr, n, k0, n_mask, stride_sn, K, GROUP_SIZE: tl.constexpr,
                       HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(w - z) * s for the decoded tile w: float32 [BLOCK_N, BLOCK_K] of rows n, columns k0 ..

    s, z: [N, G] with row stride stride_sn (stride 0: one per-tensor scale), GROUP_SIZE = K / G, 0 for
    one group per row. Each group's parameters are loaded once per tile: one column of them where the
    tile lies in one group, a [BLOCK_N, BLOCK_K / GROUP_SIZE] block broadcast over its groups where
    groups are smaller than the tile, gathered per column only for a group size that does not divide
    the (power of two) tile."""
    if GROUP_SIZE == 0:
        s, z = _group_params(s_ptr, z_ptr, n, 0, n_mask, stride_sn, HAS_ZERO)
        w = (w - z) * s
    elif GROUP_SIZE % BLOCK_K == 0:
        s, z = _group_params(s_ptr, z_ptr, n, k0 // GROUP_SIZE, n_mask, stride_sn, HAS_ZERO)
        w = (w - z) * s
    elif BLOCK_K % GROUP_SIZE == 0:
        GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
        g = k0 // GROUP_SIZE + tl.arange(0, GROUPS)[None, :]
        s, z = _group_params(s_ptr, z_ptr, n, g, n_mask & (g < K // GROUP_SIZE), stride_sn, HAS_ZERO)
        w3 = tl.reshape(w, (BLOCK_N, GROUPS, GROUP_SIZE))
        if HAS_ZERO:
            w3 = w3 - z[:, :, None]
        w = tl.reshape(w3 * s[:, :, None], (BLOCK_N, BLOCK_K))
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        s, z = _group_params(s_ptr, z_ptr, n, (k // GROUP_SIZE)[None, :], n_mask & (k < K)[None, :],
                             stride_sn, HAS_ZERO)
        w = (w - z) * s
    return w


@triton.jit
def _fp16_param(byte_ptr, mask):
    """float32 of the little-endian float16 whose two bytes start at byte_ptr (uint8 pointers, 2-byte aligned:
    every block's parameters are an even number of bytes into a 2-byte aligned tensor; 0 where masked). One
    16-bit load, not two byte loads: at 6-bit codes the byte loads' registers spill on sm_90."""
    bits = tl.load(byte_ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def apply_gguf_params(w, p_ptr, n, k0, n_mask, stride_pn, K, OFFSET: tl.constexpr, BLOCK: tl.constexpr,
                      SUB: tl.constexpr, HAS_MIN: tl.constexpr, SUB_LAYOUT: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """(w - OFFSET) * a - b for the decoded GGUF tile w: float32 [BLOCK_N, BLOCK_K] of rows n, columns k0 ..

    p: uint8 [N, K / BLOCK * param_bytes], row stride stride_pn: per block of BLOCK weights its fp16 d (bytes
    0, 1), with HAS_MIN its fp16 dmin (2, 3), then its BLOCK / SUB sub-block scales (SUB > 0; SUB_LAYOUT: int8,
    nibbles scale | min << 4, or uint8 scales then uint8 mins), as packing.GGUF_BLOCKS lays them out. Per group
    of G = SUB (else BLOCK) weights: a = d * scale (d without sub-blocks), b = dmin * min (with sub-blocks),
    -dmin (without: Q4_1 / Q5_1's m), 0 without HAS_MIN. a and b are exact in float32 (an fp16 times an
    integer of at most 8 bits), and so is (q - OFFSET) * a: each weight is rounded once, by the subtraction,
    as gguf's own dequantize rounds it. Constraints: BLOCK_K a multiple of G (G is 16 or 32, BLOCK_K a power
    of two >= 32); K a multiple of BLOCK."""
    G: tl.constexpr = SUB if SUB > 0 else BLOCK
    GROUPS: tl.constexpr = BLOCK_K // G
    PER_BLOCK: tl.constexpr = BLOCK // G
    HEADER: tl.constexpr = 4 if HAS_MIN else 2
    SUB_BYTES: tl.constexpr = (2 * PER_BLOCK if SUB_LAYOUT == _SUB_SCALE_MIN else PER_BLOCK) if SUB > 0 else 0
    PARAM_BYTES: tl.constexpr = HEADER + SUB_BYTES
    g = k0 // G + tl.arange(0, GROUPS)[None, :]  # [1, GROUPS]: the tile's groups
    mask = n_mask & (g < K // G)
    block = p_ptr + n * stride_pn + (g // PER_BLOCK) * PARAM_BYTES  # [BLOCK_N, GROUPS] byte pointers
    a = _fp16_param(block, mask)
    if SUB > 0:
        sub = block + HEADER + g % PER_BLOCK
        byte = tl.load(sub, mask=mask, other=0)
        if SUB_LAYOUT == _SUB_SIGNED:
            scale = ((byte.to(tl.int32) ^ 128) - 128).to(tl.float32)  # the byte's int8 value
        else:
            scale = (byte & 15).to(tl.float32) if SUB_LAYOUT == _SUB_NIBBLES else byte.to(tl.float32)
        a = a * scale
    w3 = (tl.reshape(w, (BLOCK_N, GROUPS, G)) - OFFSET) * a[:, :, None]
    if HAS_MIN:
        dmin = _fp16_param(block + 2, mask)
        if SUB > 0:
            if SUB_LAYOUT == _SUB_NIBBLES:
                low = (byte >> 4).to(tl.float32)
            else:
                low = tl.load(sub + PER_BLOCK, mask=mask, other=0).to(tl.float32)
            b = dmin * low
        else:
            b = -dmin
        w3 = w3 - b[:, :, None]
    return tl.reshape(w3, (BLOCK_N, BLOCK_K))


@triton.jit
def apply_params(w, s_ptr, z_ptr, n, k0, n_mask, stride_sn, K, FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr,
                 GGUF_OFFSET: tl.constexpr, GGUF_BLOCK: tl.constexpr, GGUF_SUB: tl.constexpr,
                 GGUF_MIN: tl.constexpr, GGUF_SUB_LAYOUT: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The decoded tile w with its format's group parameters applied: `apply_gguf_params` for GGUF (s_ptr: the
    block parameters), else `apply_group_params`."""
    if FORMAT == GGUF:
        w = apply_gguf_params(w, s_ptr, n, k0, n_mask, stride_sn, K, GGUF_OFFSET, GGUF_BLOCK, GGUF_SUB, GGUF_MIN,
                              GGUF_SUB_LAYOUT, BLOCK_N, BLOCK_K)
    else:
        w = apply_group_params(w, s_ptr, z_ptr, n, k0, n_mask, stride_sn, K, GROUP_SIZE, FORMAT == UINTX,
                               BLOCK_N, BLOCK_K)
    return w
