"""torchao (0.16+ safetensors, torchao.prototype.safetensors) checkpoints in quantrt's formats:
`flatten_tensor_state_dict(model.state_dict())` saved with its metadata, which is what diffusers' /
transformers' `save_pretrained` of a TorchAoConfig model writes. Every shard's header metadata holds
"tensor_names" and, per tensor, {"_type", "_data", "_tensor_data_names"}; a quantized `<module>.weight` is
stored as `<module>._weight_<data name>`. Read as JSON: no torchao object is rebuilt, and torchao need not be
installed.

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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..kernels.packing import pack_uintx
from ..schemes import Scheme, resolve_scheme
from ..serialization import CheckpointError
from .common import (check_complete, check_packable, install_from_shards, linear_layer, scheme_for_layer,
                     set_plain_tensor)
from .reader import ShardedReader


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
        scheme = scheme_for_layer("int8wo", group_size, name, f"torchao grouped its int8 weight by {group_size}")
        return scheme, {"qweight": qdata, "scale": scale}, dtype
    # signed codes in [-2**(bits-1), 2**(bits-1)) and zero points shifted alike become quantrt's unsigned ones
    offset = 2 ** (bits - 1)
    codes = qdata.to(torch.int16) + offset
    if codes.min() < 0 or codes.max() >= 2**bits:
        raise CheckpointError(f"layer {name!r}: torchao int{bits} codes outside [-{offset}, {offset - 1}]")
    scheme = scheme_for_layer("int4wo" if bits == 4 else f"uint{bits}wo", group_size or k, name,
                              f"torchao stored its int{bits} weight in groups of {group_size or k}")
    check_packable(scheme, n, k, name)
    return scheme, {"qweight": pack_uintx(codes, bits), "scale": scale,
                    "zero": (zero.double() + offset).to(dtype)}, dtype


def load_torchao_layers(folder: Path, shards: ShardedReader, skeleton: nn.Module, device: torch.device,
                        torch_dtype: torch.dtype | None) -> dict[str, Scheme]:
    """Put every quantized weight of the torchao checkpoint `folder` (its tensors and metadata in `shards`)
    into the unquantized skeleton as a QuantizedLinear, and its other tensors as they are: {layer: its scheme}."""
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
        linear = linear_layer(skeleton, module_name, f"{folder}'s torchao metadata")
        data_names = info.get("_tensor_data_names")
        if not isinstance(data_names, list):
            raise CheckpointError(f"{folder}: torchao metadata of {tensor_name!r} lists no _tensor_data_names")
        keys = {d: f"{module_name}._weight_{d}" for d in data_names}
        scheme, tensors, dtype = torchao_to_quantrt(module_name, info, {d: shards.read(key) for d, key in keys.items()},
                                                    linear.out_features, linear.in_features, torch_dtype)
        install_from_shards(skeleton, shards, module_name, scheme, tensors, dtype, device, keys.values(), consumed)
        schemes[module_name] = scheme
    expected = dict(skeleton.state_dict(keep_vars=True))
    for key in shards.keys():
        if key not in consumed:
            set_plain_tensor(skeleton, expected, key, shards.read(key), device, torch_dtype, str(folder))
    check_complete(skeleton, str(folder))
    return schemes
