"""Bring-your-own configs: torchao config objects, diffusers `TorchAoConfig` / `QuantoConfig` /
`PipelineQuantizationConfig` (and transformers' `QuantoConfig`) mapped onto `QuantConfig`.

    to_quant_config(Int4WeightOnlyConfig(group_size=64))          # == QuantConfig("int4wo", group_size=64)
    to_quant_config(TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["proj_out"]))
    to_quant_config(QuantoConfig(weights_dtype="int4"))           # == QuantConfig(weights_dtype="int4")
    pipeline_quant_mapping(pipe, PipelineQuantizationConfig(quant_backend="quanto",
                           quant_kwargs={"weights_dtype": "int8"}, components_to_quantize=["transformer"]))

torchao configs are read by class name and field name, so this module never imports torchao or diffusers,
and the spellings of torchao 0.14 .. 0.18 map whichever torchao is installed (group_size or granularity=
PerGroup, weight_dtype or dtype, scale or act_quant_scale): also the serialized form
(`torchao.core.config.config_to_dict`, what diffusers writes as `quant_type: {"default": ...}`), and classes
the installed torchao may no longer have (FPXWeightOnlyConfig, removed in 0.16; UIntXWeightOnlyConfig and
Int8DynamicActivationInt4WeightConfig, removed in 0.17). Whether a backend can then serve the scheme with
the installed torchao is the backends' question (quantrt.backends.torchao names the version needed).

What is mapped is the storage format (bits, grouping, activations). How scales are chosen is quantrt's own
(torchao's HQQ search is mapped with a warning that quantrt does not reproduce it), and packing and kernel
options (layouts, packing formats, kernel preferences, set_inductor_config) are the backends' business. An
option that changes the format in a way quantrt has no scheme for is refused with the reason and what to
use instead. diffusers' "quanto" PipelineQuantizationConfig(quant_backend=...) form needs transformers
installed to be built at all (diffusers checks the two libraries' config signatures); quant_mapping works
without it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .config import QuantConfig, QuantMethod
from .schemes import FP8_WEIGHT_DTYPES, PARAMETRIZED, Scheme

# torchao config classes that quantrt maps (any torchao version that had them)
TORCHAO_CONFIGS = (
    "Int8WeightOnlyConfig", "Int4WeightOnlyConfig", "IntxWeightOnlyConfig", "UIntXWeightOnlyConfig",
    "FPXWeightOnlyConfig", "Float8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig",
    "Int8DynamicActivationInt4WeightConfig", "Int8DynamicActivationIntxWeightConfig",
    "Float8DynamicActivationFloat8WeightConfig", "Float8StaticActivationFloat8WeightConfig",
    "FqnToConfig", "ModuleFqnToConfig", "AOPerModuleConfig",
)
# keyword arguments of diffusers' old string TorchAoConfig (before 0.38) that choose packing or kernels only
_PACKING_KWARGS = {"set_inductor_config", "layout", "version", "packing_format", "int4_packing_format",
                   "intx_packing_format", "kernel_preference", "mm_config", "int4_tile_packed_ntile",
                   "zero_point_domain", "preserve_zero"}


class _Serialized:
    """A torchao object in its `config_to_dict` form ({"_type": name, "_data": fields}), read like the object."""

    def __init__(self, data: Mapping[str, Any]):
        self.type_name = data["_type"]
        self.version = data.get("_version")
        fields = data.get("_data")
        self.fields = {k: _revive(v) for k, v in fields.items()} if isinstance(fields, Mapping) else {}

    def __getattr__(self, name: str):
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"{self.type_name}({self.fields})"


def _revive(value: Any) -> Any:
    if isinstance(value, Mapping) and "_type" in value:
        if value["_type"] == "torch.dtype":
            return getattr(torch, str(value["_data"]).replace("torch.", ""), value["_data"])
        if not isinstance(value.get("_data"), Mapping):  # an enum: keep its member name
            return str(value.get("_data"))
        return _Serialized(value)
    if isinstance(value, (list, tuple)):
        return [_revive(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _revive(v) for k, v in value.items()}
    return value


def _kind(obj: Any) -> str:
    return obj.type_name if isinstance(obj, _Serialized) else type(obj).__name__


def _option(value: Any) -> str:
    """An enum member, its serialized name, or a string option -> lower-case name ('asymmetric', 'hqq')."""
    name = getattr(value, "name", None) if not isinstance(value, str) else value
    return str(name if name is not None else value).lower()


def _dtype_bits(dtype: Any) -> tuple[str, int] | None:
    """torch.int4 -> ('int', 4); torch.uint3 -> ('uint', 3); float8 and others -> None."""
    name = str(dtype).replace("torch.", "")
    for prefix in ("uint", "int"):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return prefix, int(name[len(prefix):])
    return None


def _granularity(value: Any, what: str) -> tuple[str, int | None]:
    """A torchao granularity -> ('channel', None), ('group', g) or ('tensor', None)."""
    if isinstance(value, (list, tuple)):
        kinds = {_granularity(v, what) for v in value}
        if len(kinds) != 1:
            raise ValueError(f"{what}: activation and weight granularities differ ({value}); quantrt's schemes "
                             f"use one granularity for both")
        return kinds.pop()
    if value is None:
        return "default", None
    kind = _kind(value)
    if kind == "PerGroup":
        # as given: QuantConfig checks it is a whole number (int() would truncate 64.5 to 64)
        return "group", value.group_size
    if kind in ("PerRow", "PerToken") or (kind == "PerAxis" and getattr(value, "axis", 0) == 0):
        return "channel", None
    if kind == "PerTensor":
        return "tensor", None
    raise ValueError(f"{what}: granularity={value!r} has no quantrt scheme; use PerRow() (one scale per output "
                     f"channel) or PerGroup(group_size)")


def _not_reproduced(kind: str, option: str, note: str) -> None:
    warnings.warn(f"{kind}: {option} is mapped onto quantrt's scheme, which {note}", UserWarning, stacklevel=4)


def _fp8_name(dtype: Any, kind: str, field_name: str) -> str:
    """The float8 dtype in field `field_name` of torchao's `kind` config -> 'e4m3' or 'e5m2'."""
    name = str(dtype).replace("torch.", "").strip().lower()
    if "fnuz" in name:
        raise ValueError(f"{kind}({field_name}={dtype!r}): {name} (the ROCm MI300 fp8 variant) has no quantrt "
                         f"scheme; use torch.float8_e4m3fn or torch.float8_e5m2")
    if name not in FP8_WEIGHT_DTYPES:
        raise ValueError(f"{kind}({field_name}={dtype!r}): {field_name} is not a float8 dtype; use "
                         f"torch.float8_e4m3fn or torch.float8_e5m2")
    return FP8_WEIGHT_DTYPES[name]


