"""The aten backend: torch core's own CPU weight-only kernels, reading quantrt's codes with no copy beside them.

| scheme | kernel | resident form |
|---|---|---|
| int8wo, per channel | `aten._weight_int8pack_mm(x, qweight [N, K] int8, scale [N])` | quantrt's buffers as they are |
| int4wo, uint4wo, group 32 / 64 / 128 / 256, N % 16 == 0 | `aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_offsets [K/g, N, 2])` | the codes in torch's CPU packing |

Both kernels take x, scales and offsets in one dtype (bfloat16, float16 or float32) and x as a 2-D row-major
matrix; they are CPU kernels (torch's CUDA int4 kernel has another packing; on CUDA the triton backend serves).
They are written for few rows. Above `INT8_KERNEL_MAX_ROWS` rows an int8 layer converts its codes block by block
into x's dtype (transient, in cache), multiplies with F.linear and scales the output's columns, which is faster
there; a 4-bit layer always calls its kernel, since unpacking torch's packing in torch ops is slower still
(measured on a 2-thread AVX512 CPU, torch 2.13: README "Backends"). The kernels have no derivative: an input that
needs a gradient goes through the dequantized weight (`dequantized_weight`).

4-bit layout. torch's packing (`_convert_weight_to_int4pack_for_cpu`) places the codes in blocks of rows, k-major
within a block, in an order that depends on the CPU ISA (blocks of 64 rows under AVX512, 32 under AVX2). quantrt
reads that order off the packing op itself once per row count (`int4_layout`), which gives both directions in
plain torch: `prepare` repacks the layer's `qweight` buffer in place (same shape [N, K/2], same bytes: the packed
codes are the only copy), and `stored_tensors` (state_dict, save_pretrained, `layer.dequantize()`) and `release`
(another backend takes the layer) give quantrt's layout back, bit for bit.

4-bit numerics. torch's kernel computes w = (q - 8) * s + o per group; quantrt stores w = (q - z) * s, so
o = (8 - z) * s, computed in float32 and rounded to the layer's dtype: q and s are quantrt's exactly, and the weight
differs from quantrt's by the rounding of o, at most |8 - z| * s * 2^-9 in bfloat16 (z in [0, 15]: s / 64, a 64th
of a quantization step), |8 - z| * s * 2^-11 in float16, |8 - z| * s * 2^-24 in float32. The zero points stay in
quantrt's `zero` buffer (exact, for saving). The offsets are kept beside the buffers (with the scales interleaved
as the kernel wants them, the `scale` buffer becoming a view of that tensor, so the scales are kept once) where
their bytes stay within `COPY_LIMIT` of what the scheme stores (bf16/fp16: group >= 128; fp32: group 256);
otherwise they are computed on every call from the buffers (three small ops, about 0.1 ms at 3072x3072 and group
64; no resident copy), which then keep the scales and zero points as [K/g, N] in memory for that.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..formats import ATEN_INT4_KERNEL, ATEN_INT8_KERNEL
from . import COPY_LIMIT, Backend, BackendUnavailable, scheme_bytes

# the alignment torch's CPU weight-only kernels assume of their operands (the CPU allocator's)
KERNEL_ALIGNMENT = 64

if TYPE_CHECKING:
    from ..modules import QuantizedLinear
    from ..schemes import Scheme

SERVED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT4_GROUP_SIZES = (32, 64, 128, 256)
# the value of `layer.resident_layout` while a 4-bit layer's qweight holds torch's CPU packing
INT4_PACKED = "aten-int4-cpu"
# codes converted at a time when a layer is repacked: bounds the temporaries of big layers (quantize-on-load's peak)
REPACK_CODES = 2**22
# rows up to which the int8 kernel beats converting the weight block by block (measured: README "Backends"),
# and the weight rows of a block (6 MB of bf16 at K = 3072: they stay in cache while multiplied)
INT8_KERNEL_MAX_ROWS = 24
INT8_DEQUANTIZE_ROWS = 1024


@dataclass(frozen=True)
class RowBlocks:
    """`count` consecutive blocks of `rows` rows each, starting at row `first`. For each column k, a block
    keeps its rows' codes in `rows` consecutive nibbles (low nibble first); `slots[r]` is the nibble of row r."""

    first: int
    count: int
    rows: int
    slots: torch.Tensor  # int64 [rows]


