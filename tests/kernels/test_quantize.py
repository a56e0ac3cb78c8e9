import pytest
import torch
from hypothesis import given, settings, strategies as st

from quantrt.kernels import quantize as Q
from quantrt.kernels.packing import unpack_uintx

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ids(dtype):
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("group_size", [None, 32, 128], ids=lambda g: f"g{g}")
def test_int8_round_trip(dtype, group_size):
    w = torch.randn(48, 256).to(dtype)
    q, scale = Q.quantize_int8(w, group_size)
    assert q.dtype == torch.int8 and scale.dtype == dtype
    assert scale.shape == (48, 1 if group_size is None else 256 // group_size)
    assert q.abs().max() <= 127
    dq = Q.dequantize_int8(q, scale)
    assert (dq - w.float()).norm() / w.float().norm() < 1e-2
    # every weight is within half a step of its code
    step = scale.float().repeat_interleave(256 // scale.shape[1], dim=1)
    assert ((dq - w.float()).abs() <= 0.5 * step * (1 + 1e-3) + 1e-6).all()


@pytest.mark.parametrize("bits", range(1, 9), ids=lambda b: f"uint{b}")
@pytest.mark.parametrize("group_size", [32, 128], ids=lambda g: f"g{g}")
def test_uintx_round_trip(bits, group_size):
    w = torch.randn(24, 256)
    packed, scale, zero = Q.quantize_uintx(w, bits, group_size)
    assert packed.shape == (24, 256 * bits // 8)
    codes = unpack_uintx(packed, bits, 256)
    assert codes.max() <= 2**bits - 1
    dq = Q.dequantize_uintx(packed, scale, zero, bits, 256)
    # inside the representable range [-z*s, (qmax-z)*s] each weight is within half a step; outside, the
    # error is the clipping distance
    s = scale.repeat_interleave(group_size, dim=1)
    z = zero.repeat_interleave(group_size, dim=1)
    lo, hi = -z * s, (2**bits - 1 - z) * s
    clip = torch.clamp(w - hi, min=0) + torch.clamp(lo - w, min=0)
    assert ((dq - w).abs() <= 0.5 * s * (1 + 1e-4) + clip + 1e-6).all()
    # and the error halves with every extra bit (Gaussian weights)
    rel = ((dq - w).norm() / w.norm()).item()
    assert rel < 1.2 * 2.0 ** (1 - bits)


def test_uintx_smaller_groups_are_more_accurate():
    w = torch.randn(64, 512)
    errors = [(Q.dequantize_uintx(*Q.quantize_uintx(w, 4, g), 4, 512) - w).norm() for g in (32, 128, 512)]
    assert errors[0] < errors[1] < errors[2]


def test_uintx_constant_and_zero_groups():
    w = torch.zeros(4, 64)
    w[1] = 3.0
    packed, scale, zero = Q.quantize_uintx(w, 4, 32)
    torch.testing.assert_close(Q.dequantize_uintx(packed, scale, zero, 4, 64), w)


FPX = [(1, 1), (2, 0), (2, 1), (1, 2), (2, 2), (3, 1), (3, 2), (2, 3), (3, 3), (4, 2)]


@pytest.mark.parametrize("ebits,mbits", FPX, ids=lambda v: str(v))
def test_floatx_rounds_to_the_nearest_code(ebits, mbits):
    w = torch.randn(16, 64)
    packed, scale = Q.quantize_floatx(w, ebits, mbits)
    bits = 1 + ebits + mbits
    assert packed.shape == (16, 64 * bits // 8)
    dq = Q.dequantize_floatx(packed, scale, ebits, mbits, 64)
    mags = Q.floatx_magnitudes(ebits, mbits).float()
    values = torch.cat([mags, -mags])  # brute force: the nearest representable value
    nearest = values[((w / scale).unsqueeze(-1) - values).abs().argmin(dim=-1)] * scale
    gap = ((w - nearest).abs() - (w - dq).abs()).abs()
    assert (gap <= 1e-6 * (1 + w.abs())).all()
    assert dq.abs().amax(dim=1).sub(w.abs().amax(dim=1)).abs().max() < 1e-5  # the max is exact


def test_floatx_codebook_matches_known_formats():
    # fp4 e2m1 (the OCP MX format's E2M1): 0, 0.5, 1, 1.5, 2, 3, 4, 6
    assert Q.floatx_magnitudes(2, 1).tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert Q.floatx_max(3, 2) == 28.0  # fp6 e3m2
    assert Q.floatx_max(2, 3) == 7.5  # fp6 e2m3


def test_floatx_rejects_invalid_formats():
    with pytest.raises(ValueError, match="not a valid X-bit float"):
        Q.quantize_floatx(torch.randn(2, 8), 0, 3)
    with pytest.raises(ValueError, match="float8wo"):
        Q.check_floatx(4, 3)


@pytest.mark.parametrize("fp8", ["e4m3", "e5m2"])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["per_channel", "per_tensor"])
def test_fp8_round_trip(fp8, per_tensor):
    w = torch.randn(32, 96) * torch.logspace(-2, 1, 32).unsqueeze(1)
    q, scale = Q.quantize_fp8(w, fp8, per_tensor=per_tensor)
    assert q.dtype == Q.FP8_DTYPES[fp8]
    assert scale.shape == ((1, 1) if per_tensor else (32, 1))
    dq = Q.dequantize_fp8(q, scale)
    # relative to the channel's max: half an ulp at the top binade
    mbits = 3 if fp8 == "e4m3" else 2
    if not per_tensor:
        assert ((dq - w).abs() <= w.abs().amax(dim=1, keepdim=True) * 2.0 ** -(mbits + 1) * 1.01).all()
    torch.testing.assert_close((w / scale).clamp(-1e30, 1e30).to(q.dtype).float(), q.float())


def test_int8_per_token_activation():
    x = torch.randn(7, 33) * 4
    q, scale = Q.quantize_int8_per_token(x)
    assert scale.shape == (7, 1)
    torch.testing.assert_close(q.float() * scale, x, atol=(scale / 2).max().item() * 1.001, rtol=0)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 8), groups=st.integers(1, 4), log_group=st.integers(3, 6), rows=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_uintx_property(bits, groups, log_group, rows, seed):
    g = 2**log_group
    w = torch.randn(rows, g * groups, generator=torch.Generator().manual_seed(seed))
    packed, scale, zero = Q.quantize_uintx(w, bits, g)
    dq = Q.dequantize_uintx(packed, scale, zero, bits, g * groups)
    rng = (w.reshape(rows, groups, g).amax(-1) - w.reshape(rows, groups, g).amin(-1)).repeat_interleave(g, 1)
    # never worse than one full step of the min/max grid
    assert ((dq - w).abs() <= rng / (2**bits - 1) + 1e-5).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_int8_per_token_gives_a_row_with_nan_or_inf_a_non_finite_scale_and_leaves_other_rows_alone(bad, dtype):
    # before: a NaN row got scale 1 and codes cast from NaN, which dequantize to a finite, wrong row
    x = (torch.randn(4, 64) * 3).to(dtype)
    x[3] = 0  # an all-zero row keeps its stand-in scale 1 and codes 0
    dirty = x.clone()
    dirty[1, 17] = bad
    q, scale = Q.quantize_int8_per_token(dirty)
    assert not torch.isfinite(scale[1]).any()
    if bad != bad:  # NaN: the scale is NaN, so every output of the row is NaN
        assert scale[1].isnan().all()
    assert q.abs().max() <= 127
    assert (q.float() * scale)[1].isfinite().logical_not().any()
    # every other row is quantized exactly as without the bad row
    clean_q, clean_scale = Q.quantize_int8_per_token(x[[0, 2, 3]])
    assert torch.equal(q[[0, 2, 3]], clean_q) and torch.equal(scale[[0, 2, 3]], clean_scale)
    assert scale[3].item() == 1.0 and not q[3].any()
