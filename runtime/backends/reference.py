"""The reference backend: dequantize in pure torch, then F.linear. Any device, every scheme; the
numerical oracle of the tests. Slow by design (it dequantizes the whole weight on every call)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..kernels import reference as R
from ..kernels.quantize import FP8_DTYPES
from . import Backend

if TYPE_CHECKING:
    from ..modules import QuantizedLinear
    from ..schemes import Scheme


class ReferenceBackend(Backend):
    name = "reference"

    def unavailable_reason(self, scheme: Scheme, device: torch.device) -> str | None:
        if device.type == "mps" and scheme.storage.code_dtype in FP8_DTYPES.values():
            return "MPS has no float8 dtypes"
        return None

    def linear(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        scheme = layer.scheme
        if scheme.activation == "none":
            return R.linear_dequantized(x, layer.dequantize(), layer.bias)
        if scheme.activation == "int8_token":
            if scheme.group_size is None:
                return R.int8_dynamic_linear(x, layer.qweight, layer.scale, layer.bias)
            return R.int8_activation_linear(x, layer.dequantize(), layer.bias)
        qweight = layer.qweight.view(scheme.storage.code_dtype)  # the fp8 activation schemes' weights are fp8
        if scheme.activation == "fp8_static":
            if not layer.calibrated:
                raise RuntimeError(
                    f"layer {layer.name!r} ({scheme.name}) has no calibrated activation scale: run "
                    f"quantrt.calibrate(model, example_inputs) first, or pass QuantConfig(..., activation_scale=...)"
                )
            return R.fp8_static_linear(x, qweight, layer.scale, layer.act_scale, layer.bias)
        return R.fp8_dynamic_linear(x, qweight, layer.scale, layer.bias, scheme.activation == "fp8_row")


BACKEND = ReferenceBackend()
