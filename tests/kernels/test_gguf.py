"""The GGUF block types in the kernels (kernels/gguf.py, formats.apply_gguf_params) against a float64 product with
quantize.py's dequantized weight, in Triton's interpreter (fp16 and fp32: the interpreter gets bf16 wrong), on
every path; the dequantize kernel bit for bit against quantize.dequantize_gguf; and what the launcher refuses.

Codes, sub-block scales and mins are random over their whole range (every bit pattern of the layout), the fp16
block scales random and finite, so that every field reaches the result."""

import pytest
import torch

from quantrt.kernels import quantize as Q
from quantrt.kernels.gguf import gguf_dequantize, gguf_linear
from quantrt.kernels.packing import GGUF_BLOCKS, SUB_NIBBLES, SUB_SCALE_MIN, SUB_SIGNED

from .helpers import DTYPE_IDS, DTYPES, TOLERANCES

NAMES = list(GGUF_BLOCKS)
# the legacy types (blocks of 32) at K = 96: three blocks, a partial K tile of the CPU configs (BLOCK_K 64); the
# K-quants (blocks of 256) at K = 512: two blocks, so the parameters of a block past the first are read
K = {name: 512 if blocks.sub_block else 96 for name, blocks in GGUF_BLOCKS.items()}
N = 40  # not a multiple of the CPU configs' BLOCK_N (32)
CASES = [("gemv", 1, True), ("gemv", 7, False), ("gemm", 33, True)]
CASE_IDS = [f"{path}-M{m}-{'bias' if bias else 'nobias'}" for path, m, bias in CASES]
# the sub-block scales' ranges, by layout: int8 (Q3_K's 6-bit scale minus 32 lies within), nibbles, bytes (6 bits)
SUB_RANGE = {SUB_SIGNED: (-128, 128), SUB_NIBBLES: (0, 16), SUB_SCALE_MIN: (0, 64)}


def random_fields(name: str, n: int, k: int) -> dict[str, torch.Tensor]:
    """Random fields of a GGUF weight, scaled so that a row of K weights times O(1) inputs gives O(1) outputs."""
    blocks = GGUF_BLOCKS[name]
    count = k // blocks.block
    low, high = (-127, 128) if blocks.signed_codes else (0, 2**blocks.bits)
    fields = {"codes": torch.randint(low, high, (n, k)).to(torch.int8 if blocks.signed_codes else torch.uint8)}
    step = 1.0 / (2**blocks.bits * k**0.5)  # a weight's size, over the codes' range
    if blocks.sub_block:
        lo, hi = SUB_RANGE[blocks.sub_layout]
        fields["scales"] = torch.randint(lo, hi, (n, count * blocks.sub_blocks))
        if blocks.has_min:
            fields["mins"] = torch.randint(0, hi, (n, count * blocks.sub_blocks))
        step /= hi
    fields["d"] = ((torch.rand(n, count) + 0.5) * step).to(torch.float16)
    if blocks.has_min:
        fields["dmin"] = ((torch.rand(n, count) - 0.5) * step * 2**blocks.bits).to(torch.float16)
    return fields


@pytest.mark.parametrize("path, m, bias", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_gguf_linear_against_float64(name, dtype, path, m, bias):
    k = K[name]
    qweight, block_scales = Q.pack_gguf(random_fields(name, N, k), name)
    weight = Q.dequantize_gguf(qweight, block_scales, name, k)
    x = torch.randn(m, k, dtype=dtype)
    b = (torch.randn(N) * 0.1).to(dtype) if bias else None
    y = gguf_linear(x, qweight, block_scales, b, GGUF_BLOCKS[name].ggml_type, path=path)
    ref = x.double() @ weight.double().T + (b.double() if bias else 0)
    assert y.dtype == dtype and y.shape == (m, N)
    torch.testing.assert_close(y.double(), ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("name", NAMES)
def test_the_dequantize_kernel_is_bit_for_bit_quantize_py(name):
    """Each weight is rounded once, in the same order, by both: the float32 weights are identical."""
    k = K[name]
    qweight, block_scales = Q.pack_gguf(random_fields(name, N, k), name)
    torch.testing.assert_close(gguf_dequantize(qweight, block_scales, GGUF_BLOCKS[name].ggml_type, k),
                               Q.dequantize_gguf(qweight, block_scales, name, k), rtol=0, atol=0)


def test_fields_pack_and_unpack_exactly():
    for name in NAMES:
        fields = random_fields(name, 3, K[name])
        back = Q.unpack_gguf(*Q.pack_gguf(fields, name), name, K[name])
        assert set(back) == set(fields)
        for key, value in fields.items():
            assert torch.equal(back[key].to(value.dtype), value), (name, key)


def test_gguf_rejects_bad_inputs():
    k = 512
    qweight, block_scales = Q.pack_gguf(random_fields("q4_k", N, k), "q4_k")
    x = torch.randn(2, k)
    with pytest.raises(ValueError, match=r"qweight must be torch.uint8 \[N, 256\]"):
        gguf_linear(x, qweight[:, :-1], block_scales, None, 12)
    with pytest.raises(ValueError, match=r"block_scales must be torch.uint8 \[40, 40\]"):
        gguf_linear(x, qweight, block_scales[:, :-2], None, 12)
    with pytest.raises(ValueError, match="K=480 is not a multiple of q4_k's block of 256"):
        gguf_linear(x[:, :480], qweight, block_scales, None, 12)
    with pytest.raises(ValueError, match="ggml type 20 is not a GGUF block type"):
        gguf_linear(x, qweight, block_scales, None, 20)
    shifted = torch.empty(block_scales.numel() + 1, dtype=torch.uint8)[1:].view(block_scales.shape)
    shifted.copy_(block_scales)
    with pytest.raises(ValueError, match="2-byte boundary"):
        gguf_linear(x, qweight, shifted, None, 12)
