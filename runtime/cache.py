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

An entry is never changed in place. A process copies the files a verified entry's manifest lists (and
nothing else: an unlisted file is ignored with a warning) into a private working folder and compiles there; a
warmup then builds a new entry beside the old one and swaps it in under a cross-process file lock. An entry
that fails verification (missing, corrupt or malformed manifest, a listed path or a symlink leading out of
the entry, a file missing or changed, fields of another torch, GPU or model) is moved aside with a warning
and rebuilt; it is never loaded.

The working folders are what TORCHINDUCTOR_CACHE_DIR points at while quantrt compiles, and Inductor builds its
C++ compile command as one string that it splits again with shlex, so their path must not hold a space, quote
or backslash. They live in `QUANTRT_CACHE_DIR/work/`, or, when that path has such a character, in a private
folder of this user's in the temp dir (`quantrt-work-<uid>`); the entries stay where they are.

Trust: Inductor runs the code it caches (and its artifacts are pickles), so the cache folder must be as
trusted as the Python environment. The checksums catch corruption, truncation and stale or foreign
entries, not an attacker who can write the folder.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Iterator

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


def manifest_checksum(body: dict[str, Any]) -> str:
    """The sha256 a manifest records of its own content (every key but "checksum")."""
    return hashlib.sha256(_canonical(body)).hexdigest()


def compiler_safe(path: Path) -> bool:
    """Whether Inductor can put `path` on a compiler command line: it joins the command into one string and
    splits it with shlex, so a space, tab, quote or backslash breaks the C++ compile."""
    text = str(path)
    try:
        return shlex.split(text) == [text]
    except ValueError:  # an unbalanced quote
        return False


