"""Save and load quantized models: safetensors shards + JSON, nothing pickled, nothing executed.

A saved folder holds:
    quantrt_config.json                 format version, quantrt version, the QuantConfig, the wrapped model's
                                        library, class and config, per layer scheme/format/backend, and the
                                        name, dtype and shape of every tensor
    model.safetensors                   the state dict as stored (packed codes, scales, zero points, the
    or model-0000i-of-0000n.safetensors unquantized parameters), sharded by max_shard_size with
       + model.safetensors.index.json   an index mapping each tensor to its shard

quantrt_config.json also records the size and sha256 of every other file ("files"), checked before a
tensor is read: safetensors checks its header, not the tensor bytes, so a flipped bit in a weight would
otherwise load as a wrong result. Folders saved before quantrt recorded checksums load unchecked.

Loading rebuilds the skeleton on the meta device (accelerate's init_empty_weights), swaps in
QuantizedLinear skeletons, and copies each stored tensor straight to the target device one at a time, so
peak host memory stays near one tensor, not the model. Only diffusers and transformers classes are rebuilt
from their names, from a config stored in the file as a JSON object (never a path or a hub name); any other
model is passed in by the caller (a class named in a file is never imported).

What a folder can make a loader do is bounded: every file a loader opens goes through `inside`, which
refuses a path that leaves the folder ('..', an absolute path, a symlink pointing out); JSON files are
parsed with duplicate keys refused; a regex in a stored quant_config is never evaluated (the per-layer
records say what each layer is); `save_pretrained(overwrite=True)` replaces only the files quantrt wrote.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
import stat
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .cache import sha256_file
from .checkpoints.reader import SAFETENSORS_DTYPES, CheckpointError, OutsideFolderError, refuse_duplicate_keys
from .config import QuantConfig
from .schemes import resolve_scheme
from .version import __version__

FORMAT_VERSION = 1
CONFIG_NAME = "quantrt_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise CheckpointError(f"unknown dtype {name!r} in the checkpoint")
    return _DTYPES[name]


def parse_size(size: int | str, option: str = "max_shard_size") -> int:
    """'5GB', '200MB', '10KB', '512MiB' or a number of bytes -> bytes (GB/MB/KB are powers of 1000, as
    huggingface_hub's). Anything else is a ValueError naming `option` and saying what a size looks like."""
    fix = "give a number of bytes or a number with a unit, e.g. '5GB', '200MB', '512MiB'"
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"{option} {size!r} is not a size: {fix}")
    if isinstance(size, int):
        value = size
    else:
        text, factor = size.strip().upper(), 1
        for unit, unit_factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                                  ("KB", 10**3), ("B", 1)):
            if text.endswith(unit):
                text, factor = text[: -len(unit)], unit_factor
                break
        try:
            value = int(float(text) * factor)
        except (ValueError, OverflowError):  # "abc", "", "inf", "nan"
            raise ValueError(f"{option} {size!r} is not a size: {fix}") from None
    if value <= 0:
        raise ValueError(f"{option} {size!r} is not a size: a shard holds more than 0 bytes; {fix}")
    return value


# The Hugging Face hub cache (snapshot_download) keeps a snapshot's files as symlinks into the blobs folder of
# the same repository: models--org--name/snapshots/<revision>/... -> models--org--name/blobs/<sha>
_HUB_REPOSITORY_PREFIXES = ("models--", "datasets--", "spaces--")


def inside(folder: str | os.PathLike, name: str | os.PathLike) -> Path:
    """The real path of `name` in `folder`, or a CheckpointError if it lies outside the folder.

    Every file a loader opens goes through here, so that a folder, or a JSON file in it, cannot make quantrt
    read anything else: not through '..' or an absolute path, not through a symlink pointing out of it. The
    one place a symlink may lead is the Hugging Face hub cache's own layout: a snapshot's files are links into
    the blobs folder of the same repository."""
    root = Path(folder).resolve()
    target = (root / name).resolve()
    if target == root or root in target.parents or _hub_blob(root, target):
        return target
    raise OutsideFolderError(f"{Path(folder) / name} leads outside the folder {root} (through '..', an absolute path "
                          f"or a symlink): quantrt reads only files inside the folder it is given; copy the file "
                          f"into the folder instead of linking to it")


