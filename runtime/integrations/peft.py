"""LoRA on quantrt's quantized layers through PEFT, and so through diffusers' and transformers' LoRA loaders.

PEFT wraps a layer by asking a list of dispatchers for a LoRA module; none takes a QuantizedLinear ("Target module
QuantizedLinear(...) is not supported"). `register()` wraps `LoraModel._create_new_module` so that a
QuantizedLinear gets a `QuantizedLoraLinear` first, for every LoraConfig, also the ones diffusers and transformers
build themselves in `load_lora_adapter` (a per-config `_register_custom_module` never reaches those). The base
matmul stays quantized (the layer's backend); the LoRA path B(A(x))·scaling runs beside it in the activation
dtype. `merge` (diffusers' `fuse_lora`) re-quantizes dequant(W) + ΣBA·scaling into the layer's scheme and keeps
the codes it replaced, which `unmerge` (`unfuse_lora`) puts back exactly.

`patch_diffusers_lora_pipeline()` lets FLUX's pipeline-level `load_lora_weights` pass quantrt layers: its
`_maybe_expand_lora_state_dict` reads `<layer>.weight` from the state dict, which a QuantizedLinear does not have.
It also lets the pipeline-level adapter methods (`set_adapters`, `fuse_lora`, `unload_lora_weights`, ...) see a
`QuantizedTransformer` wrapper set as a component (`pipe.transformer = qt`): diffusers only acts on components that
are its `ModelMixin` or transformers' `PreTrainedModel`, so those methods see the wrapped model instead.

`patch_peft_hotswap()` works around a PEFT bug: a hot swap sets each layer's scaling to the new LoRA's alpha/rank
but leaves the layer's `lora_alpha` and `r` at the first LoRA's, from which `set_scale` (diffusers'
`set_adapters(weights=...)`) computes the scaling, so weights set after a swap scaled the old LoRA's alpha/rank.

quantrt.integrations runs `register()` when `peft.tuners.lora.model` is imported, `patch_diffusers_lora_pipeline()`
when `diffusers.loaders.lora_pipeline` is and `patch_peft_hotswap()` when `peft.utils.hotswap` is; all are idempotent
and reversible (`unregister()`).
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from peft.tuners.lora.config import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..modules import QuantizedLinear
from ..transformer import QuantizedTransformer

TESTED_VERSION = "0.21.2"  # the peft whose LoRA layer and dispatch the integration's tests run against
MARK = "_quantrt_lora"  # set on the functions register() installs, to find (and undo) them
# diffusers' pipeline-level adapter methods (LoraBaseMixin) that act only on ModelMixin / PreTrainedModel components
WRAPPER_BLIND_METHODS = ("unload_lora_weights", "fuse_lora", "unfuse_lora", "set_adapters", "disable_lora",
                         "enable_lora", "delete_adapters", "get_active_adapters", "get_list_adapters",
                         "set_lora_device")


class QuantizedLoraLinear(LoraLinear):
    """PEFT's LoRA Linear around a QuantizedLinear. Subclassing lora.Linear keeps its forward (base_layer(x) plus
    each active adapter's B(A(dropout(x)))·scaling), mixed-batch forward, get_delta_weight, and what PEFT's
    hotswap pads (it only pads `lora.Linear` instances). What reads the base layer's float `weight` is replaced:
    features, dtype, merge and unmerge. Plain LoRA only: DoRA and other variants change the base weight's norm
    every step, which a quantized weight cannot follow."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        if config.fan_in_fan_out:  # QuantizedLinear stores [out, in] like nn.Linear: never a transposed Conv1D
            config.fan_in_fan_out = False
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)
        # the base layer's tensors (and bias) as stored before the first merge; None while nothing is merged
        self.stored_codes: dict[str, torch.Tensor] | None = None

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # PEFT's generic lookup knows no QuantizedLinear and would warn "Unsupported layer type"
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        # PEFT would take qweight's dtype (int8/uint8 codes) and leave the LoRA in float32; the activation dtype
        # of a QuantizedLinear is its scale's
        return base_layer.qweight.device, base_layer.scale.dtype

    @property
    def lora_variants(self) -> dict[tuple[str, ...], None]:
        return {(): None}

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as e:
            name = self.get_base_layer().name
            raise ValueError(
                f"quantrt: layer {name!r} is quantized (QuantizedLinear, {self.get_base_layer().scheme.name}), and "
                f"only plain LoRA runs beside a quantized weight ({e}); drop use_dora and other LoRA variants, or "
                f"keep the layer in full precision (QuantConfig(modules_to_not_convert=[{name!r}]))") from e

    def set_scale(self, adapter: str, scale: float) -> None:
        # PEFT assigns a float; after enable_lora_hotswap the scaling is a tensor that a compiled graph reads as
        # an input, so it is filled in place: set_adapters(weights=...) then recompiles nothing
        if adapter not in self.scaling:
            return
        self.set_scaling(adapter, scale * self.lora_alpha[adapter] / self.rank_divisor(adapter))

    def unscale_layer(self, scale: float | None = None) -> None:
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            if scale is None:
                self.set_scaling(adapter, self.lora_alpha[adapter] / self.rank_divisor(adapter))
            else:
                self.set_scaling(adapter, self.scaling[adapter] / scale)

    def rank_divisor(self, adapter: str) -> float:
        return math.sqrt(self.r[adapter]) if self.use_rslora.get(adapter, False) else self.r[adapter]

    def set_scaling(self, adapter: str, value: float | torch.Tensor) -> None:
        current = self.scaling[adapter]
        if isinstance(current, torch.Tensor):
            current.fill_(float(value))
        else:
            self.scaling[adapter] = value

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into the base layer: quantize dequant(W) + Σ get_delta_weight into its scheme (the
        float sum in the layer's dtype, as quantize_ quantized the original weight)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        merging = [name for name in adapter_names if name in self.lora_A]
        weight = base.dequantize()
        bias = base.bias.float() if base.bias is not None else None
        for name in merging:
            weight = weight + self.get_delta_weight(name).float()
            if self.lora_bias[name]:
                if bias is None:
                    raise ValueError(f"quantrt: cannot merge adapter {name!r} into layer {base.name!r}: it has a "
                                     f"LoRA bias (lora_bias=True) and the layer has no bias")
                bias = bias + self.lora_B[name].bias.float() * self.scaling[name]
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"quantrt: merging adapters {merging} into layer {base.name!r} gives NaN/Inf weights; "
                             f"the adapters seem broken")
        if self.stored_codes is None:
            self.stored_codes = {key: value.clone() for key, value in base.tensors().items()}
            if base.bias is not None:
                self.stored_codes["bias"] = base.bias.clone()
        requantize(base, weight)
        if bias is not None:
            base.bias.copy_(bias.to(base.bias.dtype))
        self.merged_adapters.extend(merging)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the base layer's tensors as stored before the first merge, bit for bit (not W - ΣBA, which
        re-quantizing would not invert)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        restore(self.get_base_layer(), self.stored_codes)
        self.merged_adapters.clear()
        self.stored_codes = None

    def __repr__(self) -> str:
        return "lora." + nn.Module.__repr__(self)


