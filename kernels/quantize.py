"""Weight and activation quantization in pure torch: every storage format of quantrt and its inverse.

These functions are the numerical definition of each format. The Triton kernels read exactly what they
write, and the reference backend and the tests dequantize with them. Weights are [N, K] (out, in) as in
`nn.Linear`; scales and zero points are [N, K // group_size] (per group) or [N, 1] (per channel), in
`scale_dtype` (default: the weight's dtype). All math is done in float32.

Formats:
    int8      w = q * s,                  q int8 in [-127, 127], symmetric
    uintX     w = (q - z) * s,            q in [0, 2**X - 1] packed X bits per weight (packing.py),
                                          z a float zero point in the code domain, 1 <= X <= 8
    fpX       w = decode(c) * s,          c an X-bit float code: 1 sign, A exponent, B mantissa bits,
                                          bias 2**(A-1) - 1, subnormals, no inf/nan, 3 <= X <= 7
    fp8       w = float(q) * s,           q torch.float8_e4m3fn or torch.float8_e5m2
    GGUF      w = (q - offset) * a - b,   GGUF's block types (Q8_0 ... Q6_K): codes in bit planes (Q8_0: int8),
                                          a and b from fp16 block scales and integer sub-block scales
                                          (packing.GGUF_BLOCKS has the layout), never rounded to another dtype
"""

import torch

