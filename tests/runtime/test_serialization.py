import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from quantrt import QuantConfig, QuantizedTransformer
from quantrt.cli import main
from quantrt.models import build_flux, flux_inputs
from quantrt.schemes import SCHEMES
from quantrt.serialization import CONFIG_NAME, INDEX_NAME, CheckpointError

# one scheme per storage format and activation kind; the fresh-process test covers all of them at once
ROUND_TRIP = ["int8wo", "int4wo", "uint1wo", "uint3wo", "uint7wo", "float8wo_e5m2", "float8wo_e4m3",
              "fp3_e1m1", "fp6_e3m2", "fp7_e2m4", "int8dq", "int4dq", "float8dq_e4m3_tensor", "float8dq_e4m3_row",
              "float8_static_activation_float8_weight"]


def quantized_flux(scheme, **kwargs):
    model = build_flux("tiny", dtype=torch.float32)
    config = QuantConfig(scheme, backend="reference", **kwargs)
    if scheme == "float8_static_activation_float8_weight":
        config = QuantConfig(scheme, backend="reference", activation_scale=0.02)
    return QuantizedTransformer.from_model(model, config, progress=False), flux_inputs(model)


def test_every_scheme_is_listed_in_the_round_trip():
    formats = {SCHEMES[s].format for s in ROUND_TRIP}
    assert {"int8", "uint1", "uint3", "uint4", "uint7", "fp8_e4m3", "fp8_e5m2"} <= formats


def test_save_then_load_in_a_fresh_process_is_bitwise_identical(tmp_path):
    for scheme in ROUND_TRIP:
        qt, inputs = quantized_flux(scheme)
        with torch.no_grad():
            expected = qt(**inputs)[0]
        qt.save_pretrained(tmp_path / scheme)
        save_file({"expected": expected}, tmp_path / f"{scheme}.expected.safetensors")
    script = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import load_file
        from quantrt import QuantizedTransformer
        from quantrt.models import build_flux, flux_inputs
        inputs = flux_inputs(build_flux("tiny", dtype=torch.float32))
        for scheme in {ROUND_TRIP!r}:
            qt = QuantizedTransformer.from_pretrained(r"{tmp_path}/" + scheme, backend="reference")
            with torch.no_grad():
                out = qt(**inputs)[0]
            expected = load_file(r"{tmp_path}/" + scheme + ".expected.safetensors")["expected"]
            if not torch.equal(out, expected):
                sys.exit(f"{{scheme}}: outputs differ after load, max diff {{(out - expected).abs().max()}}")
        print("identical", len({ROUND_TRIP!r}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"identical {len(ROUND_TRIP)}" in result.stdout


def test_folder_contents_shards_and_no_pickle(tmp_path):
    qt, inputs = quantized_flux("int4wo")
    qt.save_pretrained(tmp_path / "q", max_shard_size="100KB")
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert CONFIG_NAME in files and INDEX_NAME in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1
    for file in (tmp_path / "q").iterdir():
        head = file.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"PK", f"{file.name} looks like a pickle/zip"
    meta = json.loads((tmp_path / "q" / CONFIG_NAME).read_text())
    assert meta["format_version"] == 1 and meta["model"]["class"] == "FluxTransformer2DModel"
    assert meta["layers"]["proj_out"]["format"] == "uint4" and meta["quant_config"]["scheme"] == "int4wo"
    assert "x_embedder" in meta["kept"]
    index = json.loads((tmp_path / "q" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(meta["tensors"])
    loaded = QuantizedTransformer.from_pretrained(tmp_path / "q")
    torch.testing.assert_close(loaded(**inputs)[0], qt(**inputs)[0], rtol=0, atol=0)
    assert "group_size=128" in next(r.why for r in loaded.summary() if r.name == "x_embedder")


def test_existing_folder_is_not_overwritten_silently(tmp_path):
    qt, _ = quantized_flux("int8wo")
    target = tmp_path / "q"
    target.mkdir()
    (target / "precious.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        qt.save_pretrained(target)
    # not a quantrt folder: even overwrite=True leaves it alone
    with pytest.raises(FileExistsError, match="does not look like a quantrt folder"):
        qt.save_pretrained(target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["precious.txt"] and (target / "precious.txt").read_text() == "mine"
    (target / "precious.txt").unlink()
    qt.save_pretrained(target)
    qt.save_pretrained(target, overwrite=True)  # a quantrt folder is replaced
    assert (target / CONFIG_NAME).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def _corrupt(folder: Path, how: str) -> None:
    file = folder / "model.safetensors"
    if how == "missing":
        tensors = load_file(file)
        del tensors["proj_out.qweight"]
        save_file(tensors, file)
    elif how == "renamed":
        tensors = load_file(file)
        tensors["proj_out.qweights"] = tensors.pop("proj_out.qweight")
        save_file(tensors, file)
    elif how == "wrong_shape":
        tensors = load_file(file)
        tensors["proj_out.scale"] = tensors["proj_out.scale"][:-1].contiguous()
        save_file(tensors, file)
    elif how == "truncated":
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
    elif how == "newer_format":
        meta = json.loads((folder / CONFIG_NAME).read_text())
        meta["format_version"] = 99
        (folder / CONFIG_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize("how,message", [
    ("missing", "proj_out.qweight"), ("renamed", "proj_out.qweights"), ("wrong_shape", "proj_out.scale"),
    ("truncated", "damaged or truncated"), ("newer_format", "upgrade quantrt")])
def test_damaged_folders_give_errors_naming_the_problem(tmp_path, how, message):
    qt, _ = quantized_flux("int8wo")
    qt.save_pretrained(tmp_path / "q")
    _corrupt(tmp_path / "q", how)
    with pytest.raises(CheckpointError, match=message):
        QuantizedTransformer.from_pretrained(tmp_path / "q")


def test_index_paths_cannot_escape_the_folder(tmp_path):
    qt, _ = quantized_flux("int8wo")
    qt.save_pretrained(tmp_path / "q", max_shard_size="100KB")
    index = json.loads((tmp_path / "q" / INDEX_NAME).read_text())
    index["weight_map"]["proj_out.qweight"] = "../evil.safetensors"
    (tmp_path / "q" / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the folder"):
        QuantizedTransformer.from_pretrained(tmp_path / "q")


def test_plain_modules_need_their_skeleton(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16))
    x = torch.randn(3, 64)
    qt = QuantizedTransformer.from_model(model, "uint4wo", progress=False)
    qt.save_pretrained(tmp_path / "q")
    with pytest.raises(CheckpointError, match="pass its skeleton"):
        QuantizedTransformer.from_pretrained(tmp_path / "q")
    loaded = QuantizedTransformer.from_pretrained(
        tmp_path / "q", model=lambda: nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16)))
    torch.testing.assert_close(loaded(x), qt(x), rtol=0, atol=0)


def test_torch_dtype_on_load(tmp_path):
    qt, inputs = quantized_flux("int8wo")
    qt.save_pretrained(tmp_path / "q")
    loaded = QuantizedTransformer.from_pretrained(tmp_path / "q", torch_dtype=torch.bfloat16)
    assert loaded.model.proj_out.scale.dtype == torch.bfloat16 and loaded.model.proj_out.qweight.dtype == torch.int8
    bf16_inputs = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
                   for k, v in inputs.items()}
    out = loaded(**bf16_inputs)[0].float()
    ref = qt(**inputs)[0]
    assert ((out - ref).norm() / ref.norm()) < 0.05


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
