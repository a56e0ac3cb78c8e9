import pytest
import torch

from quantrt.kernels import quantize as Q
from quantrt.kernels.int8 import int8_dequantize, int8_linear

from .helpers import CASE_IDS, CASES, DTYPE_IDS, DTYPES, N, assert_linear_close, inputs

# (K, group size): per channel with a partial K tile; groups smaller than BLOCK_K (scales gathered per
# element) and groups that are multiples of it (one scale per tile)
LAYOUTS = [(144, None), (144, 16), (192, 64)]
LAYOUT_IDS = ["K144-perchannel", "K144-g16", "K192-g64"]


@pytest.mark.parametrize("path, m, bias", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("k, group_size", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_int8_linear(path, m, bias, k, group_size, dtype):
    x, weight, b = inputs(m, N, k, dtype, bias)
    q, scale = Q.quantize_int8(weight, group_size)
    y = int8_linear(x, q, scale, b, path=path)
    assert_linear_close(y, x, Q.dequantize_int8(q, scale), b)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_int8_dequant_path(dtype):
    x, weight, b = inputs(33, N, 144, dtype, True)
    q, scale = Q.quantize_int8(weight, 16)
    assert_linear_close(int8_linear(x, q, scale, b, path="dequant"), x, Q.dequantize_int8(q, scale), b)


def test_int8_dequantize_kernel_is_exact():
    q = torch.randint(-127, 128, (N, 96), dtype=torch.int8)
    scale = torch.rand(N, 3) + 0.5
    torch.testing.assert_close(int8_dequantize(q, scale), Q.dequantize_int8(q, scale), rtol=0, atol=0)


def test_int8_strided_x_and_empty_batch():
    x, weight, b = inputs(7, N, 144, torch.float32, True)
    q, scale = Q.quantize_int8(weight)
    wide = torch.randn(7, 2 * 144)
    wide[:, ::2] = x
    assert_linear_close(int8_linear(wide[:, ::2], q, scale, b), x, Q.dequantize_int8(q, scale), b)
    assert int8_linear(x[:0], q, scale, b).shape == (0, N)


def test_int8_rejects_bad_inputs():
    x, weight, _ = inputs(2, N, 144, torch.float32, False)
    q, scale = Q.quantize_int8(weight)
    with pytest.raises(ValueError, match="qweight must be torch.int8"):
        int8_linear(x, q.view(torch.uint8), scale, None)
    with pytest.raises(ValueError, match="scale must be float"):
        int8_linear(x, q, torch.ones(N, 5), None)
    with pytest.raises(ValueError, match="bias must be"):
        int8_linear(x, q, scale, torch.zeros(N + 1))
    with pytest.raises(ValueError, match="unknown path"):
        int8_linear(x, q, scale, None, path="fastest")