def _torchao_scheme(config: Any) -> tuple[str, int | None, dict[str, Any]]:
    """One torchao config (object or serialized) -> (scheme name, group_size, extra QuantConfig arguments)."""
    kind = _kind(config)
    field = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    if kind == "Int8WeightOnlyConfig":
        granularity, group = _granularity(field("granularity"), kind)
        if granularity == "tensor":
            raise ValueError(f"{kind}(granularity=PerTensor()) has no quantrt scheme: int8wo keeps one scale per "
                             f"output channel (PerRow) or per group (PerGroup)")
        return "int8wo", group if granularity == "group" else field("group_size"), {}
    if kind == "Int4WeightOnlyConfig":
        if field("use_hqq") or _option(field("int4_choose_qparams_algorithm", "")) == "hqq":
            _not_reproduced(kind, "the HQQ scale search", "chooses int4 scales and zero points by min/max")
        return "int4wo", field("group_size", 128), {}
    if kind in ("IntxWeightOnlyConfig", "UIntXWeightOnlyConfig"):
        dtype = field("weight_dtype", field("dtype"))
        bits = _dtype_bits(dtype)
        if bits is None or not 1 <= bits[1] <= 8:
            raise ValueError(f"{kind}(weight_dtype={dtype}) has no quantrt scheme; use torch.int1 .. torch.int8 "
                             f"or torch.uint1 .. torch.uint7")
        granularity = field("granularity")
        if granularity is None:  # UIntXWeightOnlyConfig and torchao < 0.14 take group_size
            granularity, group = ("group", field("group_size")) if field("group_size") else ("channel", None)
        else:
            granularity, group = _granularity(granularity, kind)
        if bits[1] == 8:
            if bits[0] == "uint" or granularity == "tensor":
                raise ValueError(f"{kind}({dtype}, {granularity}) has no quantrt scheme; int8wo is symmetric "
                                 f"int8 with per-channel or per-group scales")
            return "int8wo", group if granularity == "group" else None, {}
        if granularity != "group":
            raise ValueError(f"{kind}({dtype}) with {granularity} scales has no quantrt scheme: quantrt's "
                             f"{bits[1]}-bit weights are grouped; use granularity=PerGroup(group_size)")
        # quantrt's uintX is asymmetric with float zero points: it holds symmetric intX grids too
        return f"uint{bits[1]}wo", group, {}
    if kind == "FPXWeightOnlyConfig":
        # the long name checks that ebits and mbits are whole numbers (int() would truncate 3.7 to 3)
        return "fpx_weight_only", None, {"ebits": field("ebits"), "mbits": field("mbits")}
    if kind == "Float8WeightOnlyConfig":
        granularity, _ = _granularity(field("granularity"), kind)
        if granularity in ("tensor", "group"):
            raise ValueError(f"{kind} with {granularity} scales has no quantrt scheme: float8wo keeps one scale "
                             f"per output channel (PerRow)")
        return f"float8wo_{_fp8_name(field('weight_dtype', torch.float8_e4m3fn), kind, 'weight_dtype')}", None, {}
    if kind == "Int8DynamicActivationInt8WeightConfig":
        granularity, _ = _granularity(field("granularity"), kind)
        if granularity in ("tensor", "group"):
            raise ValueError(f"{kind} with {granularity} weight scales has no quantrt scheme: int8dq keeps one "
                             f"weight scale per output channel (PerRow)")
        return "int8dq", None, {}
    if kind == "Int8DynamicActivationInt4WeightConfig":
        return "int4dq", field("group_size", 32), {}
    if kind == "Int8DynamicActivationIntxWeightConfig":
        dtype = field("weight_dtype", torch.int8)
        bits = _dtype_bits(dtype)
        granularity, group = _granularity(field("weight_granularity"), kind)
        if bits == ("int", 8) and granularity in ("channel", "default"):
            return "int8dq", None, {}
        if bits == ("int", 4) and granularity == "group":
            return "int4dq", group, {}
        raise ValueError(f"{kind}(weight_dtype={dtype}, {granularity}) has no quantrt scheme; quantrt has int8 "
                         f"activations with torch.int4 PerGroup weights (int4dq) or torch.int8 PerRow weights (int8dq)")
    if kind == "Float8DynamicActivationFloat8WeightConfig":
        for name in ("activation_dtype", "weight_dtype"):
            if _fp8_name(field(name, torch.float8_e4m3fn), kind, name) != "e4m3":
                raise ValueError(f"{kind}({name}={field(name)}) has no quantrt scheme: float8dq is e4m3 for both "
                                 f"activations and weights")
        granularity, _ = _granularity(field("granularity"), kind)
        if granularity == "group":
            raise ValueError(f"{kind} with blockwise scales has no quantrt scheme; use PerTensor() or PerRow()")
        return "float8dq_e4m3_row" if granularity == "channel" else "float8dq_e4m3_tensor", None, {}
    if kind == "Float8StaticActivationFloat8WeightConfig":
        granularity, _ = _granularity(field("granularity"), kind)
        if granularity in ("channel", "group"):
            raise ValueError(f"{kind} with {granularity} weight scales has no quantrt scheme: "
                             f"float8_static_activation_float8_weight scales weights per tensor")
        scale = field("scale", field("act_quant_scale"))
        extra = {}
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            extra["activation_scale"] = float(scale)
        elif isinstance(scale, (int, float)):
            extra["activation_scale"] = float(scale)
        return "float8_static_activation_float8_weight", None, extra
    raise ValueError(f"torchao's {kind} has no quantrt scheme; quantrt maps {', '.join(TORCHAO_CONFIGS)}")


