"""The triton backend: quantrt's own Triton weight-only kernels, through the torch ops of
quantrt.kernels.ops (quantrt::int8_linear, quantrt::uintx_linear, quantrt::floatx_linear), which
torch.compile(fullgraph=True) traces without graph breaks.

Serves every weight-only scheme (int8, uintX/int4, fpX, fp8) on CUDA; on CPU only with TRITON_INTERPRET=1
set before quantrt is imported, when the same kernels run through Triton's interpreter (slow: for tests).
bfloat16 inputs on CPU are computed in fp32 by the ops and rounded to bf16, since the interpreter gets
bf16 wrong (handled per call). Layers in other dtypes than fp16 / bf16 / fp32 (float64) are refused at
selection (`layer_unavailable_reason`), so `auto` passes over them.
"""

from __future__ import annotations

import os

import torch

from . import Backend

try:
    from ..kernels import ops  # registers the quantrt:: ops
    from ..kernels.matmul import FLOAT_DTYPES, interpreter_mismatch
    from ..kernels.floatx import FP8_FORMATS
except ImportError as e:  # no triton, or a torch without torch.library.triton_op
    ops = None
    _import_error = e


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, scheme, device: torch.device) -> str | None:
        device = torch.device(device)
        if scheme.activation != "none":
            return f"no own kernel yet for {scheme.activation} activations (weight-only schemes only)"
        if ops is None:
            return f"the Triton kernels cannot be imported ({type(_import_error).__name__}: {_import_error})"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available"
            if torch.cuda.get_device_capability(device) < (8, 0):
                return "the kernels need a GPU of compute capability 8.0 or newer (bf16 tensor cores)"
            return None
        if device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
            return ("Triton kernels need a CUDA device (or TRITON_INTERPRET=1 to run them through the "
                    "interpreter on CPU)")
        return interpreter_mismatch()

    def layer_unavailable_reason(self, scheme, device: torch.device, shape: tuple[int, int],
                                 dtype: torch.dtype | None) -> str | None:
        if dtype is not None and dtype not in FLOAT_DTYPES:
            return f"the kernels compute in float16, bfloat16 or float32, not {dtype}"
        return None

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        scheme = layer.scheme
        rows = x.reshape(-1, layer.in_features)  # [M, K]; M may be 0
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        if scheme.weight == "int8":
            y = torch.ops.quantrt.int8_linear(rows, layer.qweight, layer.scale, layer.bias)
        elif scheme.weight == "uintx":
            y = torch.ops.quantrt.uintx_linear(rows, layer.qweight, layer.scale, layer.zero, layer.bias, scheme.bits)
        elif scheme.weight == "fpx":
            y = torch.ops.quantrt.floatx_linear(rows, layer.qweight, layer.scale, layer.bias, scheme.ebits,
                                                scheme.mbits)
        else:
            ebits, mbits = FP8_FORMATS[scheme.fp8]
            y = torch.ops.quantrt.floatx_linear(rows, layer.qweight, layer.scale, layer.bias, ebits, mbits)
        return y.reshape(*x.shape[:-1], layer.out_features)


BACKEND = TritonBackend()
