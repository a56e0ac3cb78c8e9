"""The cache entry on its own (runtime/cache.py): commit, verify, and every way an entry can be bad. No
compilation here: the entries hold stand-in files; test_compile.py warms real ones."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from quantrt.cache import (CacheEntry, CacheWarning, Manifest, compiler_safe, fingerprint_of, manifest_checksum,
                           work_base)

FIELDS = {"model": "m", "quantrt": "1", "torch": "2.13.0", "triton": "3.9.0", "python": "3.11", "device": "cpu: x",
          "compile": {"mode": "default"}}


def warmed_entry(root, fields=FIELDS, shapes=None):
    """An entry as a warmup leaves it, with stand-ins for Inductor's files."""
    entry = CacheEntry(fields, root=root)
    (entry.inductor_dir / "fxgraph" / "ab").mkdir(parents=True)
    (entry.inductor_dir / "fxgraph" / "ab" / "graph").write_bytes(os.urandom(256))
    (entry.inductor_dir / "kernel.so").write_bytes(os.urandom(1024))
    entry.commit(shapes or {"k1": {"shape": "0=1x8", "cold_s": 1.0}}, b"artifacts", {"gpu|N=1": {"BLOCK": 16}})
    return entry


def test_commit_writes_a_verified_entry(tmp_path):
    entry = warmed_entry(tmp_path)
    manifest = CacheEntry(FIELDS, root=tmp_path).verify()
    assert manifest.shapes == {"k1": {"shape": "0=1x8", "cold_s": 1.0}}
    assert {"inductor/kernel.so", "inductor/fxgraph/ab/graph", "tuning.json"} <= set(manifest.files)
    assert any(name.startswith("artifacts-") for name in manifest.files)
    assert entry.path.name == fingerprint_of(FIELDS)


def test_load_copies_the_entry_into_a_private_folder(tmp_path):
    warmed_entry(tmp_path)
    reader = CacheEntry(FIELDS, root=tmp_path)
    manifest = reader.load()
    assert reader.status == "loaded" and manifest.shapes.keys() == {"k1"}
    assert (reader.inductor_dir / "kernel.so").read_bytes() == (reader.path / "inductor" / "kernel.so").read_bytes()
    assert reader.work_dir != reader.path
    # what the reader's Inductor writes goes to its own folder, not into the entry
    (reader.inductor_dir / "new-graph").write_bytes(b"x")
    assert not (reader.path / "inductor" / "new-graph").exists()


def corrupt_flip(entry):
    data = bytearray((entry.path / "inductor" / "kernel.so").read_bytes())
    data[100] ^= 0xFF
    (entry.path / "inductor" / "kernel.so").write_bytes(bytes(data))


def corrupt_truncate(entry):
    path = entry.path / "inductor" / "fxgraph" / "ab" / "graph"
    path.write_bytes(path.read_bytes()[:10])


def corrupt_delete(entry):
    (entry.path / "tuning.json").unlink()


def corrupt_manifest_json(entry):
    (entry.path / "manifest.json").write_text('{"format": 1, "fingerpr')


def corrupt_manifest_edit(entry):
    # a manifest edited without its checksum: someone claims another shape
    data = json.loads((entry.path / "manifest.json").read_text())
    data["shapes"]["k2"] = {"shape": "0=9x8", "cold_s": 1.0}
    (entry.path / "manifest.json").write_text(json.dumps(data))


def corrupt_other_torch(entry):
    # a self-consistent manifest of another torch in this fingerprint's folder
    data = json.loads((entry.path / "manifest.json").read_text())
    manifest = Manifest.from_json(data)
    manifest.fields = {**manifest.fields, "torch": "2.12.0"}
    (entry.path / "manifest.json").write_text(json.dumps(manifest.to_json()))


def corrupt_other_gpu(entry):
    data = json.loads((entry.path / "manifest.json").read_text())
    manifest = Manifest.from_json(data)
    manifest.fields = {**manifest.fields, "device": "NVIDIA A100 (SM 8.0)"}
    (entry.path / "manifest.json").write_text(json.dumps(manifest.to_json()))


