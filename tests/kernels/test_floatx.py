import pytest
import torch

from quantrt.kernels import quantize as Q
from quantrt.kernels.floatx import floatx_dequantize, floatx_linear, fp8_linear
from quantrt.kernels.packing import pack_uintx

from .helpers import CASE_IDS, CASES, DTYPE_IDS, DTYPES, N, assert_linear_close, inputs

# (ebits, mbits, K): K % 32 == 0 reads the planes as 32-bit words, else byte by byte. fp7_e5m1's
# codes overflow fp16 before the scale, so there the scale multiplies every weight (not the accumulator).
FPX = [(1, 1, 160), (2, 1, 144), (2, 2, 160), (3, 2, 144), (2, 3, 160), (3, 3, 144), (5, 1, 160)]
FPX_IDS = [f"fp{1 + e + m}_e{e}m{m}-K{k}" for e, m, k in FPX]
FP8 = ["e4m3", "e5m2"]


@pytest.mark.parametrize("path, m, bias", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("ebits, mbits, k", FPX, ids=FPX_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fpx_linear(path, m, bias, ebits, mbits, k, dtype):
    x, weight, b = inputs(m, N, k, dtype, bias)
    q, scale = Q.quantize_floatx(weight, ebits, mbits)
    y = floatx_linear(x, q, scale, b, ebits, mbits, path=path)
    assert_linear_close(y, x, Q.dequantize_floatx(q, scale, ebits, mbits, k), b)


@pytest.mark.parametrize("path, m, bias", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fp8_linear(path, m, bias, fp8, dtype):
    x, weight, b = inputs(m, N, 144, dtype, bias)
    q, scale = Q.quantize_fp8(weight, fp8)
    y = fp8_linear(x, q.view(torch.uint8), scale, b, fp8, path=path)
    assert_linear_close(y, x, Q.dequantize_fp8(q, scale), b)


@pytest.mark.parametrize("path", ["gemv", "gemm", "dequant"])
def test_fp8_per_tensor_scale(path):
    x, weight, b = inputs(7, N, 144, torch.float16, True)
    q, scale = Q.quantize_fp8(weight, "e4m3", per_tensor=True)
    assert scale.shape == (1, 1)
    assert_linear_close(fp8_linear(x, q, scale, b, "e4m3", path=path), x, Q.dequantize_fp8(q, scale), b)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ebits, mbits", [(2, 1), (3, 2), (5, 1)], ids=["fp4_e2m1", "fp6_e3m2", "fp7_e5m1"])
def test_fpx_dequant_path(ebits, mbits, dtype):
    x, weight, b = inputs(33, N, 160, dtype, True)
    q, scale = Q.quantize_floatx(weight, ebits, mbits)
    assert_linear_close(floatx_linear(x, q, scale, b, ebits, mbits, path="dequant"), x,
                        Q.dequantize_floatx(q, scale, ebits, mbits, 160), b)


@pytest.mark.parametrize("ebits, mbits", [(1, 1), (2, 1), (3, 2), (2, 3), (3, 3), (5, 1), (4, 3), (5, 2)],
                         ids=["fp3_e1m1", "fp4_e2m1", "fp6_e3m2", "fp6_e2m3", "fp7_e3m3", "fp7_e5m1",
                              "fp8_e4m3", "fp8_e5m2"])
def test_every_code_decodes_exactly(ebits, mbits):
    """All codes, subnormals and signed zeros included, decode like quantize.py (fp8: like torch's fp8
    dtypes; their nan/inf codes are never stored)."""
    bits = 1 + ebits + mbits
    codes = torch.arange(2**bits)
    if bits == 8:
        fp8 = "e4m3" if ebits == 4 else "e5m2"
        finite = torch.isfinite(codes.to(torch.uint8).view(Q.FP8_DTYPES[fp8]).float())
        codes = codes[finite]
        expected = codes.to(torch.uint8).view(Q.FP8_DTYPES[fp8]).float()
    else:
        expected = Q.dequantize_floatx(pack_uintx(codes[None], bits), torch.ones(1, 1), ebits, mbits, 2**bits)[0]
    k = 8 * (len(codes) // 8)
    codes, expected = codes[:k], expected[:k]
    scale = torch.ones(1, 1)
    got = floatx_dequantize(pack_uintx(codes[None], bits), scale, ebits, mbits, k)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(torch.signbit(got), torch.signbit(expected))


def test_floatx_rejects_bad_inputs():
    x, weight, _ = inputs(2, N, 144, torch.float32, False)
    q, scale = Q.quantize_floatx(weight, 3, 2)
    with pytest.raises(ValueError, match="one scale per output channel"):
        floatx_linear(x, q, scale.expand(N, 2).contiguous(), None, 3, 2)
    with pytest.raises(ValueError, match="fp8 e4m3fn"):
        floatx_linear(x, q, scale, None, 3, 4)
    with pytest.raises(ValueError, match="not a valid X-bit float"):
        floatx_linear(x, q, scale, None, 0, 5)
