"""The reference backend: dequantize in pure torch, then F.linear. Any device, every scheme; the
numerical oracle of the tests. Slow by design (it dequantizes the whole weight on every call)."""

from __future__ import annotations

import torch

from ..kernels import reference as R
from . import Backend


class ReferenceBackend(Backend):
    name = "reference"

    def unavailable_reason(self, scheme, device: torch.device) -> str | None:
        if scheme.weight == "fp8" and device.type == "mps":
            return "MPS has no float8 dtypes"
        return None

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        scheme = layer.scheme
        if scheme.activation == "none":
            return R.linear_dequantized(x, layer.dequantize(), layer.bias)
        if scheme.activation == "int8_token":
            if scheme.group_size is None:
                return R.int8_dynamic_linear(x, layer.qweight, layer.scale, layer.bias)
            return R.int8_activation_linear(x, layer.dequantize(), layer.bias)
        qweight = layer.qweight.view(torch.float8_e4m3fn)
        if scheme.activation == "fp8_static":
            if not layer.calibrated:
                raise RuntimeError(
                    f"layer {layer.name!r} ({scheme.name}) has no calibrated activation scale: run "
                    f"quantrt.calibrate(model, example_inputs) first, or pass QuantConfig(..., activation_scale=...)"
                )
            return R.fp8_static_linear(x, qweight, layer.scale, layer.act_scale, layer.bias)
        return R.fp8_dynamic_linear(x, qweight, layer.scale, layer.bias, scheme.activation == "fp8_row")


BACKEND = ReferenceBackend()
