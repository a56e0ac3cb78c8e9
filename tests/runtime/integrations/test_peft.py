"""quantrt.integrations.peft: LoRA beside quantized layers through PEFT (inject_adapter_in_model, get_peft_model,
PeftModel.from_pretrained) and diffusers (load_lora_adapter, a FluxPipeline's load_lora_weights, set_adapters,
disable/enable, fuse/unfuse, unload), each against a float reference; kohya and XLabs FLUX LoRAs that diffusers
converts; layers kept in full precision; shape errors; a compiled hot swap that recompiles nothing, with
torch.compile and with quantrt's strict compile + warmup."""

import copy
import json

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LoraBaseMixin
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from safetensors.torch import save_file

import quantrt
from quantrt import QuantConfig, QuantizedLinear, QuantizedTransformer, RecompileError
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
    layers of `model` that `targets` name, with random A and B. prefix="transformer.": a pipeline's LoRA.
    A model's `load_lora_adapter(path)` reads the metadata (and so lora_alpha) only with use_safetensors=True;
    without it every scaling is 1."""
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
    def patched():  # the diffusers pipeline methods quantrt wraps
        mixins = (LoraBaseMixin.__dict__[name] for name in integration.WRAPPER_BLIND_METHODS)
        return [getattr(method, integration.MARK, False) for method in mixins] + [getattr(
            FluxLoraLoaderMixin.__dict__["_maybe_expand_lora_state_dict"].__func__, integration.MARK, False)]

    assert all(patched())
    integration.unregister()
    assert not integration.is_registered() and not any(patched())
    with pytest.raises(ValueError, match="QuantizedLinear.*is not supported"):
        inject_adapter_in_model(LoraConfig(r=4, target_modules=["1"]), small_mlp(torch.float32))
    integration.register()
    assert integration.is_registered() and all(patched())


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


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # PEFT, on every second adapter
def test_named_adapters_set_adapters_disable_unload_fuse_unfuse(model, loras):
    model = copy.deepcopy(model)
    base, stored = forward(model), codes(model)
    reference = float_twin(model)
    for name in ("style", "detail"):
        model.load_lora_adapter(loras[name], adapter_name=name, prefix=None, use_safetensors=True)
        reference.load_lora_adapter(loras[name], adapter_name=name, prefix=None, use_safetensors=True)
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
    model.load_lora_adapter(loras["style"], adapter_name="style", prefix=None, use_safetensors=True)

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
        copy.deepcopy(model).load_lora_adapter(bad, adapter_name="bad", prefix=None, use_safetensors=True)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=copy.deepcopy(model), **ABSENT)
    bad = write_lora(wide, tmp_path / "bad_pipe.safetensors", rank=4, alpha=4, seed=0, targets=["to_q"],
                     prefix="transformer.")
    with pytest.raises(ValueError, match=r"lora_A for layer 'transformer_blocks\.0\.attn\.to_q' has shape "
                                         r"\[4, 48\].*128x128, int8wo\) needs \[rank, 128\]"):
        pipe.load_lora_weights(bad, adapter_name="bad")


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


def test_pipeline_holding_a_quantized_transformer_wrapper_sets_fuses_and_unloads(tmp_path):
    """`pipe.transformer = qt` (the wrapper, not the diffusers model): the pipeline-level adapter methods act on
    qt.model, and the pipeline holds the wrapper again after each call."""
    qt = QuantizedTransformer.from_model(build_flux("tiny", dtype=torch.float32), QuantConfig(
        "int8wo", backend="reference", modules_to_not_convert=KEEP), progress=False)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=qt, **ABSENT)
    reference = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=float_twin(qt.model), **ABSENT)
    base, stored, registered_as = forward(qt), codes(qt.model), pipe.config.transformer
    paths = {name: write_lora(qt.model, tmp_path / f"{name}.safetensors", rank=rank, alpha=8, seed=seed,
                              prefix="transformer.") for name, rank, seed in (("a", 8, 6), ("b", 4, 7))}
    for target in (pipe, reference):
        for name, path in paths.items():
            target.load_lora_weights(path, adapter_name=name)
    assert pipe.transformer is qt
    assert pipe.get_list_adapters() == {"transformer": ["a", "b"]}
    assert pipe.get_active_adapters() == ["b"]  # the last one loaded

    for target in (pipe, reference):
        target.set_adapters(["a", "b"], adapter_weights=[0.5, 1.5])
    torch.testing.assert_close(forward(qt), forward(reference.transformer))
    pipe.disable_lora()
    assert torch.equal(forward(qt), base)
    pipe.enable_lora()
    torch.testing.assert_close(forward(qt), forward(reference.transformer))

    for target in (pipe, reference):
        target.delete_adapters("b")
    assert pipe.get_list_adapters() == {"transformer": ["a"]}
    pipe.unload_lora_weights()
    assert torch.equal(forward(qt), base)
    assert pipe.get_list_adapters() == {}

    pipe.load_lora_weights(paths["a"], adapter_name="a")
    reference.set_adapters(["a"], adapter_weights=[1.0])
    pipe.fuse_lora(lora_scale=1.0, components=["transformer"])
    fused = forward(qt)  # within int8 rounding of W + BA
    torch.testing.assert_close(fused, forward(reference.transformer), rtol=0, atol=0.02 * fused.abs().max().item())
    assert not all(torch.equal(v, stored[n][k]) for n, t in codes(qt.model).items() for k, v in t.items())
    pipe.unfuse_lora(components=["transformer"])
    assert all(torch.equal(v, stored[n][k]) for n, t in codes(qt.model).items() for k, v in t.items())
    assert pipe.transformer is qt and pipe.config.transformer == registered_as


def write_community_lora(path, layout, rank=8, seed=5, hidden=128):
    """A FLUX LoRA in a community layout that diffusers converts on load, for the tiny FLUX (one double and one
    single block, hidden 128): kohya / sd-scripts (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
    `.lora_up.weight`, `.alpha`) or XLabs (`double_blocks.0.processor.qkv_lora1.down.weight`). The fused qkv LoRAs
    are the ones diffusers splits into to_q/to_k/to_v (add_q/k/v_proj): lora_A copied, lora_B cut in three.
    Single blocks' linear1 is left out: diffusers splits it with FLUX.1's sizes (3072, 12288) hard-coded.
    Returns the path and {diffusers layer: (lora_up rows, lora_down, scale)} for the qkv layers."""
    generator = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}

    def add(key, out_features, in_features, alpha=None, split=None):
        down = torch.randn(rank, in_features, generator=generator) / 8
        up = torch.randn(out_features, rank, generator=generator) / 8
        if layout == "kohya":
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
            if alpha is not None:
                tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
        else:
            tensors.update({f"{key}.down.weight": down, f"{key}.up.weight": up})
        scale = (alpha if alpha is not None and layout == "kohya" else rank) / rank
        for i, layer in enumerate(split or []):
            expected[layer] = (up[i * hidden:(i + 1) * hidden], down, scale)

    block = "transformer_blocks.0.attn."
    if layout == "kohya":
        add("lora_unet_double_blocks_0_img_attn_qkv", 3 * hidden, hidden, alpha=4,
            split=[block + n for n in ("to_q", "to_k", "to_v")])
        add("lora_unet_double_blocks_0_txt_attn_qkv", 3 * hidden, hidden, alpha=16,
            split=[block + n for n in ("add_q_proj", "add_k_proj", "add_v_proj")])
        add("lora_unet_double_blocks_0_img_attn_proj", hidden, hidden, alpha=8)
        add("lora_unet_double_blocks_0_img_mlp_0", 4 * hidden, hidden)
        add("lora_unet_double_blocks_0_img_mlp_2", hidden, 4 * hidden, alpha=2)
        add("lora_unet_single_blocks_0_linear2", hidden, 5 * hidden, alpha=8)  # proj_out: kept in full precision
    else:
        add("double_blocks.0.processor.qkv_lora1", 3 * hidden, hidden,
            split=[block + n for n in ("to_q", "to_k", "to_v")])
        add("double_blocks.0.processor.qkv_lora2", 3 * hidden, hidden,
            split=[block + n for n in ("add_q_proj", "add_k_proj", "add_v_proj")])
        add("double_blocks.0.processor.proj_lora1", hidden, hidden)
        add("double_blocks.0.processor.proj_lora2", hidden, hidden)
    save_file(tensors, path)
    return str(path), expected


@pytest.mark.parametrize("layout", ["kohya", "xlabs"])
def test_pipeline_loads_community_flux_loras_that_diffusers_converts(model, tmp_path, layout):
    path, expected = write_community_lora(tmp_path / f"{layout}.safetensors", layout)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=copy.deepcopy(model), **ABSENT)
    reference = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=float_twin(model), **ABSENT)
    transformer = pipe.transformer
    base = forward(transformer)
    pipe.load_lora_weights(path, adapter_name=layout)
    reference.load_lora_weights(path, adapter_name=layout)
    wrapped = {name: type(layer) for name, layer in transformer.named_modules() if isinstance(layer, PeftLoraLinear)}
    assert set(expected) < set(wrapped) and all(wrapped[name] is integration.QuantizedLoraLinear for name in expected)
    if layout == "kohya":
        assert wrapped["single_transformer_blocks.0.proj_out"] is PeftLoraLinear  # kept in full precision
    # the split qkv: each of to_q/to_k/to_v gets the shared lora_down and its third of lora_up, alpha/rank folded in
    for name, (up, down, scale) in expected.items():
        delta = transformer.get_submodule(name).get_delta_weight(layout)
        torch.testing.assert_close(delta, up @ down * scale)
    lora = forward(transformer)
    torch.testing.assert_close(lora, forward(reference.transformer))
    assert (lora - base).norm() > 0.01 * base.norm()
    pipe.unload_lora_weights()
    assert torch.equal(forward(transformer), base)


def test_compiled_hotswap_recompiles_nothing_and_lora_weights_are_graph_inputs(model, tmp_path):
    # quantized layers only: PEFT's own lora.Linear (a full-precision layer) assigns set_adapters' scaling as a
    # float, which a compiled graph guards on
    targets = [t for t in TARGETS if t not in KEEP]
    loras = {name: write_lora(model, tmp_path / f"{name}.safetensors", rank, alpha, seed, targets)
             for name, rank, alpha, seed in [("style", 8, 8, 1), ("detail", 8, 16, 2), ("small", 4, 2, 3)]}
    eager = {}
    for name in loras:
        copied = copy.deepcopy(model)
        copied.load_lora_adapter(loras[name], adapter_name="default", prefix=None, use_safetensors=True)
        eager[name] = forward(copied)
    model = copy.deepcopy(model)
    model.enable_lora_hotswap(target_rank=16)
    model.load_lora_adapter(loras["style"], adapter_name="default", prefix=None, use_safetensors=True)

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
            model.load_lora_adapter(loras[name], adapter_name="default", prefix=None, use_safetensors=True,
                                    hotswap=True)
            torch.testing.assert_close(forward(compiled), eager[name])
        model.set_adapters(["default"], weights=[0.5])  # the scaling tensors change in place
        half = forward(compiled)
        model.set_adapters(["default"], weights=[1.0])
        torch.testing.assert_close(forward(compiled), eager["style"])
    assert len(graphs) == 1
    assert not torch.allclose(half, eager["style"])


def test_quantrt_compile_strict_warmup_then_pipeline_hotswap_serves_without_recompiling(tmp_path):
    """quantrt's own compile path: Inductor (qt.compile, strict), warmup, then a LoRA hot-swapped through the
    pipeline. Strict mode serves warmed shapes under the "fail_on_recompile" stance, so a guard recompile would
    raise RecompileError (shown at the end by assigning a float scaling). Inductor on 2 shared CPU cores: 35-50 s
    with an empty Inductor cache, 15 s warm."""
    qt = QuantizedTransformer.from_model(build_flux("tiny", dtype=torch.float32),
                                         QuantConfig("int8wo", backend="reference", modules_to_not_convert=KEEP),
                                         progress=False)
    targets = [t for t in TARGETS if t not in KEEP]  # see the test above: quantized layers only
    loras = {name: write_lora(qt.model, tmp_path / f"{name}.safetensors", rank, alpha, seed, targets,
                              prefix="transformer.")
             for name, rank, alpha, seed in [("style", 8, 8, 1), ("detail", 4, 16, 2)]}
    eager = {}
    for name in loras:
        copied = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=copy.deepcopy(qt.model),
                              **ABSENT)
        copied.load_lora_weights(loras[name], adapter_name="default")
        eager[name] = forward(copied.transformer)
        copied.set_adapters(["default"], adapter_weights=[0.5])
        eager[f"{name} x0.5"] = forward(copied.transformer)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=qt.model, **ABSENT)
    pipe.enable_lora_hotswap(target_rank=16)
    pipe.load_lora_weights(loras["style"], adapter_name="default")

    torch._dynamo.reset()
    qt.compile(mode="default", strict=True, cache=False)
    inputs = flux_inputs(qt.model)
    report = qt.warmup([inputs], progress=False)
    assert [row.recompiles for row in report] == [0]
    tolerance = dict(atol=1e-4, rtol=1e-4)  # Inductor fuses and reorders fp32 reductions

    def serve():
        with torch.no_grad():
            return qt(**inputs)[0]

    torch.testing.assert_close(serve(), eager["style"], **tolerance)
    pipe.load_lora_weights(loras["detail"], adapter_name="default", hotswap=True)  # rank 4, alpha 16: padded
    torch.testing.assert_close(serve(), eager["detail"], **tolerance)
    layer = qt.model.get_submodule("transformer_blocks.0.attn.to_q")
    assert type(layer) is integration.QuantizedLoraLinear and layer.lora_A["default"].weight.shape[0] == 16
    assert layer.scaling["default"].item() == 4.0  # 16 / 4
    # set_adapters after a swap scales the new LoRA's alpha / rank (PEFT alone keeps the first LoRA's: 8 / 8)
    pipe.set_adapters(["default"], adapter_weights=[0.5])  # scalings filled in place
    torch.testing.assert_close(serve(), eager["detail x0.5"], **tolerance)
    assert layer.scaling["default"].item() == 2.0
    pipe.set_adapters(["default"], adapter_weights=[1.0])
    torch.testing.assert_close(serve(), eager["detail"], **tolerance)

    layer.scaling["default"] = 0.5  # a float where the graph read a tensor: its guard fails
    with pytest.raises(RecompileError, match="were warmed, but this call would recompile"):
        serve()
