"""quantrt.archive: cache entries exported as one archive, imported on another machine, listed and pruned. The
entries here hold stand-in files (test_aot.py ships a real one to a replica); the archives are checked the way a
hostile or damaged one would be read."""

import io
import json
import os
import tarfile
import time

import pytest
from filelock import FileLock

from quantrt.archive import (ArchiveError, environment_difference, export_entry, find_entry, import_archive,
                             list_entries, prune)
from quantrt.cache import CacheEntry, manifest_checksum, sha256_file
from quantrt.compile import environment_fields

FIELDS = {"model": "m", **environment_fields("cpu"), "compile": {"mode": "default"}, "settings": "s"}


def warmed_entry(root, fields=FIELDS, model_class="MLP"):
    """An entry as a warmup leaves it, with stand-ins for Inductor's files and an AOT package."""
    entry = CacheEntry(fields, root=root)
    (entry.inductor_dir / "fxgraph").mkdir(parents=True)
    (entry.inductor_dir / "fxgraph" / "graph").write_bytes(os.urandom(300))
    (entry.work_dir / "aot").mkdir()
    (entry.work_dir / "aot" / "abc.pt2").write_bytes(os.urandom(700))
    shapes = {"k1": {"shape": "0=1x8", "cold_s": 2.0, "aot": {"package": "abc.pt2", "cold_s": 2.0}},
              "k2": {"shape": "0=7x8", "cold_s": 1.0}}
    entry.commit(shapes, b"artifacts", {}, {"model_class": model_class})
    return entry


def resign(folder, edit):
    """Edit an entry's manifest and recompute its checksum (which anyone can: it catches damage, not intent)."""
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    body = {k: v for k, v in data.items() if k != "checksum"}
    data["checksum"] = manifest_checksum(body)
    (folder / "manifest.json").write_text(json.dumps(data))


def test_export_then_import_installs_the_same_entry(tmp_path):
    entry = warmed_entry(tmp_path / "build")
    archive, digest = export_entry(entry.fingerprint[:8], tmp_path / "entry.tar.gz", tmp_path / "build")
    assert digest == sha256_file(archive)
    again, _ = export_entry(str(entry.path), tmp_path / "again.tar.gz")  # by folder; the same bytes
    assert again.read_bytes() == archive.read_bytes()
    manifest = import_archive(archive, tmp_path / "replica", expected_sha256=digest)
    installed = CacheEntry(FIELDS, root=tmp_path / "replica")
    assert installed.verify().files == manifest.files == entry.verify().files
    assert installed.load() is not None and installed.status == "loaded"
    [info] = list_entries(tmp_path / "replica")
    assert (info.fingerprint, info.model, info.shapes, info.aot_packages, info.problem) == (
        entry.fingerprint, "MLP", 2, 1, "")
    assert not list((tmp_path / "replica" / "entries").glob(".import-*")), "no staging folder is left"


def test_an_installed_entry_is_replaced_only_with_overwrite(tmp_path):
    entry = warmed_entry(tmp_path / "build")
    archive, _ = export_entry(entry.fingerprint, tmp_path / "entry.tar.gz", tmp_path / "build")
    import_archive(archive, tmp_path / "replica")
    with pytest.raises(FileExistsError, match="installed already: pass --overwrite"):
        import_archive(archive, tmp_path / "replica")
    import_archive(archive, tmp_path / "replica", overwrite=True)
    with pytest.raises(FileExistsError, match="entry.tar.gz exists"):
        export_entry(entry.fingerprint, archive, tmp_path / "build")


def test_a_wrong_sha256_is_refused(tmp_path):
    entry = warmed_entry(tmp_path / "build")
    archive, digest = export_entry(entry.fingerprint, tmp_path / "entry.tar.gz", tmp_path / "build")
    with pytest.raises(ArchiveError, match="not the expected"):
        import_archive(archive, tmp_path / "replica", expected_sha256="0" * 64)
    assert not (tmp_path / "replica" / "entries").exists() or not any((tmp_path / "replica" / "entries").iterdir())


@pytest.mark.parametrize("field, value, named", [
    ("torch", "2.11.0+cu128", "torch '2.11.0+cu128' there"),
    ("device", "NVIDIA H100 80GB HBM3 (SM 9.0)", "device 'NVIDIA H100 80GB HBM3 (SM 9.0)' there, this machine has"),
    ("quantrt", "0.0.1", "quantrt '0.0.1' there"),
], ids=["other-torch", "other-gpu", "other-quantrt"])
def test_an_archive_of_another_environment_is_refused_naming_the_difference(tmp_path, field, value, named):
    fields = {**FIELDS, field: value}
    entry = warmed_entry(tmp_path / "build", fields=fields)
    assert named in environment_difference(fields)
    archive, _ = export_entry(entry.fingerprint, tmp_path / "entry.tar.gz", tmp_path / "build")
    with pytest.raises(ArchiveError, match="made for another environment") as error:
        import_archive(archive, tmp_path / "replica")
    assert named in str(error.value)
    assert not list((tmp_path / "replica" / "entries").iterdir())
    [info] = list_entries(tmp_path / "build")
    assert named in info.problem


