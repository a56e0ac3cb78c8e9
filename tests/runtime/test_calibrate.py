"""quantrt.calibrate: static fp8 activation scales from the largest |activation| each layer sees."""

import pytest
import torch
import torch.nn as nn

from quantrt import QuantConfig, QuantizedLinear, QuantizedTransformer, calibrate
from quantrt.kernels.quantize import FP8_DTYPES

STATIC = QuantConfig("float8_static_activation_float8_weight", backend="reference")


def two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def test_each_scale_is_the_largest_activation_over_the_fp8_maximum():
    model = two_layers()
    inputs = [torch.randn(5, 64), 3 * torch.randn(2, 64)]
    with torch.no_grad():  # what each layer sees, from the full-precision model
        seen0 = max(float(x.abs().amax()) for x in inputs)
        seen1 = max(float(model[1](model[0](x)).abs().amax()) for x in inputs)
    qt = QuantizedTransformer.from_model(model, STATIC, progress=False)
    assert calibrate(qt.model, [(x,) for x in inputs]) == 2
    fmax = torch.finfo(FP8_DTYPES["e4m3"]).max
    first, second = qt.model[0], qt.model[2]
    assert isinstance(first, QuantizedLinear) and first.calibrated and second.calibrated
    torch.testing.assert_close(first.act_scale, torch.full((1, 1), seen0 / fmax), rtol=1e-6, atol=0)
    # the second layer sees the quantized first layer's output: within fp8 rounding of the full-precision one
    torch.testing.assert_close(second.act_scale, torch.full((1, 1), seen1 / fmax), rtol=0.1, atol=0)


def test_a_model_without_static_layers_has_nothing_to_calibrate():
    qt = QuantizedTransformer.from_model(two_layers(), "int8wo", progress=False)
    assert calibrate(qt.model, [torch.randn(1, 64)]) == 0


def test_layers_the_inputs_never_reach_are_named():
    model = nn.ModuleDict({"used": nn.Linear(64, 8), "unused": nn.Linear(64, 8)})
    QuantizedTransformer.from_model(model, STATIC, progress=False)

    class OnlyUsed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner["used"](x)

    with pytest.raises(RuntimeError, match=r"never reached layers \['unused'\]"):
        calibrate(OnlyUsed(), [torch.randn(2, 64)])


def test_no_inputs_is_an_error():
    qt = QuantizedTransformer.from_model(two_layers(), STATIC, progress=False)
    with pytest.raises(ValueError, match="calibrate needs at least one example input"):
        calibrate(qt.model, [])
