"""The triton backend: quantrt's own Triton weight-only kernels, through the torch ops of
quantrt.kernels.ops (quantrt::int8_linear, quantrt::uintx_linear, quantrt::floatx_linear, quantrt::gguf_linear),
which torch.compile(fullgraph=True) traces without graph breaks.

Serves every weight-only scheme (int8, uintX/int4, fpX, fp8, the GGUF block types) on CUDA, each through the op its storage format
names (`StorageFormat.kernel`: quantrt::<kind>_linear(x, stored tensors, bias, int arguments)); on CPU only with
TRITON_INTERPRET=1 set before quantrt is imported, when the same kernels run through Triton's interpreter (slow:
for tests).
bfloat16 inputs on CPU are computed in fp32 by the ops and rounded to bf16, since the interpreter gets
bf16 wrong (handled per call). Layers in other dtypes than fp16 / bf16 / fp32 (float64) are refused at
selection (`layer_unavailable_reason`), so `auto` passes over them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from . import Backend

try:
    from ..kernels import ops  # registers the quantrt:: ops
    from ..kernels.formats import FLOATX, GGUF, INT8, UINTX, WeightFormat
    from ..kernels.matmul import FLOAT_DTYPES, interpreter_mismatch

    # KernelFormat.kind -> the kernels' WeightFormat kind
    WEIGHT_FORMAT_KINDS = {"int8": INT8, "uintx": UINTX, "floatx": FLOATX, "gguf": GGUF}
except ImportError as e:  # no triton, or a torch without torch.library.triton_op
    ops = None
    _import_error = e

if TYPE_CHECKING:
    from ..formats import StorageFormat
    from ..modules import QuantizedLinear
    from ..schemes import Scheme


def weight_format(storage: StorageFormat) -> WeightFormat:
    """The kernels' WeightFormat of a storage format (what the launcher and the autotuner take)."""
    if ops is None:
        raise RuntimeError(f"the Triton kernels cannot be imported ({type(_import_error).__name__}: {_import_error})")
    kernel = storage.kernel
    return WeightFormat(WEIGHT_FORMAT_KINDS[kernel.kind], kernel.bits, kernel.ebits, kernel.mbits,
                        gguf=storage.name if kernel.kind == "gguf" else "")


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, scheme: Scheme, device: torch.device) -> str | None:
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

    def layer_unavailable_reason(self, scheme: Scheme, device: torch.device, shape: tuple[int, int],
                                 dtype: torch.dtype | None) -> str | None:
        if dtype is not None and dtype not in FLOAT_DTYPES:
            return f"the kernels compute in float16, bfloat16 or float32, not {dtype}"
        return None

    def linear(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        kernel = layer.scheme.storage.kernel
        rows = x.reshape(-1, layer.in_features)  # [M, K]; M may be 0
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        op = getattr(torch.ops.quantrt, kernel.op)
        y = op(rows, *[getattr(layer, name) for name in kernel.tensors], layer.bias, *kernel.arguments)
        return y.reshape(*x.shape[:-1], layer.out_features)


BACKEND = TritonBackend()