def _from_torchao(config: Any, backend: str, modules_to_not_convert: str | list[str] | None = None) -> QuantConfig:
    kind = _kind(config)
    if kind in ("FqnToConfig", "ModuleFqnToConfig", "AOPerModuleConfig"):
        return _from_fqn_to_config(config, backend, modules_to_not_convert)
    name, group_size, extra = _torchao_scheme(config)
    return QuantConfig(name, group_size=group_size, modules_to_not_convert=modules_to_not_convert,
                       backend=backend, **extra)


def _from_fqn_to_config(config: Any, backend: str, modules_to_not_convert: str | list[str] | None) -> QuantConfig:
    """torchao's FqnToConfig({fqn or "re:regex": config or None, "_default": config}) -> QuantConfig with
    per-module overrides. Without "_default", torchao leaves unnamed layers alone: so does the result."""
    table = getattr(config, "fqn_to_config", None) or getattr(config, "module_fqn_to_config", None) or {}
    default = table.get("_default")
    overrides: dict[str, QuantConfig | None] = {}
    for key, value in table.items():
        if key == "_default":
            continue
        # torchao also names parameters ("blocks.0.attn.to_q.weight"); quantrt quantizes modules' weights
        module = key[: -len(".weight")] if key.endswith(".weight") and not key.startswith("re:") else key
        overrides[module] = None if value is None else _from_torchao(value, backend)
    if default is None:
        if not any(v is not None for v in overrides.values()):
            raise ValueError(f"{_kind(config)} names no config to apply (no '_default' and every entry None)")
        overrides["re:.*"] = None  # regexes are tried in order and exact names first: this one comes last
        main = next(v for v in overrides.values() if v is not None)
        name, group_size = main.scheme, main.scheme.group_size
    else:
        main_config = _from_torchao(default, backend)
        name, group_size = main_config.scheme, main_config.scheme.group_size
    return QuantConfig(name, group_size=group_size, modules_to_not_convert=modules_to_not_convert,
                       modules=overrides, backend=backend)


