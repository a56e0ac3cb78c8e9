"""The compiled-graph cache: one entry per fingerprint under `QUANTRT_CACHE_DIR`.

An entry is a folder `entries/<fingerprint>/` holding

- `inductor/`: the Inductor cache folder the graphs were compiled into (FX-graph and AOT-autograd entries,
  the generated code and the compiled kernel binaries: C++ shared objects on CPU, Triton cubins on CUDA).
  `torch.compiler.save_cache_artifacts` leaves the binaries out, and rebuilding them is most of a cold
  start, so the folder itself is kept;
- `artifacts-*.bin`: what `torch.compiler.save_cache_artifacts` returned after each warmup (Mega-Cache);
- `tuning.json`: quantrt's kernel tuning picks for this device;
- `manifest.json`, written last: the fingerprint's fields, the shapes warmed with their compile times, an
  sha256 of every other file and a checksum of the manifest itself.

An entry is never changed in place. A process copies a verified entry into a private working folder and
compiles there; a warmup then builds a new entry beside the old one and swaps it in under a cross-process
file lock. An entry that fails verification (missing or corrupt manifest, a file missing or changed, fields
of another torch, GPU or model) is moved aside with a warning and rebuilt; it is never loaded.

Trust: Inductor runs the code it caches (and its artifacts are pickles), so the cache folder must be as
trusted as the Python environment. The checksums catch corruption, truncation and stale or foreign
entries, not an attacker who can write the folder.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

ENTRY_FORMAT = 1
MANIFEST = "manifest.json"


class CacheWarning(UserWarning):
    """A cache entry was ignored (and will be rebuilt) or could not be written."""


def cache_root() -> Path:
    """`QUANTRT_CACHE_DIR`, else ~/.cache/quantrt."""
    return Path(os.environ.get("QUANTRT_CACHE_DIR") or Path.home() / ".cache" / "quantrt").expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()


def fingerprint_of(fields: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(fields)).hexdigest()[:32]


def _tracked_files(folder: Path) -> Iterator[Path]:
    """Every file of an entry that the manifest checksums: not the manifest, not Inductor's lock files."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name != MANIFEST and not path.name.endswith(".lock"):
            yield path


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy `src` into `dst` (merging, keeping files already in `dst`). Copies, not hard links: a running process
    maps its compiled kernels from its working folder, and a file of the entry rewritten in place (a disk
    error, a user's edit) must not change what that process has mapped."""
    for path in _tracked_files(src):
        target = dst / path.relative_to(src)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


OWNER_LOCK = "owner.lock"
STALE_WORK_SECONDS = 600


def _sweep_work(work: Path) -> None:
    """Remove the working copies of processes that died without cleaning up (killed, say). A living process
    holds the lock file in its folder for its whole life, so a folder is removed only when its lock can be
    taken and it has not changed for STALE_WORK_SECONDS (on a shared volume whose locks do not reach across
    hosts, the age still protects a process that is compiling)."""
    for folder in work.iterdir():
        try:
            if time.time() - folder.stat().st_mtime < STALE_WORK_SECONDS:
                continue
            owner = FileLock(str(folder / OWNER_LOCK), timeout=0)
            with owner:
                shutil.rmtree(folder, ignore_errors=True)
        except (Timeout, OSError):
            continue


@dataclass
class Manifest:
    fingerprint: str
    fields: dict[str, Any]
    shapes: dict[str, dict[str, Any]] = field(default_factory=dict)  # signature key -> {"shape", "cold_s", ...}
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    created: float = 0.0
    updated: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # the model's autoquant plan, say

    def to_json(self) -> dict[str, Any]:
        body = {"format": ENTRY_FORMAT, "fingerprint": self.fingerprint, "fields": self.fields,
                "shapes": self.shapes, "files": self.files, "created": self.created, "updated": self.updated,
                "extra": self.extra}
        return {**body, "checksum": hashlib.sha256(_canonical(body)).hexdigest()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict):
            raise ValueError("the manifest is not a JSON object")
        body = {k: v for k, v in data.items() if k != "checksum"}
        if data.get("format") != ENTRY_FORMAT:
            raise ValueError(f"entry format {data.get('format')!r}, this quantrt reads format {ENTRY_FORMAT}")
        if data.get("checksum") != hashlib.sha256(_canonical(body)).hexdigest():
            raise ValueError("the manifest's checksum does not match its content")
        return cls(data["fingerprint"], data["fields"], data["shapes"], data["files"], data["created"],
                   data["updated"], data.get("extra", {}))


class CacheEntry:
    """The cache entry of one fingerprint, and this process's private working copy of it."""

    def __init__(self, fields: dict[str, Any], root: Path | None = None, lock_timeout: float = 3600.0):
        self.fields = fields
        self.fingerprint = fingerprint_of(fields)
        self.root = Path(root) if root is not None else cache_root()
        self.path = self.root / "entries" / self.fingerprint
        self.lock = FileLock(str(self.root / "locks" / f"{self.fingerprint}.lock"), timeout=lock_timeout)
        self.manifest: Manifest | None = None  # of the entry this process loaded or wrote
        self.status = "new"  # new | loaded | rebuilt
        self.reason = ""  # why an entry on disk was not used
        self._work: Path | None = None

    @property
    def work_dir(self) -> Path:
        """This process's working copy: Inductor compiles into `work_dir / "inductor"`."""
        if self._work is None:
            (self.root / "work").mkdir(parents=True, exist_ok=True)
            _sweep_work(self.root / "work")
            self._work = Path(tempfile.mkdtemp(prefix=f"{self.fingerprint[:12]}-{os.getpid()}-",
                                               dir=self.root / "work"))
            self._owner = FileLock(str(self._work / OWNER_LOCK))
            self._owner.acquire()  # held until exit: the folder is in use (see _sweep_work)
            atexit.register(shutil.rmtree, self._work, ignore_errors=True)
        return self._work

    @property
    def inductor_dir(self) -> Path:
        return self.work_dir / "inductor"

    def _locked(self):
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        return self.lock

    def verify(self, path: Path | None = None) -> Manifest:
        """The manifest of the entry at `path`, after checking it and every file it lists; ValueError says
        what is wrong."""
        path = path or self.path
        try:
            data = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise ValueError("it has no manifest (a warmup that did not finish)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"its manifest cannot be read: {e}") from None
        manifest = Manifest.from_json(data)
        if manifest.fingerprint != self.fingerprint or path.name not in (self.fingerprint, f"{self.fingerprint}.new"):
            raise ValueError(f"it belongs to fingerprint {manifest.fingerprint}, not {self.fingerprint}")
        for key in sorted(set(self.fields) | set(manifest.fields)):
            if self.fields.get(key) != manifest.fields.get(key):
                raise ValueError(f"it was made for {key}={manifest.fields.get(key)!r}, this process has "
                                 f"{self.fields.get(key)!r}")
        for name, digest in manifest.files.items():
            file = (path / name).resolve()
            if not file.is_relative_to(path.resolve()):
                raise ValueError(f"its manifest names {name!r}, outside the entry")
            if not file.is_file():
                raise ValueError(f"{name} is missing")
            if sha256_file(file) != digest:
                raise ValueError(f"{name} does not match its checksum (corrupt or truncated)")
        return manifest

    def _discard(self, reason: str) -> None:
        # moved aside first (one rename, atomic), then deleted: a reader never sees half an entry
        self.reason = reason
        warnings.warn(f"quantrt cache: ignoring entry {self.path}: {reason}; it will be rebuilt", CacheWarning,
                      stacklevel=3)
        trash = self.root / "trash" / f"{self.fingerprint}-{os.getpid()}-{time.time_ns()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self.path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        except OSError:
            shutil.rmtree(self.path, ignore_errors=True)

    def load(self) -> Manifest | None:
        """Verify the entry on disk and copy it into the working folder. None (with a warning when an entry
        was there but bad) when there is nothing usable."""
        with self._locked():
            if not self.path.exists():
                return None
            try:
                manifest = self.verify()
            except ValueError as e:
                self._discard(str(e))
                self.status = "rebuilt"
                return None
            _copy_tree(self.path, self.work_dir)
        self.manifest, self.status = manifest, "loaded"
        return manifest

    def siblings(self, differing_in: str) -> list[Manifest]:
        """Manifests of other entries whose fields equal this one's except `differing_in` (to explain a miss:
        the same model compiled under other settings). Read, not verified: they are only reported on."""
        found = []
        for manifest_file in (self.root / "entries").glob(f"*/{MANIFEST}"):
            if manifest_file.parent == self.path:
                continue
            try:
                manifest = Manifest.from_json(json.loads(manifest_file.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            others = {k: v for k, v in manifest.fields.items() if k != differing_in}
            if others == {k: v for k, v in self.fields.items() if k != differing_in}:
                found.append(manifest)
        return found

    def artifact_files(self) -> list[Path]:
        return sorted(self.work_dir.glob("artifacts-*.bin"))

    def commit(self, shapes: dict[str, dict[str, Any]], artifacts: bytes | None, tuning: dict[str, Any],
               extra: dict[str, Any] | None = None) -> Manifest:
        """Write the working folder as the entry: merge what another process committed meanwhile, checksum
        everything, write the manifest last, and swap the new folder in."""
        work = self.work_dir
        if artifacts:
            (work / f"artifacts-{time.time_ns()}-{os.getpid()}.bin").write_bytes(artifacts)
        with self._locked():
            merged = dict(shapes)
            created = time.time()
            if self.path.exists():
                try:
                    current = self.verify()
                    _copy_tree(self.path, work)  # another process's graphs and artifacts are kept
                    merged = {**current.shapes, **shapes}
                    created = current.created
                    tuning = {**json.loads((self.path / "tuning.json").read_text()), **tuning}
                except (ValueError, OSError):
                    pass  # a bad entry is replaced
            (work / "tuning.json").write_text(json.dumps(tuning, indent=1, sort_keys=True))
            staging = self.path.with_name(f"{self.fingerprint}.new")
            shutil.rmtree(staging, ignore_errors=True)
            staging.parent.mkdir(parents=True, exist_ok=True)
            _copy_tree(work, staging)
            files = {str(p.relative_to(staging)): sha256_file(p) for p in _tracked_files(staging)}
            manifest = Manifest(self.fingerprint, self.fields, merged, files, created, time.time(), extra or {})
            tmp = staging / f"{MANIFEST}.tmp"
            tmp.write_text(json.dumps(manifest.to_json(), indent=1))
            os.replace(tmp, staging / MANIFEST)
            if self.path.exists():
                old = self.root / "trash" / f"{self.fingerprint}-{os.getpid()}-{time.time_ns()}"
                old.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.path, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(staging, self.path)
        self.manifest = manifest
        return manifest


def device_name(device) -> str:
    """What compiled code depends on: the GPU's name and capability, or the CPU's architecture and the vector
    ISA Inductor generates C++ for."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (SM {major}.{minor})"
    return f"{device.type}: {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"


def lock_timeout_error(entry: CacheEntry) -> str:
    return (f"another process has held the lock of cache entry {entry.path} for {entry.lock.timeout:.0f} s; if no "
            f"quantrt process is warming it, delete {entry.lock.lock_file}")


__all__ = ["CacheEntry", "CacheWarning", "Manifest", "Timeout", "cache_root", "device_name", "fingerprint_of",
           "sha256_file"]
