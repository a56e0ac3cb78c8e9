"""The torchao backend: serve a QuantizedLinear with a torchao-quantized weight.

How a layer is built (`prepare`): its stored quantrt tensors are dequantized (float32, cast to the layer's
dtype) into a temporary nn.Linear, `torchao.quantization.quantize_` quantizes that with the torchao config
the scheme maps onto (`torchao_config`), with `set_inductor_config=False` wherever the config has it
(quantrt never changes global Inductor settings), and the resulting torchao weight tensor is kept as
`layer.backend_weight`: a plain attribute, not a buffer, so `state_dict()` and `save_pretrained` stay in
quantrt's format.

Numerics: torchao derives its own scales from the dequantized weight. For fp8 that is lossless (torchao's
absmax / fp8-max scale lands on quantrt's), and so it is for int4 on CUDA (tinygemm's float zero points are
quantrt's). For int8 (torchao's grid is absmax / 127.5, quantrt's absmax / 127) and the intX path (torchao's
zero points are integers, quantrt's are floats) requantizing would add a second rounding step per weight. So
for int8, intX and weight-only fp8 `prepare` puts quantrt's own codes, scales and zero points into torchao's
Int8Tensor / IntxUnpackedToInt8Tensor / Float8Tensor (their documented qdata / scale / zero_point; the intX
tensor takes float zero points) and checks that the result dequantizes to quantrt's weight; where that check
fails (another torchao layout), torchao's own requantized weight is kept and `layer.backend_config` says so.
torchao's int4dq quantizes activations asymmetrically per token where the reference does it symmetrically.

Memory: what torchao keeps in quantrt's layout is a view of the layer's buffers, not a copy: int8 codes
(qdata [N, K] int8 is quantrt's qweight), weight-only fp8 codes (quantrt's uint8 codes viewed as
float8_e4m3fn / float8_e5m2), and scales wherever torchao's dtype is the layer's (bf16/fp16/fp32 for intX,
fp32 layers for int8 and fp8). Copies remain where torchao's layout differs: torchao's float32 scales and int8
zero points of int8 / fp8 in bf16 and fp16 layers (N x groups x 4 or 5 bytes, small), the intX codes (one
int8 per weight, unpacked, where quantrt packs X bits) and their float zero points (shifted by 2^(X-1)),
torchao's CUDA int4 packing, and the fp8 dynamic-activation schemes' weights (torchao's own quantization).
They are `Backend.extra_bytes`, counted by `storage_bytes()`, `summary()` and `memory_footprint()`.

What serves where (torchao 0.18, torch 2.13; CPU checked by running, CUDA from torchao's documentation):

| scheme | torchao config | cpu | cuda |
|---|---|---|---|
| int8wo (per channel or grouped) | Int8WeightOnlyConfig | yes | yes |
| int4wo, uint4wo | Int4WeightOnlyConfig(tile_packed_to_4d) for bf16 on SM >= 8.0, else IntxWeightOnlyConfig(int4, asymmetric) | yes (Intx) | yes |
| uint1wo .. uint7wo | IntxWeightOnlyConfig(intX, PerGroup, asymmetric) | yes | yes |
| float8wo_e4m3, float8wo_e5m2 | Float8WeightOnlyConfig | yes | yes |
| fpX_eAmB | FPXWeightOnlyConfig, removed in torchao 0.16 | no | torchao < 0.16 only |
| int8dq (per channel) | Int8DynamicActivationInt8WeightConfig | yes | yes |
| int4dq | Int8DynamicActivationIntxWeightConfig(int4) (Int8DynamicActivationInt4WeightConfig before 0.17) | yes | yes |
| float8dq_e4m3_tensor / _row | Float8DynamicActivationFloat8WeightConfig(PerTensor() / PerRow()) | no | SM >= 8.9 |
| float8_static_activation_float8_weight | none (the scale is calibrated after the layer is built) | no | no |

torch.compile(fullgraph=True) on CPU (torch 2.13, torchao 0.18): every scheme served on CPU above compiles
without graph breaks in fp32 and bf16, each checked once against eager (tests/runtime/backends/test_torchao.py
keeps three of them, compiling being slow). Compiling the CUDA paths has not been checked here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.packing import unpack_uintx
from ..version import distribution_version
from . import Backend, BackendUnavailable

if TYPE_CHECKING:
    from ..modules import QuantizedLinear
    from ..schemes import Scheme

# group sizes of torchao's tinygemm int4 kernel (Int4TilePackedTo4dTensor)
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
# layer dtypes torchao serves: its int8 / intX quantization asserts them (a float64 weight fails with
# "Unsupported input dtype: torch.float64", or a bare AssertionError). Weight-only fp8 happens to run in
# float64 on CPU; one rule for every scheme keeps the choice predictable, and float64 falls back to quanto
# or the reference
SERVED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class TorchaoCannotServe(Exception):
    """Why the installed torchao cannot serve a scheme on a device (the message is the reason)."""


@functools.cache
@functools.cache
def _quantization_module():
    """torchao.quantization, imported on first use (importing torchao takes seconds)."""
    if distribution_version("torchao") is None:
        raise TorchaoCannotServe("torchao is not installed (pip install torchao)")
    try:
        import torchao.quantization as quantization
    except Exception as e:  # a torchao built for another torch fails here in many ways
        raise TorchaoCannotServe(f"torchao {distribution_version('torchao')} does not import with torch {torch.__version__}: "
                                 f"{type(e).__name__}: {e}") from e
    return quantization


def _config_class(name: str, needed: str):
    """The torchao config class `name`, or TorchaoCannotServe saying which torchao versions have it."""
    cls = getattr(_quantization_module(), name, None)
    if cls is None:
        raise TorchaoCannotServe(f"torchao {distribution_version('torchao')} has no {name} ({needed})")
    return cls


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _make(cls, **kwargs: Any):
    """cls(**kwargs) with set_inductor_config=False where the config has that field, and without the
    arguments this torchao version's config does not take (they are version-specific spellings)."""
    fields = _fields(cls)
    if "set_inductor_config" in fields:
        kwargs["set_inductor_config"] = False
    return cls(**{k: v for k, v in kwargs.items() if k in fields})