def _nibble_positions(n: int, k: int) -> torch.Tensor:
    """Where torch's CPU int4 packing puts each code of an [n, k] weight: int64 [n, k], the index of its nibble
    in the packed bytes (byte * 2 + 1 for a high nibble). Read off the op by packing the codes' own indices,
    four bits at a time."""
    index = torch.arange(n * k, dtype=torch.int64)
    held = torch.zeros(n * k, dtype=torch.int64)  # held[p]: the index of the code at nibble p
    shift = 0
    while shift == 0 or (n * k - 1) >> shift:
        codes = ((index >> shift) & 15).to(torch.int32).view(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).reshape(-1)
        held |= torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).to(torch.int64) << shift
        shift += 4
    positions = torch.empty_like(held)
    positions[held] = index
    return positions.view(n, k)


@functools.cache
def int4_layout(n: int) -> tuple[RowBlocks, ...] | str:
    """How torch's CPU int4 packing lays out a weight of `n` rows (any K), or why quantrt cannot tell. The
    packing is read at K = 2 and 4 and must follow nibble(row, k) = block_start * K + k * block_rows + slot(row),
    checked at K = 6, with the same slots in every full block."""
    try:
        at = {k: _nibble_positions(n, k) for k in (2, 4, 6)}
    except RuntimeError as e:  # an op missing from this torch, or one that refuses n
        return f"torch's CPU int4 packing refuses {n} rows: {str(e).splitlines()[0]}"
    start = (at[4][:, 0] - at[2][:, 0]) // 2  # the first row of each row's block
    rows = at[2][:, 1] - at[2][:, 0]  # the rows of each row's block
    slot = at[2][:, 0] - 2 * start
    for k, positions in at.items():
        if not torch.equal(positions, start[:, None] * k + torch.arange(k)[None] * rows[:, None] + slot[:, None]):
            return "torch's CPU int4 packing has a layout quantrt does not know (codes are not k-major in row blocks)"
    blocks, row = [], 0
    while row < n:
        size = int(rows[row])
        slots = slot[row:row + size]
        count = 1
        while (row + (count + 1) * size <= n and int(rows[row + count * size]) == size
               and torch.equal(slot[row + count * size:row + (count + 1) * size], slots)):
            count += 1
        if int(start[row]) != row or sorted(slots.tolist()) != list(range(size)):
            return "torch's CPU int4 packing has a layout quantrt does not know (rows do not fill their blocks)"
        blocks.append(RowBlocks(row, count, size, slots.clone()))
        row += count * size
    return tuple(blocks)