def requantize(layer: QuantizedLinear, weight: torch.Tensor) -> None:
    """Quantize a float weight [N, K] into `layer` in its scheme and dtype. The new codes are copied into the
    existing buffers where shapes agree, so that a compiled graph that holds them sees the change."""
    layer.backend.release(layer)  # back to quantrt's layout and no derived tensors: prepare rebuilds them
    old = {key: getattr(layer, key) for key in layer.tensors()}
    layer.set_weight(weight.to(layer.scale.dtype))
    for key, buffer in old.items():
        new = getattr(layer, key)
        if buffer.shape == new.shape and buffer.dtype == new.dtype and buffer.device == new.device:
            buffer.copy_(new)
            setattr(layer, key, buffer)
    layer.backend.prepare(layer)


def restore(layer: QuantizedLinear, stored: dict[str, torch.Tensor]) -> None:
    """Copy tensors kept by `merge` (quantrt's layout, and the bias) back into `layer`, in place."""
    layer.backend.release(layer)
    for key, value in stored.items():
        getattr(layer, key).copy_(value)
    layer.resident_layout = None
    layer.backend.prepare(layer)


def dispatch_quantrt(target: nn.Module, adapter_name: str, lora_config: LoraConfig,
                     **kwargs: Any) -> nn.Module | None:
    """A PEFT LoRA dispatcher (the form of peft.tuners.lora's dispatch_*): a QuantizedLoraLinear for a
    QuantizedLinear target, else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, QuantizedLinear):
        return None
    kwargs.pop("parameter_name", None)  # target_parameters: a quantized weight is no nn.Parameter to wrap
    return QuantizedLoraLinear(target, adapter_name, config=lora_config, **kwargs)


def register(module: ModuleType | None = None) -> None:
    """Have PEFT wrap QuantizedLinear layers with QuantizedLoraLinear, for every LoraConfig, and patch diffusers'
    FLUX LoRA loader if it is imported already. A custom module a user registered on a config for
    QuantizedLinear still wins. Idempotent. `module` (peft.tuners.lora.model, from the import hook) is unused."""
    original = LoraModel.__dict__["_create_new_module"].__func__
    if not getattr(original, MARK, False):
        LoraModel._create_new_module = staticmethod(quantrt_first(original))
    pipeline = sys.modules.get("diffusers.loaders.lora_pipeline")
    if pipeline is not None and hasattr(pipeline, "FluxLoraLoaderMixin"):  # fully imported, not mid-import
        patch_diffusers_lora_pipeline(pipeline)
    hotswap = sys.modules.get("peft.utils.hotswap")
    if hotswap is not None and hasattr(hotswap, "_update_scaling"):
        patch_peft_hotswap(hotswap)


def quantrt_first(original: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """`LoraModel._create_new_module` asking dispatch_quantrt before PEFT's own dispatchers."""

    def _create_new_module(lora_config: LoraConfig, adapter_name: str, target: nn.Module,
                           **kwargs: Any) -> nn.Module:
        custom = lora_config._custom_modules or {}
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not any(isinstance(base, key) for key in custom):
            new_module = dispatch_quantrt(target, adapter_name, lora_config, **kwargs)
            if new_module is not None:
                return new_module
        return original(lora_config, adapter_name, target, **kwargs)

    setattr(_create_new_module, MARK, True)
    _create_new_module.__wrapped__ = original
    return _create_new_module


