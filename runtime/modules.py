"""`QuantizedLinear` and `quantize_`: swap a model's nn.Linear layers for quantized ones, in place."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .backends import Backend, get_backend, select_backend
from .config import QuantConfig
from .interop import to_quant_config
from .schemes import Scheme

QUANTIZE_CHUNK = 2**20  # weights quantized at a time by QuantizedLinear.set_weight


class QuantizedLinear(nn.Module):
    """A Linear layer whose weight is stored quantized (buffers named by `Scheme.tensor_specs`:
    qweight, scale, and zero / act_scale where the scheme has them) and whose matmul runs in `backend`."""

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, bias: bool = True,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 backend: Backend | None = None, name: str = ""):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.name = name
        specs = scheme.tensor_specs(out_features, in_features, dtype)
        for key, (shape, tensor_dtype) in specs.items():
            self.register_buffer(key, torch.empty(shape, dtype=tensor_dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        # None: the buffers are in quantrt's layout; else the name of the layout a backend repacked them into in
        # place (the aten backend's 4-bit codes), which state_dict and `tensors()` convert back from
        self.resident_layout: str | None = None
        self.backend = backend if backend is not None else get_backend("reference")
        self.backend_reason = ""
        # fp8 static activations need a calibrated scale before the first forward (quantrt.calibrate)
        self.calibrated = scheme.activation != "fp8_static"
        # backends may keep tensors derived from the buffers (torchao/quanto weights); rebuild them on load
        self.register_load_state_dict_post_hook(_prepare_after_load)
        # a state dict is always in quantrt's layout, whatever the backend keeps in memory
        self.register_state_dict_post_hook(_stored_layout_in_state_dict)
        self.register_load_state_dict_pre_hook(_release_before_load)

    @property
    def backend(self) -> Backend:
        """The backend that computes this layer's matmul. Assigning another one first has the current one hand
        the buffers back in quantrt's layout (`Backend.release`); call `backend.prepare(layer)` after."""
        return self._backend

    @backend.setter
    def backend(self, backend: Backend) -> None:
        previous = self.__dict__.get("_backend")
        if previous is not None and previous is not backend:
            previous.release(self)
        self._backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme, backend: Backend, name: str = "") -> QuantizedLinear:
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, scheme, linear.bias is not None,
                    dtype=weight.dtype, device=weight.device, backend=backend, name=name)
        layer.set_weight(weight)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        backend.prepare(layer)
        return layer

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float weight [N, K] into this layer's buffers (which may be on the meta device)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"layer {self.name!r}: weight of shape {tuple(weight.shape)} does not fit a "
                             f"{self.out_features}x{self.in_features} Linear")
        if not torch.isfinite(weight).all():
            bad = (~torch.isfinite(weight)).sum().item()
            raise ValueError(f"layer {self.name!r}: its weight {tuple(weight.shape)} has {bad} NaN/Inf values and "
                             f"cannot be quantized; fix the checkpoint or keep the layer in full precision with "
                             f"modules_to_not_convert=[{self.name!r}]")
        # rows quantize independently (all but the per-tensor fp8 scales), so big weights go in chunks of
        # ~1M values: the same result, and quantizing's float32 temporaries (~9x the input for uintX's range
        # search) stay bounded instead of growing with the layer (quantize-on-load's peak memory)
        rows = self.out_features if self.scheme.per_tensor else max(1, QUANTIZE_CHUNK // max(1, self.in_features))
        starts = list(range(0, self.out_features, rows)) or [0]
        parts = [self.scheme.quantize(weight[start:start + rows]) for start in starts]
        for key in parts[0]:
            setattr(self, key, parts[0][key] if len(parts) == 1 else torch.cat([part[key] for part in parts]))
        self.resident_layout = None  # new buffers in quantrt's layout; the backend's prepare repacks them

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored quantized tensors by name, in quantrt's layout (converted back where the backend keeps
        a buffer in a layout of its own: `resident_layout`)."""
        return self.backend.stored_tensors(self)

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in float32, as the reference computes it."""
        return self.scheme.dequantize(self.tensors(), self.in_features)

    def storage_bytes(self) -> int:
        """Bytes this layer keeps in memory: its buffers (what save_pretrained writes) plus what its backend
        built from them in storage of its own (`Backend.extra_bytes`: quanto's repacked int4 codes, say; a
        backend's view of a buffer adds nothing)."""
        return sum(b.numel() * b.element_size() for b in self.buffers()) + self.backend.extra_bytes(self)

    def __deepcopy__(self, memo: dict) -> QuantizedLinear:
        # what the backend derived from the buffers is rebuilt on the copy, not copied: some tensor
        # subclasses (quanto's) cannot be deep-copied; the backend itself is shared, it holds no layer state
        derived = set(getattr(self.backend, "derived_attributes", ()))
        memo[id(self.backend)] = self.backend
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = None if key in derived else copy.deepcopy(value, memo)
        clone.backend.prepare(clone)
        return clone

    def _apply(self, fn, recurse=True):
        # .to(device / dtype), .cuda(), .half() move the buffers only: rebuild what the backend derived from
        # them (torchao/quanto keep their weight outside the buffers, so that state_dict stays quantrt's)
        module = super()._apply(fn, recurse)
        self.backend.prepare(self)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = checked_input(self, x)
        if x.shape[:-1].numel() == 0:  # an empty batch (M = 0); torchao's dynamic-activation weights fail on one
            return x.new_zeros(*x.shape[:-1], self.out_features)
        return self.backend.linear(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.name}, backend={self.backend.name}, bias={self.bias is not None}")


