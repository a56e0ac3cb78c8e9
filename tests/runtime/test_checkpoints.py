"""Checkpoints other tools wrote (quantrt.checkpoints): optimum-quanto and torchao folders, written here the
way their users write them, loaded with quantrt and compared with the tool's own numbers; single files in
BFL's original Flux layout; and the peak memory of quantize-on-load, measured in a fresh process."""

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from quantrt import QuantConfig, QuantizedTransformer
from quantrt.checkpoints import SafetensorsReader, single_file_plan
from quantrt.models import FLUX_SIZES, build_flux, flux_inputs
from quantrt.serialization import CheckpointError


@pytest.fixture(autouse=True)
def restore_inductor_config():
    """The checkpoints here are made by torchao and diffusers themselves, whose configs default to
    set_inductor_config=True (coordinate descent tuning, int_mm fusion): global Inductor settings that would
    change the cache keys of every later compilation in this test process. Put them back."""
    import torch._inductor.config as inductor_config

    saved = inductor_config.save_config()
    yield
    inductor_config.load_config(saved)

quanto = pytest.importorskip("optimum.quanto")
torchao_quantization = pytest.importorskip("torchao.quantization")

EPS32 = torch.finfo(torch.float32).eps


def linear_stack() -> nn.Module:
    # quanto groups qint4/qint2 weights by 128 (K=256, K=512), keeps K <= 128 whole (K=64, K=8), and gives a
    # single output row (N=1) one per-tensor scale
    return nn.Sequential(nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 8), nn.Linear(8, 512, bias=False),
                         nn.Linear(512, 1))


def linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "weight") and name and m.weight is not None
            and m.weight.dim() == 2}


def save_quanto(model: nn.Module, folder: Path) -> Path:
    """What optimum-quanto's README ("Serialization") has its users do."""
    folder.mkdir(parents=True)
    save_file(model.state_dict(), folder / "model.safetensors")
    (folder / "quantization_map.json").write_text(json.dumps(quanto.quantization_map(model)))
    return folder


