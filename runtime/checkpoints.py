"""Checkpoints that other tools wrote, loaded into quantrt's formats: optimum-quanto folders, torchao
safetensors folders, and single-file checkpoints in a model's original (non-diffusers) layout.

    QuantizedTransformer.from_pretrained("flux-quanto-int4")        # quanto: routed here (foreign_format)
    QuantizedTransformer.from_pretrained("flux-torchao-int8")       # torchao safetensors: routed here
    QuantizedTransformer.from_single_file("flux1-dev.safetensors", quantization="int8wo")

Nothing is requantized where a stored format maps: each quanto / torchao weight is converted into the
quantrt scheme that stores the same numbers, and a weight that does not map is refused with an error naming
the layer and the reason. Nothing is executed: safetensors and JSON only (torchao's metadata is read as
JSON, no torchao object is rebuilt), and neither quanto nor torchao needs to be installed to load.

optimum-quanto (0.2.x). What `quantize(model, weights=...)`, `freeze(model)`, `save_file(model.state_dict())`
write, with `quantization_map(model)` as quantization_map.json (or quanto_qmap.json, optimum.quanto's
QuantizedDiffusersModel / QuantizedTransformersModel), or a diffusers folder saved with
`QuantoConfig(weights_dtype=...)` (config.json: quantization_config.quant_method "quanto"). Per layer:

| quanto | stored as | quantrt |
|---|---|---|
| qint8 | `weight._data` int8 [N, K], `weight._scale` [N, 1]: w = data * scale | int8wo, per channel: the same codes and scales, bit for bit |
| qfloat8_e4m3fn / _e5m2 | `weight._data` float8 [N, K], `weight._scale` [N, 1] | float8wo_e4m3 / float8wo_e5m2, bit for bit |
| qint4 / qint2 | `weight._data._data` uint8, codes packed along the rows of the grouped [N*K/g, g] weight; `weight._scale`, `weight._shift` [N*K/g, 1]: w = scale * code - shift | int4wo / uint2wo, group g: the same codes and scales, zero = shift / scale |

quanto groups qint4/qint2 weights by 128, else 96, 64 or 32 (the first that divides K), and keeps a K <= 128
whole (g = K). A float shift becomes quantrt's float zero point zero = shift / scale, so quantrt computes
(code - shift / scale) * scale where quanto computes scale * code - shift: equal up to one rounding of the
zero point in the scale's dtype (fp32: within a few ulps of the weight; the tests bound it). An integer
shift (quanto's zeropoint=True optimizers) is quantrt's zero exactly. A group with scale 0 (constant weights)
gets scale 1 and zero = shift, which is exact. Refused, naming the layer: quantized activations
(`activations=`, static scales quantrt does not reproduce), qfloat8_e4m3fnuz (no quantrt format), a group
size quantrt cannot store (not a power of two >= 8: quanto's 96, or a whole row K that is not), a layer that
is not an nn.Linear (quanto's QConv2d), and a quantized layer saved before `freeze` (its weight is still
float; freeze first, or load the float weights with quantization=).

torchao (0.16+ safetensors, torchao.prototype.safetensors): `flatten_tensor_state_dict(model.state_dict())`
saved with its metadata, which is what diffusers' / transformers' `save_pretrained` of a TorchAoConfig model
writes. Every shard's header metadata holds "tensor_names" and, per tensor, {"_type", "_data",
"_tensor_data_names"}; a quantized `<module>.weight` is stored as `<module>._weight_<data name>`.

| torchao config | tensor | quantrt |
|---|---|---|
| Int8WeightOnlyConfig (PerRow, PerGroup, PerTensor) | Int8Tensor: qdata int8, scale, zero_point (0) | int8wo, per channel or grouped |
| IntxWeightOnlyConfig(weight_dtype=torch.intX) | IntxUnpackedToInt8Tensor: qdata int8 in [-2**(X-1), 2**(X-1)), scale, zero_point: w = (qdata - zero_point) * scale | uintXwo (int4wo for X = 4), group g: code = qdata + 2**(X-1), zero = zero_point + 2**(X-1); X = 8 symmetric: int8wo |
| Float8WeightOnlyConfig | Float8Tensor: qdata float8, scale | float8wo_e4m3 / _e5m2 |

These hold exactly quantrt's numbers except for one thing: torchao keeps Int8Tensor and Float8Tensor scales in
float32 whatever the model's dtype, and quantrt keeps a layer's scales in the layer's dtype, so a bf16 / fp16
checkpoint's scales are rounded to it (per channel, relative change <= 2**-9 in bf16); pass
torch_dtype=torch.float32 to keep them exact (the model then computes in float32). Refused, naming the
layer: activation quantization (Int8DynamicActivation*, Float8DynamicActivation*: act_quant_kwargs),
asymmetric int8, 2-D blocks, and the int4 packings of Int4WeightOnlyConfig (Int4Tensor and
Int4PreshuffledTensor: mslk; Int4TilePackedTo4dTensor: tinygemm, CUDA; Int4PlainInt32Tensor: XPU): torchao
0.18 builds none of them on a CPU, so no mapping of their bit layouts and zero points (tinygemm's is a float
mid-point, w = (q - 8) * scale + zero) could be checked against torchao here (re-save with
IntxWeightOnlyConfig(weight_dtype=torch.int4), or quantize the unquantized model with quantization="int4wo").
MX / NVFP4 tensors have no quantrt format.

Single files (`quantize_single_file`, behind QuantizedTransformer.from_single_file): a checkpoint in the
original layout (BFL's Flux: double_blocks.N.img_attn.qkv.weight, ...), converted with diffusers' own
single-file conversion (diffusers.loaders.single_file_model.SINGLE_FILE_LOADABLE_CLASSES) and quantized while
it streams; see `single_file_plan` for how the conversion, which works on a whole state dict, is made to
stream.

Reading: `SafetensorsReader` reads each tensor (or a range of its rows) with plain file reads, not through
safe_open's memory map, so that the pages a streaming loader has read do not stay resident (see there).
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .config import QuantConfig
from .kernels.packing import pack_uintx
from .schemes import Scheme, resolve_scheme
from .serialization import (CONFIG_NAME, SAFETENSORS_DTYPES, CheckpointError, OutsideFolderError,
                            build_skeleton, inside, plan_layers,
                            read_json, refuse_duplicate_keys, unquantized_identity, unquantized_weights, upcast_weight)

QUANTO_MAP_FILES = ("quantization_map.json", "quanto_qmap.json")
# quanto qtype name -> the quantrt scheme that stores the same numbers
QUANTO_QTYPES = {"qint8": "int8wo", "qint4": "int4wo", "qint2": "uint2wo", "qfloat8_e4m3fn": "float8wo_e4m3",
                 "qfloat8": "float8wo_e4m3", "qfloat8_e5m2": "float8wo_e5m2"}
# diffusers QuantoConfig.weights_dtype -> quanto qtype (diffusers' _replace_with_quanto_layers)
DIFFUSERS_QUANTO_WEIGHTS = {"int8": "qint8", "int4": "qint4", "int2": "qint2", "float8": "qfloat8_e4m3fn"}
# the largest header this reader parses (about 100 bytes of JSON per tensor; a corrupt length must not allocate GBs)
_MAX_HEADER = 100 * 2**20


class SafetensorsReader:
    """One .safetensors file, read tensor by tensor (or row range by row range) with plain reads.

    safetensors' safe_open maps the file and hands out tensors that live in that mapping: every page a
    loader touches stays resident, and counted in the process's RSS, until the mapping goes, which is when
    the handle and every tensor from it are gone. A loader that streams a 10 GB shard through safe_open to
    quantize it therefore holds the whole shard by the end (measured: +257 MB RSS for a 256 MB file). Here
    each read fills a fresh tensor (anonymous memory) that is freed when the caller drops it; the file's
    bytes stay in the page cache, which the kernel reclaims at will and which RSS does not count.

    The header (JSON) is checked before any read: shapes of non-negative ints and data offsets inside the
    file that match each shape, so that a damaged file is a CheckpointError naming it (a dtype torch cannot
    hold is an error when that tensor is read)."""

    def __init__(self, path: str | os.PathLike, label: str | os.PathLike | None = None):
        self.path = Path(path)
        self.label = str(label) if label is not None else str(self.path)  # what errors call the file
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                # neither the length nor the size is echoed: of a file that is not safetensors, that says what
                # it holds
                if size < 8 or not 2 <= length <= min(size - 8, _MAX_HEADER):
                    raise CheckpointError(f"{self.label} is not a safetensors file, or is truncated: its first 8 bytes "
                                          f"are not the length of a header that fits in the file")
                header = json.loads(f.read(length), object_pairs_hook=refuse_duplicate_keys(self.label))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{self.label} has a damaged safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.label} has a damaged safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = metadata if isinstance(metadata, dict) else {}
        self._data_start = 8 + length
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._check_entry(name, entry, size - self._data_start)
        self._check_layout(size - self._data_start)

    def _check_entry(self, name: str, entry: Any, data_bytes: int) -> tuple[str, tuple[int, ...], int, int]:
        ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
        shape, offsets = entry.get("shape") if ok else None, entry.get("data_offsets") if ok else None
        ok = ok and isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                    for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        if not ok:
            raise CheckpointError(f"{self.label}: tensor {name!r} has a damaged header entry {entry!r:.200}")
        begin, end = offsets
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])  # unknown: an error only if the tensor is read
        # Python integers: a shape like [2**32, 2**32] must be refused here, not overflow torch's size arithmetic
        nbytes = math.prod(shape) * dtype.itemsize if dtype is not None else end - begin
        if not 0 <= begin <= end <= data_bytes or end - begin != nbytes:
            raise CheckpointError(f"{self.label}: tensor {name!r} ({entry['dtype']} {shape}) has data offsets "
                                  f"{offsets} that do not fit its size or the file: the file is damaged or truncated")
        return entry["dtype"], tuple(shape), begin, end

    def _check_layout(self, data_bytes: int) -> None:
        """As safetensors itself requires: the tensors' bytes follow one another without overlap or gap and
        fill the data section. Two tensors sharing bytes would otherwise both read, silently, as each other."""
        position, previous = 0, None
        for name, (_, _, begin, end) in sorted(self._entries.items(), key=lambda item: item[1][2:]):
            if begin < position:
                raise CheckpointError(f"{self.label}: the bytes of tensor {name!r} overlap those of {previous!r} "
                                      f"(data offsets from {begin}, the other ends at {position}): the file is damaged "
                                      f"or was crafted; safetensors refuses it too")
            if begin > position:
                raise CheckpointError(f"{self.label}: {begin - position} bytes before tensor {name!r} belong to no "
                                      f"tensor: the file is damaged; safetensors refuses it too")
            position, previous = end, name
        if position != data_bytes:
            raise CheckpointError(f"{self.label}: its last {data_bytes - position} bytes belong to no tensor: the file "
                                  f"is damaged or has something appended; safetensors refuses it too")

    def __enter__(self) -> SafetensorsReader:  # no handle is kept open; `with` reads like safe_open's
        return self

    def __exit__(self, *exc_info) -> None:
        return None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        dtype_name = self._entries[name][0]
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.label}: tensor {name!r} has dtype {dtype_name}, which quantrt cannot read")
        return SAFETENSORS_DTYPES[dtype_name]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name`, or only its rows [start, stop) along dim 0, as a fresh CPU tensor."""
        dtype = self.dtype(name)
        _, shape, begin, end = self._entries[name]
        if rows is not None:
            start, stop = rows
            if not shape or not 0 <= start <= stop <= shape[0]:
                raise CheckpointError(f"{self.label}: rows {start}:{stop} of tensor {name!r} {list(shape)} do not exist")
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, shape = begin + start * row_bytes, (stop - start, *shape[1:])
        tensor = torch.empty(shape, dtype=dtype)
        buffer = tensor.reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            got = f.readinto(memoryview(buffer))
        if got != buffer.nbytes:
            raise CheckpointError(f"{self.label} is truncated: tensor {name!r} needs {buffer.nbytes} bytes, {got} "
                                  f"are there")
        return tensor


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; other C libraries have none
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the pages of freed buffers back to the OS (glibc's malloc_trim; a no-op elsewhere).

    A streaming quantizer frees a large float tensor and its temporaries after every layer, between small
    long-lived results (codes, scales). glibc serves such buffers from its heap once one of their size has
    been freed (its mmap threshold adapts upwards) and returns heap pages only from the top, so without this
    the freed pages stay resident: measured, a 289 MiB fp32 Flux quantized to int8 while streaming grew the
    RSS by 168 to 353 MiB (run to run), 67 MiB after one malloc_trim(0). Called once per tensor: it walks
    glibc's free lists, microseconds to milliseconds, nothing next to quantizing the tensor."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _Shards:
    """The tensors of several safetensors files (a sharded checkpoint) by name; a tensor in two of them is an
    error naming it and both files."""

    def __init__(self, files: dict[str, Path], folder: Path):
        self.readers = [SafetensorsReader(path, label=folder / name) for name, path in files.items()]
        self.where: dict[str, SafetensorsReader] = {}
        for reader in self.readers:
            for name in reader.keys():
                if name in self.where:
                    raise CheckpointError(f"tensor {name!r} is in both {Path(self.where[name].label).name} and "
                                          f"{Path(reader.label).name}: which one the model should get is unclear; the "
                                          f"folder is damaged or mixes two saves")
                self.where[name] = reader

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"tensor {name!r} is missing from "
                                  f"{', '.join(Path(r.label).name for r in self.readers)}")
        return self.where[name].read(name)

    @property
    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for reader in self.readers:
            merged.update(reader.metadata)
        return merged