def _from_shorthand(quant_type: str, kwargs: Mapping[str, Any], backend: str,
                    modules_to_not_convert: str | list[str] | None) -> QuantConfig:
    """diffusers' string TorchAoConfig (before diffusers 0.38): a shorthand plus torchao keyword arguments."""
    kwargs = dict(kwargs)
    group_size = kwargs.pop("group_size", None)
    variant = {k: kwargs.pop(k) for k in ("dtype", "bits", "ebits", "mbits", "weight_dtype", "granularity")
               if k in kwargs}
    for key in list(kwargs):
        if key in _PACKING_KWARGS:
            kwargs.pop(key)
        elif key == "use_hqq":
            if kwargs.pop(key):
                _not_reproduced(f"TorchAoConfig({quant_type!r})", "use_hqq=True",
                                "chooses scales and zero points by min/max")
    if kwargs:
        raise ValueError(f"TorchAoConfig({quant_type!r}): quantrt does not map the arguments {sorted(kwargs)}; it maps "
                         f"group_size and the variant arguments of {', '.join(PARAMETRIZED)}")
    if variant and quant_type.strip().lower() not in PARAMETRIZED:
        if set(variant) == {"weight_dtype"} and quant_type.strip().lower().startswith("float8wo"):
            quant_type = "float8_weight_only"  # float8wo with an explicit weight dtype
        else:
            raise ValueError(f"TorchAoConfig({quant_type!r}): {sorted(variant)} only apply to {', '.join(PARAMETRIZED)}")
    return QuantConfig(quant_type, group_size=group_size, modules_to_not_convert=modules_to_not_convert,
                       backend=backend, **variant)


def _quant_method(obj: Any) -> str | None:
    method = obj.get("quant_method") if isinstance(obj, Mapping) else getattr(obj, "quant_method", None)
    if method is None:
        return None
    return str(getattr(method, "value", method)).lower()


def _from_quant_method(obj: Any, method: str, backend: str) -> QuantConfig:
    """A diffusers / transformers quantization config (object or its to_dict form) -> QuantConfig."""
    get = (lambda k, d=None: obj.get(k, d)) if isinstance(obj, Mapping) else (lambda k, d=None: getattr(obj, k, d))
    # as given: QuantConfig takes a lone string as one name (list() would split it into characters)
    skip = get("modules_to_not_convert") or None
    if method == QuantMethod.QUANTRT.value:  # quantrt's own, in the form diffusers / transformers write it
        data = dict(obj) if isinstance(obj, Mapping) else obj.to_dict()
        if "scheme" not in data:
            raise ValueError(f"a quantrt quantization config names its scheme, e.g. {{'quant_method': 'quantrt', "
                             f"'scheme': 'int8wo'}}; got {sorted(data)}")
        return QuantConfig.from_dict(data)
    if method == "torchao":
        quant_type = get("quant_type")
        if isinstance(quant_type, Mapping) and "default" in quant_type and len(quant_type) == 1:
            quant_type = quant_type["default"]  # diffusers' to_dict: {"default": config_to_dict(config)}
        if isinstance(quant_type, Mapping) and "_type" in quant_type:
            quant_type = _Serialized(quant_type)
        if isinstance(quant_type, str):
            kwargs = get("quant_type_kwargs") or {}
            return _from_shorthand(quant_type, kwargs, backend, skip)
        if quant_type is None:
            raise ValueError("a torchao quantization config without quant_type cannot be mapped")
        return _from_torchao(quant_type, backend, skip)
    if method == "quanto":
        activations = get("activations")
        if activations not in (None, "none"):
            raise ValueError(f"quanto's activations={activations!r} (static, calibrated) has no quantrt mapping; "
                             f"quantrt maps quanto's weights only (int8dq / float8dq quantize activations dynamically)")
        weights = get("weights_dtype", get("weights"))
        if weights is None:
            raise ValueError("a quanto quantization config without weights_dtype cannot be mapped")
        return QuantConfig(weights_dtype=str(getattr(weights, "name", weights)), modules_to_not_convert=skip,
                           backend=backend)
    raise ValueError(f"quantrt maps its own, torchao and quanto quantization configs, not quant_method={method!r} "
                     f"(bitsandbytes, GGUF and modelopt formats are not quantrt schemes)")


