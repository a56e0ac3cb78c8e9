"""optimum-quanto checkpoints (quantrt.checkpoints.quanto), written here the way quanto's and diffusers' users
write them, loaded with quantrt and compared with quanto's own numbers."""

import json
import warnings

import optimum.quanto as quanto
import pytest
import torch
import torch.nn as nn

from quantrt import QuantizedTransformer
from quantrt.checkpoints.quanto import quanto_to_quantrt
from quantrt.models import flux_inputs
from quantrt.serialization import CheckpointError

from .writers import diffusers_load, linear_stack, linears, save_quanto, tiny_flux_folder

EPS32 = torch.finfo(torch.float32).eps


def quanto_bound(weight: torch.Tensor) -> float:
    # quantrt computes (code - shift / scale) * scale, quanto scale * code - shift: a few roundings apart
    return 4 * EPS32 * float(weight.detach().abs().max())


QUANTO_SCHEMES = {  # qtype -> quantrt scheme and group size of the four layers of linear_stack
    "qint8": ("int8wo", [None, None, None, None]),
    "qint4": ("int4wo", [128, 64, 8, 128]),
    "qint2": ("uint2wo", [128, 64, 8, 128]),
    "qfloat8_e4m3fn": ("float8wo_e4m3", [None, None, None, None]),
    "qfloat8_e5m2": ("float8wo_e5m2", [None, None, None, None]),
}


@pytest.mark.parametrize("qtype", list(QUANTO_SCHEMES))
def test_quanto_checkpoint_loads_with_quantos_numbers(tmp_path, qtype):
    model = linear_stack()
    quanto.quantize(model, weights=quanto.qtypes[qtype])
    quanto.freeze(model)
    folder = save_quanto(model, tmp_path / "quanto")
    qt = QuantizedTransformer.from_pretrained(folder, model=linear_stack, backend="reference")
    scheme, groups = QUANTO_SCHEMES[qtype]
    assert len(linears(model)) == len(groups)
    for (name, theirs), group in zip(linears(model).items(), groups):
        ours = qt.model.get_submodule(name)
        assert (ours.scheme.name, ours.scheme.group_size) == (scheme, group), name
        expected = theirs.weight.dequantize()
        if qtype in ("qint4", "qint2"):
            torch.testing.assert_close(ours.dequantize(), expected, rtol=0, atol=quanto_bound(expected))
        else:  # the same codes and scales: bit for bit
            torch.testing.assert_close(ours.dequantize(), expected, rtol=0, atol=0)
    x = torch.randn(3, 7, 256)
    with torch.no_grad():
        torch.testing.assert_close(qt(x), model(x), rtol=1e-5, atol=1e-6)
    # and it is an ordinary quantrt model from here on: saved and reloaded as such, layer schemes included
    qt.save_pretrained(tmp_path / "quantrt")
    again = QuantizedTransformer.from_pretrained(tmp_path / "quantrt", model=linear_stack, backend="reference")
    torch.testing.assert_close(again(x), qt(x), rtol=0, atol=0)
    assert [r.scheme for r in again.summary()] == [r.scheme for r in qt.summary()]


@pytest.mark.parametrize("case", ["integer_zero_points", "constant_group"])
def test_quanto_integer_zero_points_and_constant_groups(case):
    """Two corners of quanto's qint4 format: integer shifts (MaxOptimizer(zeropoint=True)) map exactly, and
    a group of equal weights (scale 0, w = -shift) keeps its value."""
    weight = torch.randn(16, 256)
    if case == "constant_group":
        weight[3, 128:] = 0.3
    scale, shift = quanto.MaxOptimizer()(weight, qtype=quanto.qint4, axis=0, group_size=128,
                                         zeropoint=case == "integer_zero_points")
    theirs = quanto.quantize_weight(weight, quanto.qint4, axis=0, scale=scale, shift=shift, group_size=128,
                                    optimized=False)
    state = {}
    theirs.save_to_state_dict(state, "layer.weight.", keep_vars=False)
    parts = {key.removeprefix("layer.weight."): tensor for key, tensor in state.items()}
    scheme, tensors, _ = quanto_to_quantrt("layer", "qint4", parts, 16, 256, None)
    ours, expected = scheme.dequantize(tensors, 256), theirs.dequantize()
    if case == "integer_zero_points":
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    else:
        assert float(scale.reshape(16, 2)[3, 1]) == 0.0
        torch.testing.assert_close(ours[3, 128:], torch.full((128,), 0.3), rtol=0, atol=0)
        torch.testing.assert_close(ours, expected, rtol=0, atol=quanto_bound(expected))


@pytest.mark.parametrize("how,weights", [("diffusers", "int8"), ("diffusers", "float8"), ("quanto", "qint4")])
def test_quanto_quantized_tiny_flux(tmp_path, how, weights):
    model, unquantized = tiny_flux_folder(tmp_path)
    if how == "diffusers":  # FluxTransformer2DModel.from_pretrained(..., quantization_config=QuantoConfig(...))
        from diffusers import QuantoConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = diffusers_load(unquantized, QuantoConfig(weights_dtype=weights))
        theirs.save_pretrained(tmp_path / "quanto", max_shard_size="300KB")  # shards: a layer may span two
        saved = json.loads((tmp_path / "quanto" / "config.json").read_text())
        assert saved["quantization_config"]["quant_method"] == "quanto"
    else:
        theirs = model
        quanto.quantize(theirs, weights=quanto.qtypes[weights])
        quanto.freeze(theirs)
        save_quanto(theirs, tmp_path / "quanto")
        (tmp_path / "quanto" / "config.json").write_text((unquantized / "config.json").read_text())
    qt = QuantizedTransformer.from_pretrained(tmp_path / "quanto", backend="reference")  # no skeleton: config.json
    assert all(r.quantized for r in qt.summary())
    inputs = flux_inputs(qt.model, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(qt(**inputs)[0], theirs(**inputs)[0], rtol=1e-4, atol=1e-5)


def quanto_model(kind: str) -> tuple[nn.Module, str]:
    """A frozen quanto model that quantrt must refuse, and the words the error must contain."""
    if kind == "activations":
        model = linear_stack()
        quanto.quantize(model, weights=quanto.qint8, activations=quanto.qint8)
        return model, "layer '0' quantizes its activations"
    if kind == "group_of_96":  # K=288: quanto's groups of 128 do not divide it, 96 does
        model = nn.Sequential(nn.Linear(288, 16))
        quanto.quantize(model, weights=quanto.qint4)
        return model, "layer '0'.*groups of 96"
    if kind == "e4m3fnuz":
        model = linear_stack()
        quanto.quantize(model, weights=quanto.qtypes["qfloat8_e4m3fnuz"])
        return model, "layer '0'.*qfloat8_e4m3fnuz"
    model = linear_stack()
    quanto.quantize(model, weights=quanto.qint8)
    return model, "layer '0'.*freeze"  # saved before freeze: the weight is still float


@pytest.mark.parametrize("kind", ["activations", "group_of_96", "e4m3fnuz", "not_frozen"])
def test_quanto_formats_without_a_quantrt_scheme_are_refused(tmp_path, kind):
    model, message = quanto_model(kind)
    if kind != "not_frozen":
        quanto.freeze(model)
    folder = save_quanto(model, tmp_path / "quanto")
    skeleton = (lambda: nn.Sequential(nn.Linear(288, 16))) if kind == "group_of_96" else linear_stack
    with pytest.raises(CheckpointError, match=message):
        QuantizedTransformer.from_pretrained(folder, model=skeleton)