def pack_int4(codes: torch.Tensor, layout: tuple[RowBlocks, ...]) -> torch.Tensor:
    """uint8 codes [N, K] (0..15) -> torch's CPU int4 packing, uint8 [N, K / 2]."""
    n, k = codes.shape
    parts = []
    for b in layout:
        block = codes[b.first:b.first + b.count * b.rows].reshape(b.count, b.rows, k).transpose(1, 2)  # [., K, rows]
        parts.append(torch.empty_like(block).index_copy_(2, b.slots.to(codes.device), block).reshape(-1))
    nibbles = torch.cat(parts).view(-1, 2)
    return (nibbles[:, 0] | (nibbles[:, 1] << 4)).view(n, k // 2)


def unpack_int4(packed: torch.Tensor, layout: tuple[RowBlocks, ...]) -> torch.Tensor:
    """torch's CPU int4 packing, uint8 [N, K / 2] -> uint8 codes [N, K]."""
    k = packed.shape[1] * 2
    nibbles = torch.stack([packed.reshape(-1) & 15, packed.reshape(-1) >> 4], dim=-1).reshape(-1)
    parts = []
    for b in layout:
        block = nibbles[b.first * k:(b.first + b.count * b.rows) * k].view(b.count, k, b.rows)
        parts.append(block.index_select(2, b.slots.to(packed.device)).transpose(1, 2).reshape(b.count * b.rows, k))
    return torch.cat(parts)


def _chunks(layout: tuple[RowBlocks, ...], k: int):
    """(a slice of the weight's rows, the layout of those rows alone): whole blocks, about REPACK_CODES codes at a
    time, in order. A block's codes take the same rows of [N, K / 2] bytes in both layouts."""
    for b in layout:
        step = max(1, REPACK_CODES // (b.rows * k))
        for i in range(0, b.count, step):
            count = min(step, b.count - i)
            first = b.first + i * b.rows
            yield slice(first, first + count * b.rows), (RowBlocks(0, count, b.rows, b.slots),)


def to_torch_packing(qweight: torch.Tensor, layout: tuple[RowBlocks, ...]) -> torch.Tensor:
    """quantrt's 4-bit codes (uint8 [N, K / 2], code 2j in the low nibble of byte j) -> torch's CPU packing."""
    k = qweight.shape[1] * 2
    packed = torch.empty_like(qweight)
    for rows, part in _chunks(layout, k):
        packed[rows] = pack_int4(torch.stack([qweight[rows] & 15, qweight[rows] >> 4], dim=-1).view(-1, k), part)
    return packed


def to_quantrt_packing(packed: torch.Tensor, layout: tuple[RowBlocks, ...]) -> torch.Tensor:
    """torch's CPU packing -> quantrt's 4-bit codes, bit for bit what `to_torch_packing` was given."""
    qweight = torch.empty_like(packed)
    for rows, part in _chunks(layout, packed.shape[1] * 2):
        codes = unpack_int4(packed[rows], part)
        qweight[rows] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return qweight


def scales_and_offsets(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """quantrt's scale and zero [N, K/g] -> the kernel's [K/g, N, 2] in the scale's dtype: (s, (8 - z) * s), the
    offset computed as 8 s - z s in float32 and rounded once (8 s is exact). Fastest where scale and zero are
    views of [K/g, N] memory, as a layer that computes them per call keeps them (under torch.compile 5x)."""
    s, z = scale.t(), zero.t()
    return torch.stack([s, torch.addcmul(s * 8, z, s, value=-1)], dim=-1)


def keeps_offsets(scheme: Scheme, shape: tuple[int, int], dtype: torch.dtype) -> bool:
    """Whether a 4-bit layer keeps its kernel offsets beside the buffers: where their bytes stay within
    COPY_LIMIT of what the scheme stores. Otherwise they are computed on every call."""
    n, k = shape
    offset_bytes = n * (k // scheme.group_size) * dtype.itemsize
    return offset_bytes <= COPY_LIMIT * scheme_bytes(scheme, shape, dtype)


def _is_int4(scheme: Scheme) -> bool:
    """Whether `scheme`'s format is read by torch's CPU int4 kernel (4-bit codes)."""
    return scheme.storage.aten_kernel == ATEN_INT4_KERNEL


class AtenBackend(Backend):
    name = "aten"
    derived_attributes = ("int4_scales_and_offsets", "int4_layout")

    def unavailable_reason(self, scheme: Scheme, device: torch.device) -> str | None:
        device = torch.device(device)
        if device.type != "cpu":
            return (f"torch's weight-only kernels that quantrt uses (_weight_int8pack_mm, "
                    f"_weight_int4pack_mm_for_cpu) are CPU kernels, not {device.type}")
        if scheme.activation != "none":
            return "torch's CPU kernels are weight-only (activations stay in the layer's dtype)"
        kernel = scheme.storage.aten_kernel
        if kernel is None:
            return "torch has CPU weight-only kernels for int8 (per channel) and 4-bit codes only"
        if kernel == ATEN_INT8_KERNEL and scheme.group_size is not None:
            return (f"torch's int8 kernel ({ATEN_INT8_KERNEL}) has one scale per output channel, not groups "
                    f"of {scheme.group_size}")
        if kernel == ATEN_INT4_KERNEL and scheme.group_size not in INT4_GROUP_SIZES:
            return (f"torch's int4 kernel takes groups of {', '.join(map(str, INT4_GROUP_SIZES))}, not "
                    f"{scheme.group_size}")
        if not hasattr(torch.ops.aten, kernel):
            return f"torch {torch.__version__} has no aten.{kernel}"
        return None

    def layer_unavailable_reason(self, scheme: Scheme, device: torch.device, shape: tuple[int, int],
                                 dtype: torch.dtype | None) -> str | None:
        if dtype is not None and dtype not in SERVED_DTYPES:
            return f"torch's CPU weight-only kernels compute in bfloat16, float16 or float32, not {dtype}"
        if _is_int4(scheme):
            if shape[0] % 16:
                return f"torch's CPU int4 packing needs N % 16 == 0, N is {shape[0]}"
            layout = int4_layout(shape[0])
            if isinstance(layout, str):
                return layout
        return None

    def copy_bytes(self, scheme: Scheme, device: torch.device, shape: tuple[int, int],
                   dtype: torch.dtype) -> int | None:
        if _is_int4(scheme) and keeps_offsets(scheme, shape, dtype):
            return shape[0] * (shape[1] // scheme.group_size) * dtype.itemsize
        return 0

    def prepare(self, layer: QuantizedLinear) -> None:
        layer.int4_scales_and_offsets = layer.int4_layout = None
        if layer.qweight.is_meta:  # a skeleton before its tensors are loaded: nothing to build yet
            return
        for name, tensor in list(layer.named_buffers(recurse=False)):
            if tensor.device.type == "cpu" and tensor.data_ptr() % KERNEL_ALIGNMENT:
                # a view into a checkpoint's memory map (diffusers' and transformers' loaders keep those), at
                # safetensors' 8-byte alignment: torch's CPU int8/int4 kernels crash on it, they expect 64
                setattr(layer, name, tensor.clone())
        scheme, shape = layer.scheme, (layer.out_features, layer.in_features)
        dtype, device = layer.scale.dtype, layer.qweight.device
        reason = self.unavailable_reason(scheme, device) or self.layer_unavailable_reason(scheme, device, shape, dtype)
        if reason is not None:
            # moved to another device or dtype after the backend was chosen: quantrt's layout back, then say why
            self.release(layer)
            raise BackendUnavailable(f"layer {layer.name!r} ({scheme.name}) is served by aten, and {reason}; move "
                                     f"it back, or quantize it with backend='auto' (which falls back) for {device} "
                                     f"in {dtype}")
        if not _is_int4(scheme):
            return
        # kept on the layer so that forward (and torch.compile tracing it) never calls the cached probe
        layer.int4_layout = int4_layout(shape[0])
        if layer.resident_layout != INT4_PACKED:
            layer.qweight = to_torch_packing(layer.qweight, layer.int4_layout)
            layer.resident_layout = INT4_PACKED
        if keeps_offsets(scheme, shape, dtype):
            interleaved = scales_and_offsets(layer.scale, layer.zero)
            layer.scale = interleaved[..., 0].t()  # the scales are kept once: the buffer is a view
            layer.int4_scales_and_offsets = interleaved
        else:
            # kept as [K/g, N] in memory (the buffers views of it, same bytes): the offsets computed on every call
            # read them in order
            layer.scale = layer.scale.t().contiguous().t()
            layer.zero = layer.zero.t().contiguous().t()

    def stored_tensors(self, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
        tensors = super().stored_tensors(layer)
        if layer.resident_layout == INT4_PACKED:
            tensors["qweight"] = to_quantrt_packing(layer.qweight, int4_layout(layer.out_features))
        return tensors

    def release(self, layer: QuantizedLinear) -> None:
        if layer.resident_layout == INT4_PACKED:
            layer.qweight = self.stored_tensors(layer)["qweight"]
            layer.resident_layout = None
        for name in ("scale", "zero"):
            tensor = getattr(layer, name, None)
            if tensor is not None and not tensor.is_contiguous():
                setattr(layer, name, tensor.contiguous())
        super().release(layer)

    def linear(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, layer.in_features)
        if rows.stride(-1) != 1:  # both kernels read rows of x as contiguous memory
            rows = rows.contiguous()
        if rows.requires_grad and torch.is_grad_enabled():
            # the kernels have no derivative: an input that needs a gradient (a layer before this one kept in full
            # precision, LoRA) goes through the dequantized weight, as the reference computes it
            y = F.linear(rows, self.dequantized_weight(layer, rows.dtype), layer.bias)
        elif _is_int4(layer.scheme):
            y = self._int4(layer, rows)
        else:
            y = self._int8(layer, rows)
        return y.reshape(*x.shape[:-1], layer.out_features)

    @staticmethod
    def dequantized_weight(layer: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
        """The layer's weight [N, K] in `dtype`: quantrt's dequantization (float32) rounded once, read from the
        resident codes (torch's packing for 4 bits) in torch ops that torch.compile traces."""
        if not _is_int4(layer.scheme):
            return layer.qweight.to(dtype) * layer.scale
        codes = unpack_int4(layer.qweight, layer.int4_layout)
        n, k = codes.shape
        groups = layer.scale.shape[1]
        codes = codes.view(n, groups, k // groups).float()
        weight = (codes - layer.zero.float()[..., None]) * layer.scale.float()[..., None]
        return weight.view(n, k).to(dtype)

    @staticmethod
    def _int8(layer: QuantizedLinear, rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] <= INT8_KERNEL_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(rows, layer.qweight, layer.scale.reshape(-1))
            return y if layer.bias is None else y + layer.bias
        # y = x Q^T block by block of INT8_DEQUANTIZE_ROWS weight rows, each block of codes converted to x's dtype
        # (exactly: |code| <= 127) and multiplied while still in cache, then the scales multiply y's columns. In
        # float16 a sum of codes times x can overflow, so there each block is dequantized (codes times scale)
        n = layer.out_features
        fold = rows.dtype != torch.float16
        y = rows.new_empty(rows.shape[0], n)
        for start in range(0, n, INT8_DEQUANTIZE_ROWS):
            end = min(n, start + INT8_DEQUANTIZE_ROWS)
            weight = layer.qweight[start:end].to(rows.dtype)
            y[:, start:end] = F.linear(rows, weight if fold else weight * layer.scale[start:end])
        if fold:
            y = y.mul_(layer.scale.reshape(-1))
        return y if layer.bias is None else y.add_(layer.bias)

    @staticmethod
    def _int4(layer: QuantizedLinear, rows: torch.Tensor) -> torch.Tensor:
        # the kernel at every M: dequantizing torch's packing in torch ops is slower than it even at 256 rows
        if layer.resident_layout != INT4_PACKED:
            raise RuntimeError(f"layer {layer.name!r}: its codes are not in torch's CPU int4 packing (the layer was "
                               f"on the meta device when prepared); load its tensors, then call "
                               f"layer.backend.prepare(layer)")
        interleaved = layer.int4_scales_and_offsets
        if interleaved is None:
            interleaved = scales_and_offsets(layer.scale, layer.zero)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, layer.qweight, layer.scheme.group_size, interleaved)
        return y if layer.bias is None else y + layer.bias


BACKEND = AtenBackend()