def corrupt_path_escape(entry):
    data = json.loads((entry.path / "manifest.json").read_text())
    manifest = Manifest.from_json(data)
    manifest.files["../../outside"] = "0" * 64
    (entry.path / "manifest.json").write_text(json.dumps(manifest.to_json()))


def corrupt_no_manifest(entry):
    # a warmup killed before its manifest was written
    (entry.path / "manifest.json").unlink()


def corrupt_newer_format(entry):
    data = json.loads((entry.path / "manifest.json").read_text())
    data["format"] = 99
    (entry.path / "manifest.json").write_text(json.dumps(data))


def resign(entry, edit):
    """Apply `edit` to the entry's manifest as raw JSON and give it a valid checksum again: what someone editing
    an entry by hand (or a bug writing one) leaves, which the checksum alone does not catch."""
    data = json.loads((entry.path / "manifest.json").read_text())
    data.pop("checksum")
    edit(data)
    (entry.path / "manifest.json").write_text(json.dumps({**data, "checksum": manifest_checksum(data)}))


def outside_file(entry, name="outside.so"):
    """A file outside the entry (in the cache root), with its sha256: a manifest listing it would pass the
    checksum check, so only the path check can refuse it."""
    outside = entry.root / "outside" / name
    outside.parent.mkdir(exist_ok=True)
    outside.write_bytes(b"not part of the entry")
    return outside, hashlib.sha256(outside.read_bytes()).hexdigest()


def malformed_files_a_list(entry):
    resign(entry, lambda data: data.update(files=sorted(data["files"])))


def malformed_shapes_missing(entry):
    resign(entry, lambda data: data.pop("shapes"))


def malformed_fields_a_string(entry):
    resign(entry, lambda data: data.update(fields="m"))


def malformed_shape_without_cold_seconds(entry):
    resign(entry, lambda data: data["shapes"]["k1"].pop("cold_s"))


def malformed_digest_a_number(entry):
    resign(entry, lambda data: data["files"].update({"tuning.json": 12345}))


def malformed_parent_path(entry):
    outside, digest = outside_file(entry)
    shutil.copy(outside, entry.path.parent / "x")  # entries/x: a real file, with the listed checksum
    resign(entry, lambda data: data["files"].update({"../x": digest}))


def malformed_absolute_path(entry):
    outside, digest = outside_file(entry)
    resign(entry, lambda data: data["files"].update({str(outside): digest}))


def malformed_symlinked_file(entry):
    # the listed kernel replaced by a symlink to a file outside with the same bytes: its checksum matches
    kernel = entry.path / "inductor" / "kernel.so"
    outside, _ = outside_file(entry)
    outside.write_bytes(kernel.read_bytes())
    kernel.unlink()
    kernel.symlink_to(outside)


def malformed_symlinked_folder(entry):
    graphs = entry.path / "inductor" / "fxgraph"
    copy = entry.root / "outside" / "fxgraph"
    shutil.copytree(graphs, copy)
    shutil.rmtree(graphs)
    graphs.symlink_to(copy, target_is_directory=True)


def malformed_unlisted_symlink(entry):
    outside, _ = outside_file(entry)
    (entry.path / "inductor" / "extra.so").symlink_to(outside)


def malformed_tuning_a_list(entry):
    tuning = entry.path / "tuning.json"
    tuning.write_text("[1, 2]")
    digest = hashlib.sha256(tuning.read_bytes()).hexdigest()
    resign(entry, lambda data: data["files"].update({"tuning.json": digest}))