def _hub_blob(root: Path, target: Path) -> bool:
    """Whether `target` is a blob of the hub-cache repository whose snapshot holds `root`."""
    snapshots = next((p for p in (root, *root.parents) if p.name == "snapshots"), None)
    return (snapshots is not None and snapshots.parent.name.startswith(_HUB_REPOSITORY_PREFIXES)
            and target.parent == snapshots.parent / "blobs")


def read_json(file: Path, what: str = "") -> Any:
    """The JSON in `file` (a path `inside` returned; `what` it should be, for errors). A key given twice in one
    object is an error: json.loads would silently keep the last one, another reader the first (a second copy
    of a field can hide)."""
    be = f"is not {what}: it is" if what else "is"
    try:
        return json.loads(file.read_bytes(), object_pairs_hook=refuse_duplicate_keys(file))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} {be} not valid JSON ({e}); the folder is damaged") from e
    except RecursionError:
        raise CheckpointError(f"{file} {be} not valid JSON (nested too deeply to read); the folder is "
                              f"damaged") from None


def read_index(file: Path) -> dict[str, str]:
    """The weight_map of a safetensors index (tensor name -> shard file name), checked to be one."""
    index = read_json(file, "a valid safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    problem = None
    if not isinstance(index, dict):
        problem = f"the file holds a JSON {json_kind(index)}, not an object"
    elif not isinstance(weight_map, dict):
        problem = ("there is no 'weight_map'" if weight_map is None
                   else f"its 'weight_map' is a JSON {json_kind(weight_map)}")
    else:
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            problem = f"its 'weight_map' maps {bad[0]!r} to {bad[1]!r}, not to a file name"
    if problem:
        raise CheckpointError(f"{file} is not a valid safetensors index: {problem}. 'weight_map' must be an object "
                              f"mapping each tensor name to the .safetensors file that holds it; the index is "
                              f"damaged: restore it or save the model again")
    return weight_map


def model_identity(model: nn.Module) -> dict[str, Any]:
    """The library, class name and config needed to rebuild `model`'s skeleton."""
    module = type(model).__module__.split(".")[0]
    config = getattr(model, "config", None)
    if module == "diffusers" and config is not None:
        return {"library": "diffusers", "class": type(model).__name__,
                "config": json.loads(json.dumps(dict(config), default=_json_default))}
    if module == "transformers" and config is not None:
        return {"library": "transformers", "class": type(model).__name__,
                "config": json.loads(json.dumps(config.to_dict(), default=_json_default))}
    return {"library": None, "class": f"{type(model).__module__}.{type(model).__qualname__}", "config": None}


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without aliases (safetensors refuses shared storage): (tensors, alias -> stored name)."""
    tensors, tied, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, tied


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def check_target(path: str | os.PathLike, overwrite: bool, overwrite_flag: str = "overwrite=True") -> Path:
    """The folder a save into `path` writes (a symlink's target), once it is clear that the save may: `path`
    is absent or empty, or a quantrt folder and `overwrite`. Otherwise a FileExistsError that names the fix,
    spelling the overwrite option as the caller takes it (`overwrite_flag`: "--overwrite" on the command line)."""
    path = Path(path).resolve()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder: give the path of a folder to save into")
    if path.is_dir() and any(path.iterdir()):
        if not (path / CONFIG_NAME).is_file():
            raise FileExistsError(f"{path} is not empty and does not look like a quantrt folder (it has no "
                                  f"{CONFIG_NAME}), so quantrt will not write into it, even with {overwrite_flag}: "
                                  f"choose an empty or new folder")
        if not overwrite:
            raise FileExistsError(f"{path} is not empty; pass {overwrite_flag} to replace the quantrt files in it "
                                  f"(the old ones stay until the new ones are complete; other files in the folder "
                                  f"are kept), or choose another folder")
    return path


def save_folder(path: str | os.PathLike, model: nn.Module, metadata: dict[str, Any],
                max_shard_size: int | str = "5GB", overwrite: bool = False) -> Path:
    """Write `model`'s state dict and `metadata` (quantrt_config.json) to `path` atomically: everything goes
    to a temporary folder beside it, flushed to disk, that is then swapped into place. A non-empty folder is
    written only with overwrite=True and only if it is a quantrt folder (has quantrt_config.json); then the
    files quantrt wrote there are replaced and every other entry (a README, .git/, sub-folders) is carried
    into the new folder (hard links, or copies where the file system has none): nothing else is deleted.
    Temporary folders that killed saves left in the same parent are removed once stale (`sweep_stale_saves`)."""
    from safetensors.torch import save_file

    max_bytes = parse_size(max_shard_size)
    # the folder a symlink points at is written, not the link (swapping the link itself would leave the old
    # folder behind and make the cleanup fail after the save succeeded)
    path = check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_saves(path.parent)
    tensors, tied = _unique_state_dict(model)
    shards = _shards({k: v.cpu() for k, v in tensors.items()}, max_bytes)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                     for i in range(len(shards))]
    written = set(names) | {CONFIG_NAME} | ({INDEX_NAME} if len(shards) > 1 else set())
    if path.is_dir():
        _entries_to_carry(path, written)  # an entry that could not be kept fails the save before any work
    staging = _new_staging_folder(path)
    published = False
    try:
        weight_map = {}
        for file, shard in zip(names, shards):
            save_file(shard, staging / file, metadata={"format": "pt", "quantrt_format": str(FORMAT_VERSION)})
            _fsync(staging / file)
            weight_map.update({name: file for name in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (staging / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
            _fsync(staging / INDEX_NAME)
        metadata = dict(metadata, format_version=FORMAT_VERSION, tied=tied,
                        tensors={k: {"dtype": dtype_name(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()},
                        files=file_checksums(staging, sorted(written - {CONFIG_NAME})))
        # written last: a folder with a config is complete (a save killed midway leaves none)
        (staging / CONFIG_NAME).write_text(json.dumps(metadata, indent=2, default=_json_default))
        _fsync(staging / CONFIG_NAME)
        if path.is_dir():
            # the user's entries are linked in last, so that one they add while the shards are written is kept
            for name in _entries_to_carry(path, written):
                _carry(path / name, staging / name)
            shutil.copymode(path, staging)
        _fsync_folders(staging)
        old = _publish(staging, path)
        published = True
    except BaseException:
        if not published:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        _remove_replaced(old, path, written)
    return path


def _fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk. A file system that cannot sync a folder is let be."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir():  # some systems cannot open a folder at all (Windows)
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF) or not path.is_dir():
            raise
    finally:
        os.close(fd)


def _fsync_folders(root: Path) -> None:
    """fsync every folder under `root` and `root` itself, deepest first (their entries: the files and links)."""
    for folder, _, _ in sorted(os.walk(root), key=lambda walked: -walked[0].count(os.sep)):
        _fsync(Path(folder))


_STAGING_MARK, _REPLACED_MARK = ".saving-", ".old-"
STALE_SAVE_AGE_S = 3600.0  # a save's folder untouched this long, by a process that is gone, is a leftover


def _new_staging_folder(path: Path) -> Path:
    """A new private folder beside `path` for a save to write: .<name>.saving-<pid>-<random>. The pid says
    which process owns it, so that a later save can tell a killed save's leftover from a save still running."""
    while True:
        staging = path.parent / f".{path.name}{_STAGING_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            staging.mkdir(mode=0o700)
            return staging
        except FileExistsError:
            continue


def _staging_pid(name: str) -> int | None:
    """The pid in a staging folder's name .<target>.saving-<pid>-<8 hex digits>, or None for another name."""
    head, mark, tail = name.rpartition(_STAGING_MARK)
    pid, _, token = tail.partition("-")
    if not (mark and head.startswith(".") and len(head) > 1 and pid.isdigit() and len(token) == 8
            and all(c in "0123456789abcdef" for c in token)):
        return None
    return int(pid)


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id a save records: never treated as gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def sweep_stale_saves(parent: Path, max_age_s: float = STALE_SAVE_AGE_S) -> list[Path]:
    """Remove the temporary folders of killed saves in `parent`: named by quantrt's saves (.<name>.saving-
    <pid>-<random>), owned by this user, whose process is gone and in which nothing changed for `max_age_s`
    (a folder of another machine sharing the file system has a pid that means nothing here; the age keeps a
    running save's folder safe). Returns the folders removed."""
    removed = []
    now = time.time()
    uid = getattr(os, "getuid", lambda: None)()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        pid = _staging_pid(entry.name)
        try:
            if pid is None or not entry.is_dir(follow_symlinks=False):
                continue
            if uid is not None and entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            if _process_alive(pid) or now - _newest_change(Path(entry.path)) < max_age_s:
                continue
        except OSError:  # gone meanwhile, or unreadable: not ours to judge
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _newest_change(folder: Path) -> float:
    """The latest mtime of `folder` and its entries (a save writing a shard keeps that shard's mtime fresh)."""
    newest = folder.stat().st_mtime
    for entry in os.scandir(folder):
        try:
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        except OSError:
            continue
    return newest


def _shard_name(name: str) -> bool:
    """model-<5 digits>-of-<5 digits>.safetensors, the shard names quantrt writes."""
    stem = name.removeprefix("model-").removesuffix(".safetensors")
    first, of, total = stem.partition("-of-")
    return (name.startswith("model-") and name.endswith(".safetensors") and of == "-of-" and len(first) == 5
            and len(total) == 5 and first.isdigit() and total.isdigit())


def _written_by_quantrt(folder: Path) -> set[str]:
    """The names of the files quantrt wrote in an existing quantrt folder: its config and the files the config
    lists (shards, index); where the config cannot be read or lists none (quantrt before checksums), the
    names quantrt writes. Folders are never quantrt's: they are the user's."""
    names = {CONFIG_NAME}
    listed = None
    try:
        config = read_json(inside(folder, CONFIG_NAME))
        listed = config.get("files") if isinstance(config, dict) else None
    except (CheckpointError, OSError):
        pass
    if isinstance(listed, dict):
        names |= {name for name in listed if isinstance(name, str) and Path(name).name == name}
    else:
        names |= {INDEX_NAME, WEIGHTS_NAME} | {entry.name for entry in os.scandir(folder) if _shard_name(entry.name)}
    return {name for name in names if (folder / name).is_file() or (folder / name).is_symlink()}


def _entries_to_carry(folder: Path, written: set[str]) -> list[str]:
    """The entries of the quantrt folder `folder` that a save over it must keep: all but the files quantrt
    wrote there and the names the save writes. Checked before any work: an entry that cannot be carried (a
    socket, a device) is an error naming it, so that nothing is lost."""
    replaced = _written_by_quantrt(folder) | written
    carried = sorted(entry.name for entry in os.scandir(folder) if entry.name not in replaced)
    for name in carried:
        _check_carriable(folder / name, folder)
    return carried


def _check_carriable(entry: Path, folder: Path) -> None:
    mode = entry.lstat().st_mode
    if stat.S_ISDIR(mode):
        for child in os.scandir(entry):
            _check_carriable(Path(child.path), folder)
    elif not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise FileExistsError(f"{entry} is neither a file, a folder nor a symlink, so a save over {folder} could "
                              f"not keep it: move it out of the folder first")


def _carry(source: Path, destination: Path) -> None:
    """Recreate `source` (a file, a symlink or a folder tree) at `destination`: files as hard links to the
    same data (copies where the file system cannot link), symlinks as the same links, folders with their
    permissions."""
    if source.is_symlink():
        os.symlink(os.readlink(source), destination)
    elif source.is_dir():
        destination.mkdir()
        for entry in os.scandir(source):
            _carry(Path(entry.path), destination / entry.name)
        shutil.copystat(source, destination)
    else:
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)


def _publish(staging: Path, path: Path) -> Path | None:
    """Put the complete folder `staging` at `path`; returns the folder that now holds what `path` held (to be
    removed), or None if `path` did not exist."""
    if not path.exists():
        staging.rename(path)
        old = None
    elif _exchange(staging, path):  # atomic: `path` always holds a complete folder, old or new
        old = staging
    else:  # no atomic exchange here: `path` is missing between the two renames
        old = path.parent / f".{path.name}{_REPLACED_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        path.rename(old)
        staging.rename(path)
    _fsync(path.parent)  # the rename itself reaches the disk
    return old


def _remove_replaced(old: Path, path: Path, written: set[str]) -> None:
    """Delete the folder `old` that the save into `path` replaced. The user's entries in it are in the new
    folder too (linked or copied), so only quantrt's old files go; an entry the user added in the moment
    between the carrying and the swap is moved into the new folder first. A failure leaves the save done,
    with a warning."""
    def writable_and_again(function, failed, _):
        os.chmod(os.path.dirname(failed), stat.S_IRWXU)  # a read-only folder the user had: its links still go
        function(failed)

    try:
        replaced = _written_by_quantrt(old) | written
        for entry in os.scandir(old):
            if entry.name not in replaced and not os.path.lexists(path / entry.name):
                os.rename(entry.path, path / entry.name)
        if sys.version_info >= (3, 12):
            shutil.rmtree(old, onexc=writable_and_again)
        else:
            shutil.rmtree(old, onerror=writable_and_again)
    except OSError as e:
        warnings.warn(f"the save into {old.parent} is complete, but the replaced folder {old} could not be removed "
                      f"({e}); delete it yourself", stacklevel=4)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders `a` and `b` in one atomic step (Linux renameat2 with RENAME_EXCHANGE). False where
    the C library, kernel or file system cannot; then nothing was changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def file_checksums(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {"bytes", "sha256"}} of the files `names` in `folder` (each `inside` it), hashed in parallel
    (hashlib releases the GIL): about 1.7 GB/s per core."""
    paths = [inside(folder, name) for name in names]
    with ThreadPoolExecutor(max(1, min(len(names), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(sha256_file, paths))
    return {name: {"bytes": path.stat().st_size, "sha256": digest} for name, path, digest in zip(names, paths, digests)}


def verify_files(path: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Check the size and sha256 of every file that quantrt_config.json records against the folder's; a
    CheckpointError names the first file that differs. Folders saved without checksums pass unchecked."""
    recorded = metadata.get("files")
    if recorded is None:
        return
    root = Path(path)
    for name, record in recorded.items():
        file = inside(root, name)
        if not file.is_file():
            raise CheckpointError(f"{root / name} is missing ({CONFIG_NAME} lists it); the folder is incomplete")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise CheckpointError(f"{root / name} has {size} bytes but {record['bytes']} were saved: it was "
                                  f"truncated or modified after saving")
    actual = file_checksums(root, list(recorded))
    for name, record in recorded.items():
        if actual[name]["sha256"] != record["sha256"]:
            raise CheckpointError(f"{root / name} is corrupted: its sha256 is {actual[name]['sha256'][:16]}... but "
                                  f"{record['sha256'][:16]}... was recorded when it was saved; re-save or re-download "
                                  f"it (or pass verify_checksums=False to load it anyway)")


def _expect(condition: bool, file: Path, what: str) -> None:
    if not condition:
        raise CheckpointError(f"{file} is not a quantrt config: {what}; the file is damaged or was not written "
                              f"by quantrt")


def json_kind(value: Any) -> str:
    """What JSON calls the type of `value` ("object", "list", ...), for errors about a file's contents."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_structure(file: Path, metadata: Any) -> list[str]:
    """Every field that loading reads is present with the right type, so that a damaged or hand-edited
    quantrt_config.json fails here with its name, not with a KeyError deep inside loading. Replaces the
    quant_config by its checked form without regex overrides (`stored_quant_config`) and returns those."""
    _expect(isinstance(metadata, dict), file, "it holds no JSON object")
    for key in ("quant_config", "model", "layers", "tensors"):
        _expect(isinstance(metadata.get(key), dict), file, f"{key!r} is missing or not an object")
    for key in ("tied", "kept", "files", "autoquant_plan"):
        _expect(isinstance(metadata.get(key, {}), dict), file, f"{key!r} is not an object")
    fields = {"scheme": str, "group_size": (int, type(None)), "in_features": int, "out_features": int,
              "bias": bool, "dtype": str}
    for name, record in metadata["layers"].items():
        _expect(isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in fields.items()), file,
                f"layer {name!r} needs {', '.join(fields)} of the right types, has {record!r}")
        try:
            resolve_scheme(record["scheme"], record["group_size"] if record["group_size"] else -1)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{file}: layer {name!r}: {e} (written by a newer quantrt?)") from e
        parse_dtype(record["dtype"])
    for name, record in metadata["tensors"].items():
        _expect(isinstance(record, dict) and isinstance(record.get("dtype"), str)
                and isinstance(record.get("shape"), list)
                and all(isinstance(d, int) and d >= 0 for d in record["shape"]), file,
                f"tensor {name!r} needs a dtype and a shape, has {record!r}")
    for name, record in metadata.get("files", {}).items():
        _expect(isinstance(record, dict) and isinstance(record.get("bytes"), int)
                and isinstance(record.get("sha256"), str), file, f"file {name!r} needs bytes and sha256")
        _expect(Path(name).name == name and name not in ("", ".", ".."), file,
                f"file {name!r} is not a plain name inside the folder")
    for alias, target in metadata.get("tied", {}).items():
        _expect(isinstance(target, str), file, f"'tied' maps {alias!r} to {target!r}, not to a tensor name")
    _check_identity(file, metadata["model"])
    metadata["quant_config"], patterns = stored_quant_config(file, metadata["quant_config"])
    try:
        QuantConfig.from_dict(metadata["quant_config"])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{file}: its quant_config cannot be read: {e} (written by a newer quantrt?)") from e
    return patterns


def _check_identity(file: Path, identity: dict[str, Any]) -> None:
    """model.library / class / config: what build_skeleton rebuilds the model from."""
    library = identity.get("library")
    _expect(library in (None, "diffusers", "transformers"), file,
            f"model.library is {library!r}: quantrt rebuilds diffusers and transformers classes by name (any other "
            f"model is null there, and loads from the skeleton passed as model=)")
    if library is None:
        return
    _expect(isinstance(identity.get("class"), str), file, f"model.class is {identity.get('class')!r}, not a class name")
    config = identity.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: model.config is a JSON {json_kind(config)} ({config!r:.80}), not an object: "
                              f"quantrt builds the model only from the config stored in this file, never from a "
                              f"path or a model-hub name it would read or download; the file is damaged or was "
                              f"edited: save the model again")


def stored_quant_config(file: Path, data: Any, field: str = "quant_config") -> tuple[dict[str, Any], list[str]]:
    """The quant_config `data` stored in `file`, checked field by field (an error names the field), without its
    "re:<regex>" overrides, which are never evaluated: a pattern read from a file can run for hours on one
    layer name (catastrophic backtracking, e.g. "re:(.+)+!"), and they are not needed to load, because every
    layer's scheme is recorded by name ("layers"; save_pretrained writes the overrides by layer name too).
    Returns (the checked dict, the patterns left out)."""

    def refuse(where: str, what: str) -> CheckpointError:
        return CheckpointError(f"{file}: {where} {what}; the file is damaged or was edited by hand: save the model "
                               f"again")

    if not isinstance(data, dict):
        raise refuse(field, f"is a JSON {json_kind(data)}, not an object")
    modules = data.get("modules") or {}
    if not isinstance(modules, dict):
        raise refuse(f"{field}.modules", f"is a JSON {json_kind(modules)}: it must be an object mapping layer "
                                         f"names to null (full precision) or a config object such as "
                                         f"{{\"scheme\": \"int4wo\"}}")
    checked, patterns = {}, []
    for key, value in modules.items():
        if key.startswith("re:"):
            patterns.append(key)
            continue
        if value is not None:
            if not isinstance(value, dict):
                raise refuse(f"{field}.modules[{key!r}]", f"is {value!r:.60}, a JSON {json_kind(value)}: it must be "
                                                           f"null (the layer stays in full precision) or a config "
                                                           f"object such as {{\"scheme\": \"int4wo\"}}")
            value, inner = stored_quant_config(file, value, f"{field}.modules[{key!r}]")
            patterns += inner
        checked[key] = value
    skipped = data.get("modules_to_not_convert")
    if skipped is not None and not (isinstance(skipped, list) and all(isinstance(m, str) for m in skipped)):
        raise refuse(f"{field}.modules_to_not_convert", f"is {skipped!r:.60}: it must be a list of layer names")
    if not isinstance(data.get("scheme"), str):
        raise refuse(f"{field}.scheme", f"is {data.get('scheme')!r:.60}: it must be a scheme name such as \"int4wo\"")
    return dict(data, modules=checked), patterns


def check_source_folder(path: str | os.PathLike) -> Path:
    """`path` as a folder to load from, or a CheckpointError that says what it is instead."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{path} does not exist: from_pretrained loads a local folder (one that save_pretrained, "
                              f"diffusers, transformers, optimum-quanto or torchao wrote); quantrt never downloads, "
                              f"so fetch a hub model first (huggingface_hub.snapshot_download) and pass its folder")
    if not folder.is_dir():
        raise CheckpointError(f"{path} is a file, not a folder: from_pretrained loads folders; for one .safetensors "
                              f"file in a model's original layout use QuantizedTransformer.from_single_file(file, "
                              f"quantization=...)")
    return folder


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """quantrt_config.json of a quantrt folder, checked (`_check_structure`). A quant_config holding regex
    overrides (written by quantrt before it recorded them by layer name) loads without them, with a warning."""

    file = inside(check_source_folder(path), CONFIG_NAME)
    if not file.is_file():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}: it is not a folder that quantrt saved")
    metadata = read_json(file)
    _expect(isinstance(metadata, dict), file, "it holds no JSON object")
    version = metadata.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format version {version!r}, written by quantrt {metadata.get('quantrt_version', '?')}; "
            f"this quantrt ({__version__}) reads format versions 1..{FORMAT_VERSION}: upgrade quantrt")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{file} has format version {version!r}, which no quantrt writes (1..{FORMAT_VERSION} "
                              f"are known): the file is damaged or was not written by quantrt")
    patterns = _check_structure(file, metadata)
    if patterns:
        shown = f"{patterns[:3]}{' ...' if len(patterns) > 3 else ''}"
        warnings.warn(f"{file}: quant_config.modules holds regex overrides {shown}, "
                      f"which quantrt does not evaluate when it reads a file (a hostile pattern can run for hours). "
                      f"Every layer loads with the scheme recorded for it by name; a backend those patterns chose is "
                      f"not applied (pass backend= to choose one). Save the model again to record the overrides by "
                      f"layer name", stacklevel=3)
    return metadata


