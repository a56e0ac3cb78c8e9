"""Property-based tests (hypothesis) of every packing width of kernels/packing.py and every weight format of
runtime/schemes.py: packing is exact, and dequantize(quantize(w)) is within the format's error bound, for
random shapes, group sizes, scale dtypes and weight distributions.

The bounds, per weight w of a group whose stored scale is s (and zero point z), all in float32:

    int8      |err| <= s / 2. The scale is absmax / 127 rounded *up* to its dtype (quantize._safe_scale), so
              no weight is clipped; s itself is within the dtype's rounding of absmax / 127.
    uintX     |err| <= s / 2 + dist(w, [-z s, (qmax - z) s]): half a step inside the range the stored s and z
              can represent, the clipping distance outside it. With no clip search (X >= 5) that range is
              [lo, hi] up to the rounding of z to its dtype: dist <= u |z| s = u |lo| (u: the dtype's unit
              roundoff). At X <= 4 the search may shrink [lo, hi] about its middle to a quarter, and only
              where that lowers the group's squared error, so the error is bounded by the stored s and z,
              and the group's mean squared error by that of the plain min / max grid.
    fpX, fp8  |err| <= s * gap(|w| / s) / 2, gap(y) the distance between the two representable magnitudes
              around y: 2 ** (E - mbits) in the binade [2 ** E, 2 ** (E + 1)), 2 ** (Emin - mbits) below
              the smallest normal 2 ** Emin. s >= absmax / fmax (rounded up), so nothing is clipped.

Arithmetic slack: the codes are chosen and dequantized in float32, a few ulps of |w|, |z| s and s.
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from quantrt.kernels import quantize as Q
from quantrt.kernels.packing import k_alignment, pack_uintx, packed_bytes, plane_widths, unpack_uintx
from quantrt.schemes import SCHEMES, resolve_scheme

PROPERTY = settings(max_examples=60, deadline=None)
SCALE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SLACK = 2.0**-20  # float32 arithmetic on the way to a code and back, relative

# one scheme per distinct weight format (the activation schemes store their weights in these formats), by
# kind, so that each kind is drawn as often as the others (there are 20 fpX formats and one int8)
FORMATS = {kind: sorted({(s.format, s.per_tensor): name for name, s in SCHEMES.items() if s.weight == kind}.values())
           for kind in ("int8", "uintx", "fpx", "fp8")}
KINDS = ["normal", "outliers", "sparse", "constant", "zeros", "offset", "narrow"]


def mantissa_bits(dtype: torch.dtype) -> int:
    return -int(math.log2(torch.finfo(dtype).eps))


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def smallest_subnormal(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


def weights(kind: str, rows: int, k: int, magnitude: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[rows, k] weights in `dtype`: Gaussian, Gaussian with outliers, mostly zeros, rows of one value, all
    zeros, offset (a range of a hundredth of the mean: large zero points), or narrow (two values one ulp of
    `dtype` apart: the largest zero points, beyond fp16's range at 7 and 8 bits unless the scale is widened)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        w = torch.randn(rows, k, generator=g) * magnitude
    elif kind == "outliers":
        w = torch.randn(rows, k, generator=g) * magnitude
        w[torch.rand(rows, k, generator=g) < 0.02] *= 100
    elif kind == "sparse":
        w = torch.randn(rows, k, generator=g) * magnitude * (torch.rand(rows, k, generator=g) < 0.1)
    elif kind == "constant":
        w = (torch.randn(rows, 1, generator=g) * magnitude).expand(rows, k).clone()
    elif kind == "zeros":
        w = torch.zeros(rows, k)
    elif kind == "offset":
        w = magnitude * (10 + torch.rand(rows, k, generator=g) / 10)
    else:
        steps = torch.randint(0, 2, (rows, k), generator=g)
        w = (10 * magnitude) * (1 + torch.finfo(dtype).eps * steps)
    return w.to(dtype)


def group_view(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, K] -> [N, groups, K / groups]."""
    return t.reshape(t.shape[0], groups, -1)