def _tracked_files(folder: Path) -> Iterator[Path]:
    """Every file of an entry that the manifest checksums: not the manifest, not Inductor's lock files."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name != MANIFEST and not path.name.endswith(".lock"):
            yield path


def _copy_listed(src: Path, dst: Path, names: Iterable[str]) -> None:
    """Copy the files `names` (paths relative to `src`, checked by `verify`) into `dst`, keeping files already in
    `dst`. Only listed files: anything else in an entry was never checksummed. Copies, not hard links: see
    _copy_tree."""
    for name in sorted(names):
        target = dst / name
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        # copied beside, then renamed: a copy cut short (the entry swapped away meanwhile) leaves no partial file
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.copy2(src / name, partial)
        os.replace(partial, target)


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


def _private_temp_work(root: Path) -> Path:
    """The folder for working copies when `root/work` is not compiler_safe: one of this user's in the temp dir.
    It must be private (a directory, not a symlink, this user's, no access for others): Inductor loads and runs
    what is compiled there."""
    temp = Path(tempfile.gettempdir()).absolute()
    base = temp / (f"quantrt-work-{os.getuid()}" if hasattr(os, "getuid") else "quantrt-work")
    if not (compiler_safe(base) and compiler_safe(base.resolve())):
        raise OSError(f"the cache folder {root} has a space, quote or backslash in its path, which breaks Inductor's "
                      f"C++ compile command, and so does the temp folder {temp} where quantrt would keep its working "
                      f"copies instead; set QUANTRT_CACHE_DIR (or TMPDIR) to a path without spaces, e.g. "
                      f"QUANTRT_CACHE_DIR=/path/without/spaces")
    base.mkdir(mode=0o700, exist_ok=True)
    info = os.lstat(base)
    foreign = hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o077)
    if not stat.S_ISDIR(info.st_mode) or foreign:
        raise OSError(f"{base}, where quantrt keeps its working copies because the cache folder {root} has a space, "
                      f"quote or backslash in its path, is not a private folder of this user (owner uid "
                      f"{info.st_uid}, mode {stat.filemode(info.st_mode)}); remove it, or set QUANTRT_CACHE_DIR to "
                      f"a path without spaces, e.g. QUANTRT_CACHE_DIR=/path/without/spaces")
    return base


def work_base(root: Path) -> Path:
    """Where the working copies of the cache at `root` live: `root/work`, or a private temp folder when that
    path would break Inductor's compile command (see compiler_safe)."""
    work = Path(root).absolute() / "work"
    if compiler_safe(work) and compiler_safe(work.resolve()):
        return work
    return _private_temp_work(Path(root))


def sweep_work(work: Path) -> None:
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
        return {**body, "checksum": manifest_checksum(body)}

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """The manifest in `data`, after checking its checksum and its structure; ValueError says what is wrong.
        The checksum is no seal (anyone can recompute it), so a manifest with a valid one may still have
        wrong types, missing keys or paths out of the entry: refused here, never a crash further on."""
        if not isinstance(data, dict):
            raise ValueError("the manifest is not a JSON object")
        body = {k: v for k, v in data.items() if k != "checksum"}
        if data.get("format") != ENTRY_FORMAT:
            raise ValueError(f"entry format {data.get('format')!r}, this quantrt reads format {ENTRY_FORMAT}")
        if data.get("checksum") != manifest_checksum(body):
            raise ValueError("the manifest's checksum does not match its content")
        _check_structure(data)
        return cls(data["fingerprint"], data["fields"], data["shapes"], data["files"], data["created"],
                   data["updated"], data.get("extra", {}))


_MANIFEST_KEYS = {"fingerprint": (str, "a string"), "fields": (dict, "a JSON object"),
                  "shapes": (dict, "a JSON object"), "files": (dict, "a JSON object"),
                  "created": ((int, float), "a number"), "updated": ((int, float), "a number")}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _json_type(value: Any) -> str:
    names = {dict: "a JSON object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _check_structure(data: dict[str, Any]) -> None:
    """Every key a reader uses, of the type it uses it as; every listed path inside the entry."""
    for key, (kind, described) in _MANIFEST_KEYS.items():
        if key not in data:
            raise ValueError(f"the manifest has no {key!r}")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise ValueError(f"the manifest's {key!r} is {_json_type(data[key])}, not {described}")
    if not isinstance(data.get("extra", {}), dict):
        raise ValueError(f"the manifest's 'extra' is {_json_type(data['extra'])}, not a JSON object")
    for key, shape in data["shapes"].items():
        cold = shape.get("cold_s") if isinstance(shape, dict) else None
        if not (isinstance(shape, dict) and isinstance(shape.get("shape"), str)
                and isinstance(cold, (int, float)) and not isinstance(cold, bool)):
            raise ValueError(f"the manifest's shapes[{key!r}] is not an object with a 'shape' string and a "
                             f"'cold_s' number")
    for name, digest in data["files"].items():
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise ValueError(f"the manifest's files[{name!r}] is {digest!r}, not a sha256 (64 hex digits)")
        problem = _listed_path_problem(name)
        if problem:
            raise ValueError(f"the manifest lists {name!r}, {problem}")


def _listed_path_problem(name: str) -> str | None:
    """Why `name` cannot be a file of an entry, or None: entries list relative paths below themselves."""
    if not name or "\x00" in name:
        return "an empty path or one with a NUL byte"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        return "an absolute path, outside the entry"
    if ".." in PurePosixPath(name).parts or ".." in PureWindowsPath(name).parts:
        return "a path outside the entry ('..')"
    if name == MANIFEST:
        return "the manifest itself"
    return None


def _inside(folder: Path, path: Path) -> bool:
    """Whether `path`, with every symlink followed, is in `folder` (already resolved)."""
    try:
        return path.resolve().is_relative_to(folder)
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _entry_files(folder: Path) -> Iterator[Path]:
    """Every file and symlink in `folder`, without following symlinked folders."""
    for parent, dirs, files in os.walk(folder, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(parent, d))]:
            yield Path(parent) / name


def read_manifest(folder: Path) -> Manifest:
    """The manifest of the entry in `folder`, its checksum and structure checked (not the files it lists);
    ValueError says what is wrong."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError("it has no manifest (a warmup that did not finish)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"its manifest cannot be read: {e}") from None
    return Manifest.from_json(data)


def entry_lock(root: Path, fingerprint: str, timeout: float) -> FileLock:
    """The cross-process write lock of the entry `fingerprint` of the cache folder `root` (its file is made on
    first use)."""
    return FileLock(str(Path(root) / "locks" / f"{fingerprint}.lock"), timeout=timeout)


class CacheEntry:
    """The cache entry of one fingerprint, and this process's private working copy of it."""

    def __init__(self, fields: dict[str, Any], root: Path | None = None, lock_timeout: float = 3600.0):
        self.fields = fields
        self.fingerprint = fingerprint_of(fields)
        self.root = Path(root) if root is not None else cache_root()
        self.path = self.root / "entries" / self.fingerprint
        self.lock = entry_lock(self.root, self.fingerprint, lock_timeout)
        self.manifest: Manifest | None = None  # of the entry this process loaded or wrote
        self.status = "new"  # new | loaded | rebuilt
        self.reason = ""  # why an entry on disk was not used
        self._work: Path | None = None
        self._unlisted_reported: set[str] = set()  # warned about once per process, not at every commit

    @property
    def work_dir(self) -> Path:
        """This process's working copy: Inductor compiles into `work_dir / "inductor"`."""
        if self._work is None:
            base = work_base(self.root)
            base.mkdir(parents=True, exist_ok=True)
            sweep_work(base)
            self._work = Path(tempfile.mkdtemp(prefix=f"{self.fingerprint[:12]}-{os.getpid()}-", dir=base))
            self._owner = FileLock(str(self._work / OWNER_LOCK))
            self._owner.acquire()  # held until exit: the folder is in use (see sweep_work)
            atexit.register(shutil.rmtree, self._work, ignore_errors=True)
        return self._work

    @property
    def inductor_dir(self) -> Path:
        return self.work_dir / "inductor"

    def locked(self) -> FileLock:
        """The entry's cross-process write lock (a warmup's commit, an import, prune take it; readers do not)."""
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        return self.lock

    def verify(self, path: Path | None = None) -> Manifest:
        """The manifest of the entry at `path`, after checking it (checksum, structure, fields), that nothing in
        the entry leads out of it (listed paths, symlinks), and every file it lists; ValueError says what is
        wrong."""
        path = path or self.path
        manifest = read_manifest(path)
        if manifest.fingerprint != self.fingerprint or path.name not in (self.fingerprint, f"{self.fingerprint}.new"):
            raise ValueError(f"it belongs to fingerprint {manifest.fingerprint}, not {self.fingerprint}")
        for key in sorted(set(self.fields) | set(manifest.fields)):
            if self.fields.get(key) != manifest.fields.get(key):
                raise ValueError(f"it was made for {key}={manifest.fields.get(key)!r}, this process has "
                                 f"{self.fields.get(key)!r}")
        folder = path.resolve()
        for link in _entry_files(path):
            if link.is_symlink() and not _inside(folder, link):
                raise ValueError(f"{link.relative_to(path).as_posix()} is a symlink to {os.readlink(link)}, "
                                 f"outside the entry")
        for name, digest in manifest.files.items():
            file = path / name
            if not _inside(folder, file):
                raise ValueError(f"the manifest lists {name!r}, outside the entry")
            if not file.is_file():
                raise ValueError(f"{name} is missing or not a regular file")
            if sha256_file(file) != digest:
                raise ValueError(f"{name} does not match its checksum (corrupt or truncated)")
        if "tuning.json" in manifest.files:
            _read_tuning(path / "tuning.json")
        return manifest

    def unlisted_files(self, manifest: Manifest, path: Path | None = None) -> list[str]:
        """Files in the entry at `path` that its manifest does not list (never checksummed, so never used)."""
        path = path or self.path
        names = (f.relative_to(path).as_posix() for f in _entry_files(path))
        return sorted(n for n in names if n != MANIFEST and n not in manifest.files)

    def _copy_from_entry(self, manifest: Manifest, dst: Path) -> None:
        """Copy the entry's listed files into `dst`; warn (once per file and process) about unlisted ones."""
        unlisted = [n for n in self.unlisted_files(manifest) if n not in self._unlisted_reported]
        if unlisted:
            self._unlisted_reported.update(unlisted)
            named = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
            warnings.warn(f"quantrt cache: entry {self.path}: {named} {'is' if len(unlisted) == 1 else 'are'} not "
                          f"listed in its manifest, so ignored (not copied into the working folder, never loaded, "
                          f"left out of the next entry); delete {'it' if len(unlisted) == 1 else 'them'} to "
                          f"silence this warning", CacheWarning, stacklevel=4)
        _copy_listed(self.path, dst, manifest.files)

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
        was there but bad) when there is nothing usable.

        Readers take no lock: an entry is never changed in place, only swapped for a new one, so many processes
        load one entry at once without waiting for each other or for a warmup that holds the lock. Only when
        what it reads does not verify (a commit may be swapping the entry in that moment) does a reader look
        again under the lock, and only then is a bad entry discarded."""
        if self.path.exists():
            try:
                manifest = self.verify()
                self._copy_from_entry(manifest, self.work_dir)
            except (ValueError, OSError):
                pass  # looked at while a commit swapped it: read it again under the lock
            else:
                self.manifest, self.status = manifest, "loaded"
                return manifest
        elif not self.path.with_name(f"{self.fingerprint}.new").exists():
            return None  # no entry, and none being written
        with self.locked():
            if not self.path.exists():
                return None
            try:
                manifest = self.verify()
            except ValueError as e:
                self._discard(str(e))
                self.status = "rebuilt"
                return None
            self._copy_from_entry(manifest, self.work_dir)
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
        with self.locked():
            merged = dict(shapes)
            created = time.time()
            if self.path.exists():
                try:
                    current = self.verify()
                    self._copy_from_entry(current, work)  # another process's graphs and artifacts are kept
                    merged = {**current.shapes, **shapes}
                    created = current.created
                    if "tuning.json" in current.files:
                        tuning = {**_read_tuning(self.path / "tuning.json"), **tuning}
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


def _read_tuning(path: Path) -> dict[str, dict[str, Any]]:
    """An entry's tuning.json: kernel tuning picks, {key: config object}; ValueError when it is not."""
    try:
        picks = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"tuning.json cannot be read: {e}") from None
    if not (isinstance(picks, dict) and all(isinstance(v, dict) for v in picks.values())):
        raise ValueError("tuning.json is not a JSON object of kernel configs ({key: {...}})")
    return picks


def lock_timeout_error(entry: CacheEntry) -> str:
    return (f"another process has held the lock of cache entry {entry.path} for {entry.lock.timeout:.0f} s; if no "
            f"quantrt process is warming it, delete {entry.lock.lock_file}")


__all__ = ["CacheEntry", "CacheWarning", "MANIFEST", "Manifest", "Timeout", "cache_root", "compiler_safe",
           "entry_lock", "fingerprint_of", "manifest_checksum", "read_manifest", "sha256_file", "sweep_work", "work_base"]
