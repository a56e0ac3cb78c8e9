"""Hostile folders and bad input (issue 14): a folder, or a file in it, must not make quantrt hang, read
outside the folder, ask the network, delete a user's files or load a silently wrong model; bad input gets an
error that names the file, the field and the fix. docs/reliability.md lists these cases."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import quantrt.serialization as serialization
from quantrt import QuantConfig, QuantizedTransformer
from quantrt.checkpoints.reader import SafetensorsReader
from quantrt.cli import main
from quantrt.models import build_flux
from quantrt.serialization import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, CheckpointError


@pytest.fixture(autouse=True)
def restore_inductor_config():
    """torchao's quantize_ defaults to set_inductor_config=True, global Inductor settings that would change the
    cache keys of later compilations in this test process: put them back."""
    import torch._inductor.config as inductor_config

    saved = inductor_config.save_config()
    yield
    inductor_config.load_config(saved)


def mlp(seed: int | None = None) -> nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64))


def quantized_mlp(seed: int, scheme: str = "int8wo", **kwargs) -> QuantizedTransformer:
    return QuantizedTransformer.from_model(mlp(seed), QuantConfig(scheme, backend="reference", **kwargs),
                                           progress=False)


def load(folder: Path, **kwargs) -> QuantizedTransformer:
    return QuantizedTransformer.from_pretrained(folder, model=mlp, **kwargs)


def edit_config(folder: Path, change) -> None:
    file = folder / CONFIG_NAME
    metadata = json.loads(file.read_text())
    change(metadata)
    file.write_text(json.dumps(metadata))


def rewrite_tensors(file: Path, change) -> None:
    """Change the tensors of a safetensors file in place, keeping its header metadata (torchao needs it)."""
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata=metadata)


def record_checksum(folder: Path, name: str) -> None:
    """What someone who edits a quantrt folder can do: write the edited file's size and sha256 into the JSON."""
    data = (folder / name).read_bytes()
    edit_config(folder, lambda m: m["files"].__setitem__(name, {"bytes": len(data),
                                                                "sha256": hashlib.sha256(data).hexdigest()}))


def unquantized_folder(folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """An unquantized model folder of `mlp` (its skeleton is passed as model=)."""
    folder.mkdir(parents=True)
    tensors = tensors if tensors is not None else {k: v.contiguous() for k, v in mlp(0).state_dict().items()}
    save_file(tensors, folder / "model.safetensors")
    return folder


def quanto_folder(folder: Path) -> Path:
    from optimum import quanto

    model = mlp(0)
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)
    folder.mkdir(parents=True)
    save_file(model.state_dict(), folder / "model.safetensors")
    (folder / "quantization_map.json").write_text(json.dumps(quanto.quantization_map(model)))
    return folder


def torchao_folder(folder: Path) -> Path:
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = mlp(0)
    quantize_(model, Int8WeightOnlyConfig())
    folder.mkdir(parents=True)
    tensors, metadata = flatten_tensor_state_dict(model.state_dict())
    save_file(tensors, folder / "model.safetensors", metadata=metadata)
    return folder


def raw_safetensors(file: Path, header: dict, data: bytes) -> Path:
    """A safetensors file written byte by byte, to say exactly what its header claims."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return file


# 1. a regex in a stored quant_config is never evaluated

# (.+)+! on a name without "!" backtracks through every split of the name: 2**len(name) steps, so any
# evaluation of it on this name would run for centuries
LONG_NAME = "transformer_blocks_0_attention_to_query_projection_layer"
HOSTILE_REGEX = "re:(.+)+!"


def long_named_model() -> nn.Module:
    return nn.Sequential(OrderedDict([(LONG_NAME, nn.Linear(64, 64)), ("act", nn.GELU()), ("out", nn.Linear(64, 32))]))


REGEX_LOAD = textwrap.dedent(f"""
    import json, sys, time, warnings
    from collections import OrderedDict
    import torch.nn as nn
    from quantrt import QuantizedTransformer

    def skeleton():
        return nn.Sequential(OrderedDict([({LONG_NAME!r}, nn.Linear(64, 64)), ("act", nn.GELU()),
                                          ("out", nn.Linear(64, 32))]))

    clean, hostile = sys.argv[1], sys.argv[2]
    QuantizedTransformer.from_pretrained(clean, model=skeleton)  # imports and first-call costs, not timed
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qt = QuantizedTransformer.from_pretrained(hostile, model=skeleton)
    seconds = time.perf_counter() - start
    print(json.dumps({{"seconds": seconds, "schemes": [[r.name, r.scheme] for r in qt.summary()],
                      "modules": list(qt.quant_config.modules), "warnings": [str(w.message) for w in caught]}}))