def weight_files(path: str | os.PathLike, metadata: dict[str, Any]) -> dict[str, list[str]]:
    """Shard file -> the tensor names it holds, from the index or the single file. Every file is a plain
    .safetensors name whose real path is `inside` the folder."""
    index = inside(path, INDEX_NAME)
    weight_map = read_index(index) if index.is_file() else {name: WEIGHTS_NAME for name in metadata["tensors"]}
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        if file not in files:
            indexed_shard(path, index, name, file)
        files.setdefault(file, []).append(name)
    return files


def indexed_shard(folder: str | os.PathLike, index: Path, tensor: str, file: str) -> Path:
    """The real path of `file`, the shard the index `index` names for `tensor`: refused unless it is a plain
    .safetensors name `inside` the folder."""
    if Path(file).name == file and file.endswith(".safetensors"):
        try:
            return inside(folder, file)
        except OutsideFolderError:
            pass
    raise CheckpointError(f"{index} maps {tensor!r} to {file!r}: outside the folder or not a .safetensors file (an "
                          f"index may name only .safetensors files in the folder itself; quantrt never loads .bin/.pt "
                          f"pickles)")


def build_skeleton(identity: dict[str, Any], model: nn.Module | Callable[[], nn.Module] | None,
                   source: str = "the checkpoint") -> nn.Module:
    """An empty (meta-device) model of the saved class. diffusers/transformers classes are looked up by name
    in those libraries only, and built from a config given as a dict (a string would make diffusers read a
    file elsewhere or ask the model hub); anything else must be given as `model` (a module or a zero-argument
    factory). `source` names where the identity was read, for errors."""
    from accelerate import init_empty_weights

    if model is not None:
        if isinstance(model, nn.Module):
            return model
        with init_empty_weights():
            return model()
    library, name = identity.get("library"), identity.get("class")
    if library not in ("diffusers", "transformers"):
        raise CheckpointError(f"the saved model is a {name}, not a diffusers or transformers class: pass its "
                              f"skeleton, e.g. from_pretrained(path, model=lambda: MyModel(...))")
    if not isinstance(name, str) or not isinstance(identity.get("config"), dict):
        raise CheckpointError(f"{source} gives the model's class as {name!r} and its config as a "
                              f"{json_kind(identity.get('config'))}: quantrt builds a model only from a class name and "
                              f"a config object stored in the folder, never from a path or a model-hub name")
    lib = __import__(library)
    cls = getattr(lib, name, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise CheckpointError(f"{library} {getattr(lib, '__version__', '')} has no model class {name!r}")
    with init_empty_weights():
        if library == "diffusers":
            return cls.from_config(identity["config"])
        config = cls.config_class.from_dict(identity["config"])
        return cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)


