"""uintX weight-only linear (int4wo is X = 4): y = x @ ((q - z) * s)^T + bias, q unsigned X-bit codes
(1 <= X <= 8) packed along K in the bit-plane layout of packing.py, s and z per group [N, K / group_size]
(quantize.quantize_uintx).

The kernel, its configs and pruning are the generic ones of matmul.py and autotune.py with FORMAT =
UINTX: where K % 32 == 0 each bit plane is read as 32-bit words (8 codes of the 4-bit plane, 16 of the
2-bit, 32 of the 1-bit) that vectorize into 16-byte loads; otherwise byte by byte (formats.py).
"""

import torch

from .autotune import matmul
from .formats import UINTX, WeightFormat
from .matmul import KernelConfig, check_inputs, dequantize
from .packing import k_alignment, packed_bytes


def _format(bits: int, k: int) -> WeightFormat:
    if not 1 <= bits <= 8:
        raise ValueError(f"uintx codes have 1 to 8 bits, got {bits}")
    if k % k_alignment(bits):
        raise ValueError(f"{bits}-bit codes need K to be a multiple of {k_alignment(bits)}, got K={k}")
    return WeightFormat(UINTX, bits)


def uintx_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None, bits: int, *, path: str | None = None,
                 config: KernelConfig | None = None) -> torch.Tensor:
    """x [M, K] fp16/bf16/fp32, qweight uint8 [N, K * bits / 8], scale and zero [N, G] (G divides K),
    bias [N] or None -> [M, N] in x.dtype. `path` ("gemv", "gemm", "dequant") or `config` force a
    kernel config."""
    k = x.shape[-1]
    fmt = _format(bits, k)
    check_inputs(x, qweight, torch.uint8, packed_bytes(k, bits), scale, zero, bias)
    return matmul(x, qweight, scale, zero, bias, fmt, path, config)


def uintx_dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, k: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """qweight uint8 [N, K * bits / 8], scale/zero [N, G] -> W [N, K] in `dtype`, by the Triton
    dequantize kernel."""
    return dequantize(qweight, scale, zero, _format(bits, k), k, dtype)