""")


def test_a_hostile_regex_in_quant_config_does_not_hang_the_load(tmp_path):
    qt = QuantizedTransformer.from_model(long_named_model(), QuantConfig("int8wo", backend="reference"),
                                         progress=False)
    qt.save_pretrained(tmp_path / "clean")
    qt.save_pretrained(tmp_path / "hostile")
    # the JSON has no checksum: anyone can add an override; this one would make every layer int4wo
    edit_config(tmp_path / "hostile", lambda m: m["quant_config"]["modules"].__setitem__(
        HOSTILE_REGEX, QuantConfig("int4wo").to_dict()))
    try:
        # a child process: the regex engine holds the GIL, so a hang could not be interrupted in this one
        result = subprocess.run([sys.executable, "-c", REGEX_LOAD, str(tmp_path / "clean"), str(tmp_path / "hostile")],
                                capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"from_pretrained evaluated {HOSTILE_REGEX!r} on the layer names: it hung for 120 s")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["seconds"] < 1.0, report
    # every layer loads as its record says; the pattern is left out of the loaded config, with a warning
    assert report["schemes"] == [[LONG_NAME, "int8wo"], ["out", "int8wo"]]
    assert HOSTILE_REGEX not in report["modules"]
    assert any(HOSTILE_REGEX in w and "does not evaluate" in w for w in report["warnings"]), report["warnings"]


def test_save_pretrained_stores_overrides_by_layer_name(tmp_path):
    def model() -> nn.Module:
        return nn.Sequential(OrderedDict(a_up=nn.Linear(256, 128), mid=nn.Linear(128, 128), b_down=nn.Linear(128, 64)))

    config = QuantConfig("int8wo", backend="reference",
                         modules={"re:.*_up": QuantConfig("uint4wo", group_size=32, backend="reference"),
                                  "re:.*_down": None, "mid": QuantConfig("int8wo", group_size=32)})
    qt = QuantizedTransformer.from_model(model(), config, progress=False)
    qt.save_pretrained(tmp_path / "q")
    stored = json.loads((tmp_path / "q" / CONFIG_NAME).read_text())["quant_config"]["modules"]
    assert set(stored) == {"a_up", "mid", "b_down"}  # by name, no "re:" key left
    assert stored["a_up"]["scheme"] == "uint4wo" and stored["a_up"]["group_size"] == 32 and stored["b_down"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a folder saved now loads without the regex warning
        loaded = QuantizedTransformer.from_pretrained(tmp_path / "q", model=model)
    for name in ("a_up", "mid", "b_down"):
        assert loaded.quant_config.plan(name) == config.plan(name), name
        assert loaded.quant_config.backend_for(name) == config.backend_for(name), name
    assert [(r.name, r.scheme) for r in loaded.summary()] == [(r.name, r.scheme) for r in qt.summary()]
    x = torch.randn(3, 256)
    torch.testing.assert_close(loaded(x), qt(x), rtol=0, atol=0)


# 2. configs named by the JSON: no network, no file elsewhere


@pytest.fixture
def tiny_flux_saved(tmp_path) -> Path:
    qt = QuantizedTransformer.from_model(build_flux("tiny", dtype=torch.float32),
                                         QuantConfig("int8wo", backend="reference"), progress=False)
    qt.save_pretrained(tmp_path / "q")
    return tmp_path / "q"


@pytest.mark.parametrize("config", ["hub-name", "local-path", "list", "number"])
def test_a_model_config_that_is_not_an_object_is_refused(tiny_flux_saved, tmp_path, monkeypatch, config):
    import diffusers.configuration_utils
    import huggingface_hub

    real = json.loads((tiny_flux_saved / CONFIG_NAME).read_text())["model"]["config"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text(json.dumps(real))  # a config diffusers would happily read
    value = {"hub-name": "black-forest-labs/FLUX.1-dev", "local-path": str(elsewhere), "list": [real],
             "number": 5}[config]
    edit_config(tiny_flux_saved, lambda m: m["model"].__setitem__("config", value))

    def forbidden(*args, **kwargs):
        raise AssertionError("quantrt asked diffusers or the hub for a config")

    monkeypatch.setattr(diffusers.configuration_utils.ConfigMixin, "load_config", classmethod(forbidden))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)
    with pytest.raises(CheckpointError, match=r"model\.config is a JSON (string|list|number).*never from a path or a "
                                              r"model-hub name") as error:
        QuantizedTransformer.from_pretrained(tiny_flux_saved)
    assert CONFIG_NAME in str(error.value)


def test_a_class_name_that_is_not_a_string_is_refused(tmp_path):
    model = build_flux("tiny", dtype=torch.float32)
    model.save_pretrained(tmp_path / "flux")
    config = json.loads((tmp_path / "flux" / "config.json").read_text())
    config["_class_name"] = ["FluxTransformer2DModel"]
    (tmp_path / "flux" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: _class_name is \['FluxTransformer2DModel'\], not a "):
        QuantizedTransformer.from_pretrained(tmp_path / "flux", quantization="int8wo", progress=False)


# 3. nothing is read outside the folder

SECRET = b"SECRET-PASSWORD=hunter2;" * 180  # 4320 bytes, recognisable in a message


@pytest.fixture
def secret(tmp_path) -> Path:
    file = tmp_path / "secret.txt"
    file.write_bytes(SECRET)
    return file


def link_out(file: Path, target: Path) -> None:
    """Replace `file` by a symlink to `target` (a copy of it, or another file, outside the folder)."""
    file.unlink()
    file.symlink_to(target)


def assert_no_leak(message: str) -> None:
    assert "SECRET" not in message and "hunter2" not in message and str(len(SECRET)) not in message, message
    assert str(int.from_bytes(SECRET[:8], "little")) not in message, message


@pytest.mark.parametrize("what", ["config", "index", "shard", "files-entry", "secret-as-shard"])
@pytest.mark.parametrize("verify", [True, False])
def test_a_quantrt_folder_cannot_lead_outside_itself(tmp_path, secret, what, verify):
    folder = tmp_path / "q"
    quantized_mlp(0).save_pretrained(folder, max_shard_size="20KB" if what == "index" else "5GB")
    outside = tmp_path / "outside"
    outside.mkdir()
    if what in ("config", "index", "shard"):
        name = {"config": CONFIG_NAME, "index": INDEX_NAME, "shard": WEIGHTS_NAME}[what]
        (outside / name).write_bytes((folder / name).read_bytes())  # an exact copy: only the link is wrong
        link_out(folder / name, outside / name)
    elif what == "files-entry":  # the JSON lists a file whose real path is outside
        (folder / "notes.txt").symlink_to(secret)
        edit_config(folder, lambda m: m["files"].__setitem__("notes.txt", {"bytes": len(SECRET), "sha256": "0" * 64}))
    else:
        link_out(folder / WEIGHTS_NAME, secret)
    if what == "files-entry" and not verify:
        load(folder, verify_checksums=False)  # the checksums are the only reader of "files"
        return
    with pytest.raises(CheckpointError, match="outside the folder") as error:
        load(folder, verify_checksums=verify)
    assert_no_leak(str(error.value))


@pytest.mark.parametrize("kind", ["unquantized", "quanto", "torchao"])
@pytest.mark.parametrize("what", ["weights", "json"])
def test_other_loaders_cannot_follow_a_symlink_out_of_the_folder(tmp_path, secret, kind, what):
    if kind == "torchao" and what == "json":
        what = "index"  # torchao's own JSON is in the safetensors header: the index stands in
    if kind == "unquantized" and what == "json":  # config.json is read only without a skeleton: a diffusers folder
        folder, skeleton = tmp_path / "flux", None
        build_flux("tiny", dtype=torch.float32).save_pretrained(folder)
    else:
        folder, skeleton = {"unquantized": unquantized_folder, "quanto": quanto_folder,
                            "torchao": torchao_folder}[kind](tmp_path / kind), mlp
    if what == "index":
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {name: "model.safetensors" for name in load_file(folder / "model.safetensors")}}))
    name = {"weights": "model.safetensors", "json": "quantization_map.json" if kind == "quanto" else "config.json",
            "index": "model.safetensors.index.json"}[what]
    copy = tmp_path / f"copy-of-{name}"
    copy.write_bytes((folder / name).read_bytes())
    link_out(folder / name, copy)
    with pytest.raises(CheckpointError, match="leads outside the folder"):
        QuantizedTransformer.from_pretrained(folder, model=skeleton, progress=False,
                                             quantization="int8wo" if kind == "unquantized" else None)
    if what == "weights":  # the same with a file that is not a model at all: nothing of it in the message
        link_out(folder / name, secret)
        with pytest.raises(CheckpointError) as error:
            QuantizedTransformer.from_pretrained(folder, model=skeleton, progress=False,
                                                 quantization="int8wo" if kind == "unquantized" else None)
        assert_no_leak(str(error.value))


def test_links_that_stay_inside_the_folder_or_the_hub_cache_load(tmp_path):
    qt, x = quantized_mlp(0), torch.randn(3, 256)
    expected = qt(x)
    qt.save_pretrained(tmp_path / "q")
    (tmp_path / "q" / "weights").mkdir()
    (tmp_path / "q" / WEIGHTS_NAME).rename(tmp_path / "q" / "weights" / "data")
    (tmp_path / "q" / WEIGHTS_NAME).symlink_to(Path("weights") / "data")
    torch.testing.assert_close(load(tmp_path / "q")(x), expected, rtol=0, atol=0)
    # huggingface_hub's cache: snapshots/<revision>/<subfolder>/<file> -> ../../../blobs/<sha256>
    repository = tmp_path / "hub" / "models--org--model"
    snapshot = repository / "snapshots" / "0123abc" / "transformer"
    snapshot.mkdir(parents=True)
    (repository / "blobs").mkdir()
    for file in (tmp_path / "q").iterdir():
        if file.is_file():
            blob = repository / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            blob.write_bytes(file.read_bytes())
            (snapshot / file.name).symlink_to(Path("../../../blobs") / blob.name)
    torch.testing.assert_close(load(snapshot)(x), expected, rtol=0, atol=0)
    # a link out of the snapshot to anything but its repository's blobs is still refused
    link_out(snapshot / WEIGHTS_NAME, tmp_path / "q" / "weights" / "data")
    with pytest.raises(CheckpointError, match="outside the folder"):
        load(snapshot)


def test_a_file_that_is_not_safetensors_is_named_without_its_bytes(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(SECRET)
    with pytest.raises(CheckpointError, match="model.safetensors is not a safetensors file") as error:
        QuantizedTransformer.from_pretrained(folder, model=mlp, quantization="int8wo", progress=False)
    assert_no_leak(str(error.value))
    with pytest.raises(CheckpointError, match="is not a safetensors file") as error:
        SafetensorsReader(folder / "model.safetensors")
    assert_no_leak(str(error.value))


# 5. overwrite keeps the user's files


def user_entries(folder: Path) -> dict[str, tuple]:
    """Every entry of `folder` that quantrt did not write: (kind, content or link target, inode)."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder))
        if relative in (CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME) or relative.startswith("model-0"):
            continue
        if path.is_symlink():
            entries[relative] = ("link", os.readlink(path), None)
        elif path.is_dir():
            entries[relative] = ("folder", stat.S_IMODE(path.stat().st_mode), None)
        else:
            entries[relative] = ("file", path.read_bytes(), path.stat().st_ino)
    return entries


