"""The weight-only matmul every format shares: y = x @ dequant(W)^T + bias, with W read in its packed
storage format (quantize.py, packing.py) and dequantized in registers.

One generic kernel, `_matmul_kernel`, serves int8, uintX, fpX and fp8 through constexpr parameters; the
config picks one of three paths:

    splitk   small M (decode-like): one row-tile covers all of M, so each weight byte is read once, and
             the K range is split over SPLIT_K programs whose fp32 partial sums `_splitk_reduce_kernel`
             adds up. M == 1 is a GEMV on CUDA cores (BLOCK_M 1), M > 1 goes through tl.dot (BLOCK_M 16+).
    gemm     large M: output tiles with GROUP_M swizzling, tl.dot on tensor cores, no split.
    dequant  large M on CUDA: `_dequantize_kernel` writes W in the activation dtype, then cuBLAS
             (F.linear). One extra pass over an N x K buffer; it wins where cuBLAS beats every fused config.

Sub-byte codes (uintX, fpX) are read as whole little-endian words of 8 codes per bit plane ("octets"), so
that their loads vectorize; x's columns are then reordered lane-major (`lane_major`) to match.

`select_config` picks the config by M bucket: the tuning table's pick (tuning.py), else on CUDA the
fastest of a pruned candidate list (benchmarked once on synthetic tensors, persisted), else a fixed
heuristic (CPU and the interpreter, QUANTRT_AUTOTUNE=0). `matmul` is the launcher that the family files
(int8.py, uintx.py, floatx.py) call once they have checked their tensors.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import tuning

# weight formats (the FORMAT constexpr); fp8 is FLOATX with BITS == 8
INT8: tl.constexpr = tl.constexpr(0)
UINTX: tl.constexpr = tl.constexpr(1)
FLOATX: tl.constexpr = tl.constexpr(2)


@dataclass(frozen=True)
class WeightFormat:
    """What the kernels need to know of a storage format: kind (INT8, UINTX, FLOATX), bits per code, and
    for floats the exponent and mantissa bits (fp8 e4m3fn: 4, 3; e5m2: 5, 2)."""

    kind: int
    bits: int
    ebits: int = 0
    mbits: int = 0

    @property
    def name(self) -> str:
        if self.kind == INT8:
            return "int8"
        if self.kind == UINTX:
            return f"uint{self.bits}"
        return f"fp{self.bits}_e{self.ebits}m{self.mbits}"

    def codes_exact_in(self, dtype: torch.dtype) -> bool:
        """Whether every decoded code (before scale and zero point) is exact in `dtype`, so that a
        per-channel scale may multiply the fp32 accumulator after the K loop instead of every weight."""
        if self.kind == INT8:
            return True
        if self.kind == UINTX:
            return False  # q - z is not an integer
        bias = 2 ** (self.ebits - 1) - 1
        largest = 2.0 ** (2**self.ebits - 1 - bias) * (2 - 2.0**-self.mbits)
        smallest = 2.0 ** (1 - bias - self.mbits)
        info = torch.finfo(dtype)
        return largest <= info.max and smallest >= info.smallest_normal * 2.0**-info.bits


@dataclass(frozen=True)
class KernelConfig:
    """One point of the config space. The dequant path uses block_n x block_k as its tile only."""

    path: str  # "splitk", "gemm" or "dequant"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KernelConfig:
        config = cls(**d)
        if config.path not in PATHS:
            raise ValueError(f"unknown path {config.path!r}")
        return config


PATHS = ("splitk", "gemm", "dequant")

# The autotune space on CUDA. splitk: (BLOCK_N, BLOCK_K, num_warps) crossed with SPLIT_FACTORS, BLOCK_M
# from M's bucket (1, else 16..64); wide BLOCK_K keeps each weight row's bytes in 16-byte loads.
SPLITK_TILES = ((32, 128, 4), (64, 128, 4), (32, 256, 4), (64, 256, 8), (128, 64, 4), (128, 128, 8))
SPLIT_FACTORS = (1, 2, 4, 8)
# gemm: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
GEMM_TILES = ((128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
              (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 128, 4, 4))
DEQUANT_CONFIG = KernelConfig("dequant", block_n=32, block_k=128, num_warps=4)
# Fixed configs off CUDA (the interpreter): small blocks, so that test shapes have partial tiles and the
# split-K reduction runs.
CPU_CONFIGS = {
    "splitk": KernelConfig("splitk", block_m=16, block_n=32, block_k=64, split_k=2, num_warps=1),
    "gemm": KernelConfig("gemm", block_m=16, block_n=32, block_k=64, group_m=2, num_warps=1),
    "dequant": KernelConfig("dequant", block_n=32, block_k=32, num_warps=1),
}
SMALL_M = 16  # heuristic: up to this many rows take the splitk path
DEQUANT_M = 1024  # heuristic on CUDA: from this many rows on, dequantize then cuBLAS


def lanes(fmt: WeightFormat, k: int, group_size: int) -> int:
    """The LANES constexpr: 8 (octets of sub-byte codes, read as words) where the layout allows it: the
    planes' words are aligned when K % 32 == 0, and an octet must not straddle two groups."""
    return 8 if fmt.bits < 8 and k % 32 == 0 and group_size % 8 == 0 else 1


