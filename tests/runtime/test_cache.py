"""The cache entry on its own (runtime/cache.py): commit, verify, and every way an entry can be bad. No
compilation here: the entries hold stand-in files; test_compile.py warms real ones."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from quantrt.cache import CacheEntry, CacheWarning, Manifest, fingerprint_of

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
}


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_a_bad_entry_is_ignored_with_a_warning_and_removed(tmp_path, corruption):
    corrupt, message = CORRUPTIONS[corruption]
    entry = warmed_entry(tmp_path)
    corrupt(entry)
    reader = CacheEntry(FIELDS, root=tmp_path)
    with pytest.warns(CacheWarning, match="it will be rebuilt") as record:
        assert reader.load() is None
    assert message in str(record[0].message)
    assert reader.status == "rebuilt" and not reader.path.exists()
    assert not any(reader.inductor_dir.rglob("*")), "nothing of the bad entry may reach the working folder"
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
