"""The weight-only matmul every format shares: y = x @ dequant(W)^T + bias, with W read in its packed
storage format (formats.py) and dequantized in registers. In the order of the Triton matmul tutorial:
configs, pruning, the kernels, the launchers.

Paths (a config's `path`):

    gemv     small M (decode-like, up to 64 rows): one row tile covers all of M, so each weight byte is
             read once, and the grid splits N only (no split of K, hence no partial sums, no reduction
             kernel and no memset: one launch per call). M == 1 runs on CUDA cores (BLOCK_M 1), 2..64
             rows through tl.dot (BLOCK_M 16..64).
    gemm     large M: the same kernel with tiles of M, GROUP_M swizzled so that neighbouring programs
             share weight tiles in L2.
    dequant  `_dequantize_kernel` writes W in the activation dtype, then cuBLAS (F.linear): one extra
             pass over an N x K buffer, kept where it measures faster than the fused kernel.

Both tl.dot paths compute out^T = W_tile @ x_tile^T: the dequantized weight is the left operand, which
Hopper's wgmma can take from registers, while x (the right operand, read from memory as it is) is staged
in shared memory by the software pipeline (num_stages); a whole K tile of every format is one dot.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from .formats import FLOATX, WeightFormat, apply_params, decode, load_codes


@dataclass(frozen=True)
class KernelConfig:
    """One point of the config space. block_n rows of W by block_k columns is the weight tile of every
    path (the dequant path's tile too); block_m is 1 (GEMV on CUDA cores) or 16+ (tl.dot)."""

    path: str  # "gemv", "gemm" or "dequant"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
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


PATHS = ("gemv", "gemm", "dequant")
GEMV_MAX_M = 64  # the gemv path covers all of M in one row tile up to this many rows

# The autotune space on CUDA (autotune.candidates).
# gemv with M == 1: (BLOCK_N, BLOCK_K, num_warps); wide K tiles give each thread several 16-byte weight
# loads per iteration (64 codes per thread: 2 for int4, 4 for int8), narrow N tiles give a grid of several
# waves even for N = 3072. The compiler does not pipeline loads that feed no dot: one stage.
GEMV_TILES = ((4, 1024, 4), (8, 512, 4), (16, 512, 4), (16, 1024, 8))
# gemv with 2..64 rows (tl.dot, BLOCK_M from M's bucket): (BLOCK_N, BLOCK_K, num_warps); weights and x are
# copied into shared memory by the software pipeline (cp.async, num_stages deep)
SKINNY_TILES = ((16, 128, 4), (32, 128, 4), (32, 256, 4), (64, 128, 4))
SKINNY_STAGES = 3
# gemm: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_N (weight rows) is wgmma's M side
GEMM_TILES = ((128, 128, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4),
              (128, 64, 64, 4, 4))
DEQUANT_CONFIG = KernelConfig("dequant", block_m=1, block_n=16, block_k=256, num_warps=4, num_stages=1)
# Fixed configs off CUDA (the interpreter): small blocks, so that test shapes have partial tiles in N, K
# and M, and several groups per K tile.
CPU_CONFIGS = {
    "gemv": KernelConfig("gemv", block_m=16, block_n=32, block_k=64, num_warps=1, num_stages=1),
    "gemm": KernelConfig("gemm", block_m=16, block_n=32, block_k=64, group_m=2, num_warps=1, num_stages=1),
    "dequant": KernelConfig("dequant", block_m=1, block_n=32, block_k=64, num_warps=1, num_stages=1),
}
GEMV_REGISTERS = 64  # codes per thread a GEMV tile may decode per iteration (more reach 128+ registers)


def prune(configs: list[KernelConfig], m: int, n: int, k: int, group_size: int, shared_memory: int = 227 * 1024,
          ) -> list[KernelConfig]:
    """Drop the configs that cannot win or cannot compile for an [m, k] x [n, k]^T problem on CUDA:
    tiles much larger than the problem, K tiles that straddle groups (neither divides the other), GEMV
    tiles that decode more than GEMV_REGISTERS codes per thread, tl.dot tiles below 16, skinny tiles whose
    accumulator passes 1024 elements, gemm tiles beyond the shared memory. The limits are where sm_90
    code generation passes 128 registers or spills (tests/kernels/test_codegen.py checks every variant)."""
    kept = []
    for c in configs:
        if c.path == "dequant":
            kept.append(c)
            continue
        if c.block_n > max(16, triton.next_power_of_2(n)) or c.block_k > max(32, triton.next_power_of_2(k)):
            continue
        if group_size and group_size % c.block_k and c.block_k % group_size:
            continue
        if c.block_m == 1 and c.block_n * c.block_k // (32 * c.num_warps) > GEMV_REGISTERS:
            continue
        if c.block_m > 1 and min(c.block_n, c.block_k) < 16:
            continue
        if c.path == "gemv" and c.block_m * c.block_n > 1024:  # fp32 accumulator beside the decoded tile
            continue
        if c.path == "gemm":
            if c.block_m > max(16, 2 * triton.next_power_of_2(m)):
                continue
            # the pipelined x tiles (2 bytes) plus the epilogue's conversion of the fp32 accumulator
            if c.num_stages * c.block_k * c.block_m * 2 + 4 * c.block_m * c.block_n > shared_memory:
                continue
        kept.append(c)
    return kept


@triton.jit
def _matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    FORMAT: tl.constexpr, BITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr, GGUF_OFFSET: tl.constexpr, GGUF_BLOCK: tl.constexpr, GGUF_SUB: tl.constexpr,
    GGUF_MIN: tl.constexpr, GGUF_SUB_LAYOUT: tl.constexpr, WORDS: tl.constexpr, EVEN_K: tl.constexpr,
    LATE_SCALE: tl.constexpr,
    NATIVE_FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = x @ dequant(W)^T + bias.

    x:     [M, K] fp16/bf16/fp32, row stride stride_xm, contiguous along K
    w:     the stored weight: int8 [N, K] (INT8; GGUF with BITS 8: Q8_0) or uint8 [N, K * BITS / 8] in the
           plane layout of packing.py (UINTX: BITS in 1..8; FLOATX: BITS = 1 + EBITS + MBITS in 3..8, fp8
           e4m3fn/e5m2 being EBITS 4/5; GGUF: BITS in 2..6), row stride stride_wn; WORDS: sub-byte planes read
           as words of 8 codes (K % 32 == 0 and a 4-byte aligned w); EVEN_K: K % BLOCK_K == 0 (no column masks)
    s, z:  [N, G] (or [1, 1] with stride_sn 0: per-tensor fp8) in a float dtype, row stride stride_sn,
           contiguous along G; z only for UINTX. GROUP_SIZE = K / G, 0 for one group per row.
           GGUF: s is the uint8 block parameters [N, K / GGUF_BLOCK * param_bytes] (formats.apply_gguf_params:
           GGUF_OFFSET, GGUF_BLOCK, GGUF_SUB, GGUF_MIN, GGUF_SUB_LAYOUT describe them), z unused, GROUP_SIZE
           the weights per group of parameters.
    bias:  [N] (HAS_BIAS) in any float dtype
    out:   [M, N] x.dtype, row stride stride_om, contiguous along N

    W[n, k] = (decode(code[n, k]) - z[n, g]) * s[n, g],  g = k // GROUP_SIZE, in fp32 (formats.py); GGUF:
    W[n, k] = (code[n, k] - GGUF_OFFSET) * a[n, g] - b[n, g].
    LATE_SCALE (one scale per row, codes exact in x.dtype): the scale multiplies the fp32 accumulator
    after the K loop instead of every weight.

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), one program per [BLOCK_M, BLOCK_N] output tile over all
    of K: no partial sums. BLOCK_M == 1 (GEMV): fp32 products summed per run of 8 columns of the weight
    tile, [BLOCK_N, BLOCK_K / 8], then over K once at the end. BLOCK_M >= 16: acc^T [BLOCK_N, BLOCK_M] += W_tile @ x_tile^T by
    tl.dot, W cast to x.dtype (fp32 x: IEEE precision). Constraints: BLOCK_K a power of two >= 32 where
    WORDS; GROUP_SIZE a multiple or a divisor of BLOCK_K for the one-load-per-tile group parameters.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row tiles side by side share their weight tiles in L2
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n = offs_n.to(tl.int64)[:, None]  # [BLOCK_N, 1]: weight rows, int64 so that n * stride cannot wrap
    n_mask = (offs_n < N)[:, None]
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm  # [BLOCK_M]
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)

    for k0 in range(0, K, BLOCK_K):
        code = load_codes(w_ptr, n, k0, n_mask, stride_wn, K, BITS, WORDS, EVEN_K, BLOCK_N, BLOCK_K)
        w = decode(code, FORMAT, BITS, EBITS, MBITS, NATIVE_FP8)
        if not LATE_SCALE:
            w = apply_params(w, s_ptr, z_ptr, n, k0, n_mask, stride_sn, K, FORMAT, GROUP_SIZE, GGUF_OFFSET,
                             GGUF_BLOCK, GGUF_SUB, GGUF_MIN, GGUF_SUB_LAYOUT, BLOCK_N, BLOCK_K)
        k = k0 + tl.arange(0, BLOCK_K)
        if BLOCK_M == 1:
            # x is re-read by every program: keep it in L2 (evict_last) while the weights stream past
            if EVEN_K:
                xk = tl.load(x_rows + k, eviction_policy="evict_last")
            else:
                xk = tl.load(x_rows + k, mask=k < K, other=0.0, eviction_policy="evict_last")
            # each thread sums the products of its own 8-column runs, so that the accumulator holds an
            # eighth of the tile (registers) and no value crosses threads until the end
            acc += tl.sum(tl.reshape(w * xk.to(tl.float32)[None, :], (BLOCK_N, BLOCK_K // 8, 8)), axis=2)
        else:
            xt = tl.load(x_rows[None, :] + k[:, None], mask=(k < K)[:, None] & m_mask[None, :], other=0.0,
                         eviction_policy="evict_last")  # x^T tile [BLOCK_K, BLOCK_M]
            if x_ptr.dtype.element_ty == tl.float32:
                acc = tl.dot(w, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(w.to(x_ptr.dtype.element_ty), xt, acc)

    if BLOCK_M == 1:
        acc = tl.sum(acc, axis=1)[:, None]  # [BLOCK_N, 1]
    if LATE_SCALE:
        acc = acc * tl.load(s_ptr + n * stride_sn, mask=n_mask, other=1.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    out = out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + n
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask & m_mask[None, :])


@triton.jit
def _dequantize_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn,
    FORMAT: tl.constexpr, BITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr, GGUF_OFFSET: tl.constexpr, GGUF_BLOCK: tl.constexpr, GGUF_SUB: tl.constexpr,
    GGUF_MIN: tl.constexpr, GGUF_SUB_LAYOUT: tl.constexpr, WORDS: tl.constexpr, EVEN_K: tl.constexpr,
    NATIVE_FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[n, k] = W[n, k] as `_matmul_kernel` defines it, rounded once to out's dtype.

    w, s, z, GROUP_SIZE, WORDS, EVEN_K: as in `_matmul_kernel`; out: [N, K] contiguous, any float dtype.
    Grid: (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)); a program reads its [BLOCK_N, BLOCK_K] codes with word
    loads and its group parameters once, and writes the tile with vector stores."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = offs_n.to(tl.int64)[:, None]
    n_mask = (offs_n < N)[:, None]
    k0 = tl.program_id(1) * BLOCK_K
    code = load_codes(w_ptr, n, k0, n_mask, stride_wn, K, BITS, WORDS, EVEN_K, BLOCK_N, BLOCK_K)
    w = decode(code, FORMAT, BITS, EBITS, MBITS, NATIVE_FP8)
    w = apply_params(w, s_ptr, z_ptr, n, k0, n_mask, stride_sn, K, FORMAT, GROUP_SIZE, GGUF_OFFSET, GGUF_BLOCK,
                     GGUF_SUB, GGUF_MIN, GGUF_SUB_LAYOUT, BLOCK_N, BLOCK_K)
    k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + n * K + k[None, :], w.to(out_ptr.dtype.element_ty), mask=n_mask & (k < K)[None, :])


# triton.jit decided at decoration whether the kernels are interpreted
_DECORATED_FOR_INTERPRETER = isinstance(_matmul_kernel, InterpretedFunction)


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter: TRITON_INTERPRET=1 now, and it was set when this
    module was imported (triton.jit decides at decoration). Read at call time, so that tests can turn
    the interpreter off (monkeypatch the variable) to reach the ops' reference path."""
    return _DECORATED_FOR_INTERPRETER and os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_mismatch() -> str | None:
    """Why the kernels cannot run in the interpreter although TRITON_INTERPRET=1 asks for it, or None."""
    if os.environ.get("TRITON_INTERPRET") == "1" and not interpreting():
        return ("TRITON_INTERPRET=1 was set after quantrt.kernels was imported; set it before the first "
                "import of quantrt")
    return None


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on Python ints (triton.cdiv is a constexpr function: microseconds a call on the launch path)."""
    return -(-a // b)


def group_size_of(fmt: WeightFormat, k: int, scale: torch.Tensor) -> int:
    """The GROUP_SIZE constexpr of a scale [N, G] (or [1, 1]): K / G, 0 for one scale per row; the format's
    own where it fixes one (GGUF, whose `scale` is its block parameters)."""
    if fmt.group_size is not None:
        return fmt.group_size
    groups = scale.shape[-1]
    return 0 if groups == 1 else k // groups


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels write comes from here; the tests fill them with NaN instead, so that an
    element no program writes shows."""
    return torch.empty(shape, dtype=dtype, device=device)


def native_fp8(fmt: WeightFormat, device: torch.device) -> bool:
    """Whether fp8 codes are decoded by the hardware conversion (CUDA, SM >= 8.9)."""
    return (fmt.kind == FLOATX and fmt.bits == 8 and device.type == "cuda" and not interpreting()
            and torch.cuda.get_device_capability(device) >= (8, 9))


def byte_address(t: torch.Tensor) -> int:
    """The tensor's first byte as an address, or, for a fake tensor (torch.compile tracing, where the
    caching allocator's 512-byte aligned blocks are assumed), its offset into its storage."""
    if is_fake(t) or t.device.type == "meta":
        return t.storage_offset() * t.element_size()
    return t.data_ptr()


def word_loads(fmt: WeightFormat, qweight: torch.Tensor, k: int) -> bool:
    """Whether the kernels may read qweight's planes as 32-bit words: the layout allows it and the
    tensor starts on a 4-byte boundary (else byte loads: never a misaligned-address fault)."""
    return fmt.word_loads(k) and byte_address(qweight) % 4 == 0 and qweight.stride(0) % 4 == 0


def _stride_sn(scale: torch.Tensor) -> int:
    return scale.stride(0) if scale.shape[0] > 1 else 0  # per-tensor [1, 1] scales broadcast over rows


def format_constexprs(fmt: WeightFormat, qweight: torch.Tensor, scale: torch.Tensor, k: int) -> dict:
    """The constexprs that describe the stored weight, shared by both kernels."""
    blocks = fmt.blocks
    gguf = (dict(GGUF_OFFSET=blocks.offset, GGUF_BLOCK=blocks.block, GGUF_SUB=blocks.sub_block,
                 GGUF_MIN=blocks.has_min, GGUF_SUB_LAYOUT=blocks.sub_layout) if blocks is not None else
            dict(GGUF_OFFSET=0, GGUF_BLOCK=0, GGUF_SUB=0, GGUF_MIN=False, GGUF_SUB_LAYOUT=0))
    return dict(FORMAT=fmt.kind, BITS=fmt.bits, EBITS=fmt.ebits, MBITS=fmt.mbits,
                GROUP_SIZE=group_size_of(fmt, k, scale), **gguf, WORDS=word_loads(fmt, qweight, k),
                NATIVE_FP8=native_fp8(fmt, qweight.device))


def dequantize_launch(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: WeightFormat,
                      out: torch.Tensor, config: KernelConfig) -> tuple[tuple, tuple, dict]:
    """(grid, arguments, constexprs and launch options) of `_dequantize_kernel` writing out [N, K]."""
    n, k = out.shape
    grid = (cdiv(n, config.block_n), cdiv(k, config.block_k))
    args = (qweight, scale, zero if zero is not None else scale, out, n, k, qweight.stride(0), _stride_sn(scale))
    return grid, args, dict(format_constexprs(fmt, qweight, scale, k), EVEN_K=k % config.block_k == 0,
                            BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: WeightFormat,
               k: int, dtype: torch.dtype, config: KernelConfig | None = None) -> torch.Tensor:
    """The stored weight -> W [N, K] in `dtype`, by `_dequantize_kernel` (tensors as the family
    launchers check them)."""
    config = config or (DEQUANT_CONFIG if qweight.device.type == "cuda" else CPU_CONFIGS["dequant"])
    out = empty((qweight.shape[0], k), dtype, qweight.device)
    if out.numel() == 0:
        return out
    grid, args, constexprs = dequantize_launch(qweight, scale, zero, fmt, out, config)
    # wrap_triton lets torch.compile trace the launch (triton_op); the kernels are named in the calls so
    # that torch finds them (its compile caches hash their source); interpreted kernels launch as they are
    kernel = _dequantize_kernel if interpreting() else wrap_triton(_dequantize_kernel)
    kernel[grid](*args, **constexprs)
    return out


def fit(config: KernelConfig, m: int) -> KernelConfig:
    """A gemv config for M rows: BLOCK_M 1 (GEMV) for one row, else 16 up to 64 covering all of M."""
    if config.path != "gemv":
        return config
    block_m = 1 if m <= 1 else max(16, min(triton.next_power_of_2(m), GEMV_MAX_M))
    return replace(config, block_m=block_m)


def late_scale(fmt: WeightFormat, scale: torch.Tensor, k: int, dtype: torch.dtype) -> bool:
    """Whether the per-row scale multiplies the accumulator after the K loop (LATE_SCALE)."""
    return group_size_of(fmt, k, scale) == 0 and not fmt.has_zero and fmt.codes_exact_in(dtype)


def matmul_launch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  bias: torch.Tensor | None, fmt: WeightFormat, config: KernelConfig,
                  out: torch.Tensor) -> tuple[tuple, tuple, dict]:
    """(grid, arguments, constexprs and launch options) of `_matmul_kernel` for x [M, K] (contiguous
    along K) into out [M, N]: what `run` launches and what the code-generation checks compile."""
    m, k = x.shape
    n = qweight.shape[0]
    grid = (cdiv(m, config.block_m) * cdiv(n, config.block_n),)
    args = (x, qweight, scale, zero if zero is not None else scale, bias if bias is not None else scale, out,
            m, n, k, x.stride(0), qweight.stride(0), _stride_sn(scale), out.stride(0))
    return grid, args, dict(
        format_constexprs(fmt, qweight, scale, k), EVEN_K=k % config.block_k == 0,
        LATE_SCALE=late_scale(fmt, scale, k, x.dtype),
        HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages)


def run(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
        bias: torch.Tensor | None, fmt: WeightFormat, config: KernelConfig) -> torch.Tensor:
    """Launch one config: x [M, K] -> [M, N] in x.dtype (tensors as the family launchers check them).
    gemv and gemm: exactly one kernel launch and no other op that writes memory."""
    m, k = x.shape
    n = qweight.shape[0]
    if config.path == "dequant":
        return torch.nn.functional.linear(x, dequantize(qweight, scale, zero, fmt, k, x.dtype), bias)
    out = empty((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return out
    grid, args, constexprs = matmul_launch(x, qweight, scale, zero, bias, fmt, config, out)
    kernel = _matmul_kernel if interpreting() else wrap_triton(_matmul_kernel)
    kernel[grid](*args, **constexprs)
    return out


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
