"""quantrt.integrations.peft: LoRA beside quantized layers through PEFT (inject_adapter_in_model, get_peft_model,
PeftModel.from_pretrained) and diffusers (load_lora_adapter, a FluxPipeline's load_lora_weights, set_adapters,
disable/enable, fuse/unfuse, unload), each against a float reference; layers kept in full precision; shape errors;
a compiled hot swap that recompiles nothing."""

import copy
import json

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from safetensors.torch import save_file

import quantrt
from quantrt import QuantConfig, QuantizedLinear
from quantrt.integrations import peft as integration
from quantrt.models import build_flux, flux_inputs

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "ff.net.0.proj", "proj_out"]
KEEP = ["proj_out"]  # both proj_out layers stay nn.Linear: a LoRA on them is PEFT's own
ABSENT = dict(vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


@pytest.fixture(autouse=True, scope="module")
def registered():
    integration.register()  # what the import hook of quantrt.integrations does; idempotent
    integration.register()
    yield
    integration.register()


def forward(model, **kwargs):
    with torch.no_grad():
        return model(**flux_inputs(model), **kwargs)[0]


def codes(model):
    """{layer: {tensor: clone}} of every QuantizedLinear, named without PEFT's `.base_layer`."""
    return {name.removesuffix(".base_layer"): {k: v.clone() for k, v in layer.tensors().items()}
            for name, layer in model.named_modules() if isinstance(layer, QuantizedLinear)}


def quantized_flux(dtype=torch.float32):
    model = build_flux("tiny", dtype=dtype)
    quantrt.quantize_(model, QuantConfig("int8wo", backend="reference", modules_to_not_convert=KEEP),
                      progress=False)
    return model


def float_twin(model):
    """The float reference: `model` with every QuantizedLinear an nn.Linear holding its dequantized weight."""
    twin = copy.deepcopy(model)
    for name, layer in list(twin.named_modules()):
        if isinstance(layer, QuantizedLinear):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               dtype=layer.scale.dtype)
            linear.weight.data = layer.dequantize().to(layer.scale.dtype)
            if layer.bias is not None:
                linear.bias.data = layer.bias.clone()
            twin.set_submodule(name, linear)
    return twin