def spread(params: torch.Tensor, k: int) -> torch.Tensor:
    """Per-group parameters [N, G] (or [1, 1]) -> [N, K] float32."""
    return params.float().repeat_interleave(k // params.shape[-1], dim=-1)


def check_int8(w: torch.Tensor, tensors: dict, group_size: int | None) -> None:
    n, k = w.shape
    q, scale = tensors["qweight"], tensors["scale"]
    dq = Q.dequantize_int8(q, scale)
    wf, s = w.float(), spread(scale, k)
    assert int(q.abs().max()) <= 127
    assert ((dq - wf).abs() <= 0.5 * s * (1 + SLACK) + SLACK * wf.abs()).all()
    # the scale: absmax / 127 rounded up to its dtype (1 for an all-zero group)
    absmax = group_view(wf, scale.shape[-1]).abs().amax(dim=-1)
    ideal = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    stored = scale.float()
    assert (stored >= ideal * (1 - SLACK)).all()
    assert (stored <= ideal * (1 + 2 * unit_roundoff(scale.dtype)) + smallest_subnormal(scale.dtype)).all()


def check_uintx(w: torch.Tensor, tensors: dict, bits: int, group_size: int) -> None:
    n, k = w.shape
    groups = k // group_size
    qmax = 2**bits - 1
    scale, zero = tensors["scale"], tensors["zero"]
    assert scale.shape == zero.shape == (n, groups) and torch.isfinite(zero.float()).all()
    codes = unpack_uintx(tensors["qweight"], bits, k)
    assert int(codes.max()) <= qmax
    dq = Q.dequantize_uintx(tensors["qweight"], scale, zero, bits, k)
    wf, s, z = w.float(), spread(scale, k), spread(zero, k)
    lo_rep, hi_rep = -z * s, (qmax - z) * s
    clip = (lo_rep - wf).clamp(min=0) + (wf - hi_rep).clamp(min=0)
    slack = SLACK * (wf.abs() + (z.abs() + qmax) * s)
    assert ((dq - wf).abs() <= 0.5 * s + clip + slack).all()
    wg = group_view(wf, groups)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    u = unit_roundoff(scale.dtype)
    if bits > 4:
        # no clip search: the stored range is [lo, hi] up to the rounding of z
        assert (group_view(clip, groups).amax(dim=-1) <= 2 * u * lo.abs() + SLACK * (lo.abs() + hi.abs())).all()
    else:
        # the search shrinks the range at most to a quarter about its middle ...
        assert (group_view(clip, groups).amax(dim=-1) <= 0.375 * (hi - lo) + 2 * u * lo.abs() + 1e-30).all()
        # ... and only where that lowers the group's squared error below the min / max grid's
        s0, z0 = Q._uintx_params(lo, hi, qmax, scale.dtype)
        c0 = Q._uintx_codes(wg, s0, z0, qmax)
        baseline = Q._uintx_group_mse(wg, c0, s0, z0)
        chosen = (group_view(dq, groups) - wg).square().mean(dim=-1)
        assert (chosen <= baseline * (1 + 1e-5) + 1e-30).all()


def half_gap(y: torch.Tensor, mbits: int, min_exponent: int, max_exponent: int) -> torch.Tensor:
    """Half the distance between the representable magnitudes around y >= 0 of a float format with `mbits`
    mantissa bits whose normal exponents run from min_exponent to max_exponent."""
    exponent = torch.floor(torch.log2(y.clamp(min=2.0**min_exponent))).clamp(max=max_exponent)
    return 0.5 * torch.pow(2.0, exponent - mbits)


def check_float(w: torch.Tensor, dq: torch.Tensor, scale: torch.Tensor, fmax: float, mbits: int,
                min_exponent: int, max_exponent: int) -> None:
    k = w.shape[1]
    wf = w.float()
    s = spread(scale, k) if scale.shape[0] > 1 else scale.float().expand_as(wf)
    y = wf.abs() / s
    assert (y <= fmax * (1 + SLACK)).all()  # rounded-up scales clip nothing
    bound = s * half_gap(y, mbits, min_exponent, max_exponent)
    assert ((dq - wf).abs() <= bound * (1 + SLACK) + SLACK * wf.abs()).all()
    absmax = wf.abs().amax(dim=-1, keepdim=True) if scale.shape[0] > 1 else wf.abs().amax().reshape(1, 1)
    ideal = torch.where(absmax > 0, absmax / fmax, torch.ones_like(absmax))
    stored = scale.float()
    assert (stored >= ideal * (1 - SLACK)).all()
    assert (stored <= ideal * (1 + 2 * unit_roundoff(scale.dtype)) + smallest_subnormal(scale.dtype)).all()


def check_fpx(w: torch.Tensor, tensors: dict, ebits: int, mbits: int) -> None:
    k = w.shape[1]
    bias = 2 ** (ebits - 1) - 1
    fmax = (2 - 2.0**-mbits) * 2.0 ** (2**ebits - 1 - bias)  # all exponent and mantissa bits set
    assert Q.floatx_max(ebits, mbits) == fmax
    dq = Q.dequantize_floatx(tensors["qweight"], tensors["scale"], ebits, mbits, k)
    check_float(w, dq, tensors["scale"], fmax, mbits, 1 - bias, 2**ebits - 1 - bias)


def check_fp8(w: torch.Tensor, tensors: dict, fp8: str) -> None:
    dtype = Q.FP8_DTYPES[fp8]
    info = torch.finfo(dtype)
    dq = Q.dequantize_fp8(tensors["qweight"].view(dtype), tensors["scale"])
    check_float(w, dq, tensors["scale"], info.max, mantissa_bits(dtype), int(math.log2(info.smallest_normal)),
                int(math.floor(math.log2(info.max))))


def check_bound(scheme, w: torch.Tensor, tensors: dict) -> None:
    if scheme.weight == "int8":
        check_int8(w, tensors, scheme.group_size)
    elif scheme.weight == "uintx":
        check_uintx(w, tensors, scheme.bits, scheme.group_size)
    elif scheme.weight == "fpx":
        check_fpx(w, tensors, scheme.ebits, scheme.mbits)
    else:
        check_fp8(w, tensors, scheme.fp8)


@PROPERTY
@given(bits=st.integers(1, 8), lead=st.lists(st.integers(0, 3), max_size=2), k_units=st.integers(1, 5),
       pattern=st.sampled_from(["random", "zeros", "max", "alternating"]), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_is_exact_for_every_width(bits, lead, k_units, pattern, seed):
    k = k_alignment(bits) * k_units
    shape = (*lead, k)
    if pattern == "random":
        codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(seed))
    elif pattern == "zeros":
        codes = torch.zeros(shape, dtype=torch.int64)
    elif pattern == "max":
        codes = torch.full(shape, 2**bits - 1)
    else:
        codes = (torch.arange(k) % 2 * (2**bits - 1)).expand(shape)
    codes = codes.to(torch.uint8)
    packed = pack_uintx(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, packed_bytes(k, bits))
    assert packed_bytes(k, bits) * 8 == k * bits == k * sum(plane_widths(bits))
    assert torch.equal(unpack_uintx(packed, bits, k), codes)


@PROPERTY
@given(bits=st.integers(1, 8), k_units=st.integers(1, 4), position=st.integers(0, 2**16), seed=st.integers(0, 2**16))
def test_packing_changes_one_code_where_one_code_changed(bits, k_units, position, seed):
    # each code owns its bits: changing one code changes exactly that code after unpacking
    k = k_alignment(bits) * k_units
    codes = torch.randint(0, 2**bits, (1, k), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    changed = codes.clone()
    index = position % k
    changed[0, index] = (int(codes[0, index]) + 1) % 2**bits
    difference = unpack_uintx(pack_uintx(changed, bits), bits, k) != codes
    assert int(difference.sum()) == 1 and bool(difference[0, index])


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(FORMATS)).flatmap(lambda kind: st.sampled_from(FORMATS[kind])),
       dtype=st.sampled_from(SCALE_DTYPES), rows=st.integers(1, 5), k_units=st.integers(1, 4),
       grouped=st.booleans(), log_group=st.integers(3, 7), kind=st.sampled_from(KINDS),
       log_magnitude=st.floats(-4, 2), seed=st.integers(0, 2**31 - 1))
