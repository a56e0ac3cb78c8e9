"""quantrt.integrations.diffusers: QuantConfig as the quantization_config of diffusers' from_pretrained,
from_single_file and PipelineQuantizationConfig; save_pretrained and a reload with no config, bit for bit; whole
pipelines; a QuantizedTransformer component saved and reloaded by its pipeline; errors; peak memory."""

import copy
import json
import sys

import pytest
import torch
from diffusers import (DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       PipelineQuantizationConfig)
from diffusers.quantizers import auto as diffusers_auto
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5EncoderModel

import quantrt
from quantrt import QuantConfig, QuantizedLinear, QuantizedTransformer
from quantrt.integrations import diffusers as integration
from quantrt.models import build_flux, flux_inputs

from .helpers import linears, peak_rss_of_loading, quantized, same_state, write_random_checkpoint

# FluxPipeline without its VAE, CLIP and tokenizers (they hold no Linear layers quantrt would touch)
ABSENT = dict(vae=None, text_encoder=None, tokenizer=None, tokenizer_2=None)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux") / "fp32"
    build_flux("tiny", dtype=torch.float32).save_pretrained(folder)
    return folder


def quantize_loaded(folder, config, dtype=torch.float32):
    """What the loader must equal: the full-precision model loaded, then quantrt.quantize_."""
    model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype)
    quantrt.quantize_(model, config, progress=False)
    return model


def forward(model):
    with torch.no_grad():
        return model(**flux_inputs(model))[0]


def test_from_pretrained_quantizes_while_loading_as_quantize_does(flux_folder):
    config = QuantConfig("int8wo", modules_to_not_convert=["proj_out"])
    before = config.to_dict()
    model = FluxTransformer2DModel.from_pretrained(flux_folder, quantization_config=config, torch_dtype=torch.float32)
    assert type(model) is FluxTransformer2DModel
    # quanto-style child names too: both proj_out layers stay nn.Linear
    assert linears(model) == ["single_transformer_blocks.0.proj_out", "proj_out"]
    assert set(quantized(model).values()) == {"int8wo"}
    expected = quantize_loaded(flux_folder, config)
    same_state(model, expected)
    assert torch.equal(forward(model), forward(expected))
    assert config.to_dict() == before  # the per-layer record stays in the model's copy


@pytest.mark.parametrize("config", [
    lambda: QuantConfig("float8wo_e4m3"),
    lambda: QuantConfig(weights_dtype="float8"),
    lambda: QuantConfig("fp6_e3m2", backend="reference"),
], ids=["float8wo_e4m3", "quanto-float8", "fp6_e3m2"])
def test_schemes_load_as_quantize_makes_them(flux_folder, config):
    model = FluxTransformer2DModel.from_pretrained(flux_folder, quantization_config=config(),
                                                   torch_dtype=torch.float32)
    expected = quantize_loaded(flux_folder, config())
    same_state(model, expected)
    assert torch.equal(forward(model), forward(expected))


def test_save_pretrained_writes_the_scheme_per_layer_and_reloads_bit_for_bit(flux_folder, tmp_path, monkeypatch):
    config = QuantConfig("int4wo", group_size=32, modules={"proj_out": None, "re:.*ff\\..*": "int8wo"})
    model = FluxTransformer2DModel.from_pretrained(flux_folder, quantization_config=config,
                                                   torch_dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "q")

    stored = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "quantrt" and stored["scheme"] == "int4wo"
    layers = stored["modules"]
    assert not any(name.startswith("re:") for name in layers)  # resolved by name: a reload reads no regex
    assert layers["transformer_blocks.0.attn.to_q"] == {"scheme": "int4wo", "group_size": 32}
    assert layers["transformer_blocks.0.ff.net.2"] == {"scheme": "int8wo", "group_size": None}
    assert layers["proj_out"] is None
    assert set(layers) == set(linears(model)) | set(quantized(model))
    with safe_open(tmp_path / "q" / "diffusion_pytorch_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"transformer_blocks.0.attn.to_q.qweight", "transformer_blocks.0.attn.to_q.scale",
            "proj_out.weight"} <= keys
    assert "transformer_blocks.0.attn.to_q.weight" not in keys

    def requantize(*args, **kwargs):
        raise AssertionError("a saved model is loaded as stored, never quantized again")

    monkeypatch.setattr(QuantizedLinear, "set_weight", requantize)
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "q", torch_dtype=torch.bfloat16)
    same_state(model, again)
    assert torch.equal(forward(again), forward(model))
    # a config passed as well: diffusers keeps the stored one (and warns), as with its own quantizers
    with pytest.warns(UserWarning, match="quantization_config"):
        other = FluxTransformer2DModel.from_pretrained(tmp_path / "q", quantization_config=QuantConfig("int8wo"),
                                                       torch_dtype=torch.bfloat16)
    same_state(model, other)
    again.save_pretrained(tmp_path / "q2")  # and saves the same record again
    assert json.loads((tmp_path / "q2" / "config.json").read_text())["quantization_config"] == stored