def model_weight_files(folder: Path) -> dict[str, Path]:
    """The safetensors files of a model folder, {name: real path}: diffusers' / transformers' names (and
    their index), else the folder's only .safetensors file (what `save_file(state_dict, "anything.safetensors")`
    leaves). Each is `inside` the folder."""
    files = unquantized_weights(folder, required=False)[0]
    if files:
        return files
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return {found[0].name: inside(folder, found[0].name)}
    if found:
        names = ", ".join(f.name for f in found[:4])
        raise CheckpointError(f"{folder} holds {len(found)} .safetensors files ({names}) and no index saying which "
                              f"form the model; keep only the model's file, or name it model.safetensors")
    return unquantized_weights(folder)[0]  # the error that says what a model folder holds


def _read_json(folder: Path, name: str) -> Any:
    """The JSON file `name` of `folder` (`inside` it)."""
    return read_json(inside(folder, name))


def _quantization_config(folder: Path) -> dict[str, Any] | None:
    if not (folder / "config.json").is_file():
        return None
    config = _read_json(folder, "config.json")
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return quantization if isinstance(quantization, dict) else None


def foreign_format(path: str | os.PathLike) -> str | None:
    """"quanto" or "torchao" for a folder those tools wrote, None for anything else (a quantrt folder, an
    unquantized model folder, a path that is not a folder). A folder quantized by another tool is an error
    that names the tool."""
    folder = Path(path)
    if not folder.is_dir() or (folder / CONFIG_NAME).is_file():
        return None
    if any((folder / name).is_file() for name in QUANTO_MAP_FILES):
        return "quanto"
    quantization = _quantization_config(folder)
    method = quantization.get("quant_method") if quantization else None
    if method in ("quanto", "torchao"):
        return method
    if method is not None:
        raise CheckpointError(f"{folder} was quantized with {method!r} (config.json quantization_config), which "
                              f"quantrt cannot load; quantrt reads quanto and torchao checkpoints, or quantizes the "
                              f"unquantized model: from_pretrained(unquantized_folder, quantization=...)")
    try:
        files = model_weight_files(folder)
    except OutsideFolderError:
        raise  # a symlink out of the folder: refused here, not passed over to another loader
    except CheckpointError:
        return None
    name, path = next(iter(files.items()))
    return "torchao" if "tensor_names" in SafetensorsReader(path, label=folder / name).metadata else None


