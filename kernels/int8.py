"""int8 weight-only linear: y = x @ (q * s)^T + bias, q int8 [N, K] symmetric, s per output channel [N, 1]
or per group [N, K / group_size] (quantize.quantize_int8).

The kernel, its configs and pruning are the generic ones of matmul.py and autotune.py with FORMAT =
INT8: int8 codes load 16 bytes at a time along K; with one scale per channel the scale multiplies the fp32
accumulator once after the K loop (int8 codes are exact in fp16/bf16, so tl.dot sees them unscaled).
"""

import torch

from .autotune import matmul
from .formats import INT8, WeightFormat
from .matmul import KernelConfig, check_inputs, dequantize

FORMAT = WeightFormat(INT8, 8)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                *, path: str | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """x [M, K] fp16/bf16/fp32, qweight int8 [N, K], scale [N, G] (G divides K), bias [N] or None ->
    [M, N] in x.dtype. `path` ("gemv", "gemm", "dequant") or `config` force a kernel config."""
    check_inputs(x, qweight, torch.int8, x.shape[-1], scale, None, bias)
    return matmul(x, qweight, scale, None, bias, FORMAT, path, config)


def int8_dequantize(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """qweight int8 [N, K], scale [N, G] -> W [N, K] in `dtype`, by the Triton dequantize kernel."""
    return dequantize(qweight, scale, None, FORMAT, qweight.shape[1], dtype)
