"""`QuantConfig`: which scheme each Linear layer gets, which layers stay in full precision, which backend."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping, Sequence

from .schemes import PARAMETRIZED, Scheme, resolve_scheme

# backends.ORDER with "auto" (config sits below backends, so it names them itself)
BACKENDS = ("auto", "triton", "aten", "torchao", "quanto", "reference")
_VARIANT_KWARGS = ("dtype", "bits", "ebits", "mbits", "weight_dtype", "granularity")
AUTOQUANT = "autoquant"
# what QuantConfig("autoquant") measures unless told: one scheme per width/activation kind (quantrt.autoquant)
AUTOQUANT_CANDIDATES = ("int8wo", "int8dq", "int4wo", "float8wo_e4m3", "fp6_e3m2")
AUTOQUANT_OBJECTIVES = ("speed", "memory")
AUTOQUANT_MAX_ERROR = 0.05


class QuantMethod(str, Enum):
    """The `quant_method` under which diffusers and transformers know a QuantConfig (quantrt.integrations
    registers it with their loaders): the libraries read `quant_method.value` and write it to config.json."""

    QUANTRT = "quantrt"

    def __str__(self) -> str:  # the libraries' messages format it with f"{quant_method}": "quantrt"
        return self.value


@dataclass(frozen=True)
class LayerPlan:
    """What the config says for one layer: its scheme, or None and why it stays in full precision."""

    scheme: Scheme | None
    reason: str = ""


class QuantConfig:
    """How to quantize a model.

    QuantConfig("int4wo", group_size=64)                    # a torchao/diffusers shorthand or long name
    QuantConfig(weights_dtype="int4")                       # quanto style
    QuantConfig("fpx_weight_only", ebits=3, mbits=2)        # torchao long name with its arguments
    QuantConfig("int8wo", modules_to_not_convert=["proj_out"],
                modules={"re:.*ff\\..*": "int4wo", "norm_out.linear": None}, backend="auto")

    modules_to_not_convert: a layer is skipped when its full name equals an entry or starts with
    entry + "." (torchao/diffusers), or when its own (child) name equals an entry (quanto).
    modules: per-module overrides, exact module name or "re:<regex>" (full match) -> scheme name,
    QuantConfig, or None (keep full precision). Exact names win over regexes; regexes are tried in order.
    backend: "auto" (triton, aten, torchao, quanto, reference: the first that can serve without keeping a copy
    of the weight), or one of them.
    activation_scale: the calibrated activation scale of float8_static_activation_float8_weight, if known
    (else run `quantrt.calibrate`).

    QuantConfig("autoquant", candidates=["int8wo", "int4wo"], max_error=0.05, objective="speed") chooses a
    scheme and backend per layer by measuring them on example inputs (`quantrt.autoquant`); candidates are
    scheme names, Schemes, QuantConfigs (for a group_size) or None (full precision competes too).

    After `import quantrt` it is also a `quantization_config=` of diffusers' and transformers' `from_pretrained`
    (quantrt.integrations), which find it by `quant_method`.
    """

    quant_method = QuantMethod.QUANTRT

    def __init__(
        self,
        scheme: str | Scheme | None = None,
        *,
        group_size: int | None = None,
        weights_dtype: str | None = None,
        modules_to_not_convert: str | list[str] | tuple[str, ...] | None = None,
        modules: Mapping[str, str | QuantConfig | None] | None = None,
        backend: str = "auto",
        activation_scale: float | None = None,
        candidates: Sequence[str | Scheme | QuantConfig | Mapping[str, Any] | None] | None = None,
        max_error: float | None = None,
        objective: str | None = None,
        **scheme_kwargs: Any,
    ):
        if scheme is not None and weights_dtype is not None:
            raise ValueError(f"give either a scheme ({scheme!r}) or quanto's weights_dtype ({weights_dtype!r}), not both")
        if scheme is None and weights_dtype is None:
            raise ValueError("QuantConfig needs a scheme, e.g. QuantConfig('int8wo'), or weights_dtype='int8'")
        unknown = set(scheme_kwargs) - set(_VARIANT_KWARGS)
        if unknown:
            raise TypeError(f"QuantConfig got unexpected keyword arguments {sorted(unknown)}; scheme variants "
                            f"take {', '.join(_VARIANT_KWARGS)}")
        if scheme_kwargs and not (isinstance(scheme, str) and scheme.strip().lower() in PARAMETRIZED):
            raise TypeError(f"{sorted(scheme_kwargs)} only apply to the long names {', '.join(PARAMETRIZED)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        is_autoquant = isinstance(scheme, str) and scheme.strip().lower() == AUTOQUANT
        if not is_autoquant and (candidates is not None or max_error is not None or objective is not None):
            raise TypeError(f"candidates, max_error and objective are options of QuantConfig('autoquant', ...), "
                            f"not of {scheme if scheme is not None else weights_dtype!r}")
        # autoquant: no single scheme; quantrt.autoquant measures and fills `modules` per layer
        self.scheme: Scheme | None = None
        self.candidates: tuple[Scheme | None, ...] = ()
        self.max_error: float | None = None
        self.objective: str | None = None
        self.autoquant_plan = None  # the AutoquantPlan that filled `modules`, once measured
        if is_autoquant:
            if group_size is not None:
                raise TypeError(f"QuantConfig('autoquant') takes no group_size ({group_size}); give it per "
                                f"candidate, e.g. candidates=[QuantConfig('int4wo', group_size={group_size})]")
            self.candidates = _autoquant_candidates(AUTOQUANT_CANDIDATES if candidates is None else candidates)
            self.max_error = _autoquant_max_error(AUTOQUANT_MAX_ERROR if max_error is None else max_error)
            self.objective = objective or "speed"
            if self.objective not in AUTOQUANT_OBJECTIVES:
                raise ValueError(f"autoquant objective {objective!r} is not one of {', '.join(AUTOQUANT_OBJECTIVES)}")
        else:
            self.scheme = resolve_scheme(scheme if scheme is not None else weights_dtype, group_size, **scheme_kwargs)
        self.requested = scheme if scheme is not None else weights_dtype
        self.group_size = group_size
        self.weights_dtype = weights_dtype
        self.modules_to_not_convert = _module_names(modules_to_not_convert)
        self.backend = backend
        self.activation_scale = _activation_scale(activation_scale)
        self.scheme_kwargs = dict(scheme_kwargs)
        self.modules: dict[str, QuantConfig | None] = {}
        if modules is not None and not isinstance(modules, Mapping):
            raise TypeError(f"modules maps module names to schemes, e.g. {{'proj_out': 'int8wo', 're:.*ff.*': "
                            f"'int4wo', 'norm_out.linear': None}}; got a {type(modules).__name__}: {modules!r}")
        for key, value in (modules or {}).items():
            if not isinstance(key, str):
                raise TypeError(f"modules keys are module names ('blocks.0.attn.to_q') or 're:<regex>' patterns, "
                                f"got the key {key!r} ({type(key).__name__}); write it as a string")
            if not key.strip():
                raise ValueError(f"modules has an empty key, which names no layer; write the module's name "
                                 f"('blocks.0.attn.to_q') or a 're:<regex>' pattern")
            if value is None or isinstance(value, QuantConfig):
                self.modules[key] = value
            elif isinstance(value, (str, Scheme)):
                try:
                    self.modules[key] = QuantConfig(value, backend=backend)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"modules[{key!r}]: {e}") from e
            else:
                raise TypeError(f"modules[{key!r}] must be a scheme name such as 'int4wo', a QuantConfig (e.g. "
                                f"QuantConfig('int4wo', group_size=64)) or None (keep full precision), got "
                                f"{type(value).__name__} {value!r}")
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as e:
                    raise ValueError(f"modules override {key!r} is not a valid regex: {e}") from e
        self._regexes = [(re.compile(k[3:]), v) for k, v in self.modules.items() if k.startswith("re:")]

    def skipped(self, name: str) -> str | None:
        """The modules_to_not_convert entry that excludes module `name`, if any."""
        child = name.rsplit(".", 1)[-1]
        for entry in self.modules_to_not_convert:
            if name == entry or name.startswith(entry + ".") or child == entry:
                return entry
        return None

    def override(self, name: str) -> tuple[bool, QuantConfig | None]:
        """(matched, config) of the per-module override for `name`."""
        if name in self.modules:
            return True, self.modules[name]
        for pattern, value in self._regexes:
            if pattern.fullmatch(name):
                return True, value
        return False, None

    def plan(self, name: str) -> LayerPlan:
        """The scheme for the Linear layer `name`, or None with the reason."""
        entry = self.skipped(name)
        if entry is not None:
            return LayerPlan(None, f"modules_to_not_convert: {entry!r}")
        matched, value = self.override(name)
        if matched:
            return LayerPlan(None, "override: keep full precision") if value is None else LayerPlan(value.scheme)
        if self.scheme is None:
            if self.autoquant_plan is None:
                raise ValueError(f"layer {name!r}: QuantConfig('autoquant') chooses each layer's scheme by measuring "
                                 f"it on example inputs; use quantrt.autoquant(model, example_inputs, ...) or "
                                 f"QuantizedTransformer.from_model(model, config, example_inputs=[...])")
            return LayerPlan(None, "autoquant: not in the plan (the example inputs never reached it)")
        return LayerPlan(self.scheme)

    @property
    def is_autoquant(self) -> bool:
        return self.scheme is None

    def backend_for(self, name: str) -> str:
        matched, value = self.override(name)
        return value.backend if matched and value is not None and value.backend != "auto" else self.backend

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (saved with the model)."""
        autoquant = {}
        if self.is_autoquant:
            autoquant = {"candidates": [None if c is None else {"scheme": c.name, "group_size": c.group_size}
                                        for c in self.candidates],
                         "max_error": self.max_error, "objective": self.objective}
        return {
            "scheme": AUTOQUANT if self.is_autoquant else self.scheme.name,
            "group_size": None if self.is_autoquant else self.scheme.group_size,
            **autoquant,
            "requested": str(self.requested),
            "modules_to_not_convert": self.modules_to_not_convert,
            "modules": {k: (None if v is None else v.to_dict()) for k, v in self.modules.items()},
            "backend": self.backend,
            "activation_scale": self.activation_scale,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        modules = {k: (None if v is None else cls.from_dict(v)) for k, v in data.get("modules", {}).items()}
        return cls(data["scheme"], group_size=data.get("group_size"),
                   modules_to_not_convert=data.get("modules_to_not_convert"), modules=modules,
                   backend=data.get("backend", "auto"), activation_scale=data.get("activation_scale"),
                   candidates=data.get("candidates"), max_error=data.get("max_error"), objective=data.get("objective"))

    def __repr__(self) -> str:
        extras = "".join(f", {k}={v!r}" for k, v in (
            ("modules_to_not_convert", self.modules_to_not_convert), ("modules", list(self.modules)),
            ("backend", self.backend)) if v and v != "auto")
        if self.is_autoquant:
            candidates = [None if c is None else c.name if c.group_size is None else f"{c.name}/g{c.group_size}"
                          for c in self.candidates]
            return (f"QuantConfig('autoquant', candidates={candidates}, max_error={self.max_error}, "
                    f"objective={self.objective!r}{extras})")
        return f"QuantConfig({self.scheme.name!r}, group_size={self.scheme.group_size}{extras})"


def _module_names(value: Any) -> list[str]:
    """modules_to_not_convert -> a list of names. A lone string is one name (not its characters)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise TypeError(f"modules_to_not_convert is a list of module names, e.g. ['proj_out', 'norm_out'], got "
                        f"{type(value).__name__} {value!r}")
    names = list(value)
    for entry in names:
        if not isinstance(entry, str):
            raise TypeError(f"modules_to_not_convert holds module names (strings such as 'proj_out' or "
                            f"'transformer_blocks.0'), got {entry!r} ({type(entry).__name__}) in {names!r}")
        if not entry.strip():
            raise ValueError(f"modules_to_not_convert has an empty name in {names!r}, which matches no layer; "
                             f"remove it or write the module's name, e.g. 'proj_out'")
    return names


def _activation_scale(value: Any) -> float | None:
    """activation_scale as a float: None (not calibrated yet) or a positive finite number."""
    if value is None:
        return None
    if isinstance(value, (bool, str)):
        raise TypeError(f"activation_scale is a number (the fp8 static activation scale, e.g. 0.01), got "
                        f"{type(value).__name__} {value!r}")
    try:
        scale = float(value)  # also a numpy number or a one-element tensor
    except (TypeError, ValueError):
        raise TypeError(f"activation_scale is a number (the fp8 static activation scale, e.g. 0.01), got "
                        f"{type(value).__name__} {value!r}") from None
    if not (math.isfinite(scale) and scale > 0):
        # x / 0, x / NaN and x / inf quantize every activation to NaN, inf or 0: every output would be non-finite
        raise ValueError(f"activation_scale must be a finite number > 0 (the inputs' absmax / 448 for fp8 e4m3), "
                         f"got {value!r}; pass a measured scale or leave it None and run "
                         f"quantrt.calibrate(model, example_inputs)")
    return scale


def _autoquant_candidates(values: Sequence[Any]) -> tuple[Scheme | None, ...]:
    """Candidates of QuantConfig("autoquant") -> Schemes (None: full precision), in order, without repeats."""
    if isinstance(values, (str, Scheme)) or not isinstance(values, Sequence):
        raise TypeError(f"autoquant candidates are a list, e.g. ['int8wo', 'int4wo'], got {values!r}")
    schemes = []
    for value in values:
        if value is None or isinstance(value, Scheme):
            schemes.append(value)
        elif isinstance(value, QuantConfig):
            if value.is_autoquant:
                raise ValueError("an autoquant candidate cannot itself be QuantConfig('autoquant')")
            schemes.append(value.scheme)
        elif isinstance(value, Mapping):  # as to_dict writes it
            name = value.get("scheme", value.get("name"))
            schemes.append(resolve_scheme(name, value.get("group_size") or -1))
        else:
            if isinstance(value, str) and value.strip().lower() == AUTOQUANT:
                raise ValueError("'autoquant' cannot be one of its own candidates")
            schemes.append(resolve_scheme(value))
    if not schemes:
        raise ValueError("QuantConfig('autoquant') needs at least one candidate scheme")
    return tuple(dict.fromkeys(schemes))


def _autoquant_max_error(value: Any) -> float:
    try:
        max_error = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"max_error is a number (the relative L2 error a layer's output may have, e.g. 0.05), "
                        f"got {value!r}") from None
    if not max_error >= 0 or max_error == float("inf"):
        raise ValueError(f"max_error is the largest relative L2 error a layer may have, a finite number >= 0 "
                         f"(e.g. 0.05 for 5%), got {value!r}")
    return max_error