def test_static_fp8_activation_scale_stays_float32(flux_folder, tmp_path):
    config = QuantConfig("float8_static_activation_float8_weight", activation_scale=0.0123, backend="reference")
    model = FluxTransformer2DModel.from_pretrained(flux_folder, quantization_config=config,
                                                   torch_dtype=torch.bfloat16)
    layer = model.transformer_blocks[0].attn.to_q
    assert layer.act_scale.dtype == torch.float32 and layer.act_scale.item() == pytest.approx(0.0123)
    assert layer.calibrated and layer.scale.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "q")
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "q", torch_dtype=torch.bfloat16)
    same_state(model, again)  # diffusers would have cast act_scale to bf16 (and fp8 codes to their values)
    assert torch.equal(forward(again), forward(model))


def test_from_single_file_quantizes_and_registers_its_config(flux_folder, tmp_path):
    file = str(flux_folder / "diffusion_pytorch_model.safetensors")
    config = QuantConfig("int8wo", modules_to_not_convert=["proj_out"])
    model = FluxTransformer2DModel.from_single_file(file, config=str(flux_folder), quantization_config=config,
                                                    torch_dtype=torch.float32)
    same_state(model, FluxTransformer2DModel.from_pretrained(flux_folder, quantization_config=config,
                                                             torch_dtype=torch.float32))
    model.save_pretrained(tmp_path / "q")
    same_state(model, FluxTransformer2DModel.from_pretrained(tmp_path / "q", torch_dtype=torch.float32))
    with pytest.raises(ValueError, match="holds quantrt's quantized tensors already"):
        FluxTransformer2DModel.from_single_file(str(tmp_path / "q" / "diffusion_pytorch_model.safetensors"),
                                                config=str(flux_folder), quantization_config=config)


@pytest.fixture(scope="module")
def pipeline_folder(flux_folder, tmp_path_factory):
    """A FluxPipeline (transformer, T5 text encoder, scheduler) saved in full precision."""
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=2, d_kv=32, vocab_size=256))
    folder = tmp_path_factory.mktemp("pipeline") / "fp32"
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=t5,
                 transformer=FluxTransformer2DModel.from_pretrained(flux_folder), **ABSENT).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("form", ["quant_mapping", "quant_backend"])
def test_pipeline_quantization_config_and_a_pipeline_reload(pipeline_folder, tmp_path, form):
    if form == "quant_mapping":
        config = PipelineQuantizationConfig(quant_mapping={"transformer": QuantConfig("int8wo"),
                                                           "text_encoder_2": QuantConfig("int4wo", group_size=32)})
    else:  # the same class in diffusers' and transformers' registries, so diffusers builds it for both
        config = PipelineQuantizationConfig(quant_backend="quantrt", quant_kwargs={"scheme": "int8wo"},
                                            components_to_quantize=["transformer", "text_encoder_2"])
    pipe = DiffusionPipeline.from_pretrained(pipeline_folder, quantization_config=config, dtype=torch.float32,
                                             **ABSENT)
    assert type(pipe) is FluxPipeline and type(pipe.text_encoder_2) is T5EncoderModel
    assert set(quantized(pipe.transformer).values()) == {"int8wo"}
    # T5's _keep_in_fp32_modules (the feed-forward's wo) stay in full precision, as transformers keeps them
    assert [name.rsplit(".", 1)[-1] for name in linears(pipe.text_encoder_2)] == ["wo", "wo"]
    assert len(quantized(pipe.text_encoder_2)) == 10
    if form == "quant_mapping":
        pipe.save_pretrained(tmp_path / "q")
        again = DiffusionPipeline.from_pretrained(tmp_path / "q", dtype=torch.float32, **ABSENT)
        same_state(pipe.transformer, again.transformer)
        same_state(pipe.text_encoder_2, again.text_encoder_2)
        ids = torch.randint(0, 256, (1, 6))
        with torch.no_grad():
            assert torch.equal(again.text_encoder_2(ids)[0], pipe.text_encoder_2(ids)[0])