def prune(configs: list[KernelConfig], m: int, n: int, k: int, group_size: int, lanes: int,
          shared_memory: int = 227 * 1024) -> list[KernelConfig]:
    """Drop the configs that cannot win or cannot compile for an [m, k] x [n, k]^T problem on CUDA:
    blocks much larger than the problem, split-K pieces shorter than a block, K tiles that straddle
    groups (neither divides the other), GEMV tiles that spill registers (seen in ptxas reports on sm_90:
    more than 64 fp32 products, or 8 octet words, per thread), tl.dot with K < 16, GEMM tiles beyond the
    shared memory."""
    kept = []
    for c in configs:
        if c.path == "dequant":
            kept.append(c)
            continue
        rows = c.block_k // lanes  # K rows of a tile: columns, or octets
        if c.block_n > max(16, triton.next_power_of_2(n)) or c.block_k > max(16, triton.next_power_of_2(k)):
            continue
        if c.split_k > 1 and triton.cdiv(k, c.split_k) < c.block_k:
            continue
        if group_size and group_size % c.block_k and c.block_k % group_size:
            continue
        if c.block_m == 1 and rows * c.block_n // (32 * c.num_warps) > (64 if lanes == 1 else 8):
            continue
        if c.block_m > 1 and rows < 16:
            continue
        if c.path == "gemm":
            if c.block_m > max(16, 2 * triton.next_power_of_2(m)):
                continue
            # pipelined x (2 bytes) and weight tiles, plus the dequantized tile the MMA reads
            smem = c.num_stages * c.block_k * (2 * c.block_m + c.block_n) + 2 * c.block_k * c.block_n
            if smem > shared_memory:
                continue
        kept.append(c)
    return kept