def save_torchao(model: nn.Module, folder: Path) -> Path:
    """torchao's safetensors support: flattened tensors plus the metadata that rebuilds them."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    folder.mkdir(parents=True)
    tensors, metadata = flatten_tensor_state_dict(model.state_dict())
    save_file(tensors, folder / "model.safetensors", metadata=metadata)
    return folder


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
    from quantrt.checkpoints import quanto_to_quantrt

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


def tiny_flux_folder(tmp_path: Path) -> tuple[nn.Module, Path]:
    model = build_flux("tiny", dtype=torch.float32)
    model.save_pretrained(tmp_path / "unquantized")
    return model, tmp_path / "unquantized"


def diffusers_load(folder: Path, quantization_config) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' deprecation of QuantoConfig and torchao's bf16 advice
        return FluxTransformer2DModel.from_pretrained(folder, quantization_config=quantization_config,
                                                      torch_dtype=torch.float32).eval()


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


def test_foreign_folders_are_routed_or_refused_clearly(tmp_path):
    model = linear_stack()
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)
    folder = save_quanto(model, tmp_path / "quanto")
    with pytest.raises(ValueError, match="already quantized.*quanto"):
        QuantizedTransformer.from_pretrained(folder, model=linear_stack, quantization="int4wo")
    _, unquantized = tiny_flux_folder(tmp_path)
    config = json.loads((unquantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (unquantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'bitsandbytes'"):
        QuantizedTransformer.from_pretrained(unquantized)


def damaged_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[8:12] = b"{{{{"
    file.write_bytes(bytes(data))


def test_safetensors_reader_reads_rows_and_refuses_damaged_files(tmp_path):
    tensors = {"w": torch.randn(7, 5), "b": torch.randn(3).to(torch.bfloat16), "s": torch.tensor(2.5),
               "f8": torch.randn(4, 4).to(torch.float8_e4m3fn)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"k": "v"})
    reader = SafetensorsReader(tmp_path / "t.safetensors")
    assert reader.metadata == {"k": "v"}
    for name, tensor in tensors.items():
        read = reader.read(name)
        assert read.dtype == tensor.dtype and read.shape == tensor.shape
        assert torch.equal(read.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    torch.testing.assert_close(reader.read("w", (2, 6)), tensors["w"][2:6], rtol=0, atol=0)
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match="cut.safetensors.*damaged or truncated"):
        SafetensorsReader(tmp_path / "cut.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(data)
    damaged_header(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="bad.safetensors has a damaged safetensors header"):
        SafetensorsReader(tmp_path / "bad.safetensors")


def to_bfl_layout(state: dict[str, torch.Tensor], num_layers: int, num_single_layers: int) -> dict[str, torch.Tensor]:
    """diffusers' FluxTransformer2DModel state dict -> BFL's original layout: the inverse of diffusers'
    convert_flux_transformer_checkpoint_to_diffusers, written out so that the test does not trust it."""
    bfl = {}

    def move(diffusers_name: str, bfl_name: str) -> None:
        for leaf in ("weight", "bias"):
            if f"{diffusers_name}.{leaf}" in state:
                bfl[f"{bfl_name}.{leaf}"] = state[f"{diffusers_name}.{leaf}"]

    def fuse(diffusers_names: list[str], bfl_name: str) -> None:
        for leaf in ("weight", "bias"):
            bfl[f"{bfl_name}.{leaf}"] = torch.cat([state[f"{n}.{leaf}"] for n in diffusers_names])

    for diffusers_name, bfl_name in [("time_text_embed.timestep_embedder", "time_in"),
                                     ("time_text_embed.text_embedder", "vector_in"),
                                     ("time_text_embed.guidance_embedder", "guidance_in")]:
        move(f"{diffusers_name}.linear_1", f"{bfl_name}.in_layer")
        move(f"{diffusers_name}.linear_2", f"{bfl_name}.out_layer")
    move("context_embedder", "txt_in")
    move("x_embedder", "img_in")
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        move(f"{d}.norm1.linear", f"{b}.img_mod.lin")
        move(f"{d}.norm1_context.linear", f"{b}.txt_mod.lin")
        fuse([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{b}.img_attn.qkv")
        fuse([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{b}.txt_attn.qkv")
        for norm, bfl_norm in [("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                               ("norm_added_q", "txt_attn.norm.query_norm"),
                               ("norm_added_k", "txt_attn.norm.key_norm")]:
            bfl[f"{b}.{bfl_norm}.scale"] = state[f"{d}.attn.{norm}.weight"]
        move(f"{d}.ff.net.0.proj", f"{b}.img_mlp.0")
        move(f"{d}.ff.net.2", f"{b}.img_mlp.2")
        move(f"{d}.ff_context.net.0.proj", f"{b}.txt_mlp.0")
        move(f"{d}.ff_context.net.2", f"{b}.txt_mlp.2")
        move(f"{d}.attn.to_out.0", f"{b}.img_attn.proj")
        move(f"{d}.attn.to_add_out", f"{b}.txt_attn.proj")
    for i in range(num_single_layers):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        move(f"{d}.norm.linear", f"{b}.modulation.lin")
        fuse([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], f"{b}.linear1")
        bfl[f"{b}.norm.query_norm.scale"] = state[f"{d}.attn.norm_q.weight"]
        bfl[f"{b}.norm.key_norm.scale"] = state[f"{d}.attn.norm_k.weight"]
        move(f"{d}.proj_out", f"{b}.linear2")
    move("proj_out", "final_layer.linear")
    for leaf in ("weight", "bias"):  # diffusers' AdaLayerNormContinuous is (scale, shift), BFL's (shift, scale)
        scale, shift = state[f"norm_out.linear.{leaf}"].chunk(2)
        bfl[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
    assert sum(t.numel() for t in bfl.values()) == sum(t.numel() for t in state.values())
    return bfl


def write_bfl_file(model: nn.Module, file: Path, prefix: str = "") -> Path:
    cfg = model.config
    bfl = to_bfl_layout(model.state_dict(), cfg.num_layers, cfg.num_single_layers)
    save_file({prefix + k: v.contiguous() for k, v in bfl.items()}, file)
    return file


@pytest.mark.parametrize("config_source", ["inferred", "dict", "folder", "inferred_with_prefix"])
def test_single_file_in_bfl_layout_equals_from_model(tmp_path, config_source):
    model = build_flux("tiny", dtype=torch.float32)
    prefix = "model.diffusion_model." if config_source.endswith("prefix") else ""
    file = write_bfl_file(model, tmp_path / "flux1-tiny.safetensors", prefix)
    config = {"dict": dict(model.config), "folder": tmp_path / "config"}.get(config_source)
    if config_source == "folder":
        model.save_config(tmp_path / "config")
    inputs = flux_inputs(model, seed=4)
    qt = QuantizedTransformer.from_single_file(file, quantization="int8wo", config=config, backend="reference",
                                               progress=False)
    expected = QuantizedTransformer.from_model(model, QuantConfig("int8wo", backend="reference"), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(qt(**inputs)[0], expected(**inputs)[0], rtol=0, atol=0)
    assert [(r.name, r.scheme) for r in qt.summary()] == [(r.name, r.scheme) for r in expected.summary()]
    assert type(qt.model).__name__ == "FluxTransformer2DModel" and qt.config.num_layers == 1


def test_single_file_fp8_weights_are_upcast_before_quantizing(tmp_path):
    """FLUX checkpoints are often shipped in fp8 (e4m3fn) with the rest in bf16: quantized without --dtype,
    the fp8 weights are upcast to bf16 first (nothing computes in fp8), and an integer weight is refused."""
    model = build_flux("tiny", dtype=torch.float32)
    with torch.no_grad():  # weights fp8 can hold exactly, so the bf16 reference below has the same numbers
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(module.weight.to(torch.float8_e4m3fn).float())
    model = model.to(torch.bfloat16)
    cfg = model.config
    bfl = to_bfl_layout(model.state_dict(), cfg.num_layers, cfg.num_single_layers)
    stored = {k: (v.to(torch.float8_e4m3fn) if k.endswith(".weight") and v.dim() == 2 else v).contiguous()
              for k, v in bfl.items()}
    assert sum(v.dtype == torch.float8_e4m3fn for v in stored.values()) > 10
    save_file(stored, tmp_path / "flux1-tiny-fp8.safetensors")
    qt = QuantizedTransformer.from_single_file(tmp_path / "flux1-tiny-fp8.safetensors", quantization="int8wo",
                                               backend="reference", progress=False)
    expected = QuantizedTransformer.from_model(model, QuantConfig("int8wo", backend="reference"), progress=False)
    inputs = flux_inputs(model, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(qt(**inputs)[0], expected(**inputs)[0], rtol=0, atol=0)
    key = next(k for k, v in stored.items() if v.dtype == torch.float8_e4m3fn)
    stored[key] = stored[key].view(torch.uint8).to(torch.int8)
    save_file(stored, tmp_path / "flux1-tiny-int8.safetensors")
    with pytest.raises(CheckpointError, match=r"in flux1-tiny-int8.safetensors is int8, but it is the weight of a "
                                              r"Linear layer"):
        QuantizedTransformer.from_single_file(tmp_path / "flux1-tiny-int8.safetensors", quantization="int8wo",
                                              progress=False)


def test_single_file_needs_a_config_that_fits(tmp_path):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**{**FLUX_SIZES["tiny"], "num_layers": 2}).eval()  # not a FLUX_SIZES entry
    file = write_bfl_file(model, tmp_path / "flux-2-layers.safetensors")
    with pytest.raises(CheckpointError, match="flux-dev checkpoint.*match none of quantrt.models.FLUX_SIZES.*config="):
        QuantizedTransformer.from_single_file(file, quantization="int8wo")
    with pytest.raises(CheckpointError, match="does not match the file"):
        QuantizedTransformer.from_single_file(file, quantization="int8wo", config=FLUX_SIZES["tiny"])
    qt = QuantizedTransformer.from_single_file(file, quantization="int8wo", config=dict(model.config),
                                               backend="reference")
    assert qt.config.num_layers == 2


def test_single_file_plan_for_flux1_dev_is_diffusers_own_conversion():
    """At FLUX.1-dev's real sizes diffusers' conversion runs unchanged (no scaled split): the plan must give
    every tensor of the model its diffusers shape, from the rows a hand-written BFL layout puts where."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    full = FLUX_SIZES["full"]
    with init_empty_weights():
        model = FluxTransformer2DModel(**full)
    state = model.state_dict()
    bfl = to_bfl_layout(state, full["num_layers"], full["num_single_layers"])
    shapes = {k: tuple(v.shape) for k, v in bfl.items()}
    plan = single_file_plan(convert_flux_transformer_checkpoint_to_diffusers, shapes)
    assert set(plan) == set(state)
    d = 3072
    assert plan["single_transformer_blocks.7.proj_mlp.weight"] == [("single_blocks.7.linear1.weight", 3 * d, 7 * d)]
    assert plan["transformer_blocks.3.attn.add_k_proj.bias"] == [("double_blocks.3.txt_attn.qkv.bias", d, 2 * d)]
    assert plan["norm_out.linear.weight"] == [("final_layer.adaLN_modulation.1.weight", d, 2 * d),
                                              ("final_layer.adaLN_modulation.1.weight", 0, d)]
    for key, segments in plan.items():
        rows = sum(stop - start for _, start, stop in segments)
        assert rows == state[key].shape[0], key