def _intx_dtype(bits: int) -> torch.dtype:
    dtype = getattr(torch, f"int{bits}", None)
    if dtype is None:
        raise TorchaoCannotServe(f"torch {torch.__version__} has no torch.int{bits} dtype (torch >= 2.6 has it)")
    return dtype


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _int8_weight_config(scheme: Scheme, device: torch.device, dtype: torch.dtype):
    quantization = _quantization_module()
    cls = _config_class("Int8WeightOnlyConfig", "torchao >= 0.9 has it")
    group_size = scheme.group_size
    if "granularity" in _fields(cls):  # torchao >= 0.16 (Int8Tensor): granularity, group_size must stay None
        granularity = quantization.PerRow() if group_size is None else quantization.PerGroup(group_size)
        return _make(cls, granularity=granularity)
    return _make(cls, group_size=group_size)


def _intx_weight_config(scheme: Scheme, device: torch.device, dtype: torch.dtype):
    quantization = _quantization_module()
    cls = _config_class("IntxWeightOnlyConfig", "torchao >= 0.12 has it")
    if "granularity" not in _fields(cls):
        raise TorchaoCannotServe(f"torchao {distribution_version('torchao')}'s IntxWeightOnlyConfig takes no granularity; "
                                 f"torchao >= 0.14 is needed")
    return _make(cls, weight_dtype=_intx_dtype(scheme.bits), granularity=quantization.PerGroup(scheme.group_size),
                 mapping_type=quantization.MappingType.ASYMMETRIC)


def _int4_tinygemm_config(group_size: int):
    cls = _config_class("Int4WeightOnlyConfig", "torchao >= 0.9 has it")
    fields = _fields(cls)
    if "int4_packing_format" in fields:  # torchao >= 0.15
        return _make(cls, group_size=group_size, int4_packing_format="tile_packed_to_4d")
    if "packing_format" in fields:  # torchao 0.14
        return _make(cls, group_size=group_size, packing_format="tile_packed_to_4d")
    return _make(cls, group_size=group_size)  # before 0.14: TensorCoreTiledLayout is the default


def _int4_weight_config(scheme: Scheme, device: torch.device, dtype: torch.dtype):
    # tinygemm for bf16 on CUDA SM >= 8.0. CPU has no int4 packing in torchao 0.18 (plain needs mslk,
    # tile_packed_to_4d and plain_int32 CUDA): the unpacked intX tensor dequantizes in torch and runs on any device
    if (device.type == "cuda" and dtype == torch.bfloat16 and scheme.group_size in TINYGEMM_GROUP_SIZES
            and _cuda_capability(device) >= (8, 0)):
        return _int4_tinygemm_config(scheme.group_size)
    return _intx_weight_config(scheme, device, dtype)


