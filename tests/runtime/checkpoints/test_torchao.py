"""torchao safetensors checkpoints (quantrt.checkpoints.torchao), written by torchao and by diffusers'
TorchAoConfig, loaded with quantrt and compared with torchao's own numbers."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchao.quantization as torchao_quantization
from safetensors.torch import save_file
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

from quantrt import QuantizedTransformer
from quantrt.models import flux_inputs
from quantrt.serialization import CheckpointError

from .writers import diffusers_load, linears, tiny_flux_folder


@pytest.fixture(autouse=True)
def restore_inductor_config():
    """The checkpoints here are made by torchao and diffusers' TorchAoConfig, whose configs default to
    set_inductor_config=True (coordinate descent tuning, int_mm fusion): global Inductor settings that would
    change the cache keys of every later compilation in this test process. Put them back."""
    import torch._inductor.config as inductor_config

    saved = inductor_config.save_config()
    yield
    inductor_config.load_config(saved)


def save_torchao(model: nn.Module, folder: Path) -> Path:
    """torchao's safetensors support: flattened tensors plus the metadata that rebuilds them."""
    folder.mkdir(parents=True)
    tensors, metadata = flatten_tensor_state_dict(model.state_dict())
    save_file(tensors, folder / "model.safetensors", metadata=metadata)
    return folder


def torchao_config(name: str):
    q = torchao_quantization
    return {
        "int8_per_row": lambda: q.Int8WeightOnlyConfig(),
        "int8_group32": lambda: q.Int8WeightOnlyConfig(granularity=q.PerGroup(32)),
        "int4_asym_group32": lambda: q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=q.PerGroup(32),
                                                            mapping_type=q.MappingType.ASYMMETRIC),
        "int2_sym_group32": lambda: q.IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=q.PerGroup(32)),
        "int3_asym_per_row": lambda: q.IntxWeightOnlyConfig(weight_dtype=torch.int3, granularity=q.PerAxis(0),
                                                            mapping_type=q.MappingType.ASYMMETRIC),
        "int8_intx_per_row": lambda: q.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=q.PerAxis(0)),
        "fp8_e4m3": lambda: q.Float8WeightOnlyConfig(),
        "fp8_e5m2": lambda: q.Float8WeightOnlyConfig(weight_dtype=torch.float8_e5m2),
        "int8_dynamic_activations": lambda: q.Int8DynamicActivationInt8WeightConfig(),
        "int8_intx_asymmetric": lambda: q.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=q.PerAxis(0),
                                                               mapping_type=q.MappingType.ASYMMETRIC),
    }[name]()


def torchao_stack() -> nn.Module:
    # every K a multiple of torchao's group of 32
    return nn.Sequential(nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 32), nn.Linear(32, 128, bias=False))


TORCHAO_SCHEMES = {  # torchao config -> quantrt scheme and group size of every layer
    "int8_per_row": ("int8wo", None), "int8_group32": ("int8wo", 32), "int4_asym_group32": ("int4wo", 32),
    "int2_sym_group32": ("uint2wo", 32), "int3_asym_per_row": ("uint3wo", "K"),
    "int8_intx_per_row": ("int8wo", None), "fp8_e4m3": ("float8wo_e4m3", None), "fp8_e5m2": ("float8wo_e5m2", None),
}


@pytest.mark.parametrize("config", list(TORCHAO_SCHEMES))
def test_torchao_checkpoint_loads_with_torchaos_numbers(tmp_path, config):
    model = torchao_stack()
    torchao_quantization.quantize_(model, torchao_config(config))
    folder = save_torchao(model, tmp_path / "torchao")
    qt = QuantizedTransformer.from_pretrained(folder, model=torchao_stack, backend="reference")
    scheme, group = TORCHAO_SCHEMES[config]
    for name, theirs in linears(model).items():
        ours = qt.model.get_submodule(name)
        expected_group = ours.in_features if group == "K" else group
        if scheme == "int8wo" and expected_group == ours.in_features:
            expected_group = None  # int8 in one group per row is quantrt's per-channel int8wo
        assert (ours.scheme.name, ours.scheme.group_size) == (scheme, expected_group), name
        torch.testing.assert_close(ours.dequantize(), theirs.weight.dequantize(), rtol=0, atol=0)
    x = torch.randn(5, 3, 256)
    with torch.no_grad():
        torch.testing.assert_close(qt(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config,torch_dtype", [("int4_asym_group32", None), ("int8_per_row", None),
                                                ("int8_per_row", torch.float32)],
                         ids=["intx_bf16_scales", "int8_fp32_scales_rounded_to_bf16", "int8_torch_dtype_fp32"])
