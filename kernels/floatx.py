"""Floating-point weight-only linears: y = x @ (decode(c) * s)^T + bias, s per output channel [N, 1].

    fpX   X-bit codes, 1 sign, E exponent and M mantissa bits (X = 1 + E + M, 3 <= X <= 7), bias
          2**(E-1) - 1, subnormals, no inf/nan, packed in the bit-plane layout of packing.py
          (quantize.quantize_floatx)
    fp8   float8_e4m3fn (E 4, M 3) or float8_e5m2 (E 5, M 2) stored as their uint8 bits [N, K], scale
          [N, 1] or per tensor [1, 1] (quantize.quantize_fp8); no fp8 inf/nan code occurs (quantize
          clamps), so the fpX decoding serves them too

The kernel, its configs and pruning are the generic ones of matmul.py and autotune.py with FORMAT =
FLOATX, BITS = X: codes are decoded by moving exponent and mantissa into float32's fields (subnormals scaled
from the mantissa); on CUDA with SM >= 8.9 fp8 codes go through the hardware conversion instead.
"""

import torch

from .autotune import matmul
from .formats import FLOATX, WeightFormat
from .matmul import KernelConfig, check_inputs, dequantize
from .packing import k_alignment, packed_bytes
from .quantize import FP8_DTYPES, check_floatx

FP8_FORMATS = {"e4m3": (4, 3), "e5m2": (5, 2)}  # fp8 kind -> (ebits, mbits)


def _format(ebits: int, mbits: int, k: int) -> WeightFormat:
    bits = 1 + ebits + mbits
    if bits == 8:
        if (ebits, mbits) not in FP8_FORMATS.values():
            raise ValueError(f"8-bit floats are fp8 e4m3fn (ebits 4, mbits 3) or e5m2 (5, 2), got e{ebits}m{mbits}")
    else:
        check_floatx(ebits, mbits)
    if k % k_alignment(bits):
        raise ValueError(f"{bits}-bit codes need K to be a multiple of {k_alignment(bits)}, got K={k}")
    return WeightFormat(FLOATX, bits, ebits, mbits)


def floatx_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  ebits: int, mbits: int, *, path: str | None = None,
                  config: KernelConfig | None = None) -> torch.Tensor:
    """x [M, K] fp16/bf16/fp32, qweight uint8 [N, K * X / 8] (X = 1 + ebits + mbits; fp8: [N, K]),
    scale [N, 1] (fp8 also [1, 1]), bias [N] or None -> [M, N] in x.dtype. `path` ("gemv", "gemm",
    "dequant") or `config` force a kernel config."""
    k = x.shape[-1]
    fmt = _format(ebits, mbits, k)
    if scale.dim() == 2 and scale.shape[-1] != 1:
        raise ValueError(f"fpX and fp8 weights have one scale per output channel, got scale {tuple(scale.shape)}")
    check_inputs(x, qweight, torch.uint8, packed_bytes(k, fmt.bits), scale, None, bias, per_tensor=fmt.bits == 8)
    return matmul(x, qweight, scale, None, bias, fmt, path, config)


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               fp8: str, *, path: str | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """`floatx_linear` for fp8 `fp8` ("e4m3" or "e5m2"); qweight [N, K] as float8 or its uint8 bits."""
    if qweight.dtype in FP8_DTYPES.values():
        qweight = qweight.view(torch.uint8)
    return floatx_linear(x, qweight, scale, bias, *FP8_FORMATS[fp8], path=path, config=config)


def floatx_dequantize(qweight: torch.Tensor, scale: torch.Tensor, ebits: int, mbits: int, k: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """qweight uint8 [N, K * X / 8], scale [N, 1] or [1, 1] -> W [N, K] in `dtype`, by the Triton
    dequantize kernel."""
    return dequantize(qweight, scale, None, _format(ebits, mbits, k), k, dtype)
