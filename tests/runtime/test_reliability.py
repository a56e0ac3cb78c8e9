"""Reliability and security (issue 8): bad input to quantization and at run time, damaged or hostile saved
folders, threads and interrupted saves, and what a folder may make quantrt read. docs/reliability.md lists
these cases and what happens in each. Compile-cache faults are tested in tests/runtime/test_cache.py."""

from __future__ import annotations

import ast
import copy
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import quantrt
import quantrt.serialization as serialization
from quantrt import QuantConfig, QuantizedTransformer
from quantrt.backends import BackendUnavailable, select_backend, usable_backends
from quantrt.schemes import resolve_scheme
from quantrt.serialization import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, CheckpointError

pytest.importorskip("torchao")
pytest.importorskip("optimum.quanto")

K, N = 128, 48
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# one backend computing the same values twice (other strides or leading dims): accumulation order at most
SAME_BACKEND = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
                torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
# against the float64 oracle F.linear(x, dequantized weight): the output's rounding to its dtype
ORACLE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
          torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}

# (backend, scheme, group_size, activation dtype); triton runs through the interpreter (fp16/fp32 only there)
CASES = [
    ("reference", "int8wo", None, torch.bfloat16), ("reference", "uint4wo", 32, torch.float32),
    ("reference", "int8dq", None, torch.float32), ("reference", "float8dq_e4m3_tensor", None, torch.bfloat16),
    ("reference", "fp6_e3m2", None, torch.float16),
    ("torchao", "int8wo", None, torch.bfloat16), ("torchao", "uint4wo", 32, torch.float32),
    ("torchao", "int8dq", None, torch.float32), ("torchao", "int4dq", 32, torch.float32),
    ("quanto", "int8wo", None, torch.bfloat16), ("quanto", "uint4wo", 32, torch.float32),
    ("quanto", "float8wo_e4m3", None, torch.float32),
    ("triton", "int8wo", None, torch.float16), ("triton", "uint4wo", 32, torch.float32),
    ("triton", "fp6_e3m2", None, torch.float16), ("triton", "float8wo_e5m2", None, torch.float32),
]


def case_id(case) -> str:
    backend, scheme, group_size, dtype = case
    return f"{backend}-{scheme}{'-g' + str(group_size) if group_size else ''}-{DTYPE_IDS[dtype]}"


def one_layer(dtype: torch.dtype, k: int = K, n: int = N) -> nn.Module:
    return nn.Sequential(OrderedDict(up=nn.Linear(k, n, dtype=dtype)))


def quantized(case) -> QuantizedTransformer:
    backend, scheme, group_size, dtype = case
    return QuantizedTransformer.from_model(one_layer(dtype), QuantConfig(scheme, group_size=group_size, backend=backend),
                                           progress=False)


def oracle(qt: QuantizedTransformer, x: torch.Tensor) -> torch.Tensor:
    layer = qt.model.up
    return torch.nn.functional.linear(x.double(), layer.dequantize().double(), layer.bias.double())


# --- 1. bad input to quantization -------------------------------------------------------------------------