@pytest.mark.parametrize("scheme", ["int8wo", "int4wo", "uint3wo", "fp6_e3m2", "float8wo_e4m3",
                                    "float8dq_e4m3_tensor"])
def test_set_weight_in_row_chunks_is_the_whole_quantization(monkeypatch, scheme):
    """QuantizedLinear.set_weight quantizes ~1M weights at a time (bounded temporaries while streaming);
    row chunks (of 3 rows here, the last one short) must give exactly the tensors of one whole call."""
    import quantrt.modules
    from quantrt import QuantizedLinear, resolve_scheme

    monkeypatch.setattr(quantrt.modules, "_QUANTIZE_CHUNK", 3 * 128)
    weight = torch.randn(10, 128)
    layer = QuantizedLinear(128, 10, resolve_scheme(scheme), dtype=torch.float32)
    layer.set_weight(weight)
    whole = layer.scheme.quantize(weight)
    for key, tensor in whole.items():
        torch.testing.assert_close(getattr(layer, key), tensor, rtol=0, atol=0, msg=key)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.nn as nn
    from quantrt import QuantizedTransformer

    def status(field):  # bytes; VmRSS: the resident set now, VmHWM: its peak since the last reset
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    def load(how, path, extra):
        if how == "folder":
            width, layers = extra
            return QuantizedTransformer.from_pretrained(
                path, quantization=scheme, backend="reference", progress=False,
                model=lambda: nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]))
        return QuantizedTransformer.from_single_file(path, quantization=scheme, config=extra, backend="reference",
                                                     progress=False)

    how, scheme, small, big = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5]
    small_extra, big_extra = json.loads(sys.argv[4]), json.loads(sys.argv[6])
    load(how, small, small_extra)  # imports (diffusers' single-file code alone is ~250 MB) and first-call setup
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to VmRSS (Linux >= 4.0)
        f.write("5")
    before = status("VmRSS")
    qt = load(how, big, big_extra)
    print(json.dumps({"growth": status("VmHWM") - before, "quantized": qt.memory_footprint()}))