def add_user_files(folder: Path) -> None:
    (folder / "README.md").write_text("# my model\n")
    (folder / "LICENSE").write_text("Apache-2.0\n")
    (folder / ".git" / "objects" / "ab").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".git" / "objects" / "ab" / "cdef").write_bytes(b"\x78\x01blob")
    (folder / ".git" / "objects" / "ab" / "cdef").chmod(0o444)  # git's objects are read-only
    (folder / "notes" / "deep").mkdir(parents=True)
    (folder / "notes" / "deep" / "eval.txt").write_text("fid 3.2\n")
    (folder / "read-only").mkdir()
    (folder / "read-only" / "keep.txt").write_text("kept\n")
    (folder / "read-only").chmod(0o555)
    (folder / "readme-link").symlink_to("README.md")


@pytest.mark.parametrize("exchange", ["atomic", "two-renames"])
@pytest.mark.parametrize("link", ["hard-links", "copies"])
def test_overwrite_replaces_only_quantrts_files(tmp_path, monkeypatch, exchange, link):
    if exchange == "two-renames":
        monkeypatch.setattr(serialization, "_exchange", lambda a, b: False)
    if link == "copies":  # a file system without hard links
        def no_link(*args, **kwargs):
            raise OSError(errno.EPERM, "hard links not supported here")

        monkeypatch.setattr(os, "link", no_link)
    target = tmp_path / "q"
    quantized_mlp(0).save_pretrained(target, max_shard_size="20KB")  # an index and several shards
    add_user_files(target)
    before = user_entries(target)
    new, x = quantized_mlp(1), torch.randn(3, 256)
    try:
        new.save_pretrained(target, overwrite=True)  # one shard: the old index and shards must go
        after = user_entries(target)
        assert {k: v[:2] for k, v in after.items()} == {k: v[:2] for k, v in before.items()}
        if link == "hard-links":  # the very same files, not copies
            assert all(after[k][2] == v[2] for k, v in before.items() if v[0] == "file")
        assert sorted(p.name for p in target.iterdir() if p.name in (CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME)
                      or p.name.startswith("model-0")) == [WEIGHTS_NAME, CONFIG_NAME]
        assert list(json.loads((target / CONFIG_NAME).read_text())["files"]) == [WEIGHTS_NAME]
        torch.testing.assert_close(load(target)(x), new(x), rtol=0, atol=0)
        quantized_mlp(2).save_pretrained(target, overwrite=True)  # and again: the carried files are carried on
        assert {k: v[:2] for k, v in user_entries(target).items()} == {k: v[:2] for k, v in before.items()}
        assert [p.name for p in tmp_path.iterdir()] == ["q"]  # nothing left beside it
    finally:
        (target / "read-only").chmod(0o755)


