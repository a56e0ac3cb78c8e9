"""quantrt.integrations.transformers: QuantConfig as the quantization_config of transformers' from_pretrained
(transformers' own skips: lm_head, tied weights, _keep_in_fp32_modules); save_pretrained and a reload with no
config, bit for bit; generate; device_map; errors; peak memory."""

import json
import logging
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5EncoderModel
from transformers.quantizers import auto as transformers_auto

import quantrt
from quantrt import QuantConfig, QuantizedLinear
from quantrt.integrations import transformers as integration
from quantrt.models import build_llm

from .helpers import linears, peak_rss_of_loading, quantized, same_state, write_random_checkpoint

IDS = torch.tensor([[1, 17, 300, 42, 7, 99, 511, 3]])


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llm") / "fp32"
    build_llm("tiny", dtype=torch.float32).save_pretrained(folder)
    return folder


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_from_pretrained_quantizes_while_loading_and_keeps_the_output_embedding(llm_folder):
    config = QuantConfig("int8wo")
    model = LlamaForCausalLM.from_pretrained(llm_folder, quantization_config=config, dtype=torch.float32)
    assert type(model) is LlamaForCausalLM and model.is_quantized
    assert linears(model) == ["lm_head"]  # transformers' default skip, as for its quanto and torchao integrations
    expected = LlamaForCausalLM.from_pretrained(llm_folder, dtype=torch.float32)
    quantrt.quantize_(expected, QuantConfig("int8wo", modules_to_not_convert=["lm_head"]), progress=False)
    same_state(model, expected)
    assert torch.equal(logits(model), logits(expected))
    # greedy generation runs on the quantized layers
    assert model.generate(IDS, max_new_tokens=4, do_sample=False).shape == (1, 12)


def test_modules_to_not_convert_replaces_the_default_skips(llm_folder):
    config = QuantConfig("int4wo", group_size=32, modules_to_not_convert=["down_proj"], backend="reference")
    model = LlamaForCausalLM.from_pretrained(llm_folder, quantization_config=config, dtype=torch.float32)
    assert [name.rsplit(".", 1)[-1] for name in linears(model)] == ["down_proj", "down_proj"]
    assert quantized(model)["lm_head"] == "int4wo"


def test_save_pretrained_writes_the_scheme_per_layer_and_reloads_bit_for_bit(llm_folder, tmp_path, monkeypatch):
    model = LlamaForCausalLM.from_pretrained(llm_folder, quantization_config=QuantConfig(
        "int4wo", group_size=32, modules={"re:.*mlp\\..*": "int8wo"}), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "q")
    stored = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "quantrt"
    assert stored["modules"]["model.layers.0.self_attn.q_proj"] == {"scheme": "int4wo", "group_size": 32}
    assert stored["modules"]["model.layers.1.mlp.up_proj"] == {"scheme": "int8wo", "group_size": None}
    assert stored["modules"]["lm_head"] is None
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"model.layers.0.self_attn.q_proj.qweight", "lm_head.weight"} <= keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys

    def requantize(*args, **kwargs):
        raise AssertionError("a saved model is loaded as stored, never quantized again")

    monkeypatch.setattr(QuantizedLinear, "set_weight", requantize)
    again = LlamaForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    same_state(model, again)
    assert torch.equal(logits(again), logits(model))
    assert torch.equal(again.generate(IDS, max_new_tokens=3, do_sample=False),
                       model.generate(IDS, max_new_tokens=3, do_sample=False))
    # a QuantConfig passed as well: transformers merges it with the stored one (same class name), which wins
    with pytest.warns(UserWarning, match="quantization_config"):
        other = LlamaForCausalLM.from_pretrained(tmp_path / "q", quantization_config=QuantConfig("int8wo"),
                                                 dtype=torch.bfloat16)
    same_state(model, other)


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto"], ids=["one-device", "auto"])
def test_device_map_keeps_the_layers_quantized(llm_folder, device_map):
    config = QuantConfig("int8wo")
    model = LlamaForCausalLM.from_pretrained(llm_folder, quantization_config=config, dtype=torch.float32,
                                             device_map=device_map)
    expected = LlamaForCausalLM.from_pretrained(llm_folder, quantization_config=config, dtype=torch.float32)
    same_state(model, expected)
    assert torch.equal(logits(model), logits(expected))


