"""The quantrt torch ops, registered once with torch.library.triton_op so that
torch.compile(fullgraph=True) traces into them and Inductor sees the Triton kernels (wrap_triton):

    quantrt::int8_linear(x, qweight, scale, bias)                   int8.int8_linear
    quantrt::uintx_linear(x, qweight, scale, zero, bias, bits)      uintx.uintx_linear
    quantrt::floatx_linear(x, qweight, scale, bias, ebits, mbits)   floatx.floatx_linear (fpX, and fp8 as
                                                                    e4m3 = (4, 3), e5m2 = (5, 2))
    quantrt::gguf_linear(x, qweight, block_scales, bias, ggml_type) gguf.gguf_linear (the GGUF block types,
                                                                    by ggml type number: Q4_K = 12)

x is [M, K]; the group size follows from the scale's shape. triton_op registers the body itself as the
fake (meta) implementation: shapes come from tracing it.

Off CUDA the ops run the Triton kernels through the interpreter when TRITON_INTERPRET=1 (read at call
time), else the pure-torch reference (quantize.py's dequantizers, then reference.linear_dequantized);
fake tensors off CUDA always take the reference, since the interpreter needs data. The interpreter gets
bfloat16 wrong (triton issue 11584), so there bf16 inputs are computed in fp32 and the result rounded
to bf16.
"""

from typing import Optional

import torch
from torch.library import triton_op

from . import quantize as Q
from .matmul import interpreting
from .floatx import FP8_FORMATS
from .floatx import floatx_linear as _floatx_linear
from .gguf import gguf_linear as _gguf_linear
from .int8 import int8_linear as _int8_linear
from .packing import GGUF_BY_TYPE
from .reference import linear_dequantized
from .uintx import uintx_linear as _uintx_linear

FP8_KINDS = {formats: kind for kind, formats in FP8_FORMATS.items()}  # (ebits, mbits) -> "e4m3" / "e5m2"


def use_reference(x: torch.Tensor) -> bool:
    """Whether an op on x takes the pure-torch reference instead of a Triton kernel."""
    if x.device.type == "cuda":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not interpreting() or is_fake(x)


def _upcast(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    # bf16 -> fp32 for the interpreter (other dtypes kept)
    return [t.float() if t is not None and t.dtype == torch.bfloat16 else t for t in tensors]


def _bf16_interpreted(*tensors: torch.Tensor | None) -> bool:
    return interpreting() and any(t is not None and t.dtype == torch.bfloat16 for t in tensors)


@triton_op("quantrt::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ (qweight int8 [N, K] * scale [N, G])^T + bias [N] -> [M, N] in x.dtype."""
    if use_reference(x):
        return linear_dequantized(x, Q.dequantize_int8(qweight, scale), bias)
    if _bf16_interpreted(x, scale, bias):
        return _int8_linear(*_upcast(x), qweight, *_upcast(scale, bias)).to(x.dtype)
    return _int8_linear(x, qweight, scale, bias)


@triton_op("quantrt::uintx_linear", mutates_args=())
def uintx_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: Optional[torch.Tensor], bits: int) -> torch.Tensor:
    """x [M, K] @ ((unpack(qweight uint8 [N, K * bits / 8]) - zero) * scale)^T + bias -> [M, N] in
    x.dtype; scale, zero [N, G]."""
    if use_reference(x):
        return linear_dequantized(x, Q.dequantize_uintx(qweight, scale, zero, bits, x.shape[-1]), bias)
    if _bf16_interpreted(x, scale, zero, bias):
        return _uintx_linear(*_upcast(x), qweight, *_upcast(scale, zero, bias), bits).to(x.dtype)
    return _uintx_linear(x, qweight, scale, zero, bias, bits)


@triton_op("quantrt::floatx_linear", mutates_args=())
def floatx_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                  ebits: int, mbits: int) -> torch.Tensor:
    """x [M, K] @ (decode(qweight uint8 [N, K * X / 8]) * scale [N, 1])^T + bias -> [M, N] in x.dtype;
    X = 1 + ebits + mbits in 3..7, or 8 for fp8 (e4m3fn: 4, 3; e5m2: 5, 2; scale also [1, 1])."""
    if use_reference(x):
        if 1 + ebits + mbits == 8:
            weight = Q.dequantize_fp8(qweight.view(Q.FP8_DTYPES[FP8_KINDS[(ebits, mbits)]]), scale)
        else:
            weight = Q.dequantize_floatx(qweight, scale, ebits, mbits, x.shape[-1])
        return linear_dequantized(x, weight, bias)
    if _bf16_interpreted(x, scale, bias):
        return _floatx_linear(*_upcast(x), qweight, *_upcast(scale, bias), ebits, mbits).to(x.dtype)
    return _floatx_linear(x, qweight, scale, bias, ebits, mbits)


@triton_op("quantrt::gguf_linear", mutates_args=())
def gguf_linear(x: torch.Tensor, qweight: torch.Tensor, block_scales: torch.Tensor, bias: Optional[torch.Tensor],
                ggml_type: int) -> torch.Tensor:
    """x [M, K] @ W^T + bias -> [M, N] in x.dtype, W the GGUF weight of ggml type `ggml_type` (Q8_0 = 8, Q4_K =
    12, ...) stored as qweight and block_scales (quantize.pack_gguf)."""
    if use_reference(x):
        if ggml_type not in GGUF_BY_TYPE:
            raise ValueError(f"ggml type {ggml_type} is not a GGUF block type quantrt serves")
        weight = Q.dequantize_gguf(qweight, block_scales, GGUF_BY_TYPE[ggml_type].name, x.shape[-1])
        return linear_dequantized(x, weight, bias)
    if _bf16_interpreted(x, bias):
        return _gguf_linear(*_upcast(x), qweight, block_scales, *_upcast(bias), ggml_type).to(x.dtype)
    return _gguf_linear(x, qweight, block_scales, bias, ggml_type)