CORRUPTIONS = {
    "flipped-byte": (corrupt_flip, "does not match its checksum"),
    "truncated-file": (corrupt_truncate, "does not match its checksum"),
    "missing-file": (corrupt_delete, "tuning.json is missing"),
    "manifest-not-json": (corrupt_manifest_json, "cannot be read"),
    "manifest-edited": (corrupt_manifest_edit, "checksum does not match"),
    "other-torch": (corrupt_other_torch, "torch='2.12.0'"),
    "other-gpu": (corrupt_other_gpu, "NVIDIA A100"),
    "path-escape": (corrupt_path_escape, "outside the entry"),
    "no-manifest": (corrupt_no_manifest, "no manifest"),
    "newer-format": (corrupt_newer_format, "format 99"),
    # manifests with a valid checksum but a wrong structure
    "files-a-list": (malformed_files_a_list, "the manifest's 'files' is a list, not a JSON object"),
    "shapes-missing": (malformed_shapes_missing, "the manifest has no 'shapes'"),
    "fields-a-string": (malformed_fields_a_string, "the manifest's 'fields' is a string"),
    "shape-without-cold-seconds": (malformed_shape_without_cold_seconds, "shapes['k1'] is not an object"),
    "digest-a-number": (malformed_digest_a_number, "files['tuning.json'] is 12345, not a sha256"),
    "listed-parent-path": (malformed_parent_path, "lists '../x', a path outside the entry ('..')"),
    "listed-absolute-path": (malformed_absolute_path, "an absolute path, outside the entry"),
    "symlinked-file-outside": (malformed_symlinked_file, "inductor/kernel.so is a symlink to"),
    "symlinked-folder-outside": (malformed_symlinked_folder, "inductor/fxgraph is a symlink to"),
    "unlisted-symlink-outside": (malformed_unlisted_symlink, "inductor/extra.so is a symlink to"),
    "tuning-a-list": (malformed_tuning_a_list, "tuning.json is not a JSON object"),
}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_a_bad_entry_is_ignored_with_a_warning_and_removed(tmp_path, corruption):
    corrupt, message = CORRUPTIONS[corruption]
    entry = warmed_entry(tmp_path)
    corrupt(entry)
    outside = snapshot(tmp_path / "outside") if (tmp_path / "outside").exists() else {}
    reader = CacheEntry(FIELDS, root=tmp_path)
    with pytest.warns(CacheWarning, match="it will be rebuilt") as record:
        assert reader.load() is None
    assert message in str(record[0].message)
    assert str(entry.path) in str(record[0].message)
    assert reader.status == "rebuilt" and not reader.path.exists()
    assert not any(reader.inductor_dir.rglob("*")), "nothing of the bad entry may reach the working folder"
    if outside:
        assert snapshot(tmp_path / "outside") == outside, "removing the entry must not follow its symlinks"
    # and the rebuild commits a good entry again
    (reader.inductor_dir / "kernel.so").parent.mkdir(parents=True, exist_ok=True)
    (reader.inductor_dir / "kernel.so").write_bytes(b"rebuilt")
    reader.commit({"k1": {"shape": "0=1x8", "cold_s": 2.0}}, None, {})
    assert CacheEntry(FIELDS, root=tmp_path).verify().shapes["k1"]["cold_s"] == 2.0


def test_changed_fields_make_a_new_entry(tmp_path):
    first = warmed_entry(tmp_path)
    other = CacheEntry({**FIELDS, "model": "another"}, root=tmp_path)
    assert other.path != first.path
    assert other.load() is None and other.status == "new"
    assert first.path.exists(), "another fingerprint's entry is left alone"


def test_a_second_commit_keeps_the_first_ones_shapes_and_files(tmp_path):
    warmed_entry(tmp_path)
    second = CacheEntry(FIELDS, root=tmp_path)  # warmed without loading the first: a concurrent process
    (second.inductor_dir).mkdir(parents=True)
    (second.inductor_dir / "other.so").write_bytes(b"second")
    second.commit({"k2": {"shape": "0=7x8", "cold_s": 3.0}}, b"more", {})
    manifest = CacheEntry(FIELDS, root=tmp_path).verify()
    assert manifest.shapes.keys() == {"k1", "k2"}
    assert {"inductor/kernel.so", "inductor/other.so"} <= set(manifest.files)
    assert len([f for f in manifest.files if f.startswith("artifacts-")]) == 2


HOLD_A_WORKING_COPY = textwrap.dedent("""
    import sys, time
    from quantrt.cache import CacheEntry
    entry = CacheEntry({"model": sys.argv[2]}, root=sys.argv[1])
    print(entry.work_dir, flush=True)
    time.sleep(60)
""")