@triton.jit
def _load_plane(row_ptr, k, mask, K, BITS: tl.constexpr, WIDTH: tl.constexpr):
    """The WIDTH-bit plane of the BITS-bit codes at columns k, shifted to its place in the code.

    Planes are stored widest first (packing.py); the bytes of the wider planes of a row come before this
    one's: (BITS - BITS % (2 * WIDTH)) * K / 8 of them. A byte holds 8 / WIDTH codes, code k in bits
    (k % (8 / WIDTH)) * WIDTH and up."""
    PER: tl.constexpr = 8 // WIDTH
    offset = (BITS - BITS % (2 * WIDTH)) * K // 8
    byte = tl.load(row_ptr + offset + k // PER, mask=mask, other=0).to(tl.int32)
    return ((byte >> ((k % PER) * WIDTH)) & ((1 << WIDTH) - 1)) << (BITS % WIDTH)


@triton.jit
def load_codes(w_ptr, n, k, mask, stride_wn, K, BITS: tl.constexpr):
    """int32 codes of W at rows n and columns k (broadcastable int tensors; masked elements read 0).

    w_ptr: int8 [N, K] (BITS == 8, sign kept) or uint8 [N, K * BITS / 8] in the plane layout of
    packing.py (BITS in 1..8: planes of 4, 2 and 1 bits, the binary digits of BITS)."""
    row = w_ptr + n * stride_wn
    if BITS == 8:
        code = tl.load(row + k, mask=mask, other=0).to(tl.int32)
    elif BITS >= 4:
        code = _load_plane(row, k, mask, K, BITS, 4)
        if BITS % 4 >= 2:
            code = code | _load_plane(row, k, mask, K, BITS, 2)
        if BITS % 2 == 1:
            code = code | _load_plane(row, k, mask, K, BITS, 1)
    elif BITS >= 2:
        code = _load_plane(row, k, mask, K, BITS, 2)
        if BITS % 2 == 1:
            code = code | _load_plane(row, k, mask, K, BITS, 1)
    else:
        code = _load_plane(row, k, mask, K, BITS, 1)
    return code


@triton.jit
def decode_float(code, BITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr):
    """int32 codes of a BITS-bit float (1 sign, EBITS exponent, MBITS mantissa bits, bias
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
    """int32 codes -> float32 values before scale and zero point. fp8 codes are decoded by the hardware
    conversion where NATIVE_FP8 (CUDA, SM >= 8.9), else bit by bit like the other floats."""
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
def group_params(s_ptr, z_ptr, n, g, mask, stride_sn, HAS_ZERO: tl.constexpr):
    """float32 scale and zero point of rows n, groups g (broadcastable; zero is 0 without HAS_ZERO)."""
    s = tl.load(s_ptr + n * stride_sn + g, mask=mask, other=1.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(z_ptr + n * stride_sn + g, mask=mask, other=0.0).to(tl.float32)
    else:
        z = 0.0
    return s, z


@triton.jit
def load_octet_words(row_ptr, o, mask, K, BITS: tl.constexpr, WIDTH: tl.constexpr):
    """The WIDTH-bit plane of octets o (codes 8o .. 8o + 7 of a row) as one little-endian word of WIDTH
    bytes per octet, code 8o + j in bits j * WIDTH and up; 0 where BITS has no WIDTH-bit plane.

    row_ptr: the row's first byte in the plane layout of packing.py. The words are aligned when
    K % 32 == 0 (every row and plane then starts at a multiple of 4 bytes)."""
    if BITS % (2 * WIDTH) >= WIDTH:
        if BITS < 2 * WIDTH:
            plane = row_ptr
        else:
            plane = row_ptr + (BITS - BITS % (2 * WIDTH)) * (K // 8)
        if WIDTH == 4:
            words = tl.load(plane.to(tl.pointer_type(tl.uint32)) + o, mask=mask, other=0)
        elif WIDTH == 2:
            words = tl.load(plane.to(tl.pointer_type(tl.uint16)) + o, mask=mask, other=0)
        else:
            words = tl.load(plane + o, mask=mask, other=0)
    else:
        words = 0
    return words


@triton.jit
def octet_lane(w4, w2, w1, J: tl.constexpr, BITS: tl.constexpr):
    """int32 codes 8o + J from the octet words of the 4-, 2- and 1-bit planes (`load_octet_words`)."""
    code = 0
    if BITS % 8 >= 4:
        code = code + (((w4 >> (4 * J)) & 15).to(tl.int32) << (BITS % 4))
    if BITS % 4 >= 2:
        code = code + (((w2 >> (2 * J)) & 3).to(tl.int32) << (BITS % 2))
    if BITS % 2 == 1:
        code = code + ((w1 >> J) & 1).to(tl.int32)
    return code


@triton.jit
def _matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, K_ROWS, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_sn, stride_om, stride_os,
    FORMAT: tl.constexpr, BITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr, LANES: tl.constexpr, LATE_SCALE: tl.constexpr, NATIVE_FP8: tl.constexpr,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = x @ dequant(W)^T + bias, or fp32 partial sums over one K range (PARTIAL).

    x:     [M, K] fp16/bf16/fp32, strides (stride_xm, stride_xk); with LANES == 8 its columns in
           lane-major order (column j * K / 8 + o holds original column 8o + j, `lane_major`)
    w:     the stored weight: int8 [N, K] (INT8) or uint8 [N, K * BITS / 8] in the plane layout of
           packing.py (UINTX: BITS in 1..8; FLOATX: BITS = 1 + EBITS + MBITS in 3..8, fp8 e4m3fn/e5m2
           being EBITS 4/5), row stride stride_wn
    s, z:  [N, G] (or [1, 1] with stride_sn 0: per-tensor fp8) in the weight's float dtype, row stride
           stride_sn, contiguous along G. z only for UINTX. GROUP_SIZE = K / G, 0 for one group per row.
    bias:  [N] (HAS_BIAS) in any float dtype
    out:   [M, N] x.dtype with row stride stride_om; with PARTIAL, fp32 [SPLIT_K, M, N] with
           stride_os between splits, bias left to `_splitk_reduce_kernel`

    W[n, k] = (decode(code[n, k]) - z[n, g]) * s[n, g],  g = k // GROUP_SIZE, decoded in fp32:
        INT8: code (signed);  UINTX: code;  FLOATX: sign, exponent, mantissa (`decode_float`).
    LATE_SCALE (per-channel scale, codes exact in x.dtype): the scale multiplies the fp32 accumulator
    after the K loop instead of every weight.

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), number of K ranges). Program (pid, r) computes one
    [BLOCK_M, BLOCK_N] tile over K range r: [r * K_PER_SPLIT, (r + 1) * K_PER_SPLIT), K_PER_SPLIT a
    multiple of BLOCK_K. A K tile is walked as BLOCK_K / LANES rows of LANES codes (K_ROWS = K / LANES
    rows in all, passed so that the masks' divisibility is known and the loads vectorize).
    LANES == 1: row k is column k (`load_codes`). LANES == 8 (sub-byte codes, K % 32 == 0,
    GROUP_SIZE % 8 == 0): row o is the octet of codes 8o .. 8o + 7, whose planes load as whole words
    (`load_octet_words`), and lane j of the octets multiplies x's original columns 8o + j: the K sum
    in another order.
    BLOCK_M == 1 (GEMV): fp32 products accumulated per (K row, column), summed over K once at the end.
    BLOCK_M >= 16: tl.dot with W cast to x.dtype (fp32: IEEE precision; on GPUs BLOCK_K / LANES >= 16).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row-tiles side by side share their W tiles in L2
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    n2 = cols[None, :]  # [1, BLOCK_N]: W tiles are [BLOCK_K / LANES, BLOCK_N]
    HAS_ZERO: tl.constexpr = FORMAT == UINTX
    KO: tl.constexpr = BLOCK_K // LANES
    if LATE_SCALE:
        s_late, _ = group_params(s_ptr, z_ptr, n2, 0, n_mask[None, :], stride_sn, False)
    tl.static_assert(BLOCK_M == 1 or BLOCK_M >= 16)
    if BLOCK_M == 1:
        acc2 = tl.zeros((KO, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_o = tl.max_contiguous(tl.multiple_of(k0 // LANES + tl.arange(0, KO), KO), KO)
        o_mask = offs_o < K_ROWS
        o2 = offs_o[:, None]
        w_mask = o_mask[:, None] & n_mask[None, :]
        if LANES == 8:
            row = w_ptr + n2 * stride_wn
            w4 = load_octet_words(row, o2, w_mask, K, BITS, 4)
            w2 = load_octet_words(row, o2, w_mask, K, BITS, 2)
            w1 = load_octet_words(row, o2, w_mask, K, BITS, 1)
        if not LATE_SCALE:
            if GROUP_SIZE == 0:
                s, z = group_params(s_ptr, z_ptr, n2, 0, n_mask[None, :], stride_sn, HAS_ZERO)
            elif GROUP_SIZE % BLOCK_K == 0:  # the whole tile lies in one group
                s, z = group_params(s_ptr, z_ptr, n2, k0 // GROUP_SIZE, n_mask[None, :], stride_sn, HAS_ZERO)
            else:
                s, z = group_params(s_ptr, z_ptr, n2, o2 * LANES // GROUP_SIZE, w_mask, stride_sn, HAS_ZERO)
        for j in tl.static_range(LANES):
            k = j * K_ROWS + offs_o  # x's columns in lane-major order
            if LANES == 8:
                code = octet_lane(w4, w2, w1, j, BITS)
            else:
                code = load_codes(w_ptr, n2, o2, w_mask, stride_wn, K, BITS)
            w = decode(code, FORMAT, BITS, EBITS, MBITS, NATIVE_FP8)
            if not LATE_SCALE:
                w = (w - z) * s
            if BLOCK_M == 1:
                x = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + k * stride_xk, mask=o_mask, other=0.0)
                acc2 += x.to(tl.float32)[:, None] * w
            else:
                x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                            mask=m_mask[:, None] & o_mask[None, :], other=0.0)
                if x_ptr.dtype.element_ty == tl.float32:
                    acc = tl.dot(x, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc)

    if BLOCK_M == 1:
        acc = tl.sum(acc2, axis=0)[None, :]
    if LATE_SCALE:
        acc = acc * s_late
    out_mask = m_mask[:, None] & n_mask[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_k * stride_os + rows[:, None] * stride_om + cols[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, M, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr):
    """out[m, n] = sum_r ws[r, m, n] + bias[n].

    ws: fp32 [SPLITS, M, N] contiguous; bias: [N] (HAS_BIAS); out: [M, N] contiguous, any float dtype.
    Grid: (cdiv(M * N, BLOCK),)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for r in range(SPLITS):
        acc += tl.load(ws_ptr + r * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn,
    FORMAT: tl.constexpr, BITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr, NATIVE_FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[n, k] = W[n, k] as `_matmul_kernel` defines it, rounded once to out's dtype.

    w, s, z, GROUP_SIZE: as in `_matmul_kernel`; out: [N, K] contiguous, any float dtype.
    Grid: (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))."""
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None]
    k = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K))[None, :]
    mask = (n < N) & (k < K)
    w = decode(load_codes(w_ptr, n, k, mask, stride_wn, K, BITS), FORMAT, BITS, EBITS, MBITS, NATIVE_FP8)
    g = 0 if GROUP_SIZE == 0 else k // GROUP_SIZE
    s, z = group_params(s_ptr, z_ptr, n, g, mask, stride_sn, FORMAT == UINTX)
    tl.store(out_ptr + n * K + k, ((w - z) * s).to(out_ptr.dtype.element_ty), mask=mask)


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter: TRITON_INTERPRET=1 now, and it was set when this
    module was imported (triton.jit decides at decoration). Read at call time, so that tests can turn
    the interpreter off (monkeypatch the variable) to reach the ops' reference path."""
    from triton.runtime.interpreter import InterpretedFunction

    return os.environ.get("TRITON_INTERPRET") == "1" and isinstance(_matmul_kernel, InterpretedFunction)


def interpreter_mismatch() -> str | None:
    """Why the kernels cannot run in the interpreter although TRITON_INTERPRET=1 asks for it, or None."""
    if os.environ.get("TRITON_INTERPRET") == "1" and not interpreting():
        return ("TRITON_INTERPRET=1 was set after quantrt.kernels was imported; set it before the first "
                "import of quantrt")
    return None


SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def group_size_of(k: int, scale: torch.Tensor) -> int:
    """The GROUP_SIZE constexpr of a scale [N, G] (or [1, 1]): K / G, 0 for one scale per row."""
    groups = scale.shape[-1]
    return 0 if groups == 1 else k // groups


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels write comes from here; the tests fill them with NaN instead, so that an
    element no program writes shows."""
    return torch.empty(shape, dtype=dtype, device=device)


def _native_fp8(fmt: WeightFormat, device: torch.device) -> bool:
    return (fmt.kind == FLOATX and fmt.bits == 8 and device.type == "cuda" and not interpreting()
            and torch.cuda.get_device_capability(device) >= (8, 9))


def _stride_sn(scale: torch.Tensor) -> int:
    return scale.stride(0) if scale.shape[0] > 1 else 0  # per-tensor [1, 1] scales broadcast over rows


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: WeightFormat,
               k: int, dtype: torch.dtype, config: KernelConfig | None = None) -> torch.Tensor:
    """The stored weight -> W [N, K] in `dtype`, by `_dequantize_kernel` (tensors as the family
    launchers check them)."""
    config = config or (DEQUANT_CONFIG if qweight.device.type == "cuda" else CPU_CONFIGS["dequant"])
    n = qweight.shape[0]
    out = empty((n, k), dtype, qweight.device)
    if n == 0 or k == 0:
        return out
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(k, config.block_k))
    # wrap_triton lets torch.compile trace the launch (triton_op); the kernels are named in the calls so
    # that torch finds them (its compile caches hash their source); interpreted kernels launch as they are
    kernel = _dequantize_kernel if interpreting() else wrap_triton(_dequantize_kernel)
    kernel[grid](
        qweight, scale, zero if zero is not None else scale, out, n, k, qweight.stride(0), _stride_sn(scale),
        FORMAT=fmt.kind, BITS=fmt.bits, EBITS=fmt.ebits, MBITS=fmt.mbits,
        GROUP_SIZE=group_size_of(k, scale), NATIVE_FP8=_native_fp8(fmt, qweight.device),
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
    )
    return out


def lane_major(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> its columns reordered so that column 8o + j lands at j * K / 8 + o: one contiguous run
    of x per octet lane, for the LANES == 8 kernels."""
    m, k = x.shape
    return x.reshape(m, k // 8, 8).transpose(1, 2).reshape(m, k)


def fit(config: KernelConfig, m: int) -> KernelConfig:
    """A splitk config for M rows: BLOCK_M 1 (GEMV) for one row, else 16 up to config.block_m."""
    if config.path != "splitk":
        return config
    block_m = 1 if m <= 1 else max(16, min(triton.next_power_of_2(m), config.block_m))
    return replace(config, block_m=block_m)


def run(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
        bias: torch.Tensor | None, fmt: WeightFormat, config: KernelConfig) -> torch.Tensor:
    """Launch one config: x [M, K] -> [M, N] in x.dtype (tensors as the family launchers check them)."""
    m, k = x.shape
    n = qweight.shape[0]
    if config.path == "dequant":
        return torch.nn.functional.linear(x, dequantize(qweight, scale, zero, fmt, k, x.dtype), bias)
    out = empty((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return out
    group_size = group_size_of(k, scale)
    # octet words need 4-byte aligned rows: true of every contiguous weight with K % 32 == 0
    octets = lanes(fmt, k, group_size) == 8 and qweight.stride(0) % 4 == 0 and qweight.storage_offset() % 4 == 0
    if octets:
        x = lane_major(x)
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    splits = triton.cdiv(k, k_per_split)
    target = out if splits == 1 else empty((splits, m, n), torch.float32, x.device)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), splits)
    kernel = _matmul_kernel if interpreting() else wrap_triton(_matmul_kernel)
    kernel[grid](
        x, qweight, scale, zero if zero is not None else scale, bias if bias is not None else scale, target,
        m, n, k, k // 8 if octets else k, k_per_split,
        x.stride(0), x.stride(1), qweight.stride(0), _stride_sn(scale), n, m * n,
        FORMAT=fmt.kind, BITS=fmt.bits, EBITS=fmt.ebits, MBITS=fmt.mbits, GROUP_SIZE=group_size,
        LANES=8 if octets else 1, LATE_SCALE=group_size == 0 and fmt.codes_exact_in(x.dtype),
        NATIVE_FP8=_native_fp8(fmt, x.device), HAS_BIAS=bias is not None, PARTIAL=splits > 1,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        block = 1024 if x.device.type == "cuda" else 256
        reduce = _splitk_reduce_kernel if interpreting() else wrap_triton(_splitk_reduce_kernel)
        reduce[(triton.cdiv(m * n, block),)](
            target, bias if bias is not None else scale, out, m, n,
            SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=block,
        )
    return out


def candidates(fmt: WeightFormat, m: int, n: int, k: int, group_size: int,
               shared_memory: int) -> list[KernelConfig]:
    """The pruned configs worth benchmarking for M rows on a CUDA GPU with `shared_memory` bytes per
    block, by M bucket: splitk up to 64 rows, gemm from 32, dequant + cuBLAS from 128."""
    bucket = tuning.m_bucket(m)
    configs = []
    if bucket <= 64:
        block_m = 1 if bucket == 1 else max(16, bucket)
        configs += [KernelConfig("splitk", block_m=block_m, block_n=bn, block_k=bk, split_k=s, num_warps=w)
                    for bn, bk, w in SPLITK_TILES for s in SPLIT_FACTORS]
    if bucket >= 32:
        configs += [KernelConfig("gemm", block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
                    for bm, bn, bk, w, st in GEMM_TILES]
    if bucket >= 128:
        configs.append(DEQUANT_CONFIG)
    return prune(configs, bucket, n, k, group_size, lanes(fmt, k, group_size), shared_memory)


def heuristic(fmt: WeightFormat, m: int, n: int, k: int, group_size: int, device: torch.device,
              path: str | None = None) -> KernelConfig:
    """The config used without tuning. Off CUDA: CPU_CONFIGS (splitk up to SMALL_M rows, then gemm). On
    CUDA: splitk with enough K pieces to give every SM two programs, gemm in between, dequant + cuBLAS
    from DEQUANT_M rows. `path` forces one path."""
    if path is None:
        path = "splitk" if m <= SMALL_M else "gemm"
        if device.type == "cuda" and m >= DEQUANT_M:
            path = "dequant"
    if device.type != "cuda":
        return fit(CPU_CONFIGS[path], m)
    if path == "dequant":
        return DEQUANT_CONFIG
    # tl.dot needs 16 K rows (octets): 128 codes per tile; smaller groups gather their scales per row
    block_k = 128 if lanes(fmt, k, group_size) == 8 or path == "splitk" else 64
    if path == "gemm":
        return KernelConfig("gemm", block_m=128 if m > 64 else 64, block_n=128, block_k=block_k, num_warps=8)
    tiles = triton.cdiv(n, 64)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    split = 1
    while split < 8 and tiles * split < 2 * sms and k // (2 * split) >= 2 * block_k:
        split *= 2
    return fit(KernelConfig("splitk", block_m=16, block_n=64, block_k=block_k, split_k=split), m)


def _synthetic(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               bias: torch.Tensor | None) -> tuple:
    # real random tensors of the call's shapes and dtypes (which may be fake while torch.compile traces),
    # so that a benchmark never depends on, nor touches, the caller's data
    def like(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if t.dtype in (torch.int8, torch.uint8):
            lo, hi = (-127, 128) if t.dtype == torch.int8 else (0, 256)
            return torch.randint(lo, hi, tuple(t.shape), dtype=t.dtype, device=t.device)
        return torch.rand(tuple(t.shape), dtype=t.dtype, device=t.device) * 0.01 + 0.001
    return like(x), like(qweight), like(scale), like(zero), like(bias)


def benchmark(args: tuple, fmt: WeightFormat, configs: list[KernelConfig]) -> dict[KernelConfig, float]:
    """Median milliseconds of each config (triton.testing.do_bench) on synthetic tensors shaped like
    args = (x, qweight, scale, zero, bias); configs that fail to compile or run are left out."""
    from torch._library.triton import set_wrap_triton_enabled
    from torch.utils._python_dispatch import _disable_current_modes

    times = {}
    with _disable_current_modes(), set_wrap_triton_enabled(False):  # torch.compile traces under modes
        real = _synthetic(*args)
        for config in configs:
            config = fit(config, real[0].shape[0])
            try:
                times[config] = triton.testing.do_bench(lambda: run(*real, fmt, config), warmup=10, rep=40,
                                                        return_mode="median")
            except Exception as e:  # e.g. out of shared memory on a smaller GPU: not a candidate
                warnings.warn(f"quantrt tuning: {fmt.name} {config} failed: {type(e).__name__}: {e}")
    return times


def select_config(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  bias: torch.Tensor | None, fmt: WeightFormat) -> KernelConfig:
    """The config of a call: the tuning table's pick for (GPU, torch, triton, SOURCE_HASH, format and x
    dtype, N, K, group size, M bucket); on a miss on CUDA the fastest of `candidates`, persisted;
    `heuristic` off CUDA or with QUANTRT_AUTOTUNE=0 (then nothing is benchmarked). A symbolic M
    (torch.compile with dynamic shapes) is specialized: the config depends on it."""
    m, k = int(x.shape[0]), int(x.shape[1])
    n = qweight.shape[0]
    group_size = group_size_of(k, scale)
    if x.device.type != "cuda" or os.environ.get("QUANTRT_AUTOTUNE", "1") == "0":
        return heuristic(fmt, m, n, k, group_size, x.device)
    key = tuning.make_key(torch.cuda.get_device_name(x.device), SOURCE_HASH,
                          f"{fmt.name}/{str(x.dtype).removeprefix('torch.')}", n, k, group_size, m)
    table = tuning.default_table()
    picked = table.get(key)
    if picked is not None:
        try:
            return fit(KernelConfig.from_dict(picked), m)
        except (TypeError, ValueError):
            warnings.warn(f"quantrt tuning: ignoring the malformed entry {key!r} of {table.path}")
    smem = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
    try:
        times = benchmark((x, qweight, scale, zero, bias), fmt, candidates(fmt, m, n, k, group_size, smem))
    except Exception as e:  # tuning must never break a forward (nor a torch.compile trace)
        warnings.warn(f"quantrt tuning: benchmarking failed ({type(e).__name__}: {e})")
        times = {}
    if not times:
        warnings.warn(f"quantrt tuning: no {fmt.name} config ran for M={m}, N={n}, K={k}; using the heuristic")
        return heuristic(fmt, m, n, k, group_size, x.device)
    best = min(times, key=times.get)
    table.put(key, best.to_dict())
    return best


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(x: torch.Tensor, qweight: torch.Tensor, qdtype: torch.dtype, row_bytes: int,
                 scale: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None,
                 per_tensor: bool = False) -> None:
    """Raise ValueError unless x [M, K] is fp16/bf16/fp32, qweight is `qdtype` [N, row_bytes], scale (and
    zero, same shape and dtype) [N, G] float with G dividing K (or [1, 1] where `per_tensor`), all on
    x's device, and bias None or [N]."""
    def fail(what: str):
        raise ValueError(f"quantrt weight-only linear: {what}")
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        fail(f"x must be a 2-D fp16/bf16/fp32 tensor [M, K], got {x.dtype} {tuple(x.shape)}")
    k = x.shape[1]
    if qweight.dtype != qdtype or qweight.dim() != 2 or qweight.shape[1] != row_bytes:
        fail(f"qweight must be {qdtype} [N, {row_bytes}] for K={k}, got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    rows_ok = scale.dim() == 2 and (scale.shape[0] == n or (per_tensor and tuple(scale.shape) == (1, 1)))
    if not rows_ok or scale.dtype not in FLOAT_DTYPES or k % scale.shape[1]:
        fail(f"scale must be float [N={n}, G] with G dividing K={k}{' (or [1, 1])' if per_tensor else ''}, "
             f"got {scale.dtype} {tuple(scale.shape)}")
    if zero is not None and (zero.shape != scale.shape or zero.dtype != scale.dtype):
        fail(f"zero must match scale ({scale.dtype} {tuple(scale.shape)}), got {zero.dtype} {tuple(zero.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or bias.dtype not in FLOAT_DTYPES):
        fail(f"bias must be a float [N={n}] tensor or None, got {bias.dtype} {tuple(bias.shape)}")
    tensors = [t for t in (qweight, scale, zero, bias) if t is not None]
    if any(t.device != x.device for t in tensors):
        fail(f"all tensors must be on x's device {x.device}, got {[str(t.device) for t in tensors]}")
    if any(t.stride(-1) != 1 for t in (qweight, scale, zero) if t is not None):
        fail("qweight, scale and zero must be contiguous along their last dimension")


def matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None, fmt: WeightFormat, path: str | None = None,
           config: KernelConfig | None = None) -> torch.Tensor:
    """x [M, K] -> x @ dequant(W)^T + bias, [M, N] in x.dtype. `path` forces "splitk", "gemm" or
    "dequant" with its heuristic config, `config` one config; neither: `select_config`."""
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {', '.join(PATHS)}")
    if bias is not None:
        bias = bias.contiguous()
    if config is None:
        if path is None:
            config = select_config(x, qweight, scale, zero, bias, fmt)
        else:
            m, k = int(x.shape[0]), int(x.shape[1])
            config = heuristic(fmt, m, qweight.shape[0], k, group_size_of(k, scale), x.device, path)
    return run(x, qweight, scale, zero, bias, fmt, config)