def test_models_whose_init_reads_linear_weights_load_and_reload(tmp_path):
    """T5's _init_weights reads its attention's q/k/v/o .weight, which a QuantizedLinear has not; its
    _keep_in_fp32_modules (the feed-forward's wo) stay in full precision."""
    torch.manual_seed(0)
    T5EncoderModel(T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=2, d_kv=32, vocab_size=256)).save_pretrained(
        tmp_path / "fp32")
    model = T5EncoderModel.from_pretrained(tmp_path / "fp32", quantization_config=QuantConfig("int8wo"),
                                           dtype=torch.float32)
    assert [name.rsplit(".", 1)[-1] for name in linears(model)] == ["wo", "wo"]
    assert not any(hasattr(layer, "weight") for layer in model.modules() if isinstance(layer, QuantizedLinear))
    model.save_pretrained(tmp_path / "q")
    same_state(model, T5EncoderModel.from_pretrained(tmp_path / "q", dtype=torch.float32))


def test_a_checkpoint_missing_a_quantized_tensor_is_an_error(llm_folder, tmp_path):
    LlamaForCausalLM.from_pretrained(llm_folder, quantization_config=QuantConfig("int8wo")).save_pretrained(
        tmp_path / "q")
    file = tmp_path / "q" / "model.safetensors"
    state = load_file(file)
    del state["model.layers.1.mlp.down_proj.scale"]
    save_file(state, file, metadata={"format": "pt"})
    # transformers itself would fill the missing tensor with torch.empty and only warn
    with pytest.raises(ValueError, match="no 'model.layers.1.mlp.down_proj.scale'"):
        LlamaForCausalLM.from_pretrained(tmp_path / "q")


def test_a_non_finite_weight_is_refused_naming_the_layer(tmp_path):
    model = build_llm("tiny", dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 3] = float("inf")
    model.save_pretrained(tmp_path / "inf")
    # transformers catches the error of a conversion op, logs it in its loading report and raises its own
    report = []
    handler = logging.Handler()
    handler.emit = lambda record: report.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        with pytest.raises(RuntimeError, match="conversion"):
            LlamaForCausalLM.from_pretrained(tmp_path / "inf", quantization_config=QuantConfig("int8wo"))
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert "layer 'model.layers.1.self_attn.o_proj': its weight (128, 128) has 1 NaN/Inf" in "\n".join(report)


def test_other_transformers_internals_fail_naming_the_version(monkeypatch):
    monkeypatch.delattr(integration.HfQuantizer, "get_quantize_ops")
    monkeypatch.setattr(integration.transformers, "__version__", "9.9.9")
    with pytest.raises(ImportError, match="transformers 9.9.9.*get_quantize_ops.*transformers==5.24"):
        integration.register()
    assert transformers_auto.AUTO_QUANTIZER_MAPPING["quantrt"] is integration.QuantrtHfQuantizer


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_quantizing_while_loading_peaks_below_the_bf16_size(llm_folder, tmp_path):
    """Peak RSS growth of from_pretrained(quantization_config=QuantConfig("int8wo")) of a ~300 MiB bf16 Llama in a
    fresh process (after a tiny load, for the imports), against its bf16 size (embeddings and lm_head stay bf16).
    Without quantrt handing back the memory map's pages and the freed heap per weight it peaks above it."""
    config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=16,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=512)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    bf16 = write_random_checkpoint(skeleton.state_dict(), tmp_path / "big" / "model.safetensors")
    config.save_pretrained(tmp_path / "big")
    measured = peak_rss_of_loading("transformers", "LlamaForCausalLM", "dtype", llm_folder, tmp_path / "big")
    print(f"\ntransformers from_pretrained of a {bf16 / 2**20:.0f} MiB bf16 Llama as int8wo "
          f"({measured['quantized'] / 2**20:.0f} MiB): peak RSS +{measured['growth'] / 2**20:.0f} MiB")
    assert measured["growth"] < bf16, measured