from .packing import GgufBlocks, gguf_blocks, pack_block_params, pack_uintx, unpack_block_params, unpack_uintx

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[N, K] -> float32 [N, K // g, g]; g = K when group_size is None (one group per channel)."""
    n, k = w.shape
    g = k if group_size is None else group_size
    if g <= 0 or k % g:
        raise ValueError(f"K={k} is not a multiple of the group size {g}")
    return w.float().reshape(n, k // g, g)


def _safe_scale(absmax: torch.Tensor, qmax: float, scale_dtype: torch.dtype) -> torch.Tensor:
    # all-zero groups get scale 1 so that 0 / s stays 0. The scale is rounded up to the stored dtype, never
    # down: then absmax / scale <= qmax (the largest weight is not clipped), and a scale below the dtype's
    # smallest subnormal (fp16 scales of fp8 e5m2 rows with absmax < 2e-3) is not flushed to 0 (0 / 0: NaN)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    stored = scale.to(scale_dtype)
    rounded_down = stored.float() < scale
    return torch.where(rounded_down, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)


def quantize_int8(
    w: torch.Tensor, group_size: int | None = None, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8. w: [N, K] -> (q int8 [N, K], scale [N, K // g])."""
    wg = _grouped(w, group_size)
    scale = _safe_scale(wg.abs().amax(dim=-1), 127.0, scale_dtype or w.dtype)
    q = torch.round(wg / scale.float().unsqueeze(-1)).clamp_(-127, 127)
    return q.to(torch.int8).reshape(w.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K], scale [N, G] -> float32 [N, K]."""
    n, k = q.shape
    groups = scale.shape[-1]
    w = q.float().reshape(n, groups, k // groups) * scale.float().unsqueeze(-1)
    return w.reshape(n, k)


def _uintx_params(lo: torch.Tensor, hi: torch.Tensor, qmax: float,
                  scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # a group far from 0 with a narrow range would get a zero point -lo / scale beyond scale_dtype's range
    # (fp16, 7 bits: |lo| > 256 (hi - lo); inf there dequantizes to inf): its scale is widened so that
    # |zero| <= max / 2, which costs nothing the weight's own dtype could resolve
    span = hi - lo
    floor = torch.maximum(lo.abs(), hi.abs()) * (2 * qmax / torch.finfo(scale_dtype).max)
    scale = _safe_scale(torch.where(span > 0, torch.maximum(span, floor), span), qmax, scale_dtype)
    return scale, (-lo / scale.float()).to(scale_dtype)


def _uintx_codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: float) -> torch.Tensor:
    # wg: [N, G, g] float32; scale/zero: [N, G] -> float32 codes [N, G, g]
    return torch.round(wg / scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).clamp_(0, qmax)


def _uintx_group_mse(wg, codes, scale, zero) -> torch.Tensor:
    dq = (codes - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return (dq - wg).square_().mean(dim=-1)


# range shrink factors tried per group at <= 4 bits, where clipping outliers beats covering them
_CLIP_SEARCH = tuple(1.0 - 0.05 * i for i in range(16))


def quantize_uintx(
    w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric grouped X-bit. w: [N, K] -> (packed uint8 [N, K * bits / 8], scale [N, K // g],
    zero [N, K // g]). A group's range [lo, hi] maps onto the codes [0, 2**bits - 1]; the zero point is a
    float, rounded to scale_dtype before the codes are chosen so that the codes fit the stored parameters.
    At <= 4 bits the range is shrunk about its middle when that lowers the group's mean squared error
    (min/max ranges waste most codes on outliers there: 1-bit min/max is worse than zeros)."""
    scale_dtype = scale_dtype or w.dtype
    qmax = float(2**bits - 1)
    wg = _grouped(w, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale, zero = _uintx_params(lo, hi, qmax, scale_dtype)
    codes = _uintx_codes(wg, scale, zero, qmax)
    if bits <= 4:
        mid, best = (lo + hi) / 2, _uintx_group_mse(wg, codes, scale, zero)
        for shrink in _CLIP_SEARCH[1:]:
            s, z = _uintx_params(mid + (lo - mid) * shrink, mid + (hi - mid) * shrink, qmax, scale_dtype)
            c = _uintx_codes(wg, s, z, qmax)
            err = _uintx_group_mse(wg, c, s, z)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
            codes = torch.where(better.unsqueeze(-1), c, codes)
    return pack_uintx(codes.to(torch.uint8).reshape(w.shape), bits), scale, zero


def dequantize_uintx(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, k: int
) -> torch.Tensor:
    """packed uint8 [N, K * bits / 8], scale/zero [N, G] -> float32 [N, K]."""
    q = unpack_uintx(packed, bits, k).float()
    n, groups = scale.shape
    q = q.reshape(n, groups, k // groups)
    w = (q - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return w.reshape(n, k)


def check_floatx(ebits: int, mbits: int) -> None:
    bits = 1 + ebits + mbits
    if ebits < 1 or mbits < 0 or not 3 <= bits <= 7:
        raise ValueError(
            f"fp{bits}_e{ebits}m{mbits} is not a valid X-bit float: need ebits >= 1, mbits >= 0 and "
            f"3 <= 1 + ebits + mbits <= 7 (fp8 is float8wo_e4m3 / float8wo_e5m2)"
        )


def floatx_magnitudes(ebits: int, mbits: int) -> torch.Tensor:
    """float64 [2**(ebits+mbits)]: the magnitude of each non-negative code, increasing with the code."""
    bias = 2 ** (ebits - 1) - 1
    codes = torch.arange(2 ** (ebits + mbits), dtype=torch.int64)
    e, m = codes >> mbits, codes & (2**mbits - 1)
    subnormal = m.double() * 2.0 ** (1 - bias - mbits)
    normal = (1 + m.double() / 2**mbits) * torch.pow(2.0, (e - bias).double())
    return torch.where(e == 0, subnormal, normal)


def floatx_max(ebits: int, mbits: int) -> float:
    return float(floatx_magnitudes(ebits, mbits)[-1])


def quantize_floatx(
    w: torch.Tensor, ebits: int, mbits: int, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """X-bit float, per output channel scale, round to nearest. w: [N, K] ->
    (packed uint8 [N, K * X / 8], scale [N, 1])."""
    check_floatx(ebits, mbits)
    bits = 1 + ebits + mbits
    mags = floatx_magnitudes(ebits, mbits).to(w.device)
    wf = w.float()
    scale = _safe_scale(wf.abs().amax(dim=-1, keepdim=True), float(mags[-1]), scale_dtype or w.dtype)
    y = wf / scale.float()
    midpoints = ((mags[1:] + mags[:-1]) / 2).float()
    index = torch.bucketize(y.abs(), midpoints)  # nearest magnitude; clamps to the largest
    codes = index | (torch.signbit(y).to(torch.int64) << (bits - 1))
    return pack_uintx(codes, bits), scale


def dequantize_floatx(
    packed: torch.Tensor, scale: torch.Tensor, ebits: int, mbits: int, k: int
) -> torch.Tensor:
    """packed uint8 [N, K * X / 8], scale [N, 1] -> float32 [N, K]."""
    bits = 1 + ebits + mbits
    mags = floatx_magnitudes(ebits, mbits).float().to(packed.device)
    table = torch.cat([mags, -mags])  # code = sign << (bits - 1) | magnitude index
    codes = unpack_uintx(packed, bits, k).long()
    return table[codes] * scale.float()


def quantize_fp8(
    w: torch.Tensor, fp8: str, per_tensor: bool = False, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 (`fp8` in 'e4m3', 'e5m2'), scale per output channel [N, 1] or per tensor [1, 1].
    w: [N, K] -> (q float8 [N, K], scale)."""
    dtype = FP8_DTYPES[fp8]
    wf = w.float()
    absmax = wf.abs().amax() if per_tensor else wf.abs().amax(dim=-1, keepdim=True)
    scale = _safe_scale(absmax.reshape(-1, 1), torch.finfo(dtype).max, scale_dtype or w.dtype)
    fmax = torch.finfo(dtype).max
    q = (wf / scale.float()).clamp_(-fmax, fmax).to(dtype)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q float8 [N, K], scale [N, 1] or [1, 1] -> float32 [N, K]."""
    return q.float() * scale.float()


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row. x: [M, K] -> (q int8 [M, K], scale float32 [M, 1]). A row holding
    NaN or Inf gets a NaN or Inf scale (and codes 0 where x / scale is NaN), so the rows it multiplies come
    out non-finite as F.linear's would; the other rows are unaffected."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)  # NaN if the row has a NaN, inf if it has an inf
    # only an all-zero row needs a stand-in scale (0 / 0); `absmax > 0` alone would give a NaN row scale 1
    # and codes from casting NaN to int8, a finite wrong row
    scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax / 127.0)
    codes = torch.round(xf / scale).nan_to_num_(nan=0.0).clamp_(-127, 127)
    return codes.to(torch.int8), scale


def quantize_fp8_dynamic(x: torch.Tensor, fp8: str, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic fp8 per row ([M, 1] scale) or per tensor ([1, 1] scale). x: [M, K]."""
    dtype = FP8_DTYPES[fp8]
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    if not per_row:  # a 0 appended, so that an empty batch (M = 0) has a maximum too
        absmax = torch.cat([absmax.reshape(-1), absmax.new_zeros(1)]).amax().reshape(1, 1)
    fmax = torch.finfo(dtype).max
    scale = torch.where(absmax > 0, absmax / fmax, torch.ones_like(absmax))
    return (xf / scale).clamp_(-fmax, fmax).to(dtype), scale


def quantize_fp8_static(x: torch.Tensor, fp8: str, scale: torch.Tensor) -> torch.Tensor:
    """Static fp8 with a calibrated scale (a [1, 1] float32 tensor). x: [M, K] -> float8 [M, K]."""
    dtype = FP8_DTYPES[fp8]
    fmax = torch.finfo(dtype).max
    return (x.float() / scale).clamp_(-fmax, fmax).to(dtype)


def pack_gguf(fields: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF weight's fields -> (qweight, block_scales) as quantrt stores them. fields: "codes" [N, K] (uint8 in
    [0, 2**bits), Q8_0 int8), "d" and, where the type has them, "dmin" float16 [N, K / block], "scales" and "mins"
    [N, K / sub_block] integers. qweight: uint8 [N, K * bits / 8] in bit planes (Q8_0: int8 [N, K]); block_scales:
    uint8 [N, K / block * param_bytes] (packing.py)."""
    blocks = gguf_blocks(name)
    codes = fields["codes"]
    qweight = codes.to(torch.int8) if blocks.signed_codes else pack_uintx(codes, blocks.bits)
    return qweight, pack_block_params(blocks, fields["d"], fields.get("dmin"), fields.get("scales"),
                                      fields.get("mins"))


def unpack_gguf(qweight: torch.Tensor, block_scales: torch.Tensor, name: str, k: int) -> dict[str, torch.Tensor]:
    """Inverse of `pack_gguf`."""
    blocks = gguf_blocks(name)
    codes = qweight if blocks.signed_codes else unpack_uintx(qweight, blocks.bits, k)
    return {"codes": codes, **unpack_block_params(blocks, block_scales)}


def _gguf_factors(blocks: GgufBlocks, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    # float32 (a, b) per group [N, K / group]: a = d * scale (d alone without sub-blocks), b = dmin * min or -m.
    # a and b are exact in float32 (an fp16 times an integer of at most 8 bits), as in gguf's own dequantize
    d = fields["d"].float()
    if not blocks.sub_block:
        return d, -fields["dmin"].float() if blocks.has_min else None
    a = d.repeat_interleave(blocks.sub_blocks, dim=1) * fields["scales"].float()
    if not blocks.has_min:
        return a, None
    return a, fields["dmin"].float().repeat_interleave(blocks.sub_blocks, dim=1) * fields["mins"].float()


def dequantize_gguf_fields(fields: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """float32 [N, K] of a GGUF weight's fields (`pack_gguf`): w = (q - offset) * a - b, each weight rounded once,
    in the order gguf.quants.dequantize computes it (its products are exact, so the two agree bit for bit)."""
    blocks = gguf_blocks(name)
    codes = fields["codes"].float()
    n, k = codes.shape
    a, b = _gguf_factors(blocks, fields)
    w = (codes.reshape(n, -1, blocks.group) - blocks.offset) * a.unsqueeze(-1)
    if b is not None:
        w = w - b.unsqueeze(-1)
    return w.reshape(n, k)


def dequantize_gguf(qweight: torch.Tensor, block_scales: torch.Tensor, name: str, k: int) -> torch.Tensor:
    """qweight, block_scales (`pack_gguf`) of an [N, K] weight -> float32 [N, K]."""
    return dequantize_gguf_fields(unpack_gguf(qweight, block_scales, name, k), name)


def _fp16_up(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """x / qmax (x >= 0) rounded up to float16, so that qmax codes of it cover x; 1 where x is 0."""
    return _safe_scale(x, qmax, torch.float16)


def _signed_extreme(wg: torch.Tensor) -> torch.Tensor:
    # the value of largest magnitude of each group [..., g], with its sign
    return torch.gather(wg, -1, wg.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


# the largest sub-block scale (and min) of each K-quant: 4 bits (Q2_K), 6 bits (Q4_K, Q5_K; Q3_K's are signed,
# -32 .. 31, used to +-31 here), 8 bits signed (Q6_K)
_SUB_SCALE_MAX = {"q2_k": 15, "q3_k": 31, "q4_k": 63, "q5_k": 63, "q6_k": 127}


def quantize_gguf_fields(w: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """quantrt's own quantizer into a GGUF block type, w [N, K] (K a multiple of the block) -> fields (`pack_gguf`).
    Simpler than llama.cpp's (no iterative search), with ranges that always cover the weights: a group's scale is
    rounded up (fp16 block scales, integer sub-block scales and mins), so no weight is clipped except, in the
    symmetric types whose codes reach one step further below zero than above (Q4_0, Q5_0, Q3_K, Q6_K), the side
    opposite a group's largest magnitude, by at most one step. Loading a GGUF file keeps the file's numbers; this
    serves quantizing into these formats (QuantConfig("q4_k"), fuse_lora)."""
    blocks = gguf_blocks(name)
    n, k = w.shape
    if k % blocks.block:
        raise ValueError(f"{name} stores rows in blocks of {blocks.block} weights; K={k} is not a multiple")
    wf = w.float()
    wg = wf.reshape(n, -1, blocks.group)
    qmax = 2**blocks.bits - 1
    fields: dict[str, torch.Tensor] = {}
    if name == "q8_0":
        d = _fp16_up(wg.abs().amax(dim=-1), 127.0)
        codes = torch.round(wg / d.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        fields.update(d=d)
    elif not blocks.sub_block and not blocks.has_min:  # Q4_0, Q5_0: the largest magnitude maps to code 0
        extreme = _signed_extreme(wg)
        d = _fp16_up(extreme.abs(), float(blocks.offset))
        d = torch.where(extreme > 0, -d, d)
        codes = (torch.round(wg / d.float().unsqueeze(-1)) + blocks.offset).clamp_(0, qmax)
        fields.update(d=d)
    elif not blocks.sub_block:  # Q4_1, Q5_1: [m, m + qmax * d] covers the block, m rounded down
        lo = wg.amin(dim=-1)
        m = lo.to(torch.float16)
        m = torch.where(m.float() > lo, torch.nextafter(m, torch.full_like(m, float("-inf"))), m)
        d = _fp16_up(wg.amax(dim=-1) - m.float(), float(qmax))
        codes = torch.round((wg - m.float().unsqueeze(-1)) / d.float().unsqueeze(-1)).clamp_(0, qmax)
        fields.update(d=d, dmin=m)
    else:
        smax = _SUB_SCALE_MAX[name]
        per = blocks.sub_blocks
        if blocks.has_min:  # Q2_K, Q4_K, Q5_K: w = d * scale * q - dmin * min, min >= 0 covers the group's low end
            below = (-wg.amin(dim=-1)).clamp_(min=0).reshape(n, -1, per)
            dmin = _fp16_up(below.amax(dim=-1), float(smax))
            mins = torch.ceil(below / dmin.float().unsqueeze(-1)).clamp_(0, smax)
            low = (dmin.float().unsqueeze(-1) * mins).reshape(n, -1)  # the group's codes start at -low
            span = ((wg.amax(dim=-1) + low) / qmax).clamp_(min=0).reshape(n, -1, per)
            d = _fp16_up(span.amax(dim=-1), float(smax))
            scales = torch.ceil(span / d.float().unsqueeze(-1)).clamp_(0, smax)
            a = (d.float().unsqueeze(-1) * scales).reshape(n, -1, 1)
            codes = torch.where(a > 0, torch.round((wg + low.unsqueeze(-1)) / a.clamp(min=1e-38)), 0).clamp_(0, qmax)
            fields.update(d=d, dmin=dmin, scales=scales.reshape(n, -1), mins=mins.reshape(n, -1))
        else:  # Q3_K, Q6_K: each group's largest magnitude maps to code 0 (q - offset = -offset)
            step = (_signed_extreme(wg) / -blocks.offset).reshape(n, -1, per)
            d = _fp16_up(step.abs().amax(dim=-1), float(smax))
            scales = torch.sign(step) * torch.ceil(step.abs() / d.float().unsqueeze(-1)).clamp_(0, smax)
            a = (d.float().unsqueeze(-1) * scales).reshape(n, -1, 1)
            safe = torch.where(a != 0, a, torch.ones_like(a))
            codes = torch.where(a != 0, torch.round(wg / safe) + blocks.offset,
                                torch.full_like(wg, blocks.offset)).clamp_(0, qmax)
            fields.update(d=d, scales=scales.reshape(n, -1))
    fields["codes"] = codes.reshape(n, k).to(torch.int8 if blocks.signed_codes else torch.uint8)
    for key in ("d", "dmin"):
        if key in fields and not torch.isfinite(fields[key]).all():
            raise ValueError(f"{name}: weights up to {wf.abs().max().item():.3g} need block scales beyond float16's "
                             f"range, which GGUF stores its scales in")
    return fields


def quantize_gguf(w: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (qweight, block_scales) of the GGUF block type `name` (`quantize_gguf_fields`, `pack_gguf`)."""
    return pack_gguf(quantize_gguf_fields(w, name), name)
