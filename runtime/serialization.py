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
from their names; any other model is passed in by the caller (a class named in a file is never imported).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from .cache import sha256_file

if TYPE_CHECKING:
    from .config import QuantConfig

FORMAT_VERSION = 1
CONFIG_NAME = "quantrt_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}
# safetensors' dtype names (as its headers write them) -> torch's; more than quantrt stores (_DTYPES), for the
# checkpoints of other tools
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "U16": torch.uint16,
    "U32": torch.uint32, "U64": torch.uint64}


class CheckpointError(ValueError):
    """A saved folder is missing, malformed, or does not match what its JSON says."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise CheckpointError(f"unknown dtype {name!r} in the checkpoint")
    return _DTYPES[name]


def parse_size(size: int | str) -> int:
    """'5GB', '200MB', '10KB' or a number of bytes -> bytes (powers of 1000, as huggingface_hub)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


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


def save_folder(path: str | os.PathLike, model: nn.Module, metadata: dict[str, Any],
                max_shard_size: int | str = "5GB", overwrite: bool = False) -> Path:
    """Write `model`'s state dict and `metadata` (quantrt_config.json) to `path` atomically: everything goes
    to a temporary folder beside it that is renamed into place. A non-empty folder is replaced only with
    overwrite=True, only if it is a quantrt folder (has quantrt_config.json), and only once the new one is
    complete; any other non-empty folder (a user's ~/models, say) is never deleted."""
    from safetensors.torch import save_file

    # the folder a symlink points at is replaced, not the link (swapping the link itself would leave the
    # old folder behind and make the cleanup fail after the save succeeded)
    path = Path(path).resolve()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} is not empty; pass overwrite=True to replace it (the old folder is kept "
                                  f"until the new one is complete)")
        if not (path / CONFIG_NAME).is_file():
            raise FileExistsError(f"{path} is not empty and does not look like a quantrt folder (it has no "
                                  f"{CONFIG_NAME}), so quantrt will not delete it even with overwrite=True: "
                                  f"remove it yourself or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, tied = _unique_state_dict(model)
    shards = _shards({k: v.cpu() for k, v in tensors.items()}, parse_size(max_shard_size))
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
    try:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = WEIGHTS_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, staging / file, metadata={"format": "pt", "quantrt_format": str(FORMAT_VERSION)})
            weight_map.update({name: file for name in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (staging / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        metadata = dict(metadata, format_version=FORMAT_VERSION, tied=tied,
                        tensors={k: {"dtype": dtype_name(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()},
                        files=file_checksums(staging, sorted(p.name for p in staging.iterdir())))
        # written last: a folder with a config is complete (a save killed midway leaves none)
        (staging / CONFIG_NAME).write_text(json.dumps(metadata, indent=2, default=_json_default))
        if path.exists():
            if _exchange(staging, path):  # atomic: `path` always holds a complete folder, old or new
                shutil.rmtree(staging)  # now the old folder
            else:  # no atomic exchange here: `path` is missing between the two renames
                backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                backup.rmdir()
                path.rename(backup)
                staging.rename(path)
                shutil.rmtree(backup)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


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
    """{name: {"bytes", "sha256"}} of the files `names` in `folder`, hashed in parallel (hashlib releases
    the GIL): about 1.7 GB/s per core."""
    with ThreadPoolExecutor(max(1, min(len(names), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda name: sha256_file(folder / name), names))
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": digest} for name, digest in zip(names, digests)}


def verify_files(path: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Check the size and sha256 of every file that quantrt_config.json records against the folder's; a
    CheckpointError names the first file that differs. Folders saved without checksums pass unchecked."""
    recorded = metadata.get("files")
    if recorded is None:
        return
    root = Path(path)
    for name, record in recorded.items():
        file = root / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (quantrt_config.json lists it); the folder is incomplete")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise CheckpointError(f"{file} has {size} bytes but {record['bytes']} were saved: it was truncated "
                                  f"or modified after saving")
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


def _check_structure(file: Path, metadata: Any) -> None:
    """Every field that loading reads is present with the right type, so that a damaged or hand-edited
    quantrt_config.json fails here with its name, not with a KeyError deep inside loading."""
    from .config import QuantConfig
    from .schemes import resolve_scheme

    _expect(isinstance(metadata, dict), file, "it holds no JSON object")
    for key in ("quant_config", "model", "layers", "tensors"):
        _expect(isinstance(metadata.get(key), dict), file, f"{key!r} is missing or not an object")
    for key in ("tied", "kept", "files"):
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
    try:
        QuantConfig.from_dict(metadata["quant_config"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{file}: its quant_config cannot be read: {e} (written by a newer quantrt?)") from e


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    from . import __version__

    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}: it is not a folder that quantrt saved")
    try:
        metadata = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); the folder is damaged") from e
    _expect(isinstance(metadata, dict), file, "it holds no JSON object")
    version = metadata.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format version {version!r}, written by quantrt {metadata.get('quantrt_version', '?')}; "
            f"this quantrt ({__version__}) reads format versions 1..{FORMAT_VERSION}: upgrade quantrt")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{file} has format version {version!r}, which no quantrt writes (1..{FORMAT_VERSION} "
                              f"are known): the file is damaged or was not written by quantrt")
    _check_structure(file, metadata)
    return metadata


def weight_files(path: str | os.PathLike, metadata: dict[str, Any]) -> dict[str, list[str]]:
    """Shard file -> the tensor names it holds, from the index or the single file. Paths cannot leave the
    folder."""
    root = Path(path).resolve()
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
    else:
        weight_map = {name: WEIGHTS_NAME for name in metadata["tensors"]}
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        resolved = (root / file).resolve()
        if resolved.parent != root or not file.endswith(".safetensors"):
            raise CheckpointError(f"the index maps {name!r} to {file!r}, outside the folder or not a .safetensors file")
        files.setdefault(file, []).append(name)
    return files


def build_skeleton(identity: dict[str, Any], model: nn.Module | Callable[[], nn.Module] | None) -> nn.Module:
    """An empty (meta-device) model of the saved class. diffusers/transformers classes are looked up by name
    in those libraries only; anything else must be given as `model` (a module or a zero-argument factory)."""
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
    for file, names in files.items():
        file_path = Path(path) / file
        if not file_path.is_file():
            raise CheckpointError(f"shard {file} is missing from {path} (it holds {names[0]!r} and {len(names) - 1} more)")
        with _open_safetensors(file_path) as f:
            keys = set(f.keys())
            unknown = sorted(keys - set(expected))
            if unknown:
                raise CheckpointError(f"{file} holds tensors that {CONFIG_NAME} does not list, e.g. {unknown[:3]} "
                                      f"(renamed or from another model)")
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
            with _open_safetensors(Path(path) / file) as f:
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
        if target not in loaded:
            raise CheckpointError(f"tied tensor {alias!r} points at {target!r}, which was not loaded")
        owner, _, leaf = alias.rpartition(".")
        source_owner, _, source_leaf = target.rpartition(".")
        value = getattr(model.get_submodule(source_owner), source_leaf)
        setattr(model.get_submodule(owner), leaf, value)
        loaded.add(alias)
    unfilled = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta" and n not in loaded]
    if unfilled:
        raise CheckpointError(f"the checkpoint has no value for {len(unfilled)} tensors of the model, e.g. "
                              f"{unfilled[:3]}: it was saved from a different model or is incomplete")


def _unquantized_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers or transformers model folder, in index order."""
    for stem in ("diffusion_pytorch_model", "model"):
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                files = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from e
            paths = [(folder / f).resolve() for f in files]
            if any(p.parent != folder.resolve() or p.suffix != ".safetensors" for p in paths):
                raise CheckpointError(f"{index} points outside {folder} or at a file that is not .safetensors "
                                      f"(quantrt never loads .bin/.pt pickles)")
            return paths
        if (folder / f"{stem}.safetensors").is_file():
            return [folder / f"{stem}.safetensors"]
    raise CheckpointError(f"{folder} has no safetensors weights (diffusion_pytorch_model.safetensors or "
                          f"model.safetensors, or their index); quantrt never loads .bin/.pt pickles")


def _open_safetensors(file: Path):
    """safe_open(file) on CPU; a damaged header or a file cut short is a CheckpointError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="pt", device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"{file} is damaged or truncated and cannot be read: {e}") from e


def unquantized_identity(folder: Path) -> dict[str, Any]:
    """library/class/config of a diffusers or transformers model folder, from its config.json."""
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{folder} has neither {CONFIG_NAME} (a quantrt folder) nor config.json "
                              f"(a diffusers/transformers model folder)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); the folder is damaged") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} holds no JSON object")
    if "_class_name" in config:
        return {"library": "diffusers", "class": config["_class_name"], "config": config}
    if config.get("architectures"):
        return {"library": "transformers", "class": config["architectures"][0], "config": config}
    raise CheckpointError(f"{file} names no model class (_class_name or architectures)")


def plan_layers(skeleton: nn.Module, config: QuantConfig, torch_dtype: torch.dtype | None
                ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Swap the Linear layers of a (meta-device) skeleton that `config` quantizes for meta-device
    QuantizedLinear skeletons, to be filled by set_weight as the weights stream in:
    ({"<layer>.weight": layer}, {kept layer: why})."""
    from .modules import QuantizedLinear

    planned, kept = {}, {}
    for name, linear in list(skeleton.named_modules()):
        if type(linear) is not nn.Linear:
            continue
        plan = config.plan(name)
        why = plan.reason if plan.scheme is None else plan.scheme.unsupported_reason(linear.out_features,
                                                                                     linear.in_features)
        if why:
            kept[name] = why if plan.scheme is None else f"kept in full precision: {why}"
            continue
        layer = QuantizedLinear(linear.in_features, linear.out_features, plan.scheme, linear.bias is not None,
                                dtype=torch_dtype or linear.weight.dtype, device="meta", name=name)
        parent, _, child = name.rpartition(".")
        setattr(skeleton.get_submodule(parent) if parent else skeleton, child, layer)
        planned[f"{name}.weight"] = layer
    return planned, kept


def quantize_folder(folder: str | os.PathLike, config, device: torch.device, torch_dtype: torch.dtype | None,
                    model: nn.Module | Callable[[], nn.Module] | None = None,
                    progress: bool | None = None) -> tuple[nn.Module, dict[str, str]]:
    """Build the model of an unquantized model folder on the meta device and fill it tensor by tensor,
    quantizing each planned Linear weight as it arrives, so the full-precision model is never whole in
    memory. Returns (model, {kept layer: why})."""
    from accelerate.utils import set_module_tensor_to_device
    from tqdm.auto import tqdm

    from .checkpoints import SafetensorsReader, release_freed_memory
    from .modules import init_act_scale

    folder = Path(folder)
    # a caller-given skeleton needs no config.json (plain nn.Module folders have none)
    skeleton = build_skeleton(unquantized_identity(folder) if model is None else {}, model)
    planned, kept = plan_layers(skeleton, config, torch_dtype)
    expected = dict(skeleton.state_dict(keep_vars=True))
    loaded = set()
    files = _unquantized_weight_files(folder)
    for file in tqdm(files, desc="quantizing while loading", unit="shard", disable=(not progress) if progress is not None else None):
        # plain reads, not safe_open's memory map (whose touched pages stay resident until the whole shard
        # is closed), and freed pages handed back after each weight: peak RSS near the quantized size
        with SafetensorsReader(file) as f:
            for name in f.keys():
                tensor = f.read(name)
                if name in planned:
                    layer = planned[name]
                    weight = tensor.to(device=device, dtype=torch_dtype or tensor.dtype)
                    layer.set_weight(weight)
                    loaded.update(f"{layer.name}.{key}" for key in layer.tensors())
                    init_act_scale(layer, config.activation_scale, device)
                    del tensor, weight
                    release_freed_memory()
                    continue
                if name not in expected:
                    raise CheckpointError(f"tensor {name!r} in {file.name} has no place in {type(skeleton).__name__}")
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise CheckpointError(f"tensor {name!r} in {file.name} has shape {list(tensor.shape)}, the model "
                                          f"expects {list(expected[name].shape)}")
                if torch_dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(torch_dtype)
                set_module_tensor_to_device(skeleton, name, device, value=tensor, dtype=tensor.dtype)
                loaded.add(name)
    missing = [n for n, t in skeleton.state_dict(keep_vars=True).items() if t.device.type == "meta" and n not in loaded]
    if missing:
        raise CheckpointError(f"{folder} has no value for {len(missing)} tensors of the model, e.g. {missing[:3]}")
    return skeleton.to(device), kept
