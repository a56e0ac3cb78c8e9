"""Quantize-on-load (quantrt.checkpoints.on_load): an unquantized folder quantized tensor by tensor as it is
read, equal to quantizing the loaded model, refusing what a folder must not make it read, and its peak memory
(with that of the single-file loader), measured in a fresh process."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from quantrt import QuantConfig, QuantizedTransformer
from quantrt.cli import main
from quantrt.models import FLUX_SIZES, build_flux, flux_inputs
from quantrt.serialization import CheckpointError

from .writers import write_bfl_file


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64))


def test_quantize_on_load_streams_a_diffusers_folder(tmp_path):
    model = build_flux("tiny", dtype=torch.float32)
    inputs = flux_inputs(model)
    model.save_pretrained(tmp_path / "unquantized", max_shard_size="200KB")
    expected = QuantizedTransformer.from_model(model, QuantConfig("int4wo", backend="reference"), progress=False)
    qt = QuantizedTransformer.from_pretrained(tmp_path / "unquantized", quantization="int4wo",
                                              backend="reference", progress=False)
    torch.testing.assert_close(qt(**inputs)[0], expected(**inputs)[0], rtol=0, atol=0)
    assert [r.scheme for r in qt.summary()] == [r.scheme for r in expected.summary()]
    # and through the CLI, into a quantrt folder that loads
    assert main(["quantize", str(tmp_path / "unquantized"), str(tmp_path / "q"), "--scheme", "int4wo"]) == 0
    loaded = QuantizedTransformer.from_pretrained(tmp_path / "q", backend="reference")
    torch.testing.assert_close(loaded(**inputs)[0], expected(**inputs)[0], rtol=0, atol=0)


@pytest.mark.parametrize("activation_scale", [0.02, None], ids=["given", "uncalibrated"])
def test_quantize_on_load_sets_the_static_activation_scale(tmp_path, activation_scale):
    def skeleton():
        return nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16))

    model = skeleton()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    config = QuantConfig("float8_static_activation_float8_weight", backend="reference",
                         activation_scale=activation_scale)
    expected = QuantizedTransformer.from_model(model, config, progress=False)
    loaded = QuantizedTransformer.from_pretrained(tmp_path, model=skeleton, quantization=config, progress=False)
    for name in ("0", "2"):
        layer, reference = loaded.model.get_submodule(name), expected.model.get_submodule(name)
        assert layer.act_scale.dtype == torch.float32 and layer.act_scale.shape == (1, 1)
        torch.testing.assert_close(layer.act_scale, reference.act_scale, rtol=0, atol=0, equal_nan=True)
        assert layer.calibrated == reference.calibrated == (activation_scale is not None)
    if activation_scale is not None:
        x = torch.randn(5, 64)
        torch.testing.assert_close(loaded(x), expected(x), rtol=0, atol=0)


def test_non_finite_weights_are_refused_on_quantize_on_load(tmp_path):
    model = build_flux("tiny", dtype=torch.float32)
    with torch.no_grad():
        model.proj_out.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "unquantized")
    with pytest.raises(ValueError, match="layer 'proj_out'.*NaN/Inf"):
        QuantizedTransformer.from_pretrained(tmp_path / "unquantized", quantization="int8wo", progress=False)


def test_quantize_on_load_index_paths_cannot_leave_the_folder(tmp_path):
    folder = tmp_path / "unquantized"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "MLP"}))
    save_file({k: v.contiguous() for k, v in mlp().state_dict().items()}, tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {name: "../outside.safetensors" for name in mlp().state_dict()}}))
    with pytest.raises(CheckpointError, match="outside the folder or not a .safetensors file"):
        QuantizedTransformer.from_pretrained(folder, quantization="int8wo", model=mlp, progress=False)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        QuantizedTransformer.from_pretrained(folder, quantization="int8wo", model=mlp, progress=False)


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