def _float8_weight_config(scheme: Scheme, device: torch.device, dtype: torch.dtype):
    cls = _config_class("Float8WeightOnlyConfig", "torchao >= 0.9 has it")
    return _make(cls, weight_dtype=scheme.storage.code_dtype)


def _fpx_weight_config(scheme: Scheme, device: torch.device, dtype: torch.dtype):
    cls = getattr(_quantization_module(), "FPXWeightOnlyConfig", None)
    if cls is None:
        raise TorchaoCannotServe(f"torchao {distribution_version('torchao')} has no FPXWeightOnlyConfig: X-bit floats were "
                                 f"removed in torchao 0.16 (torchao 0.9 .. 0.15 have them, CUDA only)")
    if device.type != "cuda":
        raise TorchaoCannotServe("torchao's FPXWeightOnlyConfig (fp6-llm kernels) runs on CUDA only")
    return _make(cls, ebits=scheme.storage.ebits, mbits=scheme.storage.mbits)


def _int8_dynamic_config(scheme: Scheme, device: torch.device, dtype: torch.dtype):
    if scheme.group_size is not None:
        raise TorchaoCannotServe(f"torchao's int8 dynamic-activation weights have one scale per output "
                                 f"channel, not groups of {scheme.group_size}")
    return _make(_config_class("Int8DynamicActivationInt8WeightConfig", "torchao >= 0.9 has it"))


def _intx_dynamic_config(scheme: Scheme, device: torch.device, dtype: torch.dtype):
    quantization = _quantization_module()
    cls = getattr(quantization, "Int8DynamicActivationIntxWeightConfig", None)
    if cls is not None and "weight_granularity" in _fields(cls):
        return _make(cls, weight_dtype=_intx_dtype(scheme.bits),
                     weight_granularity=quantization.PerGroup(scheme.group_size),
                     weight_mapping_type=quantization.MappingType.ASYMMETRIC)
    if scheme.bits == 4 and hasattr(quantization, "Int8DynamicActivationInt4WeightConfig"):  # before 0.17
        return _make(quantization.Int8DynamicActivationInt4WeightConfig, group_size=scheme.group_size,
                     mapping_type=quantization.MappingType.ASYMMETRIC)
    raise TorchaoCannotServe(f"torchao {distribution_version('torchao')} has no Int8DynamicActivationIntxWeightConfig with "
                             f"weight_granularity (torchao >= 0.14 has it)")


def _float8_dynamic_config(scheme: Scheme, device: torch.device, dtype: torch.dtype):
    if device.type != "cuda":
        raise TorchaoCannotServe("torchao's float8 dynamic activation quantization needs a CUDA GPU with "
                                 "compute capability >= 8.9 (Ada, Hopper or newer)")
    capability = _cuda_capability(device)
    if capability < (8, 9):
        raise TorchaoCannotServe(f"torchao's float8 dynamic activation quantization needs compute capability "
                                 f">= 8.9; {torch.cuda.get_device_name(device)} has "
                                 f"{capability[0]}.{capability[1]}")
    quantization = _quantization_module()
    cls = _config_class("Float8DynamicActivationFloat8WeightConfig", "torchao >= 0.9 has it")
    granularity = quantization.PerRow() if scheme.activation == "fp8_row" else quantization.PerTensor()
    return _make(cls, granularity=granularity)


def _float8_static_config(scheme: Scheme, device: torch.device, dtype: torch.dtype):
    raise TorchaoCannotServe(
        "quantrt calibrates the static activation scale after the layer is built (quantrt.calibrate), while "
        "torchao's Float8StaticActivationFloat8WeightConfig needs it at quantization time")


# the torchao config classes that storage formats name (StorageFormat.torchao_configs) -> how quantrt builds each
# for (scheme, device, layer dtype), raising TorchaoCannotServe where it cannot
CONFIG_BUILDERS: dict[str, Callable[[Scheme, torch.device, torch.dtype], Any]] = {
    "Int8WeightOnlyConfig": _int8_weight_config,
    "Int4WeightOnlyConfig": _int4_weight_config,
    "IntxWeightOnlyConfig": _intx_weight_config,
    "Float8WeightOnlyConfig": _float8_weight_config,
    "FPXWeightOnlyConfig": _fpx_weight_config,
    "Int8DynamicActivationInt8WeightConfig": _int8_dynamic_config,
    "Int8DynamicActivationIntxWeightConfig": _intx_dynamic_config,
    "Float8DynamicActivationFloat8WeightConfig": _float8_dynamic_config,
    "Float8StaticActivationFloat8WeightConfig": _float8_static_config,
}


