import copy

import pytest
import torch
import torch.nn as nn

import quantrt
from quantrt import QuantConfig, QuantizedLinear, QuantizedTransformer
from quantrt.demo import relative_error
from quantrt.models import build_flux, flux_inputs
from quantrt.schemes import SCHEMES

# relative L2 error of the tiny FLUX output (float32) against the unquantized model, per scheme: a few
# times what the format's step size gives, so a broken format fails and a correct one never does
ERROR_BOUND = {"int8wo": 0.02, "int8dq": 0.03, "int4wo": 0.15, "int4dq": 0.2, "float8wo_e4m3": 0.08,
               "float8wo_e5m2": 0.15, "float8dq_e4m3_tensor": 0.1, "float8dq_e4m3_row": 0.1,
               "float8_static_activation_float8_weight": 0.1}
ERROR_BOUND.update({f"uint{b}wo": min(1.0, 0.15 * 2.0 ** (4 - b)) for b in range(1, 8)})


def fpx_bound(name: str) -> float:
    mbits = int(name[-1])
    return 0.6 * 2.0**-mbits  # the mantissa sets the relative step


@pytest.fixture(scope="module")
def tiny_flux():
    model = build_flux("tiny", dtype=torch.float32)
    inputs = flux_inputs(model)
    with torch.no_grad():
        reference = model(**inputs)[0]
    return model, inputs, reference


@pytest.mark.parametrize("name", list(SCHEMES))
def test_tiny_flux_runs_every_scheme_within_its_bound(tiny_flux, name):
    model, inputs, reference = tiny_flux
    qt = QuantizedTransformer.from_model(copy.deepcopy(model), QuantConfig(name, backend="reference"),
                                         progress=False)
    if name == "float8_static_activation_float8_weight":
        assert quantrt.calibrate(qt, [inputs]) > 0
    with torch.no_grad():
        out = qt(**inputs)[0]
    assert out.shape == reference.shape
    assert torch.isfinite(out).all()
    error = relative_error(out, reference)
    assert error < (ERROR_BOUND.get(name) or fpx_bound(name)), f"{name}: relative error {error:.4f}"
    assert error > 0  # the layers really were quantized
    quantized = [r for r in qt.summary() if r.quantized]
    assert len(quantized) >= len(qt.summary()) - 1  # only x_embedder (K=32) may not fit a group of 64/128
    assert all(isinstance(qt.model.get_submodule(r.name), QuantizedLinear) for r in quantized)
    assert qt.memory_footprint() < 0.55 * sum(p.numel() * 4 for p in model.parameters())


def test_static_activation_without_calibration_is_a_clear_error(tiny_flux):
    model, inputs, _ = tiny_flux
    qt = QuantizedTransformer.from_model(copy.deepcopy(model), "float8_static_activation_float8_weight",
                                         progress=False)
    with pytest.raises(RuntimeError, match="calibrate"):
        qt(**inputs)
    qt = QuantizedTransformer.from_model(copy.deepcopy(model), QuantConfig(
        "float8_static_activation_float8_weight", activation_scale=0.05), progress=False)
    assert torch.isfinite(qt(**inputs)[0]).all()


def test_storage_bytes_follow_the_format_arithmetic():
    k, n, g = 1024, 256, 128
    model = nn.Sequential(nn.Linear(k, n, bias=False)).to(torch.bfloat16)
    bf16_bytes = n * k * 2
    # the reference backend keeps nothing beside the buffers (torchao, auto's pick on CPU, adds unpacked codes)
    qt = QuantizedTransformer.from_model(model, QuantConfig("uint3wo", group_size=g, backend="reference"),
                                         progress=False)
    expected = n * k * 3 // 8 + 2 * (n * k // g) * 2  # 3-bit codes + bf16 scale and zero per group
    assert qt.memory_footprint() == expected
    assert qt.memory_footprint() / bf16_bytes == pytest.approx(3 / 16 + 2 / g)
    assert qt.summary()[0].bytes == expected


def test_modules_to_not_convert_on_flux(tiny_flux):
    model, inputs, _ = tiny_flux
    config = QuantConfig("int8wo", modules_to_not_convert=["proj_out", "to_q"])
    qt = QuantizedTransformer.from_model(copy.deepcopy(model), config, progress=False)
    kept = {r.name for r in qt.summary() if not r.quantized}
    assert "proj_out" in kept
    assert {"transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_q"} <= kept
    assert isinstance(qt.model.proj_out, nn.Linear) and not isinstance(qt.model.proj_out, QuantizedLinear)
    assert all("modules_to_not_convert" in r.why for r in qt.summary() if r.name in kept)