def test_a_save_that_fails_at_the_swap_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    target = tmp_path / "q"
    old, x = quantized_mlp(0), torch.randn(3, 256)
    old.save_pretrained(target)
    add_user_files(target)
    before = user_entries(target)

    def failing_exchange(a, b):
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(serialization, "_exchange", failing_exchange)
    try:
        with pytest.raises(OSError, match="input/output error"):
            quantized_mlp(1).save_pretrained(target, overwrite=True)
        assert user_entries(target) == before
        torch.testing.assert_close(load(target)(x), old(x), rtol=0, atol=0)
        assert [p.name for p in tmp_path.iterdir()] == ["q"]
    finally:
        (target / "read-only").chmod(0o755)


def test_an_entry_that_cannot_be_kept_is_refused_before_any_work(tmp_path, monkeypatch):
    target = tmp_path / "q"
    quantized_mlp(0).save_pretrained(target)
    os.mkfifo(target / "pipe")
    before = sorted(p.name for p in target.iterdir())

    def forbidden(*args, **kwargs):
        raise AssertionError("a shard was written before the check")

    monkeypatch.setattr("safetensors.torch.save_file", forbidden)
    with pytest.raises(FileExistsError, match=r"q/pipe is neither a file, a folder nor a symlink.*move it out"):
        quantized_mlp(1).save_pretrained(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


# 6. killed saves are swept; saves reach the disk


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_saving_folders_are_swept_by_the_next_save(tmp_path):
    dead, alive, hours_ago = dead_pid(), os.getpid(), time.time() - 2 * 3600
    names = {"stale": f".q.saving-{dead}-0123abcd", "recent": f".q.saving-{dead}-89abcdef",
             "running": f".q.saving-{alive}-00ff00ff", "other-target-stale": f".other.saving-{dead}-deadbeef",
             "not-ours": ".q.saving-notes", "replaced-old": f".q.old-{dead}-0123abcd"}
    for key, name in names.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half a shard")
        if key != "recent":
            for path in (tmp_path / name / "model.safetensors", tmp_path / name):
                os.utime(path, (hours_ago, hours_ago))
    quantized_mlp(0).save_pretrained(tmp_path / "q")
    left = {p.name for p in tmp_path.iterdir()}
    assert names["stale"] not in left and names["other-target-stale"] not in left
    # a save still running, one too recent to judge, a name quantrt does not write, and the only copy of a
    # folder a non-atomic swap was interrupted in, all stay
    assert {names[k] for k in ("recent", "running", "not-ours", "replaced-old")} <= left


def test_a_save_records_its_pid_and_syncs_before_and_after_the_swap(tmp_path, monkeypatch):
    target = tmp_path / "q"
    quantized_mlp(0).save_pretrained(target, max_shard_size="20KB")
    events, paths = [], {}
    real_open, real_fsync, real_exchange = os.open, os.fsync, serialization._exchange

    def recording_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        paths[fd] = Path(path)
        return fd

    def recording_fsync(fd):
        events.append(("fsync", paths.get(fd)))
        return real_fsync(fd)

    def recording_exchange(a, b):
        events.append(("swap", a))
        return real_exchange(a, b)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(serialization, "_exchange", recording_exchange)
    quantized_mlp(1).save_pretrained(target, max_shard_size="20KB", overwrite=True)
    swap = next(i for i, (kind, _) in enumerate(events) if kind == "swap")
    staging = events[swap][1]
    assert staging.name.startswith(f".q.saving-{os.getpid()}-")
    synced_before = {path for kind, path in events[:swap] if kind == "fsync"}
    written = {staging / p.name for p in target.iterdir()}
    assert written <= synced_before and staging in synced_before  # every file, and the folder's entries
    assert ("fsync", tmp_path.resolve()) in events[swap:]  # the parent, after the rename


# 7. one tensor, one place


def sharded_unquantized(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = {k: v.contiguous() for k, v in mlp(0).state_dict().items()}
    folder.mkdir(parents=True)
    first, second = {k: state[k] for k in ("0.weight", "0.bias")}, {k: state[k] for k in ("2.weight", "2.bias")}
    save_file(first, folder / "model-00001-of-00002.safetensors")
    save_file(second, folder / "model-00002-of-00002.safetensors")
    weight_map = {**dict.fromkeys(first, "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(second, "model-00002-of-00002.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder, state


def test_a_tensor_in_two_shards_is_an_error_on_quantize_on_load(tmp_path):
    folder, state = sharded_unquantized(tmp_path / "model")
    expected = QuantizedTransformer.from_model(mlp(0), QuantConfig("int8wo", backend="reference"), progress=False)
    x = torch.randn(3, 256)
    qt = QuantizedTransformer.from_pretrained(folder, model=mlp, quantization="int8wo", backend="reference",
                                              progress=False)
    torch.testing.assert_close(qt(x), expected(x), rtol=0, atol=0)  # the folder is right as written
    # a second, different 0.weight in the second shard (read last), which the index does not name
    save_file({"0.weight": torch.randn(128, 256), "2.weight": state["2.weight"], "2.bias": state["2.bias"]},
              folder / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor '0.weight' is in both model-00001-of-00002.safetensors and "
                                              r"model-00002-of-00002.safetensors.*index names model-00001"):
        QuantizedTransformer.from_pretrained(folder, model=mlp, quantization="int8wo", progress=False)
    # the index naming a shard that does not hold the tensor
    save_file({"2.weight": state["2.weight"], "2.bias": state["2.bias"]}, folder / "model-00002-of-00002.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["0.bias"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"tensor '0.bias' is in model-00001-of-00002.safetensors.*the index "
                                              r"names model-00002"):
        QuantizedTransformer.from_pretrained(folder, model=mlp, quantization="int8wo", progress=False)


def test_a_tensor_in_two_shards_is_an_error_in_a_quantrt_folder(tmp_path):
    folder = tmp_path / "q"
    quantized_mlp(0).save_pretrained(folder, max_shard_size="20KB")
    weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    first, last = sorted(set(weight_map.values()))[0], sorted(set(weight_map.values()))[-1]
    name = next(n for n, f in weight_map.items() if f == first)
    rewrite_tensors(folder / last, lambda t: t.__setitem__(name, load_file(folder / first)[name] + 1))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is in both {last} and {first}"):
        load(folder, verify_checksums=False)


def test_the_reader_refuses_tensors_that_share_bytes_as_safetensors_does(tmp_path):
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()  # 32 bytes
    cases = {  # name -> (header, whose bytes, what the error says)
        "overlap": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                     "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
                     "c": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}},
                    r"tensor 'b' overlap those of 'a'"),
        "same-bytes": ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
                        "b": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, r"overlap those of"),
        "gap": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}}, r"8 bytes before tensor 'b'"),
        "trailing": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, r"last 16 bytes belong to no"),
    }
    for case, (header, message) in cases.items():
        file = raw_safetensors(tmp_path / f"{case}.safetensors", header, data)
        with pytest.raises(SafetensorError):  # what safetensors itself says of such a file
            safe_open(file, framework="pt")
        with pytest.raises(CheckpointError, match=f"{case}.safetensors: .*{message}"):
            SafetensorsReader(file)


