"""Saving and loading quantrt folders (quantrt.serialization): round trips of every storage format, the folder's
contents, checksums, damaged, truncated and hand-edited folders, index paths that try to leave the folder,
saves killed midway, overwrite, and pickles that are never read. docs/reliability.md lists the cases."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import quantrt.serialization as serialization
from quantrt import QuantConfig, QuantizedTransformer
from quantrt.models import build_flux, flux_inputs
from quantrt.schemes import SCHEMES
from quantrt.serialization import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, CheckpointError

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
