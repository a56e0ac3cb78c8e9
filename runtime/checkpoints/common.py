"""What the checkpoint loaders of this package share: the files of a diffusers / transformers model folder,
the meta-device model skeleton built from it, and the steps that put converted or plain tensors into that
skeleton and check that it is complete."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from ..config import QuantConfig
from ..modules import install_skeleton
from ..schemes import Scheme, resolve_scheme
from ..serialization import (CONFIG_NAME, CheckpointError, build_skeleton, indexed_shard, inside, json_kind,
                             read_index, read_json)
from .reader import ShardedReader, release_freed_memory


def unquantized_weights(folder: Path, required: bool = True) -> tuple[dict[str, Path], dict[str, str] | None]:
    """The safetensors files of a diffusers or transformers model folder, {file name: real path} in index
    order, and the index's weight_map (None for a single file). Every file is `inside` the folder. A folder
    with none of those files is an error, or ({}, None) if not `required`."""
    for stem in ("diffusion_pytorch_model", "model"):
        index = inside(folder, f"{stem}.safetensors.index.json")
        if index.is_file():
            weight_map = read_index(index)
            first_tensor = {file: tensor for tensor, file in reversed(weight_map.items())}  # for errors
            files = {file: indexed_shard(folder, index, first_tensor[file], file)
                     for file in dict.fromkeys(weight_map.values())}
            return files, weight_map
        single = inside(folder, f"{stem}.safetensors")
        if single.is_file():
            return {f"{stem}.safetensors": single}, None
    if not required:
        return {}, None
    raise CheckpointError(f"{folder} has no safetensors weights (diffusion_pytorch_model.safetensors or "
                          f"model.safetensors, or their index); quantrt never loads .bin/.pt pickles")


def unquantized_identity(folder: Path) -> dict[str, Any]:
    """library/class/config of a diffusers or transformers model folder, from its config.json."""
    file = inside(folder, "config.json")
    if not file.is_file():
        raise CheckpointError(f"{folder} has neither {CONFIG_NAME} (a quantrt folder) nor config.json "
                              f"(a diffusers/transformers model folder)")
    config = read_json(file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} holds a JSON {json_kind(config)}, not the model's config object")
    if "_class_name" in config:
        name = config["_class_name"]
        library = "diffusers"
    elif config.get("architectures"):
        architectures = config["architectures"]
        name = architectures[0] if isinstance(architectures, list) else architectures
        library = "transformers"
    else:
        raise CheckpointError(f"{file} names no model class (_class_name or architectures)")
    if not isinstance(name, str):
        field = "_class_name" if library == "diffusers" else "architectures"
        raise CheckpointError(f"{file}: {field} is {name!r}, not a class name; the file is damaged")
    return {"library": library, "class": name, "config": config}


def read_folder_json(folder: Path, name: str) -> Any:
    """The JSON file `name` of `folder` (`inside` it)."""
    return read_json(inside(folder, name))


def folder_quantization_config(folder: Path) -> dict[str, Any] | None:
    """The quantization_config object of the folder's config.json (what diffusers / transformers record of a
    quantized model), or None."""
    if not (folder / "config.json").is_file():
        return None
    config = read_folder_json(folder, "config.json")
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return quantization if isinstance(quantization, dict) else None


def folder_skeleton(folder: Path, model: nn.Module | Callable[[], nn.Module] | None) -> nn.Module:
    """The unquantized meta-device model of a quantized folder: `model` if given, else the diffusers /
    transformers class its config.json names."""
    if model is not None:
        return build_skeleton({}, model)
    identity = unquantized_identity(folder)
    # the skeleton is built unquantized; the quantization_config would ask diffusers/transformers to quantize
    identity["config"] = {k: v for k, v in identity["config"].items() if k != "quantization_config"}
    return build_skeleton(identity, None, source=str(folder / "config.json"))


def _group_argument(scheme: Scheme) -> int | None:
    """The group_size that makes QuantConfig(scheme.name, group_size=...) this scheme (-1: int8 per channel)."""
    if scheme.group_size is None and scheme.storage.takes_group_size:
        return -1
    return scheme.group_size


def loaded_quant_config(schemes: dict[str, Scheme], kept: dict[str, str], backend: str | None) -> QuantConfig:
    """A QuantConfig that says what was loaded: the most common scheme, exact-name overrides for layers
    with another scheme (or group size), and None overrides for the Linear layers kept in full precision."""
    backend = backend or "auto"
    main = Counter(schemes.values()).most_common(1)[0][0]
    modules: dict[str, QuantConfig | None] = {
        name: QuantConfig(s.name, group_size=_group_argument(s), backend=backend)
        for name, s in schemes.items() if s != main}
    modules.update(dict.fromkeys(kept))
    return QuantConfig(main.name, group_size=_group_argument(main), modules=modules, backend=backend)


def linear_layer(skeleton: nn.Module, name: str, what: str) -> nn.Linear:
    """The nn.Linear `name` of the skeleton, which `what` (the checkpoint, for errors) quantizes."""
    try:
        module = skeleton.get_submodule(name)
    except AttributeError as e:
        raise CheckpointError(f"{what} quantizes layer {name!r}, which the model does not have (another model, "
                              f"or a config.json that does not match the weights)") from e
    if type(module) is not nn.Linear:
        raise CheckpointError(f"{what} quantizes layer {name!r}, a {type(module).__name__}: quantrt quantizes "
                              f"nn.Linear layers only")
    return module


def install_layer(skeleton: nn.Module, name: str, scheme: Scheme, tensors: dict[str, torch.Tensor],
                  bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
    """Replace the Linear `name` by a QuantizedLinear holding `tensors` (quantrt's stored tensors)."""
    linear = skeleton.get_submodule(name)
    n, k = linear.out_features, linear.in_features
    if bias is not None and tuple(bias.shape) != (n,):
        raise CheckpointError(f"layer {name!r}: bias of shape {list(bias.shape)} for a {n}x{k} Linear")
    layer = install_skeleton(skeleton, name, scheme, dtype, bias is not None)
    for key, (shape, tensor_dtype) in scheme.tensor_specs(n, k, dtype).items():
        value = tensors[key]
        if tuple(value.shape) != tuple(shape) or value.dtype != tensor_dtype:
            raise CheckpointError(f"layer {name!r}: converted {key} is {value.dtype} {list(value.shape)}, "
                                  f"{scheme.name} stores {tensor_dtype} {list(shape)} (a bug in the conversion)")
        setattr(layer, key, value.to(device))
    if bias is not None:
        layer.bias = bias.to(device=device, dtype=dtype)


def install_from_shards(skeleton: nn.Module, shards: ShardedReader, name: str, scheme: Scheme,
                        tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                        read: Iterable[str], consumed: set[str]) -> None:
    """`install_layer` with the layer's bias from `shards`; the keys `read` for it (and the bias) join `consumed`,
    and the pages of the read tensors go back to the OS."""
    bias = shards.read(f"{name}.bias") if f"{name}.bias" in shards else None
    install_layer(skeleton, name, scheme, tensors, bias, dtype, device)
    consumed.update(read)
    consumed.add(f"{name}.bias")
    release_freed_memory()


def set_plain_tensor(skeleton: nn.Module, expected: dict[str, torch.Tensor], name: str, tensor: torch.Tensor,
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


def check_complete(skeleton: nn.Module, source: str) -> None:
    """Every tensor of the model has a value (none is left on the meta device), or an error naming a few."""
    missing = [n for n, t in skeleton.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{source} has no value for {len(missing)} tensors of the model, e.g. {missing[:3]}: "
                              f"it was saved from a different model or is incomplete")


def scheme_for_layer(name: str, group_size: int | None, layer: str, why: str) -> Scheme:
    """resolve_scheme, with a refusal that names the layer where quantrt cannot store the group size."""
    try:
        return resolve_scheme(name, -1 if group_size is None else group_size)
    except ValueError as e:
        raise CheckpointError(f"layer {layer!r}: {why}, which quantrt cannot store: {e}") from e


def check_packable(scheme: Scheme, n: int, k: int, layer: str) -> None:
    """An [n, k] weight can be stored as `scheme`, or an error naming the layer and the reason."""
    reason = scheme.unsupported_reason(n, k)
    if reason:
        raise CheckpointError(f"layer {layer!r}: its {n}x{k} weight cannot be stored as {scheme.name}: {reason}")