def to_quant_config(obj: Any, *, backend: str = "auto") -> QuantConfig:
    """Any accepted config -> QuantConfig: a QuantConfig, a scheme name, a Scheme, a dict of QuantConfig
    arguments, a torchao config object (Int8WeightOnlyConfig(granularity=PerGroup(128)), FqnToConfig, ...) or its
    `config_to_dict` form, a diffusers TorchAoConfig / QuantoConfig or transformers QuantoConfig, or their
    `to_dict()` form ({"quant_method": "torchao", ...}). `backend` applies to what is mapped (not to a
    QuantConfig, which has its own)."""
    if isinstance(obj, QuantConfig):
        return obj
    if isinstance(obj, (str, Scheme)):
        return QuantConfig(obj, backend=backend)
    if getattr(obj, "quant_mapping", None) is not None or hasattr(obj, "components_to_quantize"):
        raise TypeError(f"a {type(obj).__name__} maps pipeline components to configs; pass it to "
                        f"quantrt.quantize_pipeline(pipeline, config) instead")
    method = _quant_method(obj)
    if method is not None:
        return _from_quant_method(obj, method, backend)
    if isinstance(obj, Mapping):
        if "_type" in obj:
            return _from_torchao(_Serialized(obj), backend)
        return QuantConfig(**{"backend": backend, **obj})
    if type(obj).__module__.split(".")[0] == "torchao" or type(obj).__name__ in TORCHAO_CONFIGS:
        return _from_torchao(obj, backend)
    raise TypeError(
        f"cannot use {type(obj).__name__} as a quantization config; pass a scheme name such as 'int8wo', a "
        f"QuantConfig, a dict of QuantConfig arguments, a torchao config (e.g. Int8WeightOnlyConfig()), or a "
        f"diffusers TorchAoConfig / QuantoConfig"
    )


def pipeline_components(pipeline: Any) -> dict[str, Any]:
    """A diffusers pipeline's components by name (`pipeline.components`), else its nn.Module attributes."""
    components = getattr(pipeline, "components", None)
    if isinstance(components, Mapping):
        return dict(components)
    return {k: v for k, v in vars(pipeline).items() if isinstance(v, nn.Module)}


def pipeline_quant_mapping(pipeline: Any, config: Any, *, backend: str = "auto") -> dict[str, QuantConfig]:
    """Component name -> QuantConfig, from a {component: config} dict or a diffusers
    PipelineQuantizationConfig (its quant_mapping, or quant_backend + quant_kwargs + components_to_quantize;
    no components_to_quantize means every nn.Module component, as in diffusers)."""
    if isinstance(config, Mapping):
        return {name: to_quant_config(value, backend=backend) for name, value in config.items()}
    mapping = getattr(config, "quant_mapping", None)
    if mapping is not None:
        return {name: to_quant_config(value, backend=backend) for name, value in mapping.items()}
    quant_backend = getattr(config, "quant_backend", None)
    if quant_backend is None:
        raise TypeError(f"expected a {{component: config}} dict or a PipelineQuantizationConfig, got "
                        f"{type(config).__name__}")
    quant_kwargs = dict(getattr(config, "quant_kwargs", None) or {})
    method = str(quant_backend).lower()
    component_config = to_quant_config({"quant_method": method, **quant_kwargs}, backend=backend)
    names = getattr(config, "components_to_quantize", None)
    if isinstance(names, str):
        names = [names]
    if not names:
        names = [name for name, value in pipeline_components(pipeline).items() if isinstance(value, nn.Module)]
    return {name: component_config for name in names}
