"""Pure-torch linear layers over quantized weights: the numerical oracle of every kernel and backend.

x: [..., K] in the compute dtype (bf16/fp16/fp32); weights as written by quantize.py; bias [N] or None.
Weight-only formats dequantize to float32, cast to x's dtype and call F.linear, which is what a fused
kernel computes up to accumulation order. Dynamic-activation formats quantize x per token / row / tensor in
the forward and multiply the integer or fp8 codes exactly in float32 before applying both scales.
"""

import torch
import torch.nn.functional as F

from .quantize import quantize_fp8_dynamic, quantize_fp8_static, quantize_int8_per_token


def linear_dequantized(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ weight^T + bias, weight a dequantized float tensor [N, K]."""
    return F.linear(x, weight.to(x.dtype), bias)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # y: float32 [M, N] -> x.dtype [..., N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def int8_dynamic_linear(
    x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """int8 per-token activations x int8 per-channel weights. qweight int8 [N, K], wscale [N, 1]."""
    xq, xscale = quantize_int8_per_token(_rows(x))
    y = F.linear(xq.float(), qweight.float()) * xscale * wscale.float().reshape(1, -1)
    return _finish(y, x, bias)


def int8_activation_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """int8 per-token activations x an already dequantized float weight [N, K] (grouped weights, whose
    scales cannot be taken out of the K sum)."""
    xq, xscale = quantize_int8_per_token(_rows(x))
    y = F.linear(xq.float() * xscale, weight.float())
    return _finish(y, x, bias)


def fp8_dynamic_linear(
    x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None, per_row: bool
) -> torch.Tensor:
    """fp8 e4m3 dynamic activations (per row or per tensor) x fp8 weights (wscale [N, 1] or [1, 1])."""
    xq, xscale = quantize_fp8_dynamic(_rows(x), "e4m3", per_row)
    y = F.linear(xq.float(), qweight.float()) * xscale * wscale.float().reshape(1, -1)
    return _finish(y, x, bias)


def fp8_static_linear(
    x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, act_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """fp8 e4m3 activations with a calibrated static scale act_scale [1, 1] x fp8 weights."""
    xq = quantize_fp8_static(_rows(x), "e4m3", act_scale.float())
    y = F.linear(xq.float(), qweight.float()) * act_scale.float() * wscale.float().reshape(1, -1)
    return _finish(y, x, bias)
