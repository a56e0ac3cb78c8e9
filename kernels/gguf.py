"""GGUF weight-only linear: y = x @ W^T + bias for the GGUF block types (llama.cpp's Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in quantrt's layout (packing.GGUF_BLOCKS, quantize.pack_gguf): codes in bit planes
(Q8_0: int8 [N, K]), and per block its fp16 scale (and min) and its integer sub-block scales (and mins),
W = (q - offset) * a - b per group (formats.apply_gguf_params).

The kernel, its configs and pruning are the generic ones of matmul.py and autotune.py with FORMAT = GGUF: the
codes load as every bit-plane format's do (32-bit words where K % 32 == 0, which every GGUF row is), the block
parameters of a tile's groups are gathered once per tile, and each weight is rounded once, as gguf's own
dequantize rounds it (the dequantize path's float32 weight equals gguf.quants.dequantize bit for bit).
"""

import torch

from .autotune import matmul
from .formats import GGUF, WeightFormat
from .matmul import FLOAT_DTYPES, KernelConfig, byte_address, dequantize
from .packing import GGUF_BY_TYPE, GgufBlocks


def gguf_format(ggml_type: int) -> WeightFormat:
    """The kernels' format of a GGUF block type, by its ggml type number (Q4_K: 12)."""
    blocks = GGUF_BY_TYPE.get(ggml_type)
    if blocks is None:
        raise ValueError(f"ggml type {ggml_type} is not a GGUF block type quantrt's kernels serve; they serve "
                         f"{', '.join(f'{b.name} ({t})' for t, b in GGUF_BY_TYPE.items())}")
    return WeightFormat(GGUF, blocks.bits, gguf=blocks.name)


def check_gguf_inputs(x: torch.Tensor | None, qweight: torch.Tensor, block_scales: torch.Tensor, k: int,
                      blocks: GgufBlocks, bias: torch.Tensor | None = None) -> None:
    """Raise ValueError unless qweight and block_scales are `blocks`' tensors of an [N, k] weight (contiguous
    rows), and x (where given) is fp16/bf16/fp32 [M, k] and bias None or [N], all on one device."""
    def fail(what: str):
        raise ValueError(f"quantrt {blocks.name} linear: {what}")
    if k % blocks.block:
        fail(f"K={k} is not a multiple of {blocks.name}'s block of {blocks.block} weights")
    if x is not None and (x.dim() != 2 or x.dtype not in FLOAT_DTYPES or x.shape[1] != k):
        fail(f"x must be a 2-D fp16/bf16/fp32 tensor [M, {k}], got {x.dtype} {tuple(x.shape)}")
    code_dtype = torch.int8 if blocks.signed_codes else torch.uint8
    if qweight.dtype != code_dtype or qweight.dim() != 2 or qweight.shape[1] != blocks.code_bytes(k):
        fail(f"qweight must be {code_dtype} [N, {blocks.code_bytes(k)}] for K={k}, got {qweight.dtype} "
             f"{tuple(qweight.shape)}")
    n = qweight.shape[0]
    row = k // blocks.block * blocks.param_bytes
    if block_scales.dtype != torch.uint8 or tuple(block_scales.shape) != (n, row):
        fail(f"block_scales must be torch.uint8 [{n}, {row}], got {block_scales.dtype} {tuple(block_scales.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or bias.dtype not in FLOAT_DTYPES):
        fail(f"bias must be a float [N={n}] tensor or None, got {bias.dtype} {tuple(bias.shape)}")
    tensors = [t for t in (x, qweight, block_scales, bias) if t is not None]
    if any(t.device != tensors[0].device for t in tensors):
        fail(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    if qweight.stride(-1) != 1 or block_scales.stride(-1) != 1:
        fail("qweight and block_scales must be contiguous along their last dimension")
    if byte_address(block_scales) % 2 or block_scales.stride(0) % 2:
        fail("block_scales must start on a 2-byte boundary with an even row stride (the kernels read its fp16 "
             "scales as 16-bit words): pass a fresh tensor (block_scales.clone())")


def gguf_linear(x: torch.Tensor, qweight: torch.Tensor, block_scales: torch.Tensor, bias: torch.Tensor | None,
                ggml_type: int, *, path: str | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """x [M, K] fp16/bf16/fp32, qweight and block_scales of the GGUF block type `ggml_type` (quantize.pack_gguf),
    bias [N] or None -> [M, N] in x.dtype. `path` ("gemv", "gemm", "dequant") or `config` force a kernel config."""
    fmt = gguf_format(ggml_type)
    check_gguf_inputs(x, qweight, block_scales, x.shape[-1], fmt.blocks, bias)
    return matmul(x, qweight, block_scales, None, bias, fmt, path, config)


def gguf_dequantize(qweight: torch.Tensor, block_scales: torch.Tensor, ggml_type: int, k: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """qweight, block_scales of an [N, K] weight -> W [N, K] in `dtype`, by the Triton dequantize kernel."""
    fmt = gguf_format(ggml_type)
    check_gguf_inputs(None, qweight, block_scales, k, fmt.blocks)
    return dequantize(qweight, block_scales, None, fmt, k, dtype)