def load_foreign(kind: str, path: str | os.PathLike, device: torch.device, torch_dtype: torch.dtype | None,
                 backend: str | None, model: nn.Module | Callable[[], nn.Module] | None
                 ) -> tuple[nn.Module, QuantConfig, dict[str, str]]:
    """Load a quanto or torchao folder (`foreign_format`): (model with QuantizedLinear layers on `device`,
    the QuantConfig that describes them, {Linear layer kept in full precision: why})."""
    loader = {"quanto": _quanto_layers, "torchao": _torchao_layers}[kind]
    folder = Path(path)
    shards = _Shards(model_weight_files(folder), folder)
    skeleton = _skeleton(folder, model)
    schemes = loader(folder, shards, skeleton, device, torch_dtype)
    if not schemes:
        raise CheckpointError(f"{folder} is a {kind} checkpoint with no quantized Linear layer")
    kept = {name: f"not quantized in the {kind} checkpoint" for name, module in skeleton.named_modules()
            if type(module) is nn.Linear}
    return skeleton.to(device), _describe(schemes, kept, backend), kept


def _skeleton(folder: Path, model: nn.Module | Callable[[], nn.Module] | None) -> nn.Module:
    if model is not None:
        return build_skeleton({}, model)
    identity = unquantized_identity(folder)
    # the skeleton is built unquantized; the quantization_config would ask diffusers/transformers to quantize
    identity["config"] = {k: v for k, v in identity["config"].items() if k != "quantization_config"}
    return build_skeleton(identity, None, source=str(folder / "config.json"))


def _group_argument(scheme: Scheme) -> int | None:
    """The group_size that makes QuantConfig(scheme.name, group_size=...) this scheme (-1: int8 per channel)."""
    if scheme.group_size is None and scheme.weight == "int8":
        return -1
    return scheme.group_size


def _describe(schemes: dict[str, Scheme], kept: dict[str, str], backend: str | None) -> QuantConfig:
    """A QuantConfig that says what was loaded: the most common scheme, exact-name overrides for layers
    with another scheme (or group size), and None overrides for the Linear layers kept in full precision."""
    backend = backend or "auto"
    main = Counter(schemes.values()).most_common(1)[0][0]
    modules: dict[str, QuantConfig | None] = {
        name: QuantConfig(s.name, group_size=_group_argument(s), backend=backend)
        for name, s in schemes.items() if s != main}
    modules.update(dict.fromkeys(kept))
    return QuantConfig(main.name, group_size=_group_argument(main), modules=modules, backend=backend)


def _linear(skeleton: nn.Module, name: str, what: str) -> nn.Linear:
    try:
        module = skeleton.get_submodule(name)
    except AttributeError as e:
        raise CheckpointError(f"{what} quantizes layer {name!r}, which the model does not have (another model, "
                              f"or a config.json that does not match the weights)") from e
    if type(module) is not nn.Linear:
        raise CheckpointError(f"{what} quantizes layer {name!r}, a {type(module).__name__}: quantrt quantizes "
                              f"nn.Linear layers only")
    return module