def test_a_model_without_linear_layers_is_refused_by_both_entry_points():
    for quantize in (lambda m: QuantizedTransformer.from_model(m, "int8wo", progress=False),
                     lambda m: quantrt.quantize_(m, "int8wo", progress=False)):
        with pytest.raises(ValueError, match="Sequential has no nn.Linear layers"):
            quantize(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    model = one_layer(torch.float32)
    quantrt.quantize_(model, "int8wo", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantrt.quantize_(model, "int8wo", progress=False)


@pytest.mark.parametrize("scheme, group_size, bad_k, reason", [
    ("int4wo", None, 96, "K=96 is not a multiple of group_size=128"),
    ("uint3wo", None, 96, "K=96 is not a multiple of group_size=64"),
    ("int8wo", 64, 96, "K=96 is not a multiple of group_size=64"),
    ("fp6_e3m2", None, 66, "K=66 is not a multiple of 4, needed to pack 6-bit codes"),
    ("fp3_e1m1", None, 100, "K=100 is not a multiple of 8, needed to pack 3-bit codes"),
], ids=["int4wo", "uint3wo", "int8wo-g64", "fp6_e3m2", "fp3_e1m1"])
def test_layers_the_scheme_cannot_take_stay_in_full_precision_and_say_why(scheme, group_size, bad_k, reason):
    model = nn.Sequential(OrderedDict(fits=nn.Linear(128, bad_k), odd=nn.Linear(bad_k, 16)))
    odd = model.odd
    x = torch.randn(5, 128)
    qt = QuantizedTransformer.from_model(model, QuantConfig(scheme, group_size=group_size, backend="reference"),
                                         progress=False)
    reports = {r.name: r for r in qt.summary()}
    assert reports["fits"].scheme == scheme and reports["odd"].scheme == "none"
    assert reports["odd"].why == f"kept in full precision: {reason}"
    assert reason in str(qt.summary())
    assert qt.model.odd is odd  # the very same nn.Linear, untouched
    hidden = qt.model.fits(x)
    torch.testing.assert_close(qt(x), odd(hidden), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused_naming_the_layer(bad):
    model = nn.Sequential(OrderedDict(first=nn.Linear(64, 64), second=nn.Linear(64, 8)))
    with torch.no_grad():
        model.second.weight[3, 5] = bad
    with pytest.raises(ValueError, match=r"layer 'second'.*1 NaN/Inf.*modules_to_not_convert=\['second'\]"):
        QuantizedTransformer.from_model(copy.deepcopy(model), "int8wo", progress=False)
    # the fix the message gives works
    qt = QuantizedTransformer.from_model(model, QuantConfig("int8wo", modules_to_not_convert=["second"]),
                                         progress=False)
    assert [r.scheme for r in qt.summary()] == ["int8wo", "none"]


def test_non_finite_weights_are_refused_on_quantize_on_load(tmp_path):
    from quantrt.models import build_flux

    model = build_flux("tiny", dtype=torch.float32)
    with torch.no_grad():
        model.proj_out.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "unquantized")
    with pytest.raises(ValueError, match="layer 'proj_out'.*NaN/Inf"):
        QuantizedTransformer.from_pretrained(tmp_path / "unquantized", quantization="int8wo", progress=False)


@pytest.mark.parametrize("name, suggestion", [
    ("int4w0", "'int4wo'"), ("uint3_wo", "'uint3wo'"), ("int8_weight_onyl", "'int8_weight_only'"),
    ("flaot8wo", "'float8wo'")])
def test_unknown_schemes_suggest_the_closest(name, suggestion):
    with pytest.raises(ValueError, match="unknown quantization scheme") as error:
        QuantConfig(name)
    assert f"Did you mean {suggestion}" in str(error.value)


@pytest.mark.parametrize("scheme, group_size, message", [
    ("int4wo", 100, "power of two >= 8"), ("int4wo", 0, "power of two >= 8"), ("int4wo", -5, "power of two >= 8"),
    ("int4wo", 7, "power of two >= 8"), ("uint3wo", 12, "power of two >= 8"), ("int8wo", 48, "power of two >= 8"),
    ("int4wo", 1.5, "whole number, got 1.5"), ("int4wo", "abc", "whole number"), ("int4wo", True, "whole number"),
    ("int4wo", -1, "stores its 4-bit codes in groups"), ("fp6_e3m2", 64, "takes no group_size"),
    ("float8wo_e4m3", 32, "takes no group_size")])
def test_group_sizes_the_scheme_cannot_take_fail_at_config_time(scheme, group_size, message):
    with pytest.raises(ValueError, match=message) as error:
        QuantConfig(scheme, group_size=group_size)
    assert scheme in str(error.value)


def fake_gpu(monkeypatch, capability: tuple[int, int], name: str) -> None:
    """torch.cuda answers as if a GPU of `capability` were here (selection only: nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.delenv("QUANTRT_BACKEND", raising=False)


@pytest.mark.parametrize("scheme", ["float8dq_e4m3_tensor", "float8dq_e4m3_row"])
def test_float8_dynamic_activations_below_sm89_fall_back_or_raise(monkeypatch, scheme):
    cuda = torch.device("cuda")
    fake_gpu(monkeypatch, (8, 6), "NVIDIA A10")
    assert usable_backends(resolve_scheme(scheme), cuda) == ["reference"]
    backend, why = select_backend(resolve_scheme(scheme), cuda, "auto", "blocks.0.attn")
    assert backend.name == "reference"
    assert "torchao: torchao's float8 dynamic activation quantization needs compute capability >= 8.9" in why
    assert "NVIDIA A10 has 8.6" in why
    with pytest.raises(BackendUnavailable) as error:
        select_backend(resolve_scheme(scheme), cuda, "torchao", "blocks.0.attn")
    for words in ("layer 'blocks.0.attn'", "'torchao'", scheme, ">= 8.9", "8.6", "backend='auto'", "reference"):
        assert words in str(error.value)
    fake_gpu(monkeypatch, (9, 0), "NVIDIA H100")
    assert select_backend(resolve_scheme(scheme), cuda, "auto")[0].name == "torchao"


def test_own_kernels_below_sm80_fall_back_or_raise(monkeypatch):
    cuda = torch.device("cuda")
    fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    backend, why = select_backend(resolve_scheme("int4wo"), cuda, "auto")
    assert backend.name == "torchao" and "triton: the kernels need a GPU of compute capability 8.0" in why
    with pytest.raises(BackendUnavailable, match="compute capability 8.0"):
        select_backend(resolve_scheme("int4wo"), cuda, "triton", "proj_out")
    fake_gpu(monkeypatch, (8, 0), "NVIDIA A100")
    assert select_backend(resolve_scheme("int4wo"), cuda, "auto")[0].name == "triton"


# --- 1. bad input at run time -----------------------------------------------------------------------------


def other_float(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype != torch.float32 else torch.float16


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_inputs_of_another_dtype_are_refused_naming_layer_dtype_and_fix(case):
    qt = quantized(case)
    dtype = case[3]
    for bad in (torch.int64, torch.int32, torch.float64, other_float(dtype)):
        x = torch.ones(3, K, dtype=bad)
        with pytest.raises(ValueError) as error:
            qt(x)
        message = str(error.value)
        for words in ("layer 'up'", str(bad), str(dtype), f"x.to({dtype})", f"(3, {K})"):
            assert words in message, message


def test_under_autocast_floating_inputs_are_cast_to_the_layer_dtype():
    qt = quantized(("reference", "uint4wo", 32, torch.bfloat16))
    x = torch.randn(4, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = qt(x)
        with pytest.raises(ValueError, match="cast the input"):
            qt(x.long())
    torch.testing.assert_close(y, qt(x.bfloat16()), rtol=0, atol=0)


def test_inputs_of_the_wrong_width_or_rank_are_refused_naming_the_layer():
    qt = quantized(("reference", "int8wo", None, torch.float32))
    with pytest.raises(ValueError, match=rf"layer 'up' takes inputs of shape \[\.\.\., {K}\], got \(3, 64\)"):
        qt(torch.randn(3, 64))
    with pytest.raises(ValueError, match=rf"layer 'up' takes inputs of shape \[\.\.\., {K}\], got \(\)"):
        qt(torch.tensor(1.0))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_leading_dimensions_and_strides_do_not_change_the_result(case):
    qt = quantized(case)
    dtype = case[3]
    x = torch.randn(2, 3, 5, K, dtype=dtype)
    flat = qt(x.reshape(30, K))
    assert flat.shape == (30, N) and flat.dtype == dtype
    torch.testing.assert_close(qt(x), flat.reshape(2, 3, 5, N), **SAME_BACKEND[dtype])
    if resolve_scheme(case[1]).activation != "fp8_tensor":  # one activation scale per call: rows interact
        torch.testing.assert_close(qt(x[0]), flat[:15].reshape(3, 5, N), **SAME_BACKEND[dtype])
    if case[1] in ("int8wo", "uint4wo", "fp6_e3m2", "float8wo_e4m3", "float8wo_e5m2"):  # weight-only: exact math
        torch.testing.assert_close(qt(x).double(), oracle(qt, x), **ORACLE[dtype])
    strided = [torch.randn(K, 7, dtype=dtype).t(),  # [7, K], stride (1, 7)
               torch.randn(7, 2 * K, dtype=dtype)[:, ::2],  # every other column
               torch.randn(3, K, 4, dtype=dtype).transpose(1, 2),  # [3, 4, K], not contiguous
               torch.randn(2 * K, dtype=dtype).as_strided((5, K), (0, 1))]  # one row broadcast 5 times
    for x in strided:
        assert not x.is_contiguous()
        torch.testing.assert_close(qt(x), qt(x.contiguous()), **SAME_BACKEND[dtype])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_an_empty_batch_gives_an_empty_output(case):
    qt = quantized(case)
    for shape in [(0, K), (2, 0, K), (0, 3, K)]:
        y = qt(torch.randn(shape, dtype=case[3]))
        assert y.shape == (*shape[:-1], N) and y.dtype == case[3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("scheme", ["int8wo", "uint4wo", "fp6_e3m2", "float8wo_e4m3"])
def test_the_triton_ops_take_an_empty_batch(scheme, dtype):
    # QuantizedLinear answers M = 0 before any backend runs; the kernels must take it too (interpreter path)
    from quantrt.kernels.ops import use_reference

    layer = quantized(("triton", scheme, 32 if scheme == "uint4wo" else None, dtype)).model.up
    x = torch.randn(0, K, dtype=dtype)
    assert not use_reference(x)
    y = layer.backend.linear(layer, x)
    assert y.shape == (0, N) and y.dtype == dtype


def test_the_input_check_compiles_without_graph_breaks():
    qt = quantized(("reference", "uint4wo", 32, torch.bfloat16))
    x = torch.randn(3, 5, K, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(qt.model, fullgraph=True)
    torch.testing.assert_close(compiled(x), qt(x), **SAME_BACKEND[torch.bfloat16])
    with pytest.raises(Exception, match="computes in torch.bfloat16 but got a torch.float32 input"):
        compiled(x.float())  # under fullgraph Dynamo reports the ValueError as the graph's exception


# --- 2. bad files -----------------------------------------------------------------------------------------


def mlp(seed: int | None = None) -> nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64))


@pytest.fixture
def saved(tmp_path):
    """(folder, input, expected output) of a reference-backend uint4wo model saved as one shard."""
    qt = QuantizedTransformer.from_model(mlp(), QuantConfig("uint4wo", group_size=32, backend="reference"),
                                         progress=False)
    qt.save_pretrained(tmp_path / "q")
    x = torch.randn(3, 256)
    return tmp_path / "q", x, qt(x)


def load(folder: Path, **kwargs) -> QuantizedTransformer:
    return QuantizedTransformer.from_pretrained(folder, model=mlp, **kwargs)


def header(file: Path) -> tuple[int, bytes]:
    """(length, JSON bytes) of a safetensors file's header."""
    data = file.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    return length, data[8:8 + length]


def flip(file: Path, position: int) -> None:
    data = bytearray(file.read_bytes())
    data[position] ^= 0x04
    file.write_bytes(bytes(data))


def test_checksums_are_recorded_per_file(saved):
    folder, _, _ = saved
    files = json.loads((folder / CONFIG_NAME).read_text())["files"]
    assert list(files) == [WEIGHTS_NAME]
    assert files[WEIGHTS_NAME]["bytes"] == (folder / WEIGHTS_NAME).stat().st_size
    assert len(files[WEIGHTS_NAME]["sha256"]) == 64


@pytest.mark.parametrize("where", ["length", "brace", "dtype", "shape", "offset", "name"])
def test_a_flipped_header_byte_is_an_error_naming_the_file(saved, where):
    folder, _, _ = saved
    file = folder / WEIGHTS_NAME
    length, text = header(file)
    # one bit flipped: the length prefix, the opening brace, "U8" -> "Q8", [128,128] -> [528,128], the first
    # data offset 0 -> 4, "2.qweight" -> "6.qweight"
    found = {"length": 0, "brace": 8, "dtype": 8 + text.index(b'"U8"') + 1,
             "shape": 8 + text.index(b'"shape":[128,128]') + 9, "offset": 8 + text.index(b'"data_offsets":[') + 16,
             "name": 8 + text.index(b'"2.qweight"') + 1}
    flip(file, found[where])
    for verify in (True, False):  # the header checks do not depend on the checksums
        with pytest.raises(CheckpointError, match=WEIGHTS_NAME):
            load(folder, verify_checksums=verify)


def test_a_flipped_data_byte_is_caught_by_the_checksum(saved):
    folder, x, expected = saved
    file = folder / WEIGHTS_NAME
    length, text = header(file)
    start, end = json.loads(text)["0.qweight"]["data_offsets"]
    flip(file, 8 + length + (start + end) // 2)
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_NAME} is corrupted: its sha256"):
        load(folder)
    # what the checksum prevents: safetensors alone loads the damaged weight, and the output is wrong
    assert not torch.equal(load(folder, verify_checksums=False)(x), expected)


@pytest.mark.parametrize("keep", ["nothing", "4 bytes", "half the header", "the header", "all but one byte"])
def test_a_file_cut_short_is_an_error_naming_the_file(saved, keep):
    folder, _, _ = saved
    file = folder / WEIGHTS_NAME
    length, _ = header(file)
    data = file.read_bytes()
    size = {"nothing": 0, "4 bytes": 4, "half the header": 8 + length // 2, "the header": 8 + length,
            "all but one byte": len(data) - 1}[keep]
    file.write_bytes(data[:size])
    for verify in (True, False):
        with pytest.raises(CheckpointError, match=WEIGHTS_NAME):
            load(folder, verify_checksums=verify)


def test_a_missing_shard_is_an_error_naming_it(tmp_path):
    qt = QuantizedTransformer.from_model(mlp(), QuantConfig("int8wo", backend="reference"), progress=False)
    qt.save_pretrained(tmp_path / "q", max_shard_size="20KB")
    shards = sorted(tmp_path.joinpath("q").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"shard {shards[-1].name} is missing"):
        load(tmp_path / "q")


def test_folders_saved_before_checksums_still_load(saved):
    folder, x, expected = saved
    metadata = json.loads((folder / CONFIG_NAME).read_text())
    del metadata["files"]
    (folder / CONFIG_NAME).write_text(json.dumps(metadata))
    torch.testing.assert_close(load(folder)(x), expected, rtol=0, atol=0)


def test_a_newer_quantrt_writing_a_known_format_loads(saved):
    folder, x, expected = saved
    metadata = json.loads((folder / CONFIG_NAME).read_text())
    metadata.update(quantrt_version="99.0", a_field_from_the_future={"x": 1})
    (folder / CONFIG_NAME).write_text(json.dumps(metadata))
    torch.testing.assert_close(load(folder)(x), expected, rtol=0, atol=0)


def _damage_config(metadata: dict, how: str):
    if how == "a list":
        return [metadata]
    if how == "no layers":
        del metadata["layers"]
    elif how == "layer without scheme":
        del metadata["layers"]["0"]["scheme"]
    elif how == "layer of an unknown scheme":
        metadata["layers"]["0"]["scheme"] = "int3wo"
    elif how == "shape not a list":
        metadata["tensors"]["0.qweight"]["shape"] = "128x128"
    elif how == "unknown quant_config scheme":
        metadata["quant_config"]["scheme"] = "nf4"
    elif how == "files entry outside":
        metadata["files"]["../model.safetensors"] = metadata["files"].pop(WEIGHTS_NAME)
    else:  # a format version
        metadata["format_version"] = {"version 0": 0, "version '1'": "1", "version true": True}[how]
    return metadata


@pytest.mark.parametrize("how, message", [
    ("a list", "holds no JSON object"), ("no layers", "'layers' is missing"),
    ("layer without scheme", "layer '0' needs scheme"), ("layer of an unknown scheme", "'int3wo'.*newer quantrt"),
    ("shape not a list", "tensor '0.qweight' needs a dtype and a shape"),
    ("unknown quant_config scheme", "quant_config.*'nf4'"),
    ("files entry outside", "not a plain name inside the folder"),
    ("version 0", "format version 0, which no quantrt writes"), ("version '1'", "format version '1'"),
    ("version true", "format version True")])
def test_a_damaged_config_is_an_error_naming_it(saved, how, message):
    folder, _, _ = saved
    file = folder / CONFIG_NAME
    file.write_text(json.dumps(_damage_config(json.loads(file.read_text()), how)))
    with pytest.raises(CheckpointError, match=message) as error:
        load(folder)
    assert CONFIG_NAME in str(error.value)


def test_a_config_cut_short_is_invalid_json(saved):
    folder, _, _ = saved
    file = folder / CONFIG_NAME
    file.write_text(file.read_text()[:100])
    with pytest.raises(CheckpointError, match=f"{CONFIG_NAME} is not valid JSON"):
        load(folder)


@pytest.fixture
def sharded(tmp_path):
    qt = QuantizedTransformer.from_model(mlp(), QuantConfig("int8wo", backend="reference"), progress=False)
    qt.save_pretrained(tmp_path / "q", max_shard_size="20KB")
    return tmp_path / "q"


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                    "pytorch_model.bin", "link.safetensors"])
def test_index_paths_cannot_leave_the_folder_or_name_other_files(sharded, target):
    index = json.loads((sharded / INDEX_NAME).read_text())
    name, shard = next(iter(index["weight_map"].items()))
    outside = sharded.parent / "outside.safetensors"
    outside.write_bytes((sharded / shard).read_bytes())
    if target == "link.safetensors":  # a symlink inside the folder that points out of it
        (sharded / target).symlink_to(outside)
    index["weight_map"][name] = target
    (sharded / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the folder or not a .safetensors file"):
        load(sharded, verify_checksums=False)


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


# --- 3. concurrency ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, scheme", [("reference", "uint4wo"), ("torchao", "uint4wo"), ("torchao", "int8dq"),
                                             ("quanto", "int8wo")])