def write_lora(model, path, rank, alpha, seed, targets=TARGETS, prefix=""):
    """A LoRA in diffusers' saved form (`<prefix><layer>.lora_A.weight`, rank and alpha in the metadata) for the
    layers of `model` that `targets` name, with random A and B. prefix="transformer.": a pipeline's LoRA."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in model.named_modules():
        if isinstance(layer, (nn.Linear, QuantizedLinear)) and any(name.endswith(t) for t in targets):
            tensors[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator) / 8
            tensors[f"{prefix}{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=generator) / 8
    metadata = {f"{prefix}{key}": value for key, value in
                dict(r=rank, lora_alpha=alpha, target_modules=targets).items()}  # a pipeline's: per component
    save_file(tensors, path, metadata={LORA_ADAPTER_METADATA_KEY: json.dumps(metadata)})
    return str(path)


@pytest.fixture(scope="module")
def model():
    return quantized_flux()


@pytest.fixture(scope="module")
def loras(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {"style": write_lora(model, folder / "style.safetensors", rank=8, alpha=8, seed=1),
            "detail": write_lora(model, folder / "detail.safetensors", rank=4, alpha=8, seed=2),
            "small": write_lora(model, folder / "small.safetensors", rank=4, alpha=2, seed=3)}


# -- PEFT on single layers --------------------------------------------------------------------------------------

def small_mlp(dtype, scheme="int8wo"):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(dtype)
    quantrt.quantize_(mlp, QuantConfig(scheme, backend="reference", group_size=32), progress=False)
    return mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scheme", ["int8wo", "int4wo"])
def test_inject_adapter_runs_lora_beside_the_quantized_matmul(dtype, scheme):
    mlp = small_mlp(dtype, scheme)
    reference = float_twin(mlp)
    config = dict(r=8, lora_alpha=16, target_modules=["1", "3"], init_lora_weights=False)
    inject_adapter_in_model(LoraConfig(**config), mlp)
    inject_adapter_in_model(LoraConfig(**config), reference)
    reference.load_state_dict({k: v for k, v in mlp.state_dict().items() if "lora_" in k}, strict=False)
    layer = mlp[1]
    assert type(layer) is integration.QuantizedLoraLinear and isinstance(layer.base_layer, QuantizedLinear)
    assert layer.lora_A["default"].weight.dtype == dtype  # the activation dtype, not the codes' int8
    x = torch.randn(3, 5, 64).to(dtype)
    with torch.no_grad():
        lora = layer.lora_B["default"](layer.lora_A["default"](x))
        torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * lora)
        torch.testing.assert_close(mlp(x), reference(x))


def test_without_registration_peft_rejects_the_layer_and_register_is_reversible():
    integration.unregister()
    assert not integration.is_registered()
    with pytest.raises(ValueError, match="QuantizedLinear.*is not supported"):
        inject_adapter_in_model(LoraConfig(r=4, target_modules=["1"]), small_mlp(torch.float32))
    integration.register()
    assert integration.is_registered()


def test_get_peft_model_trains_the_lora_only_and_from_pretrained_reloads_it(tmp_path):
    mlp = small_mlp(torch.float32)
    untouched = copy.deepcopy(mlp)
    peft_model = get_peft_model(mlp, LoraConfig(r=8, target_modules=["1", "3"], init_lora_weights=False))
    x = torch.randn(4, 64)
    peft_model(x).pow(2).mean().backward()
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert all(p.grad is not None for name, p in peft_model.named_parameters() if name in trainable)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(untouched, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), peft_model(x), rtol=0, atol=0)


def test_dora_on_a_quantized_layer_says_why_and_how_to_keep_it():
    with pytest.raises(ValueError, match=r"layer '1' is quantized.*modules_to_not_convert=\['1'\]"):
        inject_adapter_in_model(LoraConfig(r=4, target_modules=["1"], use_dora=True), small_mlp(torch.float32))


# -- diffusers, transformer level -------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # PEFT, on every second adapter
def test_named_adapters_set_adapters_disable_unload_fuse_unfuse(model, loras):
    model = copy.deepcopy(model)
    base, stored = forward(model), codes(model)
    reference = float_twin(model)
    for name in ("style", "detail"):
        model.load_lora_adapter(loras[name], adapter_name=name, prefix=None)
        reference.load_lora_adapter(loras[name], adapter_name=name, prefix=None)
    assert type(model.get_submodule("transformer_blocks.0.attn.to_q")) is integration.QuantizedLoraLinear
    # a LoRA on a layer kept in full precision: PEFT's own lora.Linear, as on any nn.Linear
    assert type(model.get_submodule("proj_out")) is PeftLoraLinear

    for names, weights in [(["style"], None), (["style", "detail"], [0.7, 0.4])]:
        model.set_adapters(names, weights)
        reference.set_adapters(names, weights)
        torch.testing.assert_close(forward(model), forward(reference))
    both = forward(model)

    model.disable_lora()
    assert torch.equal(forward(model), base)
    model.enable_lora()
    assert torch.equal(forward(model), both)
    model.unload_lora()
    assert not any(isinstance(layer, PeftLoraLinear) for layer in model.modules())
    assert torch.equal(forward(model), base)
    model.load_lora_adapter(loras["style"], adapter_name="style", prefix=None)

    # fuse_lora(lora_scale): each layer's codes are the scheme's quantization of the merged float weight
    expected = {}
    for name, layer in model.named_modules():
        if type(layer) is integration.QuantizedLoraLinear:
            lora = layer.lora_B["style"].weight @ layer.lora_A["style"].weight * (8 / 8) * 0.8
            expected[name] = layer.base_layer.scheme.quantize(layer.base_layer.dequantize() + lora)
    model.fuse_lora(lora_scale=0.8, adapter_names=["style"])
    for name, want in expected.items():
        got = model.get_submodule(name).base_layer.tensors()
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)
    reference.set_adapters(["style"], [0.8])
    fused_error = (forward(model) - forward(reference)).norm() / forward(reference).norm()
    assert fused_error < 0.02  # the int8 rounding of W + 0.8·BA

    # the codes come back exactly (a full-precision layer's unfuse subtracts BA in float, as PEFT does)
    model.unfuse_lora()
    assert codes(model).keys() == stored.keys()
    for name, tensors in codes(model).items():
        for key, value in tensors.items():
            assert torch.equal(value, stored[name][key]), (name, key)



def test_a_lora_of_another_shape_names_the_layer_and_the_shapes(model, loras, tmp_path):
    wide = build_flux("tiny", dtype=torch.float32)
    wide.transformer_blocks[0].attn.to_q = nn.Linear(48, 64)
    bad = write_lora(wide, tmp_path / "bad.safetensors", rank=4, alpha=4, seed=0, targets=["to_q"])
    # PEFT's load_state_dict error names the layer and both shapes
    with pytest.raises(RuntimeError, match=r"to_q\.lora_A\.bad\.weight: .*\[4, 48\].*\[4, 128\]"):
        copy.deepcopy(model).load_lora_adapter(bad, adapter_name="bad", prefix=None)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=copy.deepcopy(model), **ABSENT)
    bad = write_lora(wide, tmp_path / "bad_pipe.safetensors", rank=4, alpha=4, seed=0, targets=["to_q"],
                     prefix="transformer.")
    with pytest.raises(ValueError, match=r"lora_A for layer 'transformer_blocks\.0\.attn\.to_q' has shape "
                                         r"\[4, 48\].*128x128, int8wo\) needs \[rank, 128\]"):
        pipe.load_lora_weights(bad, adapter_name="bad")


# -- diffusers, pipeline level ----------------------------------------------------------------------------------

def test_pipeline_load_lora_weights_set_adapters_fuse_unload(model, tmp_path):
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=copy.deepcopy(model), **ABSENT)
    transformer = pipe.transformer
    base, stored = forward(transformer), codes(transformer)
    reference = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=float_twin(model), **ABSENT)
    path = write_lora(model, tmp_path / "pipe.safetensors", rank=8, alpha=16, seed=4, prefix="transformer.")
    pipe.load_lora_weights(path, adapter_name="pipe")
    reference.load_lora_weights(path, adapter_name="pipe")
    assert transformer.get_submodule("transformer_blocks.0.attn.to_q").scaling == {"pipe": 2.0}
    torch.testing.assert_close(forward(transformer), forward(reference.transformer))

    pipe.set_adapters(["pipe"], adapter_weights=[0.5])
    reference.set_adapters(["pipe"], adapter_weights=[0.5])
    torch.testing.assert_close(forward(transformer), forward(reference.transformer))
    pipe.unload_lora_weights()
    assert torch.equal(forward(transformer), base)

    pipe.load_lora_weights(path, adapter_name="pipe")
    pipe.fuse_lora(lora_scale=1.0, components=["transformer"])
    reference.set_adapters(["pipe"], adapter_weights=[1.0])
    fused = forward(transformer)  # within int8 rounding of W + BA
    torch.testing.assert_close(fused, forward(reference.transformer), rtol=0, atol=0.02 * fused.abs().max().item())
    pipe.unfuse_lora(components=["transformer"])
    assert all(torch.equal(v, stored[n][k]) for n, t in codes(transformer).items() for k, v in t.items())


# -- compiled hot swap ------------------------------------------------------------------------------------------

def test_compiled_hotswap_recompiles_nothing_and_lora_weights_are_graph_inputs(model, tmp_path):
    # quantized layers only: PEFT's own lora.Linear (a full-precision layer) assigns set_adapters' scaling as a
    # float, which a compiled graph guards on
    targets = [t for t in TARGETS if t not in KEEP]
    loras = {name: write_lora(model, tmp_path / f"{name}.safetensors", rank, alpha, seed, targets)
             for name, rank, alpha, seed in [("style", 8, 8, 1), ("detail", 8, 16, 2), ("small", 4, 2, 3)]}
    eager = {}
    for name in loras:
        copied = copy.deepcopy(model)
        copied.load_lora_adapter(loras[name], adapter_name="default", prefix=None)
        eager[name] = forward(copied)
    model = copy.deepcopy(model)
    model.enable_lora_hotswap(target_rank=16)
    model.load_lora_adapter(loras["style"], adapter_name="default", prefix=None)

    graphs = []

    def recording_backend(graph_module, example_inputs):  # runs the graph eagerly, keeps its inputs' names
        graphs.append([node.target for node in graph_module.graph.nodes if node.op == "placeholder"])
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=recording_backend)
    torch.testing.assert_close(forward(compiled), eager["style"])
    inputs = " ".join(graphs[0])
    assert inputs.count("lora_A") == inputs.count("lora_B") > 0 and "scaling" in inputs
    with torch.compiler.set_stance("fail_on_recompile"):
        for name in ("detail", "small", "style"):  # ranks 8 and 4, alphas 16 and 2, all padded to rank 16
            model.load_lora_adapter(loras[name], adapter_name="default", prefix=None, hotswap=True)
            torch.testing.assert_close(forward(compiled), eager[name])
        model.set_adapters(["default"], weights=[0.5])  # the scaling tensors change in place
        half = forward(compiled)
        model.set_adapters(["default"], weights=[1.0])
        torch.testing.assert_close(forward(compiled), eager["style"])
    assert len(graphs) == 1
    assert not torch.allclose(half, eager["style"])