def _install(skeleton: nn.Module, name: str, scheme: Scheme, tensors: dict[str, torch.Tensor],
             bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
    """Replace the Linear `name` by a QuantizedLinear holding `tensors` (quantrt's stored tensors)."""
    from .modules import QuantizedLinear

    linear = skeleton.get_submodule(name)
    n, k = linear.out_features, linear.in_features
    if bias is not None and tuple(bias.shape) != (n,):
        raise CheckpointError(f"layer {name!r}: bias of shape {list(bias.shape)} for a {n}x{k} Linear")
    layer = QuantizedLinear(k, n, scheme, bias is not None, dtype=dtype, device="meta", name=name)
    for key, (shape, tensor_dtype) in scheme.tensor_specs(n, k, dtype).items():
        value = tensors[key]
        if tuple(value.shape) != tuple(shape) or value.dtype != tensor_dtype:
            raise CheckpointError(f"layer {name!r}: converted {key} is {value.dtype} {list(value.shape)}, "
                                  f"{scheme.name} stores {tensor_dtype} {list(shape)} (a bug in the conversion)")
        setattr(layer, key, value.to(device))
    if bias is not None:
        layer.bias = bias.to(device=device, dtype=dtype)
    parent, _, child = name.rpartition(".")
    setattr(skeleton.get_submodule(parent) if parent else skeleton, child, layer)


def _set_plain(skeleton: nn.Module, expected: dict[str, torch.Tensor], name: str, tensor: torch.Tensor,
               device: torch.device, torch_dtype: torch.dtype | None, source: str) -> None:
    """Put an unquantized stored tensor into the model, checking that it has a place and the right shape."""
    from accelerate.utils import set_module_tensor_to_device

    if name not in expected:
        raise CheckpointError(f"tensor {name!r} of {source} has no place in {type(skeleton).__name__} (another "
                              f"model, or a config that does not match the weights)")
    if tuple(tensor.shape) != tuple(expected[name].shape):
        raise CheckpointError(f"tensor {name!r} of {source} has shape {list(tensor.shape)}, the model expects "
                              f"{list(expected[name].shape)}")
    if torch_dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(torch_dtype)
    set_module_tensor_to_device(skeleton, name, device, value=tensor, dtype=tensor.dtype)


def _check_complete(skeleton: nn.Module, source: str) -> None:
    missing = [n for n, t in skeleton.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{source} has no value for {len(missing)} tensors of the model, e.g. {missing[:3]}: "
                              f"it was saved from a different model or is incomplete")


def _scheme(name: str, group_size: int | None, layer: str, why: str) -> Scheme:
    """resolve_scheme, with a refusal that names the layer where quantrt cannot store the group size."""
    try:
        return resolve_scheme(name, -1 if group_size is None else group_size)
    except ValueError as e:
        raise CheckpointError(f"layer {layer!r}: {why}, which quantrt cannot store: {e}") from e


def _check_packable(scheme: Scheme, n: int, k: int, layer: str) -> None:
    reason = scheme.unsupported_reason(n, k)
    if reason:
        raise CheckpointError(f"layer {layer!r}: its {n}x{k} weight cannot be stored as {scheme.name}: {reason}")


def _quanto_qtypes(folder: Path, shards: _Shards) -> dict[str, str]:
    """{layer name: quanto qtype name} of the quantized layers, from the quantization map or from diffusers'
    QuantoConfig (every layer whose weight was saved as a quanto tensor)."""
    for file_name in QUANTO_MAP_FILES:
        file = folder / file_name
        if not file.is_file():
            continue
        qmap = _read_json(folder, file_name)
        if not isinstance(qmap, dict):
            raise CheckpointError(f"{file} is not a quanto quantization map ({{layer: {{weights, activations}}}})")
        qtypes = {}
        for name, entry in qmap.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("weights"), str):
                raise CheckpointError(f"{file}: layer {name!r} has {entry!r}, not "
                                      f"{{'weights': ..., 'activations': ...}}")
            activations = entry.get("activations", "none")
            if activations != "none":
                raise CheckpointError(f"layer {name!r} quantizes its activations ({activations}, {file.name}): "
                                      f"quanto's activation scales are static, calibrated on sample inputs, and "
                                      f"quantrt has no such scheme; quantize the model with weights only")
            if entry["weights"] != "none":
                qtypes[name] = entry["weights"]
        return qtypes
    quantization = _quantization_config(folder) or {}
    weights = quantization.get("weights_dtype")
    if weights not in DIFFUSERS_QUANTO_WEIGHTS:
        raise CheckpointError(f"{folder}/config.json: quanto weights_dtype {weights!r} is not one of "
                              f"{', '.join(DIFFUSERS_QUANTO_WEIGHTS)}")
    if quantization.get("activations") not in (None, "none"):
        raise CheckpointError(f"{folder}: quanto activations={quantization['activations']!r} are static, calibrated "
                              f"scales that quantrt does not reproduce; quantrt loads weight-only quanto checkpoints")
    suffix = ".weight._scale"
    return {key[: -len(suffix)]: DIFFUSERS_QUANTO_WEIGHTS[weights] for key in shards.keys() if key.endswith(suffix)}


