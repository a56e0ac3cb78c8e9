"""quantrt.checkpoints.common: what the converting loaders share: the QuantConfig that describes what was loaded,
the layer a checkpoint names, converted tensors put into the skeleton, and the errors that name the layer."""

import pytest
import torch
import torch.nn as nn

from quantrt import QuantizedLinear
from quantrt.checkpoints.common import (check_complete, check_packable, install_layer, linear_layer,
                                        loaded_quant_config, scheme_for_layer, set_plain_tensor)
from quantrt.schemes import resolve_scheme
from quantrt.serialization import CheckpointError


def skeleton() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16, bias=False))


def test_the_loaded_config_names_the_common_scheme_and_the_exceptions():
    int8, int4 = resolve_scheme("int8wo"), resolve_scheme("int4wo", 32)
    config = loaded_quant_config({"a": int8, "b": int8, "c": int4}, {"d": "not quantized"}, None)
    assert config.scheme == int8 and config.backend == "auto"
    assert config.plan("a").scheme == int8 and config.plan("c").scheme == int4 and config.plan("d").scheme is None
    assert loaded_quant_config({"a": int4}, {}, "reference").plan("a").scheme == int4


def test_a_named_layer_must_be_a_linear_of_the_model():
    model = skeleton()
    assert linear_layer(model, "0", "the map") is model[0]
    with pytest.raises(CheckpointError, match="the map quantizes layer 'nope', which the model does not have"):
        linear_layer(model, "nope", "the map")
    with pytest.raises(CheckpointError, match="layer '1', a ReLU: quantrt quantizes nn.Linear layers only"):
        linear_layer(model, "1", "the map")


def test_converted_tensors_go_into_the_skeleton_as_stored():
    model = skeleton()
    scheme = resolve_scheme("int8wo")
    weight = torch.randn(32, 64)
    tensors = scheme.quantize(weight)
    install_layer(model, "0", scheme, tensors, torch.ones(32), torch.float32, torch.device("cpu"))
    layer = model[0]
    assert isinstance(layer, QuantizedLinear) and layer.scheme == scheme
    for key, tensor in tensors.items():
        assert torch.equal(getattr(layer, key), tensor)
    assert torch.equal(layer.bias, torch.ones(32))


def test_a_converted_tensor_of_the_wrong_shape_or_a_bias_of_the_wrong_length_is_refused():
    scheme = resolve_scheme("int8wo")
    tensors = scheme.quantize(torch.randn(32, 64))
    with pytest.raises(CheckpointError, match=r"layer '0': bias of shape \[31\] for a 32x64 Linear"):
        install_layer(skeleton(), "0", scheme, tensors, torch.ones(31), torch.float32, torch.device("cpu"))
    tensors["scale"] = tensors["scale"][:-1]
    with pytest.raises(CheckpointError, match="converted scale is torch.float32 \\[31, 1\\]"):
        install_layer(skeleton(), "0", scheme, tensors, None, torch.float32, torch.device("cpu"))


def test_plain_tensors_need_a_place_and_the_right_shape():
    model = nn.Sequential(nn.Linear(4, 2))
    expected = dict(model.state_dict(keep_vars=True))
    set_plain_tensor(model, expected, "0.bias", torch.full((2,), 3.0), torch.device("cpu"), torch.float16, "f")
    assert model[0].bias.dtype == torch.float16 and torch.equal(model[0].bias, torch.full((2,), 3.0, dtype=torch.float16))
    with pytest.raises(CheckpointError, match="tensor 'extra' of f has no place in Sequential"):
        set_plain_tensor(model, expected, "extra", torch.zeros(1), torch.device("cpu"), None, "f")
    with pytest.raises(CheckpointError, match=r"has shape \[3\], the model expects \[2\]"):
        set_plain_tensor(model, expected, "0.bias", torch.zeros(3), torch.device("cpu"), None, "f")


def test_a_skeleton_with_tensors_left_on_meta_is_incomplete():
    with pytest.raises(CheckpointError, match=r"folder has no value for 3 tensors of the model, e.g. \['0.weight'"):
        check_complete(skeleton(), "folder")
    check_complete(nn.Linear(2, 2), "folder")


def test_group_sizes_and_shapes_quantrt_cannot_store_name_the_layer():
    assert scheme_for_layer("int4wo", 64, "up", "g64") == resolve_scheme("int4wo", 64)
    assert scheme_for_layer("int8wo", None, "up", "per channel").group_size is None
    with pytest.raises(CheckpointError, match="layer 'up': groups of 96, which quantrt cannot store"):
        scheme_for_layer("int4wo", 96, "up", "groups of 96")
    with pytest.raises(CheckpointError, match="layer 'up': its 8x100 weight cannot be stored as uint4wo"):
        check_packable(resolve_scheme("uint4wo", 4 * 8), 8, 100, "up")