def test_forward_from_many_threads_matches_serial(backend, scheme):
    qt = QuantizedTransformer.from_model(mlp(), QuantConfig(scheme, group_size=32 if scheme == "uint4wo" else None,
                                                            backend=backend), progress=False)
    inputs = [torch.randn(1 + i % 5, 256) for i in range(32)]
    with torch.no_grad():
        serial = [qt(x) for x in inputs]
        with ThreadPoolExecutor(8) as pool:
            threaded = list(pool.map(qt, inputs))
    for a, b in zip(threaded, serial):
        torch.testing.assert_close(a, b, **SAME_BACKEND[torch.float32])


# The child saves a second model over the folder with overwrite=True and stops at `point` (it prints
# "reached <point>" and sleeps) so that the test can SIGKILL it there; the patches only add the stops.
KILLED_SAVE = textwrap.dedent("""
    import os, pathlib, shutil, sys, time
    import safetensors.torch
    import torch, torch.nn as nn
    import quantrt.serialization as serialization
    from quantrt import QuantConfig, QuantizedTransformer

    target, point = sys.argv[1], sys.argv[2]

    def stop():
        print("reached", point, flush=True)
        time.sleep(120)

    real_save_file, shards = safetensors.torch.save_file, []
    def save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        shards.append(filename)
        if point == "mid-shard" and len(shards) == 2:
            os.truncate(filename, os.path.getsize(filename) // 2)
            stop()
    safetensors.torch.save_file = save_file

    real_write_text = pathlib.Path.write_text
    def write_text(self, data, *args, **kwargs):
        if (point, self.name) in (("mid-index", serialization.INDEX_NAME), ("mid-config", serialization.CONFIG_NAME)):
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            stop()
        return real_write_text(self, data, *args, **kwargs)
    pathlib.Path.write_text = write_text

    real_exchange = serialization._exchange
    def exchange(a, b):
        if point == "before-swap":
            stop()
        return real_exchange(a, b)
    serialization._exchange = exchange

    real_rmtree = shutil.rmtree
    def rmtree(path, *args, **kwargs):
        if point == "after-swap":
            stop()
        return real_rmtree(path, *args, **kwargs)
    shutil.rmtree = rmtree

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64))
    qt = QuantizedTransformer.from_model(model, QuantConfig("int8wo", backend="reference"), progress=False)
    qt.save_pretrained(target, max_shard_size="20KB", overwrite=True)
    print("finished", flush=True)
""")