def _unpack_quanto(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of quanto's pack_weights: packed uint8 [ceil(rows / (8 // bits)), C] holds row
    i * packed_rows + r in bits [bits * i, bits * (i + 1)) of its row r -> uint8 codes [rows, C]."""
    per = 8 // bits
    planes = [(packed >> (bits * i)) & (2**bits - 1) for i in range(per)]
    return torch.cat(planes, dim=0)[:rows]


def quanto_to_quantrt(name: str, qtype: str, parts: dict[str, torch.Tensor], n: int, k: int,
                      dtype: torch.dtype | None) -> tuple[Scheme, dict[str, torch.Tensor], torch.dtype]:
    """One quanto weight (the state-dict tensors under `<name>.weight.`, by suffix: "_data", "_scale",
    "_shift", "_data._data") of an [n, k] Linear -> (scheme, quantrt's stored tensors, the layer's dtype).
    `dtype` None keeps quanto's (its scales' dtype)."""
    if qtype not in QUANTO_QTYPES:
        raise CheckpointError(f"layer {name!r}: quanto {qtype} weights have no quantrt format (quantrt maps "
                              f"{', '.join(QUANTO_QTYPES)})")
    scale = parts.get("_scale")
    if scale is None:
        raise CheckpointError(f"layer {name!r}: its quanto weight has no _scale")
    dtype = dtype or scale.dtype
    if qtype in ("qint8", "qfloat8", "qfloat8_e4m3fn", "qfloat8_e5m2"):
        data = parts.get("_data")
        want = {"qint8": torch.int8, "qfloat8_e5m2": torch.float8_e5m2}.get(qtype, torch.float8_e4m3fn)
        if data is None or data.dtype != want or tuple(data.shape) != (n, k):
            found = None if data is None else (data.dtype, list(data.shape))
            raise CheckpointError(f"layer {name!r}: a {qtype} weight of a {n}x{k} Linear needs _data {want} "
                                  f"[{n}, {k}], has {found}")
        if scale.numel() not in (1, n):
            raise CheckpointError(f"layer {name!r}: quanto scale of shape {list(scale.shape)} is neither per "
                                  f"tensor nor per output channel of a {n}x{k} weight")
        # one scale per output channel; a per-tensor scale (quanto's choice for a single row) repeated per row
        scale = scale.reshape(-1, 1).expand(n, 1).to(dtype).contiguous()
        scheme = resolve_scheme(QUANTO_QTYPES[qtype], -1 if qtype == "qint8" else None)
        qweight = data if qtype == "qint8" else data.view(torch.uint8)
        return scheme, {"qweight": qweight, "scale": scale}, dtype
    bits = 4 if qtype == "qint4" else 2
    packed, shift = parts.get("_data._data"), parts.get("_shift")
    if packed is None or shift is None or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise CheckpointError(f"layer {name!r}: a {qtype} weight needs _data._data (uint8, 2-D), _scale and _shift; "
                              f"has {sorted(parts)}")
    rows = scale.numel()  # one scale per group: rows of quanto's grouped [n * k / g, g] weight
    if rows % n or k % (rows // n) or shift.numel() != rows:
        raise CheckpointError(f"layer {name!r}: {rows} scales / {shift.numel()} shifts do not group a {n}x{k} weight")
    groups = rows // n
    group_size = k // groups
    per = 8 // bits
    if tuple(packed.shape) != (-(-rows // per), group_size):
        raise CheckpointError(f"layer {name!r}: packed {qtype} data of shape {list(packed.shape)} does not hold "
                              f"{rows}x{group_size} codes")
    scheme = _scheme(QUANTO_QTYPES[qtype], group_size, name,
                     f"quanto stored its {qtype} weight in groups of {group_size} (K={k})")
    _check_packable(scheme, n, k, name)
    codes = _unpack_quanto(packed, bits, rows).reshape(n, k)
    scale = scale.reshape(n, groups)
    shift = shift.reshape(n, groups)
    if shift.is_floating_point():
        # quanto: w = scale * code - shift; quantrt: w = (code - zero) * scale, so zero = shift / scale. A group of
        # equal weights has scale 0 (w = -shift): scale 1, zero = shift and codes 0 give exactly -shift.
        flat = scale == 0
        zero = torch.where(flat, shift.double(), shift.double() / torch.where(flat, 1.0, scale.double()))
        scale = torch.where(flat, torch.ones_like(scale), scale)
        codes = torch.where(flat.repeat_interleave(group_size, dim=1), 0, codes)
    else:  # an integer zero point (zeropoint=True): w = scale * (code - shift)
        zero = shift.double()
    zero = zero.to(dtype)
    if not torch.isfinite(zero).all():
        raise CheckpointError(f"layer {name!r}: quanto scales so small that shift / scale overflows {dtype}")
    return scheme, {"qweight": pack_uintx(codes, bits), "scale": scale.to(dtype), "zero": zero}, dtype


def _quanto_layers(folder: Path, shards: _Shards, skeleton: nn.Module, device: torch.device,
                   torch_dtype: torch.dtype | None) -> dict[str, Scheme]:
    qtypes = _quanto_qtypes(folder, shards)
    quanto_tensors: dict[str, dict[str, str]] = {}  # layer -> {"_data" / "_scale" / ...: state-dict key}
    for key in shards.keys():
        layer, separator, part = key.rpartition(".weight.")
        if separator:
            quanto_tensors.setdefault(layer, {})[part] = key
    schemes, consumed = {}, set()
    for name, qtype in qtypes.items():
        linear = _linear(skeleton, name, f"{folder}'s quanto quantization")
        parts = quanto_tensors.get(name, {})
        if not parts:
            if f"{name}.weight" in shards:
                raise CheckpointError(f"layer {name!r} is quantized to {qtype} in {folder}'s quantization map but its "
                                      f"weight was saved unquantized: the model was saved before "
                                      f"optimum.quanto.freeze(model); freeze it before saving, or load the float "
                                      f"weights with quantization=")
            raise CheckpointError(f"layer {name!r} is quantized to {qtype} in {folder}'s quantization map, but the "
                                  f"checkpoint has no quanto weight for it")
        scheme, tensors, dtype = quanto_to_quantrt(name, qtype, {s: shards.read(key) for s, key in parts.items()},
                                                   linear.out_features, linear.in_features, torch_dtype)
        bias = shards.read(f"{name}.bias") if f"{name}.bias" in shards else None
        _install(skeleton, name, scheme, tensors, bias, dtype, device)
        schemes[name] = scheme
        consumed.update(parts.values())
        consumed.add(f"{name}.bias")
        release_freed_memory()
    expected = dict(skeleton.state_dict(keep_vars=True))
    for key in shards.keys():
        if key in consumed:
            continue
        module_name, _, leaf = key.rpartition(".")
        if leaf in ("input_scale", "output_scale") and key not in expected:
            continue  # quanto's activation scales of a weight-only layer: ones, never used
        if ".weight._" in key:
            raise CheckpointError(f"{key!r} is a quanto tensor of a layer the quantization map does not list")
        _set_plain(skeleton, expected, key, shards.read(key), device, torch_dtype, str(folder))
    _check_complete(skeleton, str(folder))
    return schemes


def _torchao_dtype(value: Any, what: str, name: str) -> torch.dtype:
    """A torch dtype in torchao's JSON form {"_type": "torch.dtype", "_data": "bfloat16"}."""
    dtype = getattr(torch, value.get("_data", ""), None) if isinstance(value, dict) else None
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"layer {name!r}: torchao metadata has {what}={value!r}, not a torch dtype")
    return dtype


def _torchao_groups(name: str, block_size: Any, n: int, k: int) -> int | None:
    """torchao's block_size -> quantrt's group size (None: one scale per output channel or per tensor)."""
    if block_size in ([1, k], [n, k]):
        return None
    group = block_size[1] if isinstance(block_size, list) and len(block_size) == 2 and block_size[0] == 1 else None
    if isinstance(group, int) and group > 0 and k % group == 0:
        return group
    raise CheckpointError(f"layer {name!r}: torchao block_size {block_size} of a {n}x{k} weight is not per row, "
                          f"per group of a row or per tensor; quantrt has no 2-D block scales")