def test_every_weight_format_is_within_its_bound(name, dtype, rows, k_units, grouped, log_group, kind, log_magnitude,
                                                 seed):
    base = SCHEMES[name]
    # uintX is always grouped; int8 per channel or grouped; fpX and fp8 per channel (or per tensor)
    takes_groups = base.weight == "uintx" or (base.weight == "int8" and grouped)
    group_size = 2**log_group if takes_groups else None
    scheme = resolve_scheme(name, group_size=group_size) if group_size else base
    unit = max(group_size or 1, k_alignment(scheme.bits) if scheme.weight in ("uintx", "fpx") else 1)
    k = unit * k_units
    w = weights(kind, rows, k, 10.0**log_magnitude, dtype, seed)
    assert scheme.unsupported_reason(rows, k) is None
    tensors = scheme.quantize(w)
    specs = scheme.tensor_specs(rows, k, dtype)
    assert {key: (tuple(t.shape), t.dtype) for key, t in tensors.items() if key in specs} == {
        key: spec for key, spec in specs.items() if key in tensors}
    dequantized = scheme.dequantize(tensors, k)
    assert dequantized.shape == (rows, k) and dequantized.dtype == torch.float32
    assert torch.isfinite(dequantized).all()
    check_bound(scheme, w, tensors)


