"""Quantize-on-load: an unquantized diffusers / transformers model folder (or any model's safetensors, with its
skeleton passed in) read tensor by tensor and quantized as each Linear weight arrives, so the full-precision
model is never whole in memory (`QuantizedTransformer.from_pretrained(folder, quantization=...)`,
`quantrt quantize`). `plan_layers` and `upcast_weight` serve the single-file loader too."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..config import QuantConfig
from ..modules import QuantizedLinear, init_act_scale, install_skeleton
from ..serialization import CheckpointError, build_skeleton, dtype_name
from .common import unquantized_identity, unquantized_weights
from .reader import SafetensorsReader, release_freed_memory


def upcast_weight(name: str, tensor: torch.Tensor, source: str, torch_dtype: torch.dtype | None,
                  linear_weight: bool) -> torch.Tensor:
    """A stored tensor as quantize-on-load puts it into the model: fp8 (common for FLUX checkpoints) upcast to
    `torch_dtype`, else bfloat16, since nothing computes in fp8 here; other floating tensors cast to
    `torch_dtype` if given. A Linear weight that is not floating (int, bool: an already quantized or foreign
    checkpoint) is refused naming the tensor."""
    if tensor.is_floating_point() and tensor.element_size() == 1:
        return tensor.to(torch_dtype or torch.bfloat16)
    if linear_weight and not tensor.is_floating_point():
        raise CheckpointError(f"tensor {name!r} in {source} is {dtype_name(tensor.dtype)}, but it is the weight of a "
                              f"Linear layer, which quantize-on-load needs floating (float32, float16, bfloat16, or "
                              f"fp8, upcast): the checkpoint is already quantized (load it without quantization=) or "
                              f"it is not this model's")
    if torch_dtype is not None and tensor.is_floating_point():
        return tensor.to(torch_dtype)
    return tensor


def plan_layers(skeleton: nn.Module, config: QuantConfig, torch_dtype: torch.dtype | None
                ) -> tuple[dict[str, QuantizedLinear], dict[str, str]]:
    """Swap the Linear layers of a (meta-device) skeleton that `config` quantizes for meta-device
    QuantizedLinear skeletons, to be filled by set_weight as the weights stream in:
    ({"<layer>.weight": layer}, {kept layer: why})."""
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
        planned[f"{name}.weight"] = install_skeleton(skeleton, name, plan.scheme, torch_dtype)
    return planned, kept


def quantize_folder(folder: str | os.PathLike, config: QuantConfig, device: torch.device,
                    torch_dtype: torch.dtype | None, model: nn.Module | Callable[[], nn.Module] | None = None,
                    progress: bool | None = None) -> tuple[nn.Module, dict[str, str]]:
    """Build the model of an unquantized model folder on the meta device and fill it tensor by tensor,
    quantizing each planned Linear weight as it arrives, so the full-precision model is never whole in
    memory. Every tensor is read from the one shard that holds it (and that the index names): a tensor in two
    shards, or where the index does not say, is an error naming it. Returns (model, {kept layer: why})."""
    from accelerate.utils import set_module_tensor_to_device
    from tqdm.auto import tqdm

    folder = Path(folder)
    # a caller-given skeleton needs no config.json (plain nn.Module folders have none)
    skeleton = build_skeleton(unquantized_identity(folder) if model is None else {}, model,
                              source=str(folder / "config.json"))
    planned, kept = plan_layers(skeleton, config, torch_dtype)
    linear_weights = set(planned) | {f"{name}.weight" for name in kept}
    expected = dict(skeleton.state_dict(keep_vars=True))
    loaded = set()
    files, weight_map = unquantized_weights(folder)
    # headers only: which shard holds what, checked before a byte of data is read
    readers = [SafetensorsReader(path, label=folder / name) for name, path in files.items()]
    _check_one_shard_each(readers, list(files), weight_map, folder)
    for name_in_folder, f in tqdm(list(zip(files, readers)), desc="quantizing while loading", unit="shard",
                                  disable=(not progress) if progress is not None else None):
        # plain reads, not safe_open's memory map (whose touched pages stay resident until the whole shard
        # is closed), and freed pages handed back after each weight: peak RSS near the quantized size
        for name in f.keys():
            tensor = upcast_weight(name, f.read(name), name_in_folder, torch_dtype, name in linear_weights)
            if name in planned:
                layer = planned[name]
                layer.set_weight(tensor.to(device))
                loaded.update(f"{layer.name}.{key}" for key in layer.tensors())
                init_act_scale(layer, config.activation_scale, device)
                del tensor
                release_freed_memory()
                continue
            if name not in expected:
                raise CheckpointError(f"tensor {name!r} in {name_in_folder} has no place in {type(skeleton).__name__}")
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise CheckpointError(f"tensor {name!r} in {name_in_folder} has shape {list(tensor.shape)}, the model "
                                      f"expects {list(expected[name].shape)}")
            set_module_tensor_to_device(skeleton, name, device, value=tensor, dtype=tensor.dtype)
            loaded.add(name)
    missing = [n for n, t in skeleton.state_dict(keep_vars=True).items() if t.device.type == "meta" and n not in loaded]
    if missing:
        raise CheckpointError(f"{folder} has no value for {len(missing)} tensors of the model, e.g. {missing[:3]}")
    return skeleton.to(device), kept


def _check_one_shard_each(readers: list[SafetensorsReader], names: list[str], weight_map: dict[str, str] | None, folder: Path) -> None:
    """Every tensor is in exactly one shard, the one the index (if any) names for it."""
    holder: dict[str, str] = {}
    for file, reader in zip(names, readers):
        for tensor in reader.keys():
            if tensor in holder:
                named = f" (the index names {weight_map[tensor]})" if weight_map and tensor in weight_map else ""
                raise CheckpointError(f"tensor {tensor!r} is in both {holder[tensor]} and {file} in {folder}{named}: "
                                      f"which one the model should get is unclear; the folder is damaged or mixes two "
                                      f"saves: keep one copy")
            holder[tensor] = file
    if weight_map is None:
        return
    for tensor, file in holder.items():
        if weight_map.get(tensor) != file:
            raise CheckpointError(f"tensor {tensor!r} is in {file} in {folder}, but the index "
                                  f"{'names ' + weight_map[tensor] if tensor in weight_map else 'does not list it'}: "
                                  f"the index and the shards disagree; the folder is damaged")
    absent = sorted(set(weight_map) - set(holder))
    if absent:
        raise CheckpointError(f"the index of {folder} maps {absent[0]!r} to {weight_map[absent[0]]}, which does not "
                              f"hold it ({len(absent)} such tensors): the folder is incomplete")