def quantized_mlp(seed: int) -> QuantizedTransformer:
    return QuantizedTransformer.from_model(mlp(seed), QuantConfig("int8wo", backend="reference"), progress=False)


@pytest.mark.parametrize("point", ["mid-shard", "mid-index", "mid-config", "before-swap", "after-swap"])
def test_a_save_killed_midway_leaves_a_loadable_folder(tmp_path, point):
    target = tmp_path / "q"
    old, new = quantized_mlp(0), quantized_mlp(1)  # the child saves the same model as `new`
    old.save_pretrained(target, max_shard_size="20KB")
    x = torch.randn(3, 256)
    outputs = {"old": old(x), "new": new(x)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(target), point], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()  # blocks until the child reaches the point, or ends
        assert line.strip() == f"reached {point}", child.communicate(timeout=60)[1][-3000:]
    finally:
        child.kill()
        child.communicate(timeout=60)
    expected = "new" if point == "after-swap" else "old"
    torch.testing.assert_close(load(target)(x), outputs[expected], rtol=0, atol=0)
    # a leftover folder either loads as one complete model or is refused: never half of one
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert leftovers and all(p.name.startswith(".q.") for p in leftovers)
    for folder in leftovers:
        try:
            result = load(folder)(x)
        except CheckpointError:
            continue
        assert any(torch.equal(result, output) for output in outputs.values()), folder.name
    new.save_pretrained(target, max_shard_size="20KB", overwrite=True)  # the leftovers do not get in the way
    torch.testing.assert_close(load(target)(x), outputs["new"], rtol=0, atol=0)