def test_a_quantized_transformer_component_saves_and_reloads_with_its_pipeline(pipeline_folder, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(pipeline_folder, dtype=torch.float32, **ABSENT)
    pipe.transformer = QuantizedTransformer.from_model(pipe.transformer, "int8wo", progress=False)
    pipe.save_pretrained(tmp_path / "q")
    index = json.loads((tmp_path / "q" / "model_index.json").read_text())
    assert index["transformer"] == ["quantrt.transformer", "QuantizedTransformer"]
    assert (tmp_path / "q" / "transformer" / "quantrt_config.json").is_file()  # quantrt's own folder
    again = DiffusionPipeline.from_pretrained(tmp_path / "q", dtype=torch.float32, **ABSENT)
    assert isinstance(again.transformer, QuantizedTransformer)
    same_state(pipe.transformer.model, again.transformer.model)
    assert torch.equal(forward(again.transformer), forward(pipe.transformer))


def test_a_checkpoint_missing_a_quantized_tensor_is_an_error(flux_folder, tmp_path):
    FluxTransformer2DModel.from_pretrained(flux_folder, quantization_config=QuantConfig("int8wo")).save_pretrained(
        tmp_path / "q")
    file = tmp_path / "q" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["transformer_blocks.0.attn.to_k.qweight"]
    save_file(state, file)
    with pytest.raises(ValueError, match="no 'transformer_blocks.0.attn.to_k.qweight'"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "q")


def test_a_non_finite_weight_and_autoquant_are_refused_naming_why(tmp_path):
    model = build_flux("tiny", dtype=torch.float32)
    with torch.no_grad():
        model.proj_out.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(ValueError, match="layer 'proj_out'.*NaN"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "nan", quantization_config=QuantConfig("int8wo"))
    with pytest.raises(ValueError, match="autoquant.*example inputs"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "nan", quantization_config=QuantConfig("autoquant"))


def test_other_diffusers_internals_fail_naming_the_version(monkeypatch):
    monkeypatch.delattr(diffusers_auto, "AUTO_QUANTIZATION_CONFIG_MAPPING")
    monkeypatch.setattr(integration.diffusers, "__version__", "9.9.9")
    with pytest.raises(ImportError, match="diffusers 9.9.9.*AUTO_QUANTIZATION_CONFIG_MAPPING.*diffusers==0.42"):
        integration.register()


def test_a_loaded_model_compiles_without_graph_breaks(flux_folder):
    model = FluxTransformer2DModel.from_pretrained(flux_folder, quantization_config=QuantConfig("int8wo"),
                                                   torch_dtype=torch.float32)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(**flux_inputs(model))[0], forward(model))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_quantizing_while_loading_peaks_below_the_bf16_size(flux_folder, tmp_path):
    """Peak RSS growth of from_pretrained(quantization_config=QuantConfig("int8wo")) of a ~290 MiB bf16 FLUX in a
    fresh process (after a tiny load, for the imports), against its bf16 size. Without quantrt handing back the
    memory map's pages and the freed heap per weight it peaks at more than twice the bf16 size."""
    config = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                  num_attention_heads=8, joint_attention_dim=1024, pooled_projection_dim=256, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
    with torch.device("meta"):
        skeleton = FluxTransformer2DModel(**config)
    bf16 = write_random_checkpoint(skeleton.state_dict(), tmp_path / "big" / "diffusion_pytorch_model.safetensors")
    skeleton.save_config(tmp_path / "big")
    measured = peak_rss_of_loading("diffusers", "FluxTransformer2DModel", "torch_dtype", flux_folder,
                                   tmp_path / "big")
    print(f"\ndiffusers from_pretrained of a {bf16 / 2**20:.0f} MiB bf16 FLUX as int8wo "
          f"({measured['quantized'] / 2**20:.0f} MiB): peak RSS +{measured['growth'] / 2**20:.0f} MiB")
    assert measured["growth"] < bf16, measured