def test_only_working_copies_of_dead_processes_are_swept(tmp_path):
    living = subprocess.Popen([sys.executable, "-c", HOLD_A_WORKING_COPY, str(tmp_path), "alive"],
                              stdout=subprocess.PIPE, text=True)
    try:
        alive = Path(living.stdout.readline().strip())
        dead_run = subprocess.run([sys.executable, "-c", HOLD_A_WORKING_COPY.replace("time.sleep(60)", ""),
                                   str(tmp_path), "dead"], capture_output=True, text=True)
        dead = Path(dead_run.stdout.strip())
        dead.mkdir(parents=True, exist_ok=True)  # as a killed process leaves it (atexit did not run)
        (dead / "inductor").mkdir(exist_ok=True)
        recent = tmp_path / "work" / "recent-1-x"
        recent.mkdir()
        old = time.time() - 3600
        for folder in (alive, dead):
            os.utime(folder, (old, old))
        entry = CacheEntry(FIELDS, root=tmp_path)
        assert entry.work_dir.exists()
        assert not dead.exists(), "a dead process's old copy is removed"
        assert alive.exists(), "a living process's copy is kept, however old"
        assert recent.exists(), "a recent copy is kept: its owner may be on another host"
    finally:
        living.kill()
        living.wait()


COMMIT_IN_PROCESS = textwrap.dedent("""
    import os, sys
    from quantrt.cache import CacheEntry
    fields = {"model": "m", "quantrt": "1", "torch": "2.13.0", "triton": "3.9.0", "python": "3.11",
              "device": "cpu: x", "compile": {"mode": "default"}}
    entry = CacheEntry(fields, root=sys.argv[1])
    (entry.inductor_dir).mkdir(parents=True)
    for i in range(20):
        (entry.inductor_dir / f"{sys.argv[2]}-{i}.so").write_bytes(os.urandom(4096))
    for round in range(5):
        entry.commit({f"{sys.argv[2]}-{round}": {"shape": sys.argv[2], "cold_s": 1.0}}, os.urandom(64), {})
""")


def test_processes_committing_at_once_leave_one_valid_entry(tmp_path):
    script = tmp_path / "commit.py"
    script.write_text(COMMIT_IN_PROCESS)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), name]) for name in "abc"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    manifest = CacheEntry(FIELDS, root=tmp_path / "cache").verify()
    assert {f"{name}-{r}" for name in "abc" for r in range(5)} == set(manifest.shapes)
    assert {f"inductor/{name}-{i}.so" for name in "abc" for i in range(20)} <= set(manifest.files)
    assert not list((tmp_path / "cache" / "entries").glob("*.new"))


def test_extra_metadata_is_kept_and_checksummed(tmp_path):
    entry = CacheEntry(FIELDS, root=tmp_path)
    entry.inductor_dir.mkdir(parents=True)
    entry.commit({}, None, {}, extra={"autoquant_plan": {"layers": {"0": "int8wo"}}})
    assert CacheEntry(FIELDS, root=tmp_path).verify().extra == {"autoquant_plan": {"layers": {"0": "int8wo"}}}
    data = json.loads((entry.path / "manifest.json").read_text())
    data["extra"]["autoquant_plan"]["layers"]["0"] = "uint1wo"
    (entry.path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="checksum does not match"):
        CacheEntry(FIELDS, root=tmp_path).verify()


def test_tuning_picks_of_both_processes_are_kept(tmp_path):
    warmed_entry(tmp_path)  # picks {"gpu|N=1": ...}
    second = CacheEntry(FIELDS, root=tmp_path)
    second.inductor_dir.mkdir(parents=True)
    second.commit({}, None, {"gpu|N=2": {"BLOCK": 32}})
    picks = json.loads((second.path / "tuning.json").read_text())
    assert picks == {"gpu|N=1": {"BLOCK": 16}, "gpu|N=2": {"BLOCK": 32}}


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_a_commit_over_a_bad_entry_replaces_it(tmp_path, corruption):
    """A process that did not load the entry (it was warming meanwhile) commits over a bad one: no exception,
    and nothing of the bad entry is merged into the new one."""
    corrupt, _ = CORRUPTIONS[corruption]
    corrupt(warmed_entry(tmp_path))
    writer = CacheEntry(FIELDS, root=tmp_path)
    writer.inductor_dir.mkdir(parents=True)
    (writer.inductor_dir / "mine.so").write_bytes(b"mine")
    writer.commit({"k2": {"shape": "0=7x8", "cold_s": 3.0}}, None, {})
    manifest = CacheEntry(FIELDS, root=tmp_path).verify()
    assert manifest.shapes.keys() == {"k2"}
    assert set(manifest.files) == {"inductor/mine.so", "tuning.json"}
    assert not any(p.is_symlink() for p in writer.path.rglob("*"))