def test_layers_that_do_not_fit_stay_in_full_precision_and_say_why(tiny_flux):
    model, _, _ = tiny_flux
    qt = QuantizedTransformer.from_model(copy.deepcopy(model), QuantConfig("int4wo"), progress=False)
    x_embedder = next(r for r in qt.summary() if r.name == "x_embedder")
    assert not x_embedder.quantized and "K=32" in x_embedder.why and "group_size=128" in x_embedder.why
    assert "kept in full precision" in str(qt.summary())


def test_pipeline_like_call_through_config(tiny_flux):
    # what diffusers' FluxPipeline does with pipeline.transformer: read the config, dtype and device, then
    # call with keyword arguments and return_dict=False
    model, inputs, reference = tiny_flux
    qt = QuantizedTransformer.from_model(copy.deepcopy(model), "int8wo", progress=False)
    assert qt.config is qt.model.config and qt.config == model.config
    assert qt.config.in_channels == 32 and qt.config.guidance_embeds
    assert qt.dtype == torch.float32 and qt.device.type == "cpu"
    latents = torch.randn(1, 64, qt.config.in_channels)
    call = dict(inputs, hidden_states=latents)
    with torch.no_grad():
        noise_pred = qt(**call)[0]
        expected = model(**call)[0]
    assert noise_pred.shape == latents.shape
    assert relative_error(noise_pred, expected) < ERROR_BOUND["int8wo"]
    pipeline = type("Pipeline", (), {})()
    pipeline.transformer = qt
    assert isinstance(pipeline.transformer, nn.Module)


def test_quantize_in_place_and_errors():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(5, 64)
    expected = model(x)
    reports = quantrt.quantize_(model, "int8wo", progress=False)
    assert [r.name for r in reports] == ["0", "2"]
    assert isinstance(model[0], QuantizedLinear) and model[0].bias is not None
    torch.testing.assert_close(model(x), expected, rtol=0.02, atol=0.02)
    with pytest.raises(ValueError, match="no nn.Linear layers"):
        QuantizedTransformer.from_model(nn.Sequential(nn.ReLU()), "int8wo", progress=False)
    with pytest.raises(TypeError, match="wrap a lone nn.Linear"):
        quantrt.quantize_(nn.Linear(8, 8), "int8wo")


def test_nan_weights_name_the_layer():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with torch.no_grad():
        model[1].weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match="layer '1'.*NaN"):
        quantrt.quantize_(model, "int8wo", progress=False)


def test_summary_and_attribute_passthrough(tiny_flux):
    model, _, _ = tiny_flux
    qt = QuantizedTransformer.from_model(copy.deepcopy(model), "int4wo", progress=False)
    text = str(qt.summary())
    assert "| layer" in text and "int4wo" in text
    assert all(r.backend in text and (r.why or "-") in text for r in qt.summary())
    assert qt.transformer_blocks is qt.model.transformer_blocks
    with pytest.raises(AttributeError):
        qt.no_such_attribute
    with pytest.raises(TypeError, match="already a QuantizedTransformer"):
        QuantizedTransformer.from_model(qt, "int8wo")


def test_dtype_cast_keeps_fp8_codes():
    model = nn.Sequential(nn.Linear(32, 16))
    qt = QuantizedTransformer.from_model(model, "float8wo_e4m3", progress=False)
    before = qt.model[0].qweight.clone()
    qt.to(torch.float16)
    assert qt.model[0].qweight.dtype == torch.uint8 and torch.equal(qt.model[0].qweight, before)
    assert qt.model[0].scale.dtype == torch.float16


@pytest.mark.parametrize("load", ["from_pretrained", "from_single_file"])
def test_a_cuda_device_without_cuda_is_refused_with_the_fix(monkeypatch, tmp_path, load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda'.*load with device='cpu'"):
        if load == "from_pretrained":
            QuantizedTransformer.from_pretrained(tmp_path / "missing", device="cuda")
        else:
            QuantizedTransformer.from_single_file(tmp_path / "missing.safetensors", "int8wo", device="cuda")


def test_summary_prints_a_reason_many_layers_share_once():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)], nn.Linear(64, 48))
    qt = QuantizedTransformer.from_model(model, QuantConfig("int8wo", backend="reference"))
    reasons = [r.why for r in qt.summary()]
    shared = max(set(reasons), key=reasons.count)
    assert reasons.count(shared) == 5 and shared
    text = str(qt.summary())
    assert text.count(shared) == 1
    assert f"[1] {shared} (5 layers)" in text
    assert sum(line.split("|")[5].strip() == "[1]" for line in text.splitlines() if line.startswith("|")) == 5