def _rowwise(name: str, tensor: torch.Tensor, n: int, groups: int, what: str) -> torch.Tensor:
    """A torchao scale / zero point as [n, groups] (a per-tensor value repeated per row)."""
    if tensor.numel() == 1:
        return tensor.reshape(1, 1).expand(n, groups).contiguous()
    if tensor.numel() != n * groups:
        raise CheckpointError(f"layer {name!r}: torchao {what} of shape {list(tensor.shape)} does not give "
                              f"{groups} per output channel of {n}")
    return tensor.reshape(n, groups)


_TORCHAO_REFUSED = {  # torchao int4 tensors: what builds them
    "Int4Tensor": "Int4WeightOnlyConfig's plain packing, built by mslk",
    "Int4PlainInt32Tensor": "Int4WeightOnlyConfig(int4_packing_format='plain_int32'), for XPU (oneDNN)",
    "Int4TilePackedTo4dTensor": "Int4WeightOnlyConfig's tinygemm packing ('tile_packed_to_4d'), for CUDA",
    "Int4PreshuffledTensor": "Int4WeightOnlyConfig's preshuffled packing, built by mslk",
}


def torchao_to_quantrt(name: str, info: dict[str, Any], parts: dict[str, torch.Tensor], n: int, k: int,
                       dtype: torch.dtype | None) -> tuple[Scheme, dict[str, torch.Tensor], torch.dtype]:
    """One torchao weight (its metadata entry and the tensors under `<module>._weight_`, by data name) of an
    [n, k] Linear -> (scheme, quantrt's stored tensors, the layer's dtype). `dtype` None keeps the model's
    (torchao's recorded dtype)."""
    kind = info.get("_type")
    data = info.get("_data") if isinstance(info.get("_data"), dict) else {}
    if kind in _TORCHAO_REFUSED:
        raise CheckpointError(
            f"layer {name!r} is a torchao {kind} ({_TORCHAO_REFUSED[kind]}): torchao cannot build it on a CPU, so "
            f"quantrt has no mapping of its bit layout and zero points checked against torchao. Re-save with "
            f"IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g)), or load the unquantized "
            f"model with quantization='int4wo'")
    if kind not in ("Int8Tensor", "IntxUnpackedToInt8Tensor", "Float8Tensor"):
        raise CheckpointError(f"layer {name!r} is a torchao {kind}, which has no quantrt format (quantrt maps "
                              f"Int8Tensor, IntxUnpackedToInt8Tensor and Float8Tensor weights)")
    activation = data.get("act_quant_kwargs") or data.get("activation_quantization")
    if activation:
        how = activation.get("_type", activation) if isinstance(activation, dict) else activation
        raise CheckpointError(f"layer {name!r}: its torchao {kind} quantizes activations too ({how}); "
                              f"quantrt loads torchao's weight-only checkpoints (Int8WeightOnlyConfig, "
                              f"IntxWeightOnlyConfig, Float8WeightOnlyConfig)")
    extra = set(parts) - {"qdata", "scale", "zero_point"}
    if extra:
        raise CheckpointError(f"layer {name!r}: torchao {kind} holds {sorted(extra)} as well, which quantrt does not "
                              f"reproduce")
    dtype = dtype or _torchao_dtype(data.get("dtype"), "dtype", name)
    qdata, scale = parts.get("qdata"), parts.get("scale")
    if qdata is None or scale is None or tuple(qdata.shape) != (n, k):
        raise CheckpointError(f"layer {name!r}: torchao {kind} of a {n}x{k} Linear needs qdata [{n}, {k}] and a "
                              f"scale, has {[(key, list(t.shape)) for key, t in parts.items()]}")
    group_size = _torchao_groups(name, data.get("block_size"), n, k)
    groups = 1 if group_size is None else k // group_size
    scale = _rowwise(name, scale, n, groups, "scale").to(dtype)
    zero_point = parts.get("zero_point")
    if kind == "Float8Tensor":
        fp8 = {torch.float8_e4m3fn: "float8wo_e4m3", torch.float8_e5m2: "float8wo_e5m2"}.get(qdata.dtype)
        if fp8 is None or group_size is not None:
            raise CheckpointError(f"layer {name!r}: torchao Float8Tensor of {qdata.dtype} with block_size "
                                  f"{data.get('block_size')}: quantrt stores e4m3fn / e5m2 with one scale per row")
        return resolve_scheme(fp8), {"qweight": qdata.view(torch.uint8), "scale": scale}, dtype
    if qdata.dtype != torch.int8:
        raise CheckpointError(f"layer {name!r}: torchao {kind} qdata is {qdata.dtype}, not int8")
    bits = 8
    if kind == "IntxUnpackedToInt8Tensor":
        target = _torchao_dtype(data.get("target_dtype"), "target_dtype", name)
        bits = {getattr(torch, f"int{b}", None): b for b in range(1, 9)}.get(target)
        if bits is None:
            raise CheckpointError(f"layer {name!r}: torchao target_dtype {target} is not int1 .. int8")
    zero = torch.zeros(n, groups) if zero_point is None else _rowwise(name, zero_point, n, groups, "zero_point")
    if bits == 8:
        if zero.any():
            raise CheckpointError(f"layer {name!r}: torchao {kind} is asymmetric int8 (non-zero zero points); "
                                  f"quantrt's int8 is symmetric and it has no 8-bit asymmetric scheme")
        scheme = _scheme("int8wo", group_size, name, f"torchao grouped its int8 weight by {group_size}")
        return scheme, {"qweight": qdata, "scale": scale}, dtype
    # signed codes in [-2**(bits-1), 2**(bits-1)) and zero points shifted alike become quantrt's unsigned ones
    offset = 2 ** (bits - 1)
    codes = qdata.to(torch.int16) + offset
    if codes.min() < 0 or codes.max() >= 2**bits:
        raise CheckpointError(f"layer {name!r}: torchao int{bits} codes outside [-{offset}, {offset - 1}]")
    scheme = _scheme("int4wo" if bits == 4 else f"uint{bits}wo", group_size or k, name,
                     f"torchao stored its int{bits} weight in groups of {group_size or k}")
    _check_packable(scheme, n, k, name)
    return scheme, {"qweight": pack_uintx(codes, bits), "scale": scale,
                    "zero": (zero.double() + offset).to(dtype)}, dtype