def torchao_config(scheme: Scheme, device: torch.device | str, dtype: torch.dtype = torch.bfloat16):
    """The torchao config object that serves `scheme` for a layer of `dtype` on `device`, built against the
    installed torchao: the config class the scheme's format names for its activations
    (`StorageFormat.torchao_configs`). Raises TorchaoCannotServe with the reason when there is none."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise TorchaoCannotServe(f"quantrt uses torchao on cpu and cuda devices only, not {device.type}")
    _quantization_module()  # torchao imports, or the reason it does not
    config = scheme.storage.torchao_configs.get(scheme.activation)
    if config is None:
        raise TorchaoCannotServe(f"torchao has no config for {scheme.format} weights with {scheme.activation} "
                                 f"activations")
    return CONFIG_BUILDERS[config](scheme, device, dtype)


def _takes_quantrt_codes(weight: torch.Tensor, scheme: Scheme) -> bool:
    """Whether `prepare` puts quantrt's codes into torchao's `weight`: where it is the torchao tensor the scheme's
    format names (`StorageFormat.torchao_tensor`): torchao's requantization is lossy for int8 and the
    integer-zero-point intX path, and weight-only fp8 codes can then stay a view of the layer's buffer instead of a
    copy. The fp8 dynamic-activation schemes keep torchao's own quantization."""
    return type(weight).__name__ == scheme.storage.torchao_tensor and scheme.activation in ("none", "int8_token")


def _adopt_quantrt_codes(weight: torch.Tensor, layer: QuantizedLinear, dequantized: torch.Tensor) -> bool:
    """Put the layer's own codes, scales and zero points into torchao's freshly built `weight` (in place), so
    torchao computes with quantrt's weight and not a second rounding of it. Each is a view of the layer's
    buffer where torchao's dtype and shape are the buffer's, else a converted copy. False (and `weight`
    unusable) where torchao's tensor does not have the expected qdata / scale / zero_point layout or does not
    dequantize to `dequantized` afterwards."""
    scheme = layer.scheme
    kind = type(weight).__name__
    if kind == "Int8Tensor":
        tensors = {"qdata": layer.qweight, "scale": layer.scale}
    elif kind == "Float8Tensor":
        # quantrt stores fp8 codes as their uint8 bits; viewed as the fp8 dtype they are torchao's qdata
        tensors = {"qdata": layer.qweight.view(scheme.storage.code_dtype), "scale": layer.scale}
    elif kind == "IntxUnpackedToInt8Tensor":
        # torchao's intX codes are signed: code - 2**(bits-1), with the zero point shifted alike
        offset = 2 ** (scheme.bits - 1)
        codes = unpack_uintx(layer.qweight, scheme.bits, layer.in_features).to(torch.int16) - offset
        tensors = {"qdata": codes, "scale": layer.scale, "zero_point": layer.zero.float() - offset}
    else:
        return False
    for name, value in tensors.items():
        current = getattr(weight, name, None)
        if not isinstance(current, torch.Tensor) or tuple(current.shape) != tuple(value.shape):
            return False
        # a float zero point in the scale's dtype (IntxUnpackedToInt8Tensor's documented alternative to int8)
        target = weight.scale.dtype if name == "zero_point" else current.dtype
        tensors[name] = value.to(target).contiguous()
    for name, value in tensors.items():
        setattr(weight, name, value)
    try:
        adopted = weight.dequantize().float()
    except Exception:
        return False
    # torchao dequantizes in the layer's dtype (bf16: about 3 significant digits), quantrt in float32
    tolerance = 1e-5 if dequantized.dtype == torch.float32 else 2e-2
    return torch.allclose(adopted, dequantized.float(), rtol=tolerance, atol=tolerance * float(dequantized.abs().max()))


def _is_quantized(weight: torch.Tensor) -> bool:
    return type(weight) not in (torch.Tensor, nn.Parameter)