def tar_of(members):
    """A gzipped tar of (name, bytes or None for a folder, kind) members; kind "file", "dir" or "symlink"."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def hostile_members(entry):
    manifest = (entry.path / "manifest.json").read_bytes()
    fp = entry.fingerprint
    return {
        "parent-path": [(f"{fp}/manifest.json", manifest, "file"), (f"{fp}/../../evil.py", b"x", "file")],
        "absolute-path": [(f"{fp}/manifest.json", manifest, "file"), ("/tmp/evil.py", b"x", "file")],
        "symlink": [(f"{fp}/manifest.json", manifest, "file"), (f"{fp}/tuning.json", None, "symlink")],
        "two-entries": [(f"{fp}/manifest.json", manifest, "file"), ("other/manifest.json", manifest, "file")],
        "damaged-file": [(f"{fp}/manifest.json", manifest, "file"), *[
            (f"{fp}/{name}", b"not what the manifest says", "file") for name in json.loads(manifest)["files"]]],
        "no-manifest": [(f"{fp}/tuning.json", b"{}", "file")],
        "not-gzip": None,
    }


HOSTILE = ["parent-path", "absolute-path", "symlink", "two-entries", "damaged-file", "no-manifest", "not-gzip"]
REFUSAL = {"parent-path": "outside its folder", "absolute-path": "outside its folder", "symlink": "not a regular file",
           "two-entries": "2 top-level folders", "damaged-file": "damaged", "no-manifest": "no manifest",
           "not-gzip": "not a readable quantrt cache archive"}


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_or_damaged_archive_is_refused_and_leaves_nothing(tmp_path, kind):
    entry = warmed_entry(tmp_path / "build")
    members = hostile_members(entry)[kind]
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(tar_of(members) if members is not None else b"plain text, not an archive")
    with pytest.raises(ArchiveError, match=REFUSAL[kind]):
        import_archive(archive, tmp_path / "replica")
    assert not (tmp_path / "evil.py").exists()
    left = list((tmp_path / "replica" / "entries").iterdir()) if (tmp_path / "replica" / "entries").exists() else []
    assert left == []


def test_a_damaged_entry_is_not_exported(tmp_path):
    entry = warmed_entry(tmp_path / "build")
    (entry.path / "aot" / "abc.pt2").write_bytes(b"truncated")
    with pytest.raises(ArchiveError, match="abc.pt2 does not match its checksum.*warm the model again"):
        export_entry(entry.fingerprint, tmp_path / "entry.tar.gz", tmp_path / "build")
    assert not list(tmp_path.glob("*.tar.gz")) and not list(tmp_path.glob(".*partial"))


def test_find_entry_names_what_is_ambiguous_or_missing(tmp_path):
    warmed_entry(tmp_path, fields={**FIELDS, "model": "a"})
    warmed_entry(tmp_path, fields={**FIELDS, "model": "b"})
    with pytest.raises(ArchiveError, match="no cache entry 'zzz'.*quantrt cache list"):
        find_entry("zzz", tmp_path)
    with pytest.raises(ArchiveError, match="is the start of 2 entries"):
        find_entry("", tmp_path)


def test_prune_removes_what_cannot_be_used_and_keeps_the_rest(tmp_path):
    usable = warmed_entry(tmp_path, fields={**FIELDS, "model": "usable"})
    stale = warmed_entry(tmp_path, fields={**FIELDS, "model": "stale", "torch": "2.11.0"})
    old = warmed_entry(tmp_path, fields={**FIELDS, "model": "old"})
    resign(old.path, lambda data: data.update(updated=time.time() - 10 * 86400))
    broken = warmed_entry(tmp_path, fields={**FIELDS, "model": "broken"})
    (broken.path / "manifest.json").write_text("{")
    leftover = tmp_path / "entries" / f"{usable.fingerprint}.new"
    leftover.mkdir()
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))

    planned = prune(tmp_path, older_than_days=7, stale=True, dry_run=True)
    assert {p.path for p in planned} == {stale.path, old.path, broken.path, leftover}
    assert all(p.path.exists() for p in planned), "a dry run removes nothing"
    assert {p.path for p in prune(tmp_path)} == {broken.path, leftover}  # unreadable and leftovers only
    assert stale.path.exists() and old.path.exists()
    with FileLock(old.lock.lock_file, timeout=0):  # a warmup holding the entry
        kept = prune(tmp_path, older_than_days=7, stale=True)
    assert {p.path: p.reason.startswith("kept") for p in kept} == {stale.path: False, old.path: True}
    assert [info.fingerprint for info in list_entries(tmp_path)] == sorted(
        [usable.fingerprint, old.fingerprint], key=lambda f: f != usable.fingerprint)
    assert usable.verify() is not None