def checked_input(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """`x` if `layer` can take it, else a ValueError naming the layer, the input and the fix. Reads only
    dtype, dim and the last size (no data), so torch.compile(fullgraph=True) traces through it. Any number
    of leading dimensions (flattened by the backends), an empty batch and any strides are fine. Like
    nn.Linear, a layer never casts its input silently: x must be in the layer's dtype; only under
    torch.autocast is a floating x cast to it (nn.Linear computes in the autocast dtype there)."""
    dtype = layer.scale.dtype
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer {layer.name!r} takes a torch.Tensor of shape [..., {layer.in_features}], got a "
                        f"{type(x).__name__}; convert it first: torch.as_tensor(x, dtype={dtype})")
    if x.dtype != dtype:
        if not x.is_floating_point():
            raise ValueError(f"layer {layer.name!r} got a {x.dtype} input {tuple(x.shape)}; quantized layers "
                             f"take floating inputs in the model's dtype: cast the input to {dtype} "
                             f"(x.to({dtype}))")
        if not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"layer {layer.name!r} computes in {dtype} but got a {x.dtype} input "
                             f"{tuple(x.shape)}: cast the input to the model's dtype (x.to({dtype})); quantrt, "
                             f"like nn.Linear, does not cast silently")
        x = x.to(dtype)
    if x.dim() == 0 or x.shape[-1] != layer.in_features:
        raise ValueError(f"layer {layer.name!r} takes inputs of shape [..., {layer.in_features}], got "
                         f"{tuple(x.shape)}")
    return x


def init_act_scale(layer: QuantizedLinear, activation_scale: float | None,
                   device: torch.device | str | None = None) -> None:
    """Set the static activation scale [1, 1] (float32) of a layer whose scheme has one (fp8 static
    activations; other layers are left alone): `activation_scale`, or NaN, which marks a scale not yet
    calibrated (quantrt.calibrate measures it), also in a saved model. `device`: default the qweight's."""
    if "act_scale" not in layer.scheme.tensor_specs(1, layer.in_features, torch.float32):
        return
    value = float("nan") if activation_scale is None else activation_scale
    layer.act_scale = torch.full((1, 1), value, dtype=torch.float32,
                                 device=device if device is not None else layer.qweight.device)
    layer.calibrated = activation_scale is not None