def _torchao_layers(folder: Path, shards: _Shards, skeleton: nn.Module, device: torch.device,
                    torch_dtype: torch.dtype | None) -> dict[str, Scheme]:
    metadata = shards.metadata
    try:
        names = json.loads(metadata["tensor_names"])
        infos = {name: json.loads(metadata[name]) for name in names}
    except (KeyError, TypeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{folder} is a torchao checkpoint without readable torchao safetensors metadata "
                              f"({type(e).__name__}: {e}); quantrt reads what torchao >= 0.16 writes "
                              f"(flatten_tensor_state_dict / save_pretrained with safetensors)") from e
    schemes, consumed = {}, set()
    for tensor_name, info in infos.items():
        if not isinstance(info, dict) or info.get("_type") in ("Tensor", None):
            continue
        module_name, _, attribute = tensor_name.rpartition(".")
        if attribute != "weight" or not module_name:
            raise CheckpointError(f"{folder}: torchao quantized {tensor_name!r}; quantrt quantizes Linear weights only")
        linear = _linear(skeleton, module_name, f"{folder}'s torchao metadata")
        data_names = info.get("_tensor_data_names")
        if not isinstance(data_names, list):
            raise CheckpointError(f"{folder}: torchao metadata of {tensor_name!r} lists no _tensor_data_names")
        keys = {d: f"{module_name}._weight_{d}" for d in data_names}
        scheme, tensors, dtype = torchao_to_quantrt(module_name, info, {d: shards.read(key) for d, key in keys.items()},
                                                    linear.out_features, linear.in_features, torch_dtype)
        bias = shards.read(f"{module_name}.bias") if f"{module_name}.bias" in shards else None
        _install(skeleton, module_name, scheme, tensors, bias, dtype, device)
        schemes[module_name] = scheme
        consumed.update(keys.values())
        consumed.add(f"{module_name}.bias")
        release_freed_memory()
    expected = dict(skeleton.state_dict(keep_vars=True))
    for key in shards.keys():
        if key not in consumed:
            _set_plain(skeleton, expected, key, shards.read(key), device, torch_dtype, str(folder))
    _check_complete(skeleton, str(folder))
    return schemes


class _RowIds(torch.Tensor):
    """1-D int64 ids (source tensor << 32 | row) that a diffusers single-file conversion moves around as it
    would the weights (pop, rename, chunk, split, cat along dim 0): what it returns per diffusers key says
    which rows of which original tensors make that tensor.

    diffusers' Flux conversion splits the single blocks' fused linear1 with FLUX.1's widths hard-coded,
    torch.split(w, (3072, 3072, 3072, 12288)), so it converts FLUX.1-sized checkpoints only. For a narrower
    Flux the sizes are scaled to the tensor (the same 1:1:1:4 split of q, k, v and the MLP), which is the
    conversion with its inner_dim set to the model's; sizes that do not scale to whole rows stay an error."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.split, torch.Tensor.split) and len(args) > 1 and isinstance(args[1], (list, tuple)):
            tensor, sizes = args[0], list(args[1])
            total, wanted = tensor.shape[0], sum(sizes)
            if wanted and wanted != total and all(s * total % wanted == 0 for s in sizes):
                args = (tensor, [s * total // wanted for s in sizes], *args[2:])
        return super().__torch_function__(func, types, args, kwargs)


def single_file_plan(convert: Callable[[dict], dict], shapes: dict[str, tuple[int, ...]]
                     ) -> dict[str, list[tuple[str, int, int]]]:
    """{diffusers key: [(original key, first row, end row), ...]} for the original checkpoint whose tensor
    shapes are `shapes`, computed by running diffusers' conversion `convert` on row ids instead of weights.

    Why this way: diffusers' conversion functions take the whole state dict and return the whole converted
    one, so calling them on the weights holds the model in full precision twice. Run on row ids (8 bytes per
    row, about 50 MB for FLUX.1-dev), the same code yields the plan; the loader then reads each diffusers
    tensor's rows from the file when its turn comes and quantizes it at once, so only one full-precision
    tensor is in memory at a time, and the renames, q/k/v splits and scale/shift swaps are diffusers' own.
    A conversion that does anything but move whole rows (a transpose, a reshape, arithmetic) is refused."""
    names = list(shapes)
    ids = {}
    for index, name in enumerate(names):
        rows = shapes[name][0] if shapes[name] else 1
        ids[name] = (torch.arange(rows, dtype=torch.int64) + (index << 32)).as_subclass(_RowIds)
    try:
        converted = convert(ids)
    except Exception as e:
        raise CheckpointError(f"diffusers' {getattr(convert, '__name__', convert)} failed on this checkpoint's "
                              f"layout ({type(e).__name__}: {e}): the file is not a checkpoint of this model type, "
                              f"or its sizes are not ones the conversion knows") from e
    rows_of = torch.tensor([shapes[name][0] if shapes[name] else 1 for name in names])
    plan = {}
    for key, value in converted.items():
        moved = isinstance(value, torch.Tensor) and value.dtype == torch.int64 and value.dim() == 1 and len(value)
        if moved:
            value = value.as_subclass(torch.Tensor)
            source, row = value >> 32, value & 0xFFFFFFFF
            moved = 0 <= int(source.min()) and int(source.max()) < len(names) and bool((row < rows_of[source]).all())
        if not moved:
            raise CheckpointError(f"diffusers' conversion computes {key!r} by more than moving whole rows; quantrt's "
                                  f"streaming loader cannot follow it")
        breaks = ((source[1:] != source[:-1]) | (row[1:] != row[:-1] + 1)).nonzero().flatten() + 1
        starts = [0, *breaks.tolist()]
        ends = [*breaks.tolist(), len(value)]
        plan[key] = [(names[int(source[a])], int(row[a]), int(row[b - 1]) + 1) for a, b in zip(starts, ends)]
    return plan


def _planned_shape(plan: list[tuple[str, int, int]], shapes: dict[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    tails = {shapes[source][1:] for source, _, _ in plan}
    if len(tails) != 1:
        raise CheckpointError(f"diffusers' conversion builds {key!r} from tensors of different shapes {sorted(tails)}")
    first = shapes[plan[0][0]]
    if len(plan) == 1 and not first:
        return ()
    return (sum(stop - start for _, start, stop in plan), *tails.pop())


# diffusers single-file model types (infer_diffusers_model_type) -> the diffusers class that loads them
_SINGLE_FILE_CLASSES = {"flux-dev": "FluxTransformer2DModel", "flux-schnell": "FluxTransformer2DModel",
                        "flux-fill": "FluxTransformer2DModel", "flux-depth": "FluxTransformer2DModel"}


def _infer_model_type(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]) -> str | None:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    meta = {name: torch.empty(shape, dtype=dtypes[name], device="meta") for name, shape in shapes.items()}
    try:
        return infer_diffusers_model_type(meta)
    except Exception:  # a layout diffusers' detector trips on: no type
        return None


def _single_file_config(file: Path, config: dict | str | os.PathLike | None, model_type: str | None,
                        plan_for: Callable[[str], dict[str, tuple[int, ...]]]) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, diffusers config) for a single file: the caller's config (a dict, or a
    folder holding config.json, or that file), else the quantrt.models.FLUX_SIZES entry whose model has
    exactly the converted file's tensor shapes. `plan_for(class name)` gives {diffusers key: shape}."""
    from accelerate import init_empty_weights

    from .models import FLUX_SIZES

    guessed = _SINGLE_FILE_CLASSES.get(model_type or "")
    if config is not None:
        if not isinstance(config, dict):
            path = Path(config)
            config = read_json(inside(path, "config.json") if path.is_dir() else path)
            if not isinstance(config, dict):
                raise CheckpointError(f"{path} holds no diffusers config (a JSON object)")
        config = {k: v for k, v in config.items() if k != "quantization_config"}
        class_name = config.get("_class_name") or guessed
        if class_name is None:
            raise CheckpointError(f"cannot tell which diffusers model {file} is (diffusers detects "
                                  f"{model_type or 'no known type'}): give config with its '_class_name'")
        return class_name, config
    hint = (f"{file} is a {model_type} checkpoint by diffusers' detection" if model_type
            else f"diffusers does not recognise the layout of {file}")
    if guessed != "FluxTransformer2DModel":
        raise CheckpointError(f"{hint}; without config= quantrt infers only Flux configs (from "
                              f"quantrt.models.FLUX_SIZES) and the model hub is not reachable: pass config= (a dict, "
                              f"or the model's diffusers config folder)")
    from diffusers import FluxTransformer2DModel

    shapes = plan_for(guessed)
    for sizes_config in FLUX_SIZES.values():
        with init_empty_weights():
            candidate = FluxTransformer2DModel(**sizes_config)
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
            return guessed, {"_class_name": guessed, **dict(candidate.config)}
    raise CheckpointError(f"{hint}, but its tensor shapes match none of quantrt.models.FLUX_SIZES "
                          f"({', '.join(FLUX_SIZES)}), and the model hub, where diffusers would fetch the config, is "
                          f"not reachable: pass config= (a dict, or the folder of the model's diffusers config.json, "
                          f"e.g. FLUX.1-schnell/transformer)")