""")


def peak_growth(how: str, scheme: str, small: Path, small_extra, big: Path, big_extra) -> dict:
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, how, scheme, str(small), json.dumps(small_extra),
                             str(big), json.dumps(big_extra)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_linear_folder(folder: Path, width: int, layers: int) -> int:
    """A plain nn.Sequential of Linear(width, width) in fp32, saved as model.safetensors; returns its bytes."""
    state = {f"{i}.{leaf}": torch.randn(width, width) if leaf == "weight" else torch.randn(width)
             for i in range(layers) for leaf in ("weight", "bias")}
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_quantize_on_load_peak_memory_stays_below_the_unquantized_size(tmp_path):
    """Peak RSS growth of from_pretrained(folder, quantization=...) and from_single_file(...) in a fresh
    process (after a small load of the same kind, for the imports), against the model's fp32 size: the
    kernel's RSS high-water mark, reset just before the load (ru_maxrss cannot be reset, and would keep a
    peak of the warm-up). Not tracemalloc: torch's allocations bypass Python's allocator (tracemalloc sees 80
    bytes of a 4 MB tensor)."""
    from diffusers import FluxTransformer2DModel

    write_linear_folder(tmp_path / "small", 64, 2)
    unquantized = write_linear_folder(tmp_path / "plain", 2048, 16)
    folder = {scheme: peak_growth("folder", scheme, tmp_path / "small", [64, 2], tmp_path / "plain", [2048, 16])
              for scheme in ("int8wo", "int4wo")}

    tiny = dict(FLUX_SIZES["tiny"])
    config = {**tiny, "num_attention_heads": 16, "joint_attention_dim": 512, "pooled_projection_dim": 256,
              "num_single_layers": 2}
    write_bfl_file(build_flux("tiny", dtype=torch.float32), tmp_path / "tiny.safetensors")
    flux = FluxTransformer2DModel(**config)
    flux_bytes = sum(t.numel() * t.element_size() for t in flux.state_dict().values())
    write_bfl_file(flux, tmp_path / "flux.safetensors")
    del flux
    single = peak_growth("single_file", "int8wo", tmp_path / "tiny.safetensors", tiny, tmp_path / "flux.safetensors",
                         config)
    def mib(result: dict) -> str:
        return f"{result['growth'] / 2**20:.0f} MiB ({result['quantized'] / 2**20:.0f} MiB quantized)"

    print(f"\nquantize-on-load, peak RSS growth: folder of {unquantized / 2**20:.0f} MiB fp32: "
          + ", ".join(f"{scheme} {mib(result)}" for scheme, result in folder.items())
          + f"; single file of {flux_bytes / 2**20:.0f} MiB fp32: int8wo {mib(single)}")
    for scheme, result in folder.items():
        assert result["growth"] < unquantized, (scheme, result)
    assert single["growth"] < flux_bytes, single
