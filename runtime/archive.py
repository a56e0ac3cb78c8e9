"""Cache entries a deploy pipeline ships: one archive per warmed entry (`quantrt cache export`), installed on each
replica (`quantrt cache import`), and the cache folder's entries shown and cleaned (`quantrt cache list`,
`quantrt cache prune`).

An archive is a gzipped tar of one entry folder as runtime/cache.py writes it (its manifest lists every file with
its sha256: Inductor's folder, the Mega-Cache artifacts, the AOT packages and the kernel tuning picks), under a
folder named by its fingerprint. Importing reads the members itself (regular files and folders only, each below
that folder; no links, no devices, nothing outside), into a staging folder beside the entry, verifies the
manifest and every file as a loader would, checks that the entry was made by this quantrt, torch, triton and
Python for a device of this machine (or names the difference and refuses), and swaps it in under the entry's
lock. An entry already there is replaced only with `overwrite=True`.

Trust: an entry holds code that Inductor runs, so an archive is as trusted as a wheel you install: the checksums
catch damage in transit, not someone who built a hostile archive; `expected_sha256` (printed by export) pins the
archive a pipeline built.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from filelock import Timeout

from .cache import (MANIFEST, CacheEntry, Manifest, cache_root, entry_lock, read_manifest, sha256_file, sweep_work,
                    work_base)
from .compile import ENVIRONMENT_FIELDS, environment_fields

ARCHIVE_SUFFIX = ".tar.gz"
# entries being written (`<fingerprint>.new`, a warmup's commit) or imported (`<fingerprint>.import-*`)
STAGING_MARKERS = (".new", ".import-")
STALE_STAGING_SECONDS = 3600
PRUNE_LOCK_SECONDS = 10.0


class ArchiveError(ValueError):
    """An archive or an entry that cannot be exported, imported or found; the message says why and what to do."""


@dataclass
class EntryInfo:
    """One entry of a cache folder, as `quantrt cache list` shows it."""

    fingerprint: str
    path: Path
    model: str
    device: str
    torch: str
    quantrt: str
    shapes: int
    aot_packages: int
    bytes: int
    updated: float
    problem: str  # "" for an entry this installation can use; else why it cannot (another torch, unreadable, ...)


def local_devices() -> list[str]:
    """The device names (runtime/devices.py) of this machine: its CPU and every visible CUDA GPU."""
    names = [environment_fields("cpu")["device"]]
    if torch.cuda.is_available():
        names += [environment_fields(f"cuda:{i}")["device"] for i in range(torch.cuda.device_count())]
    return names


def environment_difference(fields: dict) -> str:
    """How the environment an entry was made in differs from this one ("torch 2.11.0 there, 2.13.0 here"), or
    "" when this installation can use it."""
    here = environment_fields("cpu")
    differences = [f"{key} {fields.get(key)!r} there, {here[key]!r} here" for key in ENVIRONMENT_FIELDS
                   if key != "device" and fields.get(key) != here[key]]
    devices = local_devices()
    if fields.get("device") not in devices:
        differences.append(f"device {fields.get('device')!r} there, this machine has {' and '.join(map(repr, devices))}")
    return "; ".join(differences)


def entries_folder(root: Path | None) -> Path:
    return (Path(root) if root is not None else cache_root()) / "entries"


def _is_staging(name: str) -> bool:
    return any(marker in name for marker in STAGING_MARKERS)


def list_entries(root: Path | None = None) -> list[EntryInfo]:
    """Every entry of the cache folder `root` (default QUANTRT_CACHE_DIR), newest first, with why this installation
    cannot use it where it cannot. Reads manifests only (no checksums: `export` and loading verify)."""
    folder = entries_folder(root)
    infos = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not path.is_dir() or _is_staging(path.name):
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        try:
            manifest = read_manifest(path)
        except ValueError as e:
            infos.append(EntryInfo(path.name, path, "?", "?", "?", "?", 0, 0, size, path.stat().st_mtime,
                                   f"unreadable: {e}"))
            continue
        fields = manifest.fields
        aot = sum(1 for shape in manifest.shapes.values() if isinstance(shape.get("aot"), dict))
        problem = "" if manifest.fingerprint == path.name else f"its manifest is of fingerprint {manifest.fingerprint}"
        problem = problem or environment_difference(fields)
        infos.append(EntryInfo(path.name, path, str(manifest.extra.get("model_class", "?")), str(fields.get("device")),
                               str(fields.get("torch")), str(fields.get("quantrt")), len(manifest.shapes), aot, size,
                               manifest.updated, problem))
    return sorted(infos, key=lambda info: -info.updated)


def find_entry(name: str, root: Path | None = None) -> Path:
    """The entry folder that `name` names: an entry's path, its fingerprint, or a prefix of exactly one."""
    given = Path(name)
    if given.is_dir() and (given / MANIFEST).is_file():
        return given
    folder = entries_folder(root)
    candidates = [p for p in (sorted(folder.iterdir()) if folder.is_dir() else [])
                  if p.is_dir() and not _is_staging(p.name) and p.name.startswith(name)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ArchiveError(f"no cache entry {name!r} in {folder}: `quantrt cache list` shows the entries (pass a "
                           f"fingerprint, a prefix of one, or an entry's folder)")
    raise ArchiveError(f"{name!r} is the start of {len(candidates)} entries' fingerprints in {folder} "
                       f"({', '.join(p.name[:12] for p in candidates[:4])}...): give more of it")


def export_entry(name: str, archive: str | os.PathLike, root: Path | None = None,
                 overwrite: bool = False) -> tuple[Path, str]:
    """Write the entry `name` (find_entry) as one archive at `archive` (written beside it, then renamed into place;
    an existing file is replaced only with `overwrite`). The entry is verified first (manifest, every file's
    checksum), so a damaged entry is never shipped. Returns the archive's path and sha256."""
    path = find_entry(name, root)
    archive = Path(archive)
    if archive.exists() and not overwrite:
        raise FileExistsError(f"{archive} exists: choose another path, or pass --overwrite (overwrite=True) to "
                              f"replace it")
    try:
        manifest = read_manifest(path)
        CacheEntry(manifest.fields, root=path.parent.parent).verify(path)
    except ValueError as e:
        raise ArchiveError(f"the cache entry {path} cannot be exported: {e}; warm the model again to rebuild it") from e
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(f".{archive.name}.{os.getpid()}.partial")
    try:
        # gzip with a fixed mtime and sorted members: the same entry gives the same archive bytes
        with open(partial, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as zipped, \
                tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for relative in sorted([MANIFEST, *manifest.files]):
                info = tar.gettarinfo(str(path / relative), arcname=f"{manifest.fingerprint}/{relative}")
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                with open(path / relative, "rb") as f:
                    tar.addfile(info, f)
        os.replace(partial, archive)
    finally:
        partial.unlink(missing_ok=True)
    return archive, sha256_file(archive)


def _members(tar: tarfile.TarFile) -> tuple[str, list[tarfile.TarInfo]]:
    """The fingerprint folder an archive holds and its file members, after refusing anything but regular files and
    folders below one folder named by a fingerprint."""
    tops, files = set(), []
    for member in tar.getmembers():
        parts = PurePosixPath(member.name).parts
        if PurePosixPath(member.name).is_absolute() or ".." in parts or not parts or "\\" in member.name:
            raise ArchiveError(f"it has a member {member.name!r} outside its folder")
        if not (member.isfile() or member.isdir()):
            raise ArchiveError(f"its member {member.name!r} is not a regular file or folder (a link or a device): "
                               f"quantrt's archives hold files only")
        tops.add(parts[0])
        if member.isfile():
            if len(parts) < 2:
                raise ArchiveError(f"its member {member.name!r} is not inside the entry's folder")
            files.append(member)
    if len(tops) != 1:
        raise ArchiveError(f"it holds {len(tops)} top-level folders ({', '.join(sorted(tops)[:3])}), a quantrt "
                           f"archive holds one entry")
    return tops.pop(), files


def import_archive(archive: str | os.PathLike, root: Path | None = None, expected_sha256: str | None = None,
                   overwrite: bool = False) -> Manifest:
    """Install the entry in `archive` (written by export_entry) into the cache folder `root` (default
    QUANTRT_CACHE_DIR) and return its manifest. Refused, with why: an archive whose sha256 is not
    `expected_sha256`, one that is malformed or damaged (a member outside its folder, a link, a file that does not
    match the manifest), one made by another quantrt, torch, triton or Python or for a device this machine does
    not have, and an entry already installed unless `overwrite`."""
    archive = Path(archive)
    if not archive.is_file():
        raise ArchiveError(f"{archive} does not exist or is not a file")
    if expected_sha256 is not None and sha256_file(archive) != expected_sha256.lower():
        raise ArchiveError(f"{archive} has sha256 {sha256_file(archive)}, not the expected {expected_sha256}: it is "
                           f"not the archive that was exported (or it was damaged on the way)")
    folder = entries_folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".import-{os.getpid()}-{time.time_ns()}"
    try:
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                fingerprint, files = _members(tar)
                for member in files:
                    target = staging / PurePosixPath(member.name).relative_to(fingerprint)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as source, open(target, "wb") as sink:
                        shutil.copyfileobj(source, sink)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ArchiveError(f"{archive} is not a readable quantrt cache archive ({e})") from e
        try:
            manifest = read_manifest(staging)
        except ValueError as e:
            raise ArchiveError(f"{archive} is not a quantrt cache archive: {e}") from e
        if manifest.fingerprint != fingerprint:
            raise ArchiveError(f"{archive}: its folder is {fingerprint!r} but its manifest is of fingerprint "
                               f"{manifest.fingerprint}")
        difference = environment_difference(manifest.fields)
        if difference:
            raise ArchiveError(f"{archive} was made for another environment ({difference}): its graphs and kernels "
                               f"would not be used here. Warm the model on a machine like this one and export that "
                               f"entry")
        entry = CacheEntry(manifest.fields, root=folder.parent)
        with entry.locked():
            new = entry.path.with_name(f"{entry.fingerprint}.new")
            shutil.rmtree(new, ignore_errors=True)
            os.replace(staging, new)
            try:
                entry.verify(new)
            except ValueError as e:
                shutil.rmtree(new, ignore_errors=True)
                raise ArchiveError(f"{archive} is damaged: {e}") from e
            if entry.path.exists():
                if not overwrite:
                    shutil.rmtree(new, ignore_errors=True)
                    raise FileExistsError(f"the cache entry {entry.path} is installed already: pass --overwrite "
                                          f"(overwrite=True) to replace it with the archive's")
                old = folder.parent / "trash" / f"{entry.fingerprint}-{os.getpid()}-{time.time_ns()}"
                old.parent.mkdir(parents=True, exist_ok=True)
                os.replace(entry.path, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(new, entry.path)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class Pruned:
    """What `prune` removed (or would remove, dry_run), and why."""

    path: Path
    reason: str
    bytes: int


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def prune(root: Path | None = None, older_than_days: float | None = None, stale: bool = False,
          dry_run: bool = False) -> list[Pruned]:
    """Clean the cache folder `root` (default QUANTRT_CACHE_DIR): entries whose manifest cannot be read, with
    `stale` also those another quantrt, torch, triton, Python or device made (never used here), with
    `older_than_days` those not written for that long; leftovers of killed warmups and imports (staging folders an
    hour old, `trash/`) and the working copies of dead processes. An entry is removed under its lock (one a warmup
    holds is left, and said so). `dry_run`: say what would go, remove nothing."""
    base = Path(root) if root is not None else cache_root()
    folder = base / "entries"
    removed: list[Pruned] = []

    def remove(path: Path, reason: str, fingerprint: str | None = None) -> None:
        size = _folder_bytes(path) if path.is_dir() else 0
        if dry_run:
            removed.append(Pruned(path, reason, size))
            return
        try:
            if fingerprint is not None:
                (base / "locks").mkdir(parents=True, exist_ok=True)
                with entry_lock(base, fingerprint, PRUNE_LOCK_SECONDS):
                    shutil.rmtree(path)
            else:
                shutil.rmtree(path)
        except Timeout:
            removed.append(Pruned(path, f"kept: {reason}, but a warmup holds its lock", 0))
            return
        removed.append(Pruned(path, reason, size))

    now = time.time()
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not path.is_dir():
            continue
        if _is_staging(path.name):
            if now - path.stat().st_mtime > STALE_STAGING_SECONDS:
                remove(path, "left by a warmup or import that did not finish")
            continue
        try:
            manifest = read_manifest(path)
        except ValueError as e:
            remove(path, f"unreadable ({e})", path.name)
            continue
        difference = environment_difference(manifest.fields)
        if stale and difference:
            remove(path, f"made for another environment ({difference})", path.name)
        elif older_than_days is not None and now - manifest.updated > older_than_days * 86400:
            remove(path, f"not written for {(now - manifest.updated) / 86400:.1f} days", path.name)
    trash = base / "trash"
    for path in sorted(trash.iterdir()) if trash.is_dir() else []:
        remove(path, "left in trash/ by an interrupted swap")
    if not dry_run and (base / "work").is_dir():
        sweep_work(work_base(base))
    return removed


__all__ = ["ARCHIVE_SUFFIX", "ArchiveError", "EntryInfo", "Pruned", "environment_difference", "export_entry",
           "find_entry", "import_archive", "list_entries", "local_devices", "prune"]