def patch_diffusers_lora_pipeline(module: ModuleType | None = None) -> None:
    """Let FluxLoraLoaderMixin.load_lora_weights load LoRAs onto quantrt layers (module:
    diffusers.loaders.lora_pipeline). Its `_maybe_expand_lora_state_dict` zero-pads a lora_A narrower than the
    layer's `weight` (FLUX Control); a QuantizedLinear has no `weight`, so its entries are checked here instead
    (a quantized weight cannot be expanded) and the rest goes to diffusers. Also has the pipeline-level adapter
    methods see through QuantizedTransformer components (`patch_diffusers_lora_base`). Idempotent."""
    if module is None:
        module = sys.modules["diffusers.loaders.lora_pipeline"]
    patch_diffusers_lora_base(module.LoraBaseMixin)
    mixin = module.FluxLoraLoaderMixin
    original = mixin.__dict__["_maybe_expand_lora_state_dict"].__func__
    if getattr(original, MARK, False):
        return

    def _maybe_expand_lora_state_dict(cls: type, transformer: nn.Module,
                                      lora_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix = f"{cls.transformer_name}."
        layers = {name.removesuffix(".base_layer"): layer for name, layer in transformer.named_modules()
                  if isinstance(layer, QuantizedLinear)}
        quantized = {key: value for key, value in lora_state_dict.items()
                     if key.startswith(prefix) and key[len(prefix):].rsplit(".lora_", 1)[0] in layers}
        rest = original(cls, transformer, {k: v for k, v in lora_state_dict.items() if k not in quantized})
        for key, value in quantized.items():
            check_lora_shape(key[len(prefix):], value, layers)
        rest.update(quantized)
        return rest

    setattr(_maybe_expand_lora_state_dict, MARK, True)
    _maybe_expand_lora_state_dict.__wrapped__ = original
    mixin._maybe_expand_lora_state_dict = classmethod(_maybe_expand_lora_state_dict)


@contextmanager
def wrapped_models_shown(pipeline: Any) -> Iterator[None]:
    """While it is open, each LoRA-loadable component of `pipeline` that is a QuantizedTransformer is its wrapped
    model (`qt.model`, the diffusers or transformers class the pipeline's adapter methods look for), then the
    wrapper again. The components are swapped in the instance's own attributes, not through the pipeline's
    `__setattr__`, which would register the wrapped model in the pipeline's config. Nested calls swap nothing."""
    swapped = {}
    for name in getattr(pipeline, "_lora_loadable_modules", ()):
        component = vars(pipeline).get(name)
        if isinstance(component, QuantizedTransformer):
            swapped[name] = component
            vars(pipeline)[name] = component.model
    try:
        yield
    finally:
        for name, component in swapped.items():
            if vars(pipeline).get(name) is component.model:
                vars(pipeline)[name] = component


def seeing_wrapped_models(method: Callable[..., Any]) -> Callable[..., Any]:
    """A LoraBaseMixin method run inside `wrapped_models_shown(self)`."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with wrapped_models_shown(self):
            return method(self, *args, **kwargs)

    setattr(run, MARK, True)
    return run


def patch_diffusers_lora_base(mixin: type) -> None:
    """Have the pipeline-level adapter methods of diffusers' `LoraBaseMixin` (WRAPPER_BLIND_METHODS) act on a
    QuantizedTransformer component's wrapped model: they skip any component that is not a ModelMixin or
    PreTrainedModel, so `pipe.set_adapters(...)` on a pipeline holding a wrapper said "Adapter name(s) ... not in
    the list of present adapters" and `fuse_lora` fused nothing. Idempotent."""
    for name in WRAPPER_BLIND_METHODS:
        method = mixin.__dict__.get(name)
        if method is not None and not getattr(method, MARK, False):
            setattr(mixin, name, seeing_wrapped_models(method))


def check_lora_shape(key: str, value: torch.Tensor, layers: dict[str, QuantizedLinear]) -> None:
    """Raise if a LoRA tensor (key: `<layer>.lora_A.weight` or `.lora_B.weight`) does not fit its quantized
    layer: lora_A must read in_features, lora_B must write out_features."""
    name, _, part = key.rpartition(".lora_")
    layer = layers[name]
    if part.startswith("A.") and value.dim() == 2 and value.shape[1] != layer.in_features:
        side, want = "lora_A", f"[rank, {layer.in_features}]"
    elif part.startswith("B.") and value.dim() == 2 and value.shape[0] != layer.out_features:
        side, want = "lora_B", f"[{layer.out_features}, rank]"
    else:
        return
    raise ValueError(f"quantrt: the LoRA's {side} for layer {name!r} has shape {list(value.shape)}, and the "
                     f"quantized layer ({layer.out_features}x{layer.in_features}, {layer.scheme.name}) needs "
                     f"{want}; the LoRA was trained for another model (a quantized weight cannot be expanded)")


def patch_peft_hotswap(module: ModuleType | None = None) -> None:
    """Keep a LoRA layer's `lora_alpha` in step with the scaling a hot swap sets (module: peft.utils.hotswap).
    PEFT's `hotswap_adapter_from_state_dict` sets `scaling = alpha / rank` of the new LoRA through `_update_scaling`
    and leaves `lora_alpha` and `r` at the first LoRA's; `set_scale(adapter, weight)` (diffusers' set_adapters)
    then sets `weight · lora_alpha / r`, the first LoRA's scaling. After the swap, `lora_alpha` is set so that
    `lora_alpha / r` (or / sqrt(r), rsLoRA) is the new scaling. Any LoRA layer (also PEFT's own lora.Linear on a
    full-precision layer): a model mixing both would otherwise scale them inconsistently. Idempotent."""
    if module is None:
        import peft.utils.hotswap as module
    original = module._update_scaling
    if getattr(original, MARK, False):
        return

    def _update_scaling(lora_module: nn.Module, adapter_name: str, scaling: float) -> None:
        original(lora_module, adapter_name, scaling)
        alphas, ranks = getattr(lora_module, "lora_alpha", None), getattr(lora_module, "r", None)
        if isinstance(alphas, dict) and isinstance(ranks, dict) and adapter_name in ranks:
            rank = ranks[adapter_name]
            rslora = getattr(lora_module, "use_rslora", {}).get(adapter_name, False)
            alphas[adapter_name] = float(scaling) * (math.sqrt(rank) if rslora else rank)

    setattr(_update_scaling, MARK, True)
    _update_scaling.__wrapped__ = original
    module._update_scaling = _update_scaling


def unregister() -> None:
    """Undo register(), patch_diffusers_lora_pipeline() (with patch_diffusers_lora_base()) and patch_peft_hotswap().
    Layers wrapped already stay wrapped."""
    current = LoraModel.__dict__["_create_new_module"].__func__
    if getattr(current, MARK, False):
        LoraModel._create_new_module = staticmethod(current.__wrapped__)
    pipeline = sys.modules.get("diffusers.loaders.lora_pipeline")
    mixin = getattr(pipeline, "FluxLoraLoaderMixin", None)
    if mixin is not None:
        current = mixin.__dict__["_maybe_expand_lora_state_dict"].__func__
        if getattr(current, MARK, False):
            mixin._maybe_expand_lora_state_dict = classmethod(current.__wrapped__)
        base = pipeline.LoraBaseMixin
        for name in WRAPPER_BLIND_METHODS:
            current = base.__dict__.get(name)
            if getattr(current, MARK, False):
                setattr(base, name, current.__wrapped__)
    hotswap = sys.modules.get("peft.utils.hotswap")
    current = getattr(hotswap, "_update_scaling", None)
    if getattr(current, MARK, False):
        hotswap._update_scaling = current.__wrapped__


def is_registered() -> bool:
    """Whether PEFT sends QuantizedLinear layers to quantrt (register() ran and was not undone)."""
    return getattr(LoraModel.__dict__["_create_new_module"].__func__, MARK, False)
