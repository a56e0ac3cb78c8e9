import pytest
import torch

from quantrt.kernels.formats import FLOATX, INT8, UINTX, WeightFormat, mantissa_bits


def test_mantissa_bits():
    assert [mantissa_bits(d) for d in (torch.float32, torch.float16, torch.bfloat16)] == [23, 10, 7]


@pytest.mark.parametrize("fmt, fp16, bf16", [
    (WeightFormat(INT8, 8), True, True),
    (WeightFormat(UINTX, 4), False, False),               # q - z is not an integer
    (WeightFormat(FLOATX, 8, 4, 3), True, True),          # fp8 e4m3fn: 448, 2**-9
    (WeightFormat(FLOATX, 8, 5, 2), True, True),          # fp8 e5m2: 57344, 2**-16
    (WeightFormat(FLOATX, 7, 5, 1), False, True),         # 2**16 * 1.5 overflows fp16
    (WeightFormat(FLOATX, 7, 1, 5), True, True),
], ids=["int8", "uint4", "fp8_e4m3", "fp8_e5m2", "fp7_e5m1", "fp7_e1m5"])
def test_codes_exact_in(fmt, fp16, bf16):
    assert fmt.codes_exact_in(torch.float16) == fp16
    assert fmt.codes_exact_in(torch.bfloat16) == bf16
    assert fmt.codes_exact_in(torch.float32) == (fmt.kind != UINTX)


def test_codes_exact_in_uses_mantissa_bits_not_total_bits():
    """A float with more mantissa bits than the activation dtype is not exact there, whatever its range:
    a hypothetical 12-bit float e3m8 fits bf16's range but not its 7 mantissa bits."""
    wide = WeightFormat(FLOATX, 12, 3, 8)
    assert not wide.codes_exact_in(torch.bfloat16)
    assert wide.codes_exact_in(torch.float16)
    # e6m0 codes (2**-30 .. 2**32) are below fp16's smallest subnormal (2**-24): beyond fp16's range
    assert not WeightFormat(FLOATX, 7, 6, 0).codes_exact_in(torch.float16)


@pytest.mark.parametrize("bits, k, words", [(4, 160, True), (3, 144, False), (1, 32, True), (8, 160, False),
                                            (7, 64, True)])
def test_word_loads_need_whole_words_per_plane(bits, k, words):
    assert WeightFormat(UINTX, bits).word_loads(k) == words