@PROPERTY
@given(bits=st.integers(1, 8), dtype=st.sampled_from(SCALE_DTYPES), rows=st.integers(1, 4),
       groups=st.integers(1, 3), log_group=st.integers(3, 6),
       kind=st.sampled_from(KINDS), log_magnitude=st.floats(-4, 2),
       seed=st.integers(0, 2**31 - 1))
def test_uintx_including_8_bits_is_within_its_bound(bits, dtype, rows, groups, log_group, kind, log_magnitude, seed):
    # the kernels' uintX format goes to 8 bits, one more than the schemes use
    group_size = 2**log_group
    w = weights(kind, rows, group_size * groups, 10.0**log_magnitude, dtype, seed)
    packed, scale, zero = Q.quantize_uintx(w, bits, group_size)
    check_uintx(w, {"qweight": packed, "scale": scale, "zero": zero}, bits, group_size)


@pytest.mark.parametrize("dtype", SCALE_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", ["int8wo", "uint4wo", "uint7wo", "fp6_e3m2", "float8wo_e4m3", "float8wo_e5m2"])
def test_tiny_rows_do_not_flush_their_scale_to_zero(name, dtype):
    # a row whose absmax / fmax is below the scale dtype's smallest subnormal (fp16: e5m2 rows under 2e-3)
    # used to get scale 0, and 0 / 0 codes: NaN weights
    scheme = resolve_scheme(name, group_size=64 if name.startswith("uint") else None)
    w = (torch.randn(4, 64) * torch.tensor([[1e-3], [1e-5], [1e-7], [0.0]])).to(dtype)
    tensors = scheme.quantize(w)
    dequantized = scheme.dequantize(tensors, 64)
    assert torch.isfinite(dequantized).all()
    assert (tensors["scale"].float() > 0).all()
    check_bound(scheme, w, tensors)


@pytest.mark.parametrize("bits", [7, 8], ids=lambda b: f"uint{b}")
def test_narrow_groups_far_from_zero_keep_a_finite_zero_point(bits):
    # two fp16 values one ulp apart (1000, 1000.5): -lo / scale was 2.6e5 at 7 bits, beyond fp16's 65504, and
    # the inf zero point dequantized to inf
    w = torch.full((2, 64), 1000.0, dtype=torch.float16)
    w[:, ::2] = 1000.5
    packed, scale, zero = Q.quantize_uintx(w, bits, 64)
    assert torch.isfinite(zero.float()).all()
    check_uintx(w, {"qweight": packed, "scale": scale, "zero": zero}, bits, 64)