def _prepare_after_load(layer: QuantizedLinear, incompatible_keys) -> None:
    layer.backend.prepare(layer)


def _stored_layout_in_state_dict(layer: QuantizedLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    if layer.resident_layout is None:
        return
    for key, tensor in layer.tensors().items():
        if prefix + key in state_dict:
            state_dict[prefix + key] = tensor.detach()


def _release_before_load(layer: QuantizedLinear, state_dict: dict, prefix: str, *args) -> None:
    # the incoming tensors are in quantrt's layout: copy them into buffers in that layout, then prepare again
    if layer.resident_layout is not None:
        layer.backend.release(layer)


def install_skeleton(model: nn.Module, name: str, scheme: Scheme, dtype: torch.dtype | None = None,
                     bias: bool | None = None) -> QuantizedLinear:
    """Swap the nn.Linear `name` of `model` for an empty QuantizedLinear of the same shape on the meta device
    (`dtype`: its group parameters' and bias's dtype, the Linear's by default; `bias`: whether it has one, as
    the Linear by default), for a loader to fill. Returns the new layer."""
    linear = model.get_submodule(name)
    layer = QuantizedLinear(linear.in_features, linear.out_features, scheme,
                            linear.bias is not None if bias is None else bias,
                            dtype=dtype or linear.weight.dtype, device="meta", name=name)
    model.set_submodule(name, layer)
    return layer


@dataclass
class LayerReport:
    """One Linear layer of a quantized model: what happened to it and why."""

    name: str
    out_features: int
    in_features: int
    scheme: str  # scheme name, or "none" for a layer kept in full precision
    backend: str
    why: str
    bytes: int
    full_precision_bytes: int

    @property
    def quantized(self) -> bool:
        return self.scheme != "none"


def _linear_bytes(linear: nn.Linear) -> int:
    return sum(p.numel() * p.element_size() for p in linear.parameters())


def quantize_(model: nn.Module, config: str | QuantConfig, *, progress: bool | None = None) -> list[LayerReport]:
    """Replace every nn.Linear of `model` in place by a QuantizedLinear as `config` says (torchao-style).
    Returns one LayerReport per Linear layer, quantized or kept. `progress`: None shows a progress bar on
    a terminal, True always, False never."""
    config = to_quant_config(config)
    linears = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    if isinstance(model, nn.Linear):
        raise TypeError("quantize_ swaps the Linear layers inside a model; wrap a lone nn.Linear in a module "
                        "(e.g. nn.Sequential(linear)) first")
    if not linears:
        if any(isinstance(module, QuantizedLinear) for module in model.modules()):
            raise ValueError(f"{type(model).__name__} is already quantized (its Linear layers are QuantizedLinear); "
                             f"quantize the original model")
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers: there is nothing to quantize")
    reports = []
    bar = tqdm(linears, desc="quantizing", unit="layer", disable=(not progress) if progress is not None else None)
    for name, linear in bar:
        plan = config.plan(name)
        fp_bytes = _linear_bytes(linear)
        shape = (linear.out_features, linear.in_features)
        why = plan.reason
        if plan.scheme is not None:
            why = plan.scheme.unsupported_reason(*shape) or ""
            if why:
                why = f"kept in full precision: {why}"
        if plan.scheme is None or why:
            reports.append(LayerReport(name, *shape, "none", "torch", why, fp_bytes, fp_bytes))
            continue
        backend, how = select_backend(plan.scheme, linear.weight.device, config.backend_for(name), name,
                                      shape=shape, dtype=linear.weight.dtype)
        layer = QuantizedLinear.from_linear(linear, plan.scheme, backend, name)
        layer.backend_reason = how
        init_act_scale(layer, config.activation_scale)
        model.set_submodule(name, layer)
        reports.append(LayerReport(name, *shape, plan.scheme.name, backend.name, how, layer.storage_bytes(), fp_bytes))
    return reports