@pytest.mark.parametrize("loads_first", [True, False], ids=["loaded-then-committed", "committed-without-loading"])
def test_an_unlisted_file_is_ignored_and_never_enters_a_later_manifest(tmp_path, loads_first):
    entry = warmed_entry(tmp_path)
    (entry.path / "inductor" / "planted.py").write_text("print('not compiled by quantrt')")
    (entry.path / "extra.bin").write_bytes(b"x")
    process = CacheEntry(FIELDS, root=tmp_path)
    with pytest.warns(CacheWarning, match=r"extra.bin, inductor/planted.py are not listed in its manifest, so "
                                          r"ignored") as record:
        if loads_first:
            assert process.load() is not None and process.status == "loaded"
            assert (process.inductor_dir / "kernel.so").read_bytes() == (entry.path / "inductor/kernel.so").read_bytes()
        else:
            process.inductor_dir.mkdir(parents=True)
        assert not (process.inductor_dir / "planted.py").exists() and not (process.work_dir / "extra.bin").exists()
        (process.inductor_dir / "new.so").write_bytes(b"new")
        process.commit({"k2": {"shape": "0=7x8", "cold_s": 3.0}}, None, {})
    assert len([w for w in record if "not listed" in str(w.message)]) == 1, "one warning per process"
    assert str(entry.path) in str(record[0].message)
    manifest = CacheEntry(FIELDS, root=tmp_path).verify()
    assert manifest.shapes.keys() == {"k1", "k2"}
    assert {"inductor/kernel.so", "inductor/new.so"} <= set(manifest.files)
    assert "inductor/planted.py" not in manifest.files and "extra.bin" not in manifest.files
    assert not (process.path / "inductor" / "planted.py").exists() and not (process.path / "extra.bin").exists()


def test_working_copies_of_a_cache_folder_with_a_space_are_kept_off_it(tmp_path, monkeypatch):
    """Inductor's C++ compile command breaks on a space in TORCHINDUCTOR_CACHE_DIR: the working folders of a
    cache folder with one go to a private folder in the temp dir (test_compile.py compiles there for real)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    plain = CacheEntry(FIELDS, root=tmp_path / "plain")
    assert plain.work_dir.parent == tmp_path / "plain" / "work", "a path without spaces keeps its own work folder"
    for root in (tmp_path / "my cache", tmp_path / "it's", tmp_path / "back\\slash"):
        writer = warmed_entry(root)
        assert " " not in str(writer.work_dir) and compiler_safe(writer.work_dir)
        assert writer.work_dir.parent == work_base(root) and writer.work_dir.parent.parent == tmp_path / "tmp"
        assert stat.S_IMODE(writer.work_dir.parent.stat().st_mode) == 0o700
        assert writer.path.parent == root / "entries", "the entry itself stays in the cache folder"
        reader = CacheEntry(FIELDS, root=root)
        assert reader.load() is not None and reader.work_dir != writer.work_dir
        assert (reader.inductor_dir / "kernel.so").read_bytes() == (root / "entries" / writer.fingerprint /
                                                                    "inductor" / "kernel.so").read_bytes()


def test_a_space_in_the_temp_folder_too_is_refused_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp dir"))
    entry = CacheEntry(FIELDS, root=tmp_path / "my cache")
    with pytest.raises(OSError, match=r"my cache has a space.*temp dir.*QUANTRT_CACHE_DIR=/path/without/spaces"):
        entry.work_dir


def test_a_working_folder_base_that_is_not_private_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = tmp_path / "my cache"
    base = work_base(root)
    assert base.parent == tmp_path and stat.S_IMODE(base.stat().st_mode) == 0o700
    base.chmod(0o777)  # another user could plant compiled code in it
    with pytest.raises(OSError, match=r"is not a private folder of this user.*QUANTRT_CACHE_DIR"):
        work_base(root)
    base.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    base.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError, match="is not a private folder of this user"):
        CacheEntry(FIELDS, root=root).work_dir