def test_torchao_bf16_checkpoint(tmp_path, config, torch_dtype):
    model = torchao_stack().to(torch.bfloat16)
    torchao_quantization.quantize_(model, torchao_config(config))
    folder = save_torchao(model, tmp_path / "torchao")
    qt = QuantizedTransformer.from_pretrained(folder, model=torchao_stack, backend="reference",
                                              torch_dtype=torch_dtype)
    for name, theirs in linears(model).items():
        ours = qt.model.get_submodule(name)
        if torch_dtype is torch.float32:  # torchao's float32 scales kept: torchao's weight exactly, in float32
            assert ours.scale.dtype == torch.float32
            torch.testing.assert_close(ours.dequantize(), theirs.weight.dequantize(torch.float32), rtol=0, atol=0)
        elif config == "int4_asym_group32":  # bf16 scales and integer zero points: exact
            torch.testing.assert_close(ours.dequantize().to(torch.bfloat16), theirs.weight.dequantize(), rtol=0, atol=0)
        else:  # Int8Tensor keeps float32 scales, quantrt the layer's bf16: one rounding of each scale
            assert ours.scale.dtype == torch.bfloat16
            torch.testing.assert_close(ours.dequantize(), theirs.weight.dequantize(torch.float32), rtol=2**-8, atol=0)


@pytest.mark.parametrize("config", ["int8_per_row", "int4_asym_group32"])
def test_torchao_quantized_tiny_flux_saved_by_diffusers(tmp_path, config):
    from diffusers import TorchAoConfig

    _, unquantized = tiny_flux_folder(tmp_path)
    theirs = diffusers_load(unquantized, TorchAoConfig(torchao_config(config)))
    theirs.save_pretrained(tmp_path / "torchao", max_shard_size="300KB")  # shards: a layer may span two
    assert len(list((tmp_path / "torchao").glob("*.safetensors"))) > 1
    qt = QuantizedTransformer.from_pretrained(tmp_path / "torchao", backend="reference")
    assert all(r.quantized for r in qt.summary())
    inputs = flux_inputs(qt.model, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(qt(**inputs)[0], theirs(**inputs)[0], rtol=1e-4, atol=1e-5)


def write_int4_tensor_checkpoint(folder: Path) -> None:
    """The metadata torchao writes for an Int4Tensor (Int4WeightOnlyConfig's plain packing), which torchao
    0.18 cannot build on a CPU without mslk: the layout is written out by hand."""
    folder.mkdir(parents=True)
    info = {"_type": "Int4Tensor", "_data": {"block_size": [1, 64], "shape": [16, 64]},
            "_tensor_data_names": ["qdata", "scale", "zero_point"]}
    tensors = {"0._weight_qdata": torch.zeros(16, 32, dtype=torch.uint8), "0._weight_scale": torch.ones(1, 16),
               "0._weight_zero_point": torch.zeros(1, 16), "0.bias": torch.zeros(16)}
    metadata = {"tensor_names": json.dumps(["0.weight", "0.bias"]), "0.weight": json.dumps(info),
                "0.bias": json.dumps({"_type": "Tensor"})}
    save_file(tensors, folder / "model.safetensors", metadata=metadata)


@pytest.mark.parametrize("kind,message", [
    ("int8_dynamic_activations", "layer '0'.*quantizes activations"),
    ("int8_intx_asymmetric", "layer '0'.*asymmetric int8"),
    ("Int4Tensor", "layer '0' is a torchao Int4Tensor.*IntxWeightOnlyConfig")])
def test_torchao_formats_without_a_quantrt_scheme_are_refused(tmp_path, kind, message):
    if kind == "Int4Tensor":
        write_int4_tensor_checkpoint(tmp_path / "torchao")
        skeleton = lambda: nn.Sequential(nn.Linear(64, 16))  # noqa: E731
    else:
        model = torchao_stack()
        torchao_quantization.quantize_(model, torchao_config(kind))
        save_torchao(model, tmp_path / "torchao")
        skeleton = torchao_stack
    with pytest.raises(CheckpointError, match=message):
        QuantizedTransformer.from_pretrained(tmp_path / "torchao", model=skeleton)