def _check_headers(model: nn.Module, path: str | os.PathLike, files: dict[str, list[str]],
                   expected: dict[str, Any], skeleton: dict[str, torch.Tensor]) -> None:
    """Names, dtypes and shapes of every shard's tensors (from the safetensors headers, no data read) against
    the JSON and the skeleton; every mismatch is an error naming the tensor."""
    shard_of = {name: file for file, names in files.items() for name in names}
    for file, names in files.items():
        file_path = inside(path, file)
        if not file_path.is_file():
            raise CheckpointError(f"shard {file} is missing from {path} (it holds {names[0]!r} and {len(names) - 1} more)")
        with _open_safetensors(file_path, file) as f:
            keys = set(f.keys())
            unknown = sorted(keys - set(expected))
            if unknown:
                raise CheckpointError(f"{file} holds tensors that {CONFIG_NAME} does not list, e.g. {unknown[:3]} "
                                      f"(renamed or from another model)")
            elsewhere = sorted(key for key in keys if shard_of.get(key, file) != file)
            if elsewhere:
                raise CheckpointError(f"tensor {elsewhere[0]!r} is in both {file} and {shard_of[elsewhere[0]]} (the "
                                      f"index names {shard_of[elsewhere[0]]}): one of them is left over from another "
                                      f"save; the folder is damaged: save the model again")
            for name in names:
                if name not in keys:
                    raise CheckpointError(f"tensor {name!r} is missing from {file}")
                if name not in expected:
                    raise CheckpointError(f"tensor {name!r} in {file} is not listed in {CONFIG_NAME}")
                if name not in skeleton:
                    raise CheckpointError(f"tensor {name!r} in {file} has no place in the rebuilt "
                                          f"{type(model).__name__} (renamed, or a different model?)")
                stored = f.get_slice(name)
                stored_dtype = SAFETENSORS_DTYPES.get(stored.get_dtype())
                dtype = dtype_name(stored_dtype) if stored_dtype is not None else stored.get_dtype()
                shape = list(stored.get_shape())
                want, target = expected[name], skeleton[name]
                if dtype != want["dtype"] or shape != want["shape"]:
                    raise CheckpointError(f"tensor {name!r} in {file} is {dtype} {shape} but {CONFIG_NAME} says "
                                          f"{want['dtype']} {want['shape']}")
                target_dtype = dtype_name(target.dtype)
                if tuple(shape) != tuple(target.shape) or dtype != target_dtype and not (
                        parse_dtype(dtype).is_floating_point and target.is_floating_point()):
                    raise CheckpointError(f"tensor {name!r} is {dtype} {shape} but the model expects {target_dtype} "
                                          f"{list(target.shape)}")


