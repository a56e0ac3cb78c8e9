"""optimum-quanto (0.2.x) checkpoints in quantrt's formats. What `quantize(model, weights=...)`, `freeze(model)`,
`save_file(model.state_dict())` write, with `quantization_map(model)` as quantization_map.json (or
quanto_qmap.json, optimum.quanto's QuantizedDiffusersModel / QuantizedTransformersModel), or a diffusers folder
saved with `QuantoConfig(weights_dtype=...)` (config.json: quantization_config.quant_method "quanto"). Per layer:

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
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..formats import QUANTO_QTYPES
from ..kernels.packing import pack_uintx
from ..schemes import QUANTO_WEIGHTS, Scheme, resolve_scheme
from ..serialization import CheckpointError
from .common import (check_complete, check_packable, folder_quantization_config, install_from_shards, linear_layer,
                     read_folder_json, scheme_for_layer, set_plain_tensor)
from .reader import ShardedReader

QUANTO_MAP_FILES = ("quantization_map.json", "quanto_qmap.json")


# diffusers' QuantoConfig.weights_dtype (its _replace_with_quanto_layers) -> quanto qtype; quantrt's one table of quanto
# names is quantrt.formats.QUANTO_QTYPES (qtype -> storage format; schemes.QUANTO_WEIGHTS gives the scheme)
DIFFUSERS_QUANTO_WEIGHTS = {qtype[1:]: QUANTO_QTYPES[qtype].quanto_qtype
                            for qtype in ("qint8", "qint4", "qint2", "qfloat8")}


def _quanto_qtypes(folder: Path, shards: ShardedReader) -> dict[str, str]:
    """{layer name: quanto qtype name} of the quantized layers, from the quantization map or from diffusers'
    QuantoConfig (every layer whose weight was saved as a quanto tensor)."""
    for file_name in QUANTO_MAP_FILES:
        file = folder / file_name
        if not file.is_file():
            continue
        qmap = read_folder_json(folder, file_name)
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
    quantization = folder_quantization_config(folder) or {}
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
    stored = QUANTO_QTYPES[qtype]
    stored_scheme = QUANTO_WEIGHTS[qtype].name
    scale = parts.get("_scale")
    if scale is None:
        raise CheckpointError(f"layer {name!r}: its quanto weight has no _scale")
    dtype = dtype or scale.dtype
    if stored.bits == 8:
        data = parts.get("_data")
        want = stored.code_dtype
        if data is None or data.dtype != want or tuple(data.shape) != (n, k):
            found = None if data is None else (data.dtype, list(data.shape))
            raise CheckpointError(f"layer {name!r}: a {qtype} weight of a {n}x{k} Linear needs _data {want} "
                                  f"[{n}, {k}], has {found}")
        if scale.numel() not in (1, n):
            raise CheckpointError(f"layer {name!r}: quanto scale of shape {list(scale.shape)} is neither per "
                                  f"tensor nor per output channel of a {n}x{k} weight")
        # one scale per output channel; a per-tensor scale (quanto's choice for a single row) repeated per row
        scale = scale.reshape(-1, 1).expand(n, 1).to(dtype).contiguous()
        integer = want == torch.int8
        scheme = resolve_scheme(stored_scheme, -1 if integer else None)  # int8wo per channel
        qweight = data if integer else data.view(torch.uint8)
        return scheme, {"qweight": qweight, "scale": scale}, dtype
    bits = stored.bits
    packed, shift = parts.get("_data._data"), parts.get("_shift")
    if packed is None or shift is None or packed.dtype != stored.code_dtype or packed.dim() != 2:
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
    scheme = scheme_for_layer(stored_scheme, group_size, name,
                              f"quanto stored its {qtype} weight in groups of {group_size} (K={k})")
    check_packable(scheme, n, k, name)
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


def load_quanto_layers(folder: Path, shards: ShardedReader, skeleton: nn.Module, device: torch.device,
                       torch_dtype: torch.dtype | None) -> dict[str, Scheme]:
    """Put every quantized layer of the quanto checkpoint `folder` (its tensors in `shards`) into the
    unquantized skeleton as a QuantizedLinear, and its other tensors as they are: {layer: its scheme}."""
    qtypes = _quanto_qtypes(folder, shards)
    quanto_tensors: dict[str, dict[str, str]] = {}  # layer -> {"_data" / "_scale" / ...: state-dict key}
    for key in shards.keys():
        layer, separator, part = key.rpartition(".weight.")
        if separator:
            quanto_tensors.setdefault(layer, {})[part] = key
    schemes, consumed = {}, set()
    for name, qtype in qtypes.items():
        linear = linear_layer(skeleton, name, f"{folder}'s quanto quantization")
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
        install_from_shards(skeleton, shards, name, scheme, tensors, dtype, device, parts.values(), consumed)
        schemes[name] = scheme
    expected = dict(skeleton.state_dict(keep_vars=True))
    for key in shards.keys():
        if key in consumed:
            continue
        module_name, _, leaf = key.rpartition(".")
        if leaf in ("input_scale", "output_scale") and key not in expected:
            continue  # quanto's activation scales of a weight-only layer: ones, never used
        if ".weight._" in key:
            raise CheckpointError(f"{key!r} is a quanto tensor of a layer the quantization map does not list")
        set_plain_tensor(skeleton, expected, key, shards.read(key), device, torch_dtype, str(folder))
    check_complete(skeleton, str(folder))
    return schemes