def quantize_single_file(file: str | os.PathLike, quant_config: QuantConfig,
                         config: dict | str | os.PathLike | None, device: torch.device,
                         torch_dtype: torch.dtype | None, progress: bool | None = None
                         ) -> tuple[nn.Module, dict[str, str]]:
    """Build the diffusers model of a single-file checkpoint in its original layout on the meta device and
    fill it tensor by tensor in diffusers' layout (`single_file_plan`), quantizing each planned Linear weight
    as it is read, so the full-precision model is never whole in memory. Returns (model, {kept: why})."""
    from accelerate.utils import set_module_tensor_to_device
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
    from tqdm.auto import tqdm

    from .modules import init_act_scale

    file = Path(file)
    if not file.exists():
        raise CheckpointError(f"{file} does not exist: from_single_file loads a local .safetensors file; quantrt never "
                              f"downloads")
    if not file.is_file() or file.suffix != ".safetensors":
        raise CheckpointError(f"{file} is not a .safetensors file; quantrt never loads .ckpt/.pt/.bin pickles")
    reader = SafetensorsReader(file)
    shapes = {name: reader.shape(name) for name in reader.keys()}
    model_type = _infer_model_type(shapes, {name: reader.dtype(name) for name in shapes})
    plans: dict[str, dict[str, list[tuple[str, int, int]]]] = {}

    def plan_for(class_name: str) -> dict[str, list[tuple[str, int, int]]]:
        if class_name not in SINGLE_FILE_LOADABLE_CLASSES:
            raise CheckpointError(f"diffusers has no single-file conversion for {class_name} (it has one for "
                                  f"{', '.join(SINGLE_FILE_LOADABLE_CLASSES)})")
        if class_name not in plans:
            plans[class_name] = single_file_plan(SINGLE_FILE_LOADABLE_CLASSES[class_name]["checkpoint_mapping_fn"],
                                                 shapes)
        return plans[class_name]

    class_name, model_config = _single_file_config(
        file, config, model_type,
        lambda name: {key: _planned_shape(p, shapes, key) for key, p in plan_for(name).items()})
    plan = plan_for(class_name)
    skeleton = build_skeleton({"library": "diffusers", "class": class_name, "config": model_config}, None)
    expected = {key: tuple(t.shape) for key, t in skeleton.state_dict(keep_vars=True).items()}
    planned, kept = plan_layers(skeleton, quant_config, torch_dtype)
    linear_weights = set(planned) | {f"{name}.weight" for name in kept}
    unknown = sorted(set(plan) - set(expected))
    if unknown:
        raise CheckpointError(f"the conversion of {file} gives tensors that {class_name} with this config does not "
                              f"have, e.g. {unknown[:3]}: the config does not match the file")
    bar = tqdm(plan.items(), desc="quantizing while loading", unit="tensor",
               disable=(not progress) if progress is not None else None)
    for key, segments in bar:
        shape = _planned_shape(segments, shapes, key)
        if shape != expected[key]:
            raise CheckpointError(f"{key!r} converted from {file.name} has shape {list(shape)}, {class_name} with this "
                                  f"config expects {list(expected[key])}: the config does not match the file")
        parts = [reader.read(source) if (start, stop) == (0, shapes[source][0] if shapes[source] else 1)
                 else reader.read(source, (start, stop)) for source, start, stop in segments]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        del parts
        tensor = upcast_weight(key, tensor, file.name, torch_dtype, key in linear_weights)
        if key in planned:
            layer = planned.pop(key)
            layer.set_weight(tensor.to(device))
            init_act_scale(layer, quant_config.activation_scale, device)
        else:
            set_module_tensor_to_device(skeleton, key, device, value=tensor, dtype=tensor.dtype)
        del tensor
        release_freed_memory()
    _check_complete(skeleton, str(file))
    return skeleton.to(device), kept