class TorchaoBackend(Backend):
    name = "torchao"
    derived_attributes = ("backend_weight",)

    def unavailable_reason(self, scheme: Scheme, device: torch.device) -> str | None:
        try:
            torchao_config(scheme, torch.device(device))
        except TorchaoCannotServe as e:
            return str(e)
        return None

    def layer_unavailable_reason(self, scheme: Scheme, device: torch.device, shape: tuple[int, int],
                                 dtype: torch.dtype | None) -> str | None:
        if dtype is not None and dtype not in SERVED_DTYPES:
            return f"torchao quantizes bfloat16, float16 and float32 layers, not {dtype}"
        return None

    def copy_bytes(self, scheme: Scheme, device: torch.device, shape: tuple[int, int],
                   dtype: torch.dtype) -> int | None:
        """torchao's copies beside the buffers, from its layouts (CPU checked against `extra_bytes` in the tests;
        CUDA from torchao's documentation): float32 scales of int8 and fp8 (a view only in float32 layers), int8
        zero points of int8, one int8 per intX code plus zero points in the layer's dtype, and the CUDA int4
        tile packing (packed codes plus bf16 scales and zeros) and fp8 dynamic-activation weights, which torchao
        quantizes itself."""
        device = torch.device(device)
        n, k = shape
        groups = 1 if scheme.group_size is None else k // scheme.group_size
        scale_copy = 0 if dtype == torch.float32 else n * groups * 4
        try:
            config = type(torchao_config(scheme, device, dtype)).__name__
        except TorchaoCannotServe:
            return None
        if config.startswith("Int4WeightOnly"):  # tinygemm: int32-packed codes, bf16 [K/g, N, 2] scales and zeros
            return n * k // 2 + n * groups * 4
        if scheme.activation in ("fp8_tensor", "fp8_row"):
            return n * k + (n * 4 if scheme.activation == "fp8_row" else 4)
        tensor = scheme.storage.torchao_tensor
        if tensor == "Int8Tensor":
            return scale_copy + n * groups
        if tensor == "Float8Tensor":
            return scale_copy
        if tensor == "IntxUnpackedToInt8Tensor":
            return n * k + n * groups * dtype.itemsize
        return None

    def prepare(self, layer: QuantizedLinear) -> None:
        layer.backend_weight = None
        if layer.qweight.is_meta:  # a skeleton before its tensors are loaded: nothing to build yet
            return
        dtype = layer.scale.dtype
        device = layer.qweight.device
        # a layer moved to another dtype after its backend was chosen (layer.to(torch.float64))
        reason = self.layer_unavailable_reason(layer.scheme, device, (layer.out_features, layer.in_features), dtype)
        if reason is not None:
            raise BackendUnavailable(f"layer {layer.name!r} ({layer.scheme.name}) is served by torchao, and {reason}; "
                                     f"convert the model to one of those dtypes, or quantize it in {dtype} with "
                                     f"backend='auto' (which falls back) or backend='reference'")
        try:
            config = torchao_config(layer.scheme, device, dtype)
        except TorchaoCannotServe as e:
            raise RuntimeError(f"layer {layer.name!r}: torchao cannot serve {layer.scheme.name} on {device}: {e}") from e
        weight = layer.dequantize().to(dtype)
        try:
            backend_weight = self._quantize(weight, config)
        except Exception as first:
            if not type(config).__name__.startswith("Int4WeightOnly"):
                raise RuntimeError(f"layer {layer.name!r}: torchao {distribution_version('torchao')} failed to quantize its "
                                   f"{tuple(weight.shape)} {dtype} weight with {type(config).__name__} on {device}: "
                                   f"{type(first).__name__}: {first}") from first
            # the CUDA int4 packing refused this layer (shape, GPU): the unpacked intX path serves any layer
            config = _intx_weight_config(layer.scheme, device, dtype)
            backend_weight = self._quantize(weight, config)
        layer.backend_config = type(config).__name__
        if _takes_quantrt_codes(backend_weight, layer.scheme):
            if _adopt_quantrt_codes(backend_weight, layer, weight):
                layer.backend_config += " (quantrt's codes)"
            else:
                backend_weight = self._quantize(weight, config)
                layer.backend_config += " (requantized by torchao)"
        layer.backend_weight = backend_weight

    @staticmethod
    def _quantize(weight: torch.Tensor, config) -> torch.Tensor:
        quantize_ = _quantization_module().quantize_
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        quantize_(linear, config)
        if not _is_quantized(linear.weight):
            # torchao skips weights it cannot take (a K its group size does not divide) without an error
            raise RuntimeError(f"{type(config).__name__} left the {tuple(weight.shape)} weight unquantized")
        return linear.weight.detach()

    def linear(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        weight = layer.backend_weight
        if weight is None:
            raise RuntimeError(f"layer {layer.name!r}: its torchao weight was never built (the layer was on the "
                               f"meta device when prepared); load its tensors, then call layer.backend.prepare(layer)")
        y = F.linear(x.to(weight.dtype), weight, layer.bias)
        return y.to(x.dtype)


BACKEND = TorchaoBackend()