# 8. non-finite scales are refused on load


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("kind", ["quanto", "torchao", "quantrt-scale", "quantrt-zero"])
def test_non_finite_stored_scales_are_refused_naming_the_layer(tmp_path, kind, bad):
    x = torch.randn(3, 256)
    if kind == "quanto":
        folder, key, field = quanto_folder(tmp_path / "f"), "2.weight._scale", "scale"
    elif kind == "torchao":
        folder, key, field = torchao_folder(tmp_path / "f"), "2._weight_scale", "scale"
    else:
        folder, field = tmp_path / "f", kind.removeprefix("quantrt-")
        quantized_mlp(0, "uint4wo", group_size=32).save_pretrained(folder)
        key = f"2.{field}"
    load(folder)(x)  # loads as written

    def poison(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[1] = bad

    rewrite_tensors(folder / WEIGHTS_NAME, poison)
    if kind.startswith("quantrt"):
        record_checksum(folder, WEIGHTS_NAME)  # the checksum cannot help: whoever edits can recompute it
    with pytest.raises(CheckpointError, match=fr"layer '2' has 1 NaN/Inf values in its stored {field}"):
        load(folder)


def test_scales_that_overflow_torch_dtype_are_refused(tmp_path):
    quantized_mlp(0).save_pretrained(tmp_path / "q")  # float32 scales
    rewrite_tensors(tmp_path / "q" / WEIGHTS_NAME, lambda t: t["0.scale"].view(-1).__setitem__(0, 1e6))
    record_checksum(tmp_path / "q", WEIGHTS_NAME)
    load(tmp_path / "q")  # finite in float32
    with pytest.raises(CheckpointError, match=r"layer '0' has 1 NaN/Inf values in its stored scale \(float16"
                                              r".*torch_dtype"):
        load(tmp_path / "q", torch_dtype=torch.float16)


# 12. fp8, int and bool weights on quantize-on-load


@pytest.mark.parametrize("torch_dtype", [None, torch.float16], ids=["as-stored", "float16"])
def test_fp8_weights_are_upcast_before_quantizing(tmp_path, torch_dtype):
    state = mlp(0).state_dict()
    stored = {k: v.to(torch.float8_e4m3fn if k.endswith("weight") else torch.bfloat16).contiguous()
              for k, v in state.items()}
    folder = unquantized_folder(tmp_path / "fp8", stored)
    qt = QuantizedTransformer.from_pretrained(folder, model=mlp, quantization="int8wo", backend="reference",
                                              torch_dtype=torch_dtype, progress=False)
    dtype = torch_dtype or torch.bfloat16  # nothing computes in fp8: the model's dtype, else bfloat16
    reference = mlp().to(dtype)
    reference.load_state_dict({k: v.to(dtype) for k, v in stored.items()})
    expected = QuantizedTransformer.from_model(reference, QuantConfig("int8wo", backend="reference"), progress=False)
    assert qt.model[0].scale.dtype == dtype
    x = torch.randn(3, 256, dtype=dtype)
    torch.testing.assert_close(qt(x), expected(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_non_float_linear_weights_are_refused_naming_the_tensor(tmp_path, dtype):
    state = {k: v.contiguous() for k, v in mlp(0).state_dict().items()}
    state["2.weight"] = (state["2.weight"] * 100).to(dtype)
    folder = unquantized_folder(tmp_path / "model", state)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=fr"tensor '2.weight' in model.safetensors is {name}.*Linear layer.*"
                                              fr"already quantized"):
        QuantizedTransformer.from_pretrained(folder, model=mlp, quantization="int8wo", progress=False)
    # also when the layer is kept in full precision: an int weight cannot compute there either
    with pytest.raises(CheckpointError, match=r"tensor '2.weight'"):
        QuantizedTransformer.from_pretrained(folder, model=mlp, progress=False,
                                             quantization=QuantConfig("int8wo", modules_to_not_convert=["2"]))


# 14. errors that name the file, the field and the fix


@pytest.mark.parametrize("weight_map, problem", [
    (["model-00001-of-00002.safetensors"], "its 'weight_map' is a JSON list"),
    ("INT", "its 'weight_map' maps '0.weight' to 7, not to a file name"),
    (None, "there is no 'weight_map'"),
], ids=["list", "int", "missing"])
@pytest.mark.parametrize("loader", ["quantrt", "quantize-on-load"])
def test_a_malformed_index_names_the_file_and_the_field(tmp_path, weight_map, problem, loader):
    if loader == "quantrt":
        folder = tmp_path / "q"
        quantized_mlp(0).save_pretrained(folder, max_shard_size="20KB")
        index_file = folder / INDEX_NAME
    else:
        folder, _ = sharded_unquantized(tmp_path / "model")
        index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    if weight_map == "INT":
        index["weight_map"] = {"0.weight": 7, **{k: v for k, v in index["weight_map"].items() if k != "0.weight"}}
    elif weight_map is None:
        del index["weight_map"]
    else:
        index["weight_map"] = weight_map
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=fr"index.json is not a valid safetensors index: {problem}.*'weight_map' "
                                              fr"must be an object mapping each tensor name.*save the model again"):
        QuantizedTransformer.from_pretrained(folder, model=mlp, progress=False,
                                             quantization="int8wo" if loader == "quantize-on-load" else None)


@pytest.mark.parametrize("field, value, message", [
    ("modules", {"0": 5}, r"quant_config.modules\['0'\] is 5, a JSON number: it must be null"),
    ("modules", {"0": "int4wo"}, r"quant_config.modules\['0'\] is 'int4wo', a JSON string: it must be null"),
    ("modules", ["0"], r"quant_config.modules is a JSON list: it must be an object mapping layer names"),
    ("modules", {"0": {"scheme": "int4wo", "modules": {"x": [1]}}},
     r"quant_config.modules\['0'\].modules\['x'\] is \[1\]"),
    ("modules_to_not_convert", "0", r"quant_config.modules_to_not_convert is '0': it must be a list of layer names"),
    ("scheme", 4, r"quant_config.scheme is 4: it must be a scheme name"),
], ids=["number", "string", "list", "nested", "not-convert-string", "scheme-number"])
def test_a_quant_config_of_the_wrong_types_names_the_field(tmp_path, field, value, message):
    quantized_mlp(0).save_pretrained(tmp_path / "q")
    edit_config(tmp_path / "q", lambda m: m["quant_config"].__setitem__(field, value))
    with pytest.raises(CheckpointError, match=message) as error:
        load(tmp_path / "q")
    assert CONFIG_NAME in str(error.value) and "save the model again" in str(error.value)


def test_tied_entries_name_what_is_wrong(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 64)
            self.body = nn.Linear(64, 64)
            self.head = nn.Linear(64, 16, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.body(self.embed(ids)))

    qt = QuantizedTransformer.from_model(Tied(), QuantConfig("int8wo", modules_to_not_convert=["head"]), progress=False)
    qt.save_pretrained(tmp_path / "q")
    ids = torch.tensor([[1, 2, 3]])
    assert json.loads((tmp_path / "q" / CONFIG_NAME).read_text())["tied"] == {"head.weight": "embed.weight"}
    torch.testing.assert_close(QuantizedTransformer.from_pretrained(tmp_path / "q", model=Tied)(ids), qt(ids))
    for tied, message in [({"missing.weight": "embed.weight"}, "the model has no tensor 'missing.weight'"),
                          ({"head.weight": "nowhere.weight"}, "'nowhere.weight' is not a tensor the folder stores"),
                          ({"head.weight": "body.bias"}, r"their shapes differ \(\[16, 64\] and \[64\]\)"),
                          ({"head.weight": 3}, "'tied' maps 'head.weight' to 3, not to a tensor name")]:
        edit_config(tmp_path / "q", lambda m: m.__setitem__("tied", tied))
        with pytest.raises(CheckpointError, match=message) as error:
            QuantizedTransformer.from_pretrained(tmp_path / "q", model=Tied)
        assert CONFIG_NAME in str(error.value)


def test_a_shape_whose_size_overflows_is_a_damaged_header(tmp_path):
    file = raw_safetensors(tmp_path / "huge.safetensors",
                           {"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(CheckpointError, match=r"huge.safetensors: tensor 'w' \(F32 \[4294967296, 4294967296\]\) has "
                                              r"data offsets \[0, 16\] that do not fit"):
        SafetensorsReader(file)
    folder = tmp_path / "model"
    folder.mkdir()
    raw_safetensors(folder / "model.safetensors",
                    {"0.weight": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '0.weight'"):
        QuantizedTransformer.from_pretrained(folder, model=mlp, quantization="int8wo", progress=False)


def test_json_with_a_key_given_twice_or_nested_too_deep_is_refused(tmp_path):
    folder = tmp_path / "q"
    quantized_mlp(0).save_pretrained(folder)
    text = (folder / CONFIG_NAME).read_text()
    # a second "quant_config" after the first: json.loads would silently take this one
    (folder / CONFIG_NAME).write_text(text.rstrip()[:-1] + ', "quant_config": {"scheme": "int4wo"}}')
    with pytest.raises(CheckpointError, match=f"{CONFIG_NAME} names 'quant_config' twice"):
        load(folder)
    (folder / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=f"{CONFIG_NAME} is not valid JSON \\(nested too deeply"):
        load(folder)


def test_missing_sources_and_quantrt_folders_given_quantization_say_so(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere does not exist.*quantrt never downloads"):
        QuantizedTransformer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        QuantizedTransformer.from_pretrained(tmp_path / "nowhere", quantization="int8wo")
    with pytest.raises(CheckpointError, match="nowhere.safetensors does not exist"):
        QuantizedTransformer.from_single_file(tmp_path / "nowhere.safetensors", quantization="int8wo")
    quantized_mlp(0).save_pretrained(tmp_path / "q")
    with pytest.raises(CheckpointError, match="model.safetensors is a file, not a folder.*from_single_file"):
        QuantizedTransformer.from_pretrained(tmp_path / "q" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"is a quantrt folder: it is already quantized, and it loads as stored: drop "
                                         r"quantization="):
        QuantizedTransformer.from_pretrained(tmp_path / "q", model=mlp, quantization="int4wo")


def test_a_bad_max_shard_size_is_refused_before_anything_is_written(tmp_path):
    qt = quantized_mlp(0)
    for size in ("abc", "", "-5MB", "0", "inf", "1.5XB", True):
        with pytest.raises(ValueError, match=f"max_shard_size {size!r} is not a size.*'5GB'"):
            qt.save_pretrained(tmp_path / "q", max_shard_size=size)
    assert list(tmp_path.iterdir()) == []
    qt.save_pretrained(tmp_path / "q", max_shard_size="1e4")  # 10 kB shards
    assert len(list((tmp_path / "q").glob("model-*.safetensors"))) > 1


@pytest.fixture
def no_quantization(monkeypatch):
    """Fail the test if the command gets as far as quantizing."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the command started quantizing before checking its arguments")

    monkeypatch.setattr(QuantizedTransformer, "from_pretrained", forbidden)


@pytest.mark.parametrize("case, message", [
    ("bad-shard-size", "--max-shard-size 'abc' is not a size"),
    ("missing-src", "SRC .*nowhere does not exist"),
    ("src-is-a-file", "SRC .*model.safetensors is not a folder"),
    ("src-is-quantrt", "is a quantrt folder, already quantized: quantize the unquantized model's folder"),
    ("dst-not-empty", "dst is not empty; pass --overwrite to replace the quantrt files"),
    ("dst-not-quantrt", "does not look like a quantrt folder.*even with --overwrite"),
    ("dst-is-a-file", "exists and is not a folder"),
    ("bad-device", "device"),
])
def test_quantize_command_checks_everything_before_it_works(tmp_path, capsys, no_quantization, case, message):
    src = unquantized_folder(tmp_path / "src")
    dst = tmp_path / "dst"
    args = ["quantize", str(src), str(dst), "--scheme", "int8wo"]
    if case == "bad-shard-size":
        args += ["--max-shard-size", "abc"]
    elif case == "missing-src":
        args[1] = str(tmp_path / "nowhere")
    elif case == "src-is-a-file":
        args[1] = str(src / "model.safetensors")
    elif case == "src-is-quantrt":
        quantized_mlp(0).save_pretrained(tmp_path / "q")
        args[1] = str(tmp_path / "q")
    elif case == "dst-not-empty":  # a quantrt folder: replaced only with --overwrite
        quantized_mlp(0).save_pretrained(dst)
    elif case == "dst-not-quantrt":  # a user's folder: never written
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
        args.append("--overwrite")
    elif case == "dst-is-a-file":
        dst.write_text("a file")
    else:
        args += ["--device", "gpu0"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert "overwrite=True" not in err
