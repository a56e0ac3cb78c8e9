"""The optimum-quanto backend: serve a QuantizedLinear with a quanto weight tensor.

How a layer is built (`prepare`), into what `freeze` leaves on a QLinear (a frozen WeightQBytesTensor /
WeightQBitsTensor), kept as `layer.backend_weight`: a plain attribute, not a buffer, so `state_dict()` stays
in quantrt's format.
- 8-bit (qint8, qfloat8): quanto's layout is quantrt's, so the WeightQBytesTensor is made of views of the
  layer's buffers, no copy: its data [N, K] is quantrt's qweight (int8, or the fp8 codes stored as uint8
  viewed as quanto's float8 dtype) and its scale [N, 1] quantrt's scale (quanto's scale * code is quantrt's
  dequantization). Exception: on CUDA, quanto's Marlin fp8 tensor (e4m3, SM >= 8.0, N and K multiples of
  64/128) repacks the codes into storage of its own.
- 4 / 2-bit (qint4, qint2): quanto packs codes along its group rows, not along K as quantrt does, and wants a
  shift (zero * scale) where quantrt stores zero points, so quanto's own `quantize_weight` quantizes the
  layer's dequantized weight (float32, cast to the layer's dtype) with quantrt's scales and zero points passed
  in as quanto's scale and shift: the quanto tensor holds exactly quantrt's codes (quanto's dequantization,
  scale * code - shift, is quantrt's (code - zero) * scale with shift = zero * scale) and any group size works,
  not only the 128 / 96 / 64 / 32 that `quanto.quantize` + `freeze` would pick on their own. Its scale is a
  view of quantrt's; its packed codes and shifts are copies.
Memory: what does not share the buffers' storage (the 4/2-bit packed codes and shifts, Marlin's fp8 repack) is
`Backend.extra_bytes` and counted by `storage_bytes()`, `summary()` and `memory_footprint()`.

Schemes (cpu and cuda):

| scheme | quanto qtype |
|---|---|
| int8wo, per channel only (quanto's 8-bit weights have one scale per output channel) | qint8 |
| int4wo, uint4wo (any group size dividing K) | qint4 |
| uint2wo | qint2 |
| float8wo_e4m3 / float8wo_e5m2 | qfloat8_e4m3fn / qfloat8_e5m2 |

Not served: uint1/3/5/6/7, fpX (quanto has no such weights), and every activation-quantizing scheme: quanto
quantizes activations with static scales calibrated on sample inputs (`optimum.quanto.Calibration`), not
dynamically per token or per tensor, and quantrt's fp8 static scale is calibrated after the layer is built.

Kernels: on CUDA, quanto picks its optimized kernels (Marlin, AWQ, tinygemm) where they apply; on CPU quantrt
asks for quanto's plain tensors, because quanto's optimized CPU int4 path (tinygemm, bf16, group 128) does
not run under torch.compile (torch 2.13: "expected scalar type Float but found BFloat16" in
_weight_int4pack_mm_for_cpu) and stores a lossy bf16 zero point. With plain tensors every scheme above
compiles with torch.compile(fullgraph=True) on CPU in fp32 and bf16, each checked once against eager
(tests/runtime/backends/test_quanto.py keeps two, among them int4 / group 128 / bf16). Compiling quanto's
CUDA kernels has not been checked here.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..formats import FORMATS
from ..version import distribution_version
from . import Backend

if TYPE_CHECKING:
    from ..modules import QuantizedLinear
    from ..schemes import Scheme

# storage format name -> the quanto qtype that stores it (`StorageFormat.quanto_qtype`)
QTYPE_NAMES = {name: storage.quanto_qtype for name, storage in FORMATS.items() if storage.quanto_qtype}


@functools.cache
@functools.cache
def _quanto():
    """optimum.quanto, imported on first use."""
    import optimum.quanto as quanto

    return quanto


def qtype_name(scheme: Scheme) -> str:
    """The quanto qtype that stores `scheme`'s weights. Raises ValueError with the reason if none does."""
    if not scheme.weight_only:
        if scheme.activation == "fp8_static":
            raise ValueError("quantrt calibrates the fp8 static activation scale after the layer is built, and "
                             "quanto keeps its own calibrated activation scales (optimum.quanto.Calibration)")
        raise ValueError("quanto quantizes activations with static scales calibrated on sample inputs, not "
                         "dynamically per token or per tensor as this scheme does")
    storage = scheme.storage
    name = storage.quanto_qtype
    if name is None:
        qtypes = sorted(QTYPE_NAMES.values())
        raise ValueError(f"quanto has no {scheme.format} weights (it has {', '.join(qtypes[:-1])} and {qtypes[-1]})")
    if storage.bits == 8 and scheme.group_size is not None:
        raise ValueError(f"quanto's 8-bit weights have one scale per output channel; {scheme.format} in groups of "
                         f"{scheme.group_size} is not a quanto format (use group_size=None)")
    return name


