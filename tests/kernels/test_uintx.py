import pytest
import torch

from quantrt.kernels import quantize as Q
from quantrt.kernels.formats import UINTX, WeightFormat
from quantrt.kernels.matmul import word_loads
from quantrt.kernels.packing import pack_uintx
from quantrt.kernels.uintx import uintx_dequantize, uintx_linear

from .helpers import CASE_IDS, CASES, DTYPE_IDS, DTYPES, N, assert_linear_close, inputs

BITS = list(range(1, 9))
# (K, group size): K % 32 != 0 reads codes byte by byte, scales gathered per element (groups of 16 are
# smaller than BLOCK_K); K % 32 == 0 reads the planes as 32-bit words, with partial K tiles
LAYOUTS = [(144, 16), (160, 32)]
LAYOUT_IDS = ["bytes-K144-g16", "words-K160-g32"]


@pytest.mark.parametrize("path, m, bias", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("k, group_size", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("bits", BITS, ids=[f"uint{b}" for b in BITS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_uintx_linear(path, m, bias, k, group_size, bits, dtype):
    assert WeightFormat(UINTX, bits).word_loads(k) == (k % 32 == 0 and bits < 8)
    x, weight, b = inputs(m, N, k, dtype, bias)
    q, scale, zero = Q.quantize_uintx(weight, bits, group_size)
    y = uintx_linear(x, q, scale, zero, b, bits, path=path)
    assert_linear_close(y, x, Q.dequantize_uintx(q, scale, zero, bits, k), b)


@pytest.mark.parametrize("path", ["gemv", "gemm", "dequant"])
@pytest.mark.parametrize("group_size", [None, 64], ids=["perchannel", "g64"])
def test_int4_group_layouts(path, group_size):
    """int4wo's format with one group per row and with groups spanning several K tiles."""
    x, weight, b = inputs(7, N, 192, torch.float16, True)
    q, scale, zero = Q.quantize_uintx(weight, 4, group_size)
    assert_linear_close(uintx_linear(x, q, scale, zero, b, 4, path=path), x,
                        Q.dequantize_uintx(q, scale, zero, 4, 192), b)


@pytest.mark.parametrize("bits", [3, 4, 7], ids=lambda b: f"uint{b}")
def test_uintx_dequantize_kernel_is_exact(bits):
    k = 128
    codes = torch.randint(0, 2**bits, (N, k))
    scale, zero = torch.rand(N, 4) + 0.5, torch.rand(N, 4) * 2**bits
    packed = pack_uintx(codes, bits)
    torch.testing.assert_close(uintx_dequantize(packed, scale, zero, bits, k),
                               Q.dequantize_uintx(packed, scale, zero, bits, k), rtol=0, atol=0)


def test_uintx_rejects_bad_inputs():
    x, weight, _ = inputs(2, N, 144, torch.float32, False)
    q, scale, zero = Q.quantize_uintx(weight, 4, 16)
    with pytest.raises(ValueError, match=r"qweight must be torch.uint8 \[N, 72\]"):
        uintx_linear(x, q[:, :-1], scale, zero, None, 4)
    with pytest.raises(ValueError, match="zero must match scale"):
        uintx_linear(x, q, scale, zero[:, :1], None, 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        uintx_linear(x[:, :140], q, scale, zero, None, 3)
    with pytest.raises(ValueError, match="1 to 8 bits"):
        uintx_linear(x, q, scale, zero, None, 9)


@pytest.mark.parametrize("path", ["gemv", "gemm", "dequant"])
def test_misaligned_weights_fall_back_to_byte_loads(path):
    """A packed weight that does not start on a 4-byte boundary (a view one byte into a buffer) is read
    byte by byte: the same numbers, never a misaligned word load."""
    x, weight, b = inputs(7, N, 160, torch.float16, True)
    q, scale, zero = Q.quantize_uintx(weight, 4, 32)
    buffer = torch.empty(q.numel() + 1, dtype=torch.uint8)
    shifted = buffer[1:].view(q.shape)
    shifted.copy_(q)
    assert shifted.data_ptr() % 4 != 0
    assert word_loads(WeightFormat(UINTX, 4), q, 160) and not word_loads(WeightFormat(UINTX, 4), shifted, 160)
    assert_linear_close(uintx_linear(x, shifted, scale, zero, b, 4, path=path), x,
                        Q.dequantize_uintx(q, scale, zero, 4, 160), b)