def test_replacing_a_folder_without_an_atomic_exchange(tmp_path, monkeypatch):
    # where renameat2(RENAME_EXCHANGE) is missing (other systems, some file systems): two renames
    monkeypatch.setattr(serialization, "_exchange", lambda a, b: False)
    quantized_mlp(0).save_pretrained(tmp_path / "q")
    new = quantized_mlp(1)
    new.save_pretrained(tmp_path / "q", overwrite=True)
    x = torch.randn(3, 256)
    torch.testing.assert_close(load(tmp_path / "q")(x), new(x), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


@pytest.mark.parametrize("exchange", ["atomic", "two-renames"])
@pytest.mark.parametrize("contents", ["user-files", "model-files-without-config"])
def test_overwrite_never_deletes_a_folder_that_is_not_quantrt(tmp_path, monkeypatch, exchange, contents):
    if exchange == "two-renames":
        monkeypatch.setattr(serialization, "_exchange", lambda a, b: False)
    target = tmp_path / "models"
    target.mkdir()
    if contents == "user-files":
        (target / "notes.txt").write_text("mine")
        (target / "flux").mkdir()
        (target / "flux" / "model.safetensors").write_bytes(b"weights")
    else:  # a diffusers/transformers folder: safetensors and config.json, but no quantrt_config.json
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"weights")
    before = {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=r"models is not empty and does not look like a quantrt folder"):
        quantized_mlp(0).save_pretrained(target, overwrite=True)
    assert {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # no staging folder left behind


def test_overwrite_replaces_a_quantrt_folder_and_fills_an_empty_one(tmp_path):
    old, new = quantized_mlp(0), quantized_mlp(1)
    x = torch.randn(3, 256)
    old.save_pretrained(tmp_path / "q")
    new.save_pretrained(tmp_path / "q", overwrite=True)
    torch.testing.assert_close(load(tmp_path / "q")(x), new(x), rtol=0, atol=0)
    (tmp_path / "empty").mkdir()
    new.save_pretrained(tmp_path / "empty", overwrite=True)
    torch.testing.assert_close(load(tmp_path / "empty")(x), new(x), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "q"]


@pytest.mark.parametrize("exchange", ["atomic", "two-renames"])
def test_overwrite_through_a_symlink_replaces_the_folder_it_points_at(tmp_path, monkeypatch, exchange):
    if exchange == "two-renames":
        monkeypatch.setattr(serialization, "_exchange", lambda a, b: False)
    old, new = quantized_mlp(0), quantized_mlp(1)
    x = torch.randn(3, 256)
    (tmp_path / "store").mkdir()
    real, link = tmp_path / "store" / "q", tmp_path / "q-link"
    old.save_pretrained(real)
    link.symlink_to(real, target_is_directory=True)
    new.save_pretrained(link, overwrite=True)
    assert link.is_symlink() and link.resolve() == real.resolve()
    torch.testing.assert_close(load(link)(x), new(x), rtol=0, atol=0)
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["q"]  # the old folder was removed, nothing else


# --- 4. security ------------------------------------------------------------------------------------------

UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_calls(source: str) -> list[str]:
    """Where `source` imports a pickle-family module, or calls torch.load without weights_only=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            found.append(f"line {node.lineno}: from torch import load")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
    return sorted(found, key=lambda problem: int(problem.split(":")[0].removeprefix("line ")))


def test_the_scanner_finds_what_it_looks_for():
    source = "import pickle\nfrom dill import loads\nimport torch\ntorch.load(f)\ntorch.load(f, weights_only=False)\n" \
             "torch.load(f, weights_only=True)\nfrom torch import load\n"
    assert [line.split(":")[0] for line in unsafe_calls(source)] == ["line 1", "line 2", "line 4", "line 5", "line 7"]


def test_package_sources_never_unpickle():
    import quantrt.kernels

    roots = {Path(quantrt.__file__).parent, Path(quantrt.kernels.__file__).parent}
    files = sorted({f for root in roots for f in root.rglob("*.py")})
    assert len(files) > 20
    problems = [f"{f}: {problem}" for f in files for problem in unsafe_calls(f.read_text())]
    assert not problems, "\n".join(problems)


class _Bait:
    """Unpickling this creates the file `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_bait(folder: Path, marker: Path) -> list[str]:
    names = ["pytorch_model.bin", "model.pt", "weights.pkl", "diffusion_pytorch_model.bin"]
    for name in names:
        (folder / name).write_bytes(pickle.dumps(_Bait(marker)))
    torch.save({"bait": _Bait(marker)}, folder / "optimizer.pt")
    return names


def test_pickle_files_in_a_folder_are_never_read(saved, tmp_path):
    folder, x, expected = saved
    marker = tmp_path / "unpickled"
    write_bait(folder, marker)
    pickle.loads((folder / "model.pt").read_bytes())
    assert marker.exists()  # the bait works
    marker.unlink()
    torch.testing.assert_close(load(folder)(x), expected, rtol=0, atol=0)
    # an index naming one is refused, not opened
    index = {"weight_map": {name: "pytorch_model.bin" for name in json.loads((folder / CONFIG_NAME).read_text())["tensors"]}}
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        load(folder)
    # a model folder with only pickled weights is refused for quantize-on-load
    unquantized = tmp_path / "unquantized"
    unquantized.mkdir()
    (unquantized / "config.json").write_text(json.dumps({"_class_name": "MLP"}))
    write_bait(unquantized, marker)
    with pytest.raises(CheckpointError, match="never loads .bin/.pt pickles"):
        QuantizedTransformer.from_pretrained(unquantized, quantization="int8wo", model=mlp, progress=False)
    assert not marker.exists()