def load_tensors(model: nn.Module, path: str | os.PathLike, metadata: dict[str, Any], device: torch.device,
                 cast: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, t: t, verify: bool = True) -> None:
    """Copy every stored tensor into `model` on `device`. First the names, dtypes and shapes in the shards'
    headers are checked against both the JSON and the skeleton, then (`verify`) every file's sha256
    against the JSON's, and only then is any tensor read; every mismatch is an error naming the tensor or
    the file."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import SafetensorError

    expected = metadata["tensors"]
    skeleton = dict(model.state_dict(keep_vars=True))
    files = weight_files(path, metadata)
    _check_headers(model, path, files, expected, skeleton)
    if verify:
        verify_files(path, metadata)
    loaded = set()
    for file, names in files.items():
        try:
            with _open_safetensors(inside(path, file), file) as f:
                for name in names:
                    tensor = cast(name, f.get_tensor(name))
                    set_module_tensor_to_device(model, name, device, value=tensor, dtype=tensor.dtype)
                    loaded.add(name)
        except SafetensorError as e:
            raise CheckpointError(f"{file} is damaged or truncated and cannot be read: {e}") from e
    missing = set(expected) - loaded
    if missing:
        raise CheckpointError(f"{len(missing)} tensors listed in {CONFIG_NAME} were not found in any shard, e.g. "
                              f"{sorted(missing)[:3]}")
    for alias, target in metadata.get("tied", {}).items():
        problem = None
        if alias not in skeleton:
            problem = f"the model has no tensor {alias!r}"
        elif alias in expected:
            problem = f"{alias!r} is also stored in its own right"
        elif target not in loaded:
            problem = f"{target!r} is not a tensor the folder stores"
        elif tuple(skeleton[alias].shape) != tuple(skeleton[target].shape):
            problem = f"their shapes differ ({list(skeleton[alias].shape)} and {list(skeleton[target].shape)})"
        if problem:
            raise CheckpointError(f"{Path(path) / CONFIG_NAME}: 'tied' maps {alias!r} to {target!r}, but {problem}: "
                                  f"the file is damaged or belongs to another model; save the model again")
        owner, _, leaf = alias.rpartition(".")
        source_owner, _, source_leaf = target.rpartition(".")
        value = getattr(model.get_submodule(source_owner), source_leaf)
        setattr(model.get_submodule(owner), leaf, value)
        loaded.add(alias)
    unfilled = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta" and n not in loaded]
    if unfilled:
        raise CheckpointError(f"the checkpoint has no value for {len(unfilled)} tensors of the model, e.g. "
                              f"{unfilled[:3]}: it was saved from a different model or is incomplete")


def _open_safetensors(file: Path, name: str | None = None):
    """safe_open(file) on CPU; a damaged header or a file cut short is a CheckpointError naming the file
    (`name`: how the folder calls it, where `file` is its real path)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="pt", device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"{name or file} is damaged or truncated and cannot be read: {e}") from e