def _qbytes_weight_of_buffers(layer: QuantizedLinear, qtype, optimized: bool) -> torch.Tensor:
    """quanto's 8-bit weight tensor for `layer`, made of views of its buffers: data [N, K] is the qweight
    (int8; fp8 codes are stored as uint8 and viewed as quanto's float8 dtype), scale [N, 1] the scale.
    `optimized` lets quanto pick its optimized tensor (on CUDA: Marlin for fp8 e4m3, which repacks)."""
    from optimum.quanto.tensor.weights import WeightQBytesTensor

    data = layer.qweight if layer.qweight.dtype == qtype.dtype else layer.qweight.view(qtype.dtype)
    # a single output channel is "per tensor" to quanto (axis None, as quantize_weight makes it): a scalar scale
    axis, scale = (None, layer.scale.reshape(())) if layer.out_features == 1 else (0, layer.scale.reshape(-1, 1))
    build = WeightQBytesTensor.create if optimized else WeightQBytesTensor
    return build(qtype, axis, data.size(), data.stride(), data, scale, activation_qtype=None)


class QuantoBackend(Backend):
    name = "quanto"
    derived_attributes = ("backend_weight",)

    def unavailable_reason(self, scheme: Scheme, device: torch.device) -> str | None:
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            return f"quantrt uses quanto on cpu and cuda devices only, not {device.type}"
        if distribution_version("optimum-quanto") is None:
            return "optimum-quanto is not installed (pip install optimum-quanto)"
        try:
            qtype_name(scheme)
        except ValueError as e:
            return str(e)
        try:
            _quanto()
        except Exception as e:  # a quanto built for another torch fails here in many ways
            return f"optimum-quanto {distribution_version('optimum-quanto')} does not import: {type(e).__name__}: {e}"
        return None

    def copy_bytes(self, scheme: Scheme, device: torch.device, shape: tuple[int, int],
                   dtype: torch.dtype) -> int | None:
        """quanto's copies beside the buffers: none for 8-bit weights (views), except Marlin's fp8 repack on
        CUDA; quanto's own packing of 4/2-bit codes plus its shifts in the layer's dtype (CPU checked against
        `extra_bytes` in the tests; quanto's CUDA packings are taken to be the same size, unverified)."""
        n, k = shape
        if scheme.storage.packed:
            return n * k * scheme.bits // 8 + n * (k // scheme.group_size) * dtype.itemsize
        if (torch.device(device).type == "cuda" and scheme.storage.quanto_qtype == "qfloat8_e4m3fn"
                and n % 64 == 0 and k % 128 == 0):
            return n * k
        return 0

    def prepare(self, layer: QuantizedLinear) -> None:
        layer.backend_weight = None
        if layer.qweight.is_meta:  # a skeleton before its tensors are loaded: nothing to build yet
            return
        quanto = _quanto()
        scheme = layer.scheme
        try:
            qtype = getattr(quanto, qtype_name(scheme))
        except ValueError as e:
            raise RuntimeError(f"layer {layer.name!r}: quanto cannot serve {scheme.name}: {e}") from e
        dtype = layer.scale.dtype
        optimized = layer.qweight.device.type == "cuda"
        if scheme.storage.packed:  # qint4, qint2
            # quanto: w = scale * code - shift; quantrt: w = (code - zero) * scale, so shift = zero * scale
            weight = layer.dequantize().to(dtype)
            scale = layer.scale.reshape(-1, 1)
            shift = (layer.zero.float() * layer.scale.float()).to(dtype).reshape(-1, 1)
            qweight = quanto.quantize_weight(weight, qtype, axis=0, scale=scale, shift=shift,
                                             group_size=scheme.group_size, optimized=optimized)
        else:
            qweight = _qbytes_weight_of_buffers(layer, qtype, optimized)
        layer.backend_weight = qweight
        layer.backend_config = qtype.name

    def linear(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        weight = layer.backend_weight
        if weight is None:
            raise RuntimeError(f"layer {layer.name!r}: its quanto weight was never built (the layer was on the "
                               f"meta device when prepared); load its tensors, then call layer.backend.prepare(layer)")
        # quanto's CPU int8 kernel (_weight_int8pack_mm) refuses rows that are not contiguous
        y = F.linear(x.to(weight.dtype).contiguous(), weight, layer.bias)
        return y.to(x.dtype)


BACKEND = QuantoBackend()
