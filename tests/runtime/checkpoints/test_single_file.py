"""Single files in BFL's original Flux layout (quantrt.checkpoints.single_file), converted with diffusers' own
single-file conversion while they stream."""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from quantrt import QuantConfig, QuantizedTransformer
from quantrt.checkpoints.single_file import single_file_plan
from quantrt.models import FLUX_SIZES, build_flux, flux_inputs
from quantrt.serialization import CheckpointError

from .writers import to_bfl_layout, write_bfl_file


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
