"""Calibration of static activation scales (float8_static_activation_float8_weight)."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from .kernels.quantize import FP8_DTYPES
from .examples import run_examples
from .modules import QuantizedLinear


@torch.no_grad()
def calibrate(model: nn.Module, example_inputs: Iterable[Any]) -> int:
    """Run `model` on `example_inputs` and set every static-activation layer's scale to the largest
    |activation| seen divided by the fp8 maximum. Returns the number of layers calibrated."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.scheme.activation == "fp8_static"]
    if not layers:
        return 0
    fmax = torch.finfo(FP8_DTYPES["e4m3"]).max
    seen = {id(m): 0.0 for m in layers}

    def observe(module: QuantizedLinear, args: tuple) -> None:
        seen[id(module)] = max(seen[id(module)], float(args[0].detach().abs().amax()))
        module.act_scale.fill_(max(seen[id(module)], 1e-12) / fmax)
        module.calibrated = True

    handles = [m.register_forward_pre_hook(observe) for m in layers]
    try:
        run_examples(model, example_inputs, "calibrate")
    finally:
        for handle in handles:
            handle.remove()
    missed = [m.name for m in layers if not m.calibrated]
    if missed:
        raise RuntimeError(f"calibration inputs never reached layers {missed[:5]}; give inputs that exercise them")
    return len(layers)
