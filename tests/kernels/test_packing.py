import pytest
import torch
from hypothesis import given, settings, strategies as st

from quantrt.kernels.packing import k_alignment, pack_uintx, packed_bytes, plane_widths, unpack_uintx


@pytest.mark.parametrize("bits", range(1, 9), ids=lambda b: f"uint{b}")
def test_pack_unpack_is_exact(bits):
    k = 8 * 13
    codes = torch.randint(0, 2**bits, (5, k), dtype=torch.uint8)
    packed = pack_uintx(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, k * bits // 8)  # really X bits per code
    torch.testing.assert_close(unpack_uintx(packed, bits, k), codes, rtol=0, atol=0)


@pytest.mark.parametrize("bits", range(1, 9), ids=lambda b: f"uint{b}")
def test_planes_cover_all_bits(bits):
    assert sum(plane_widths(bits)) == bits
    assert packed_bytes(k_alignment(bits), bits) * 8 == k_alignment(bits) * bits


def test_layout_of_a_known_code():
    # uint3 = 2-bit plane (high) then 1-bit plane (low); code 5 = 0b101 at position 1 of 8
    codes = torch.zeros(1, 8, dtype=torch.uint8)
    codes[0, 1] = 5
    packed = pack_uintx(codes, 3)
    assert packed.tolist() == [[0b10 << 2, 0, 0b1 << 1]]


def test_misaligned_k_is_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_uintx(torch.zeros(2, 12, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="expected"):
        unpack_uintx(torch.zeros(2, 5, dtype=torch.uint8), 4, 8)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), k_units=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pack_unpack_property(bits, rows, k_units, seed):
    k = k_alignment(bits) * k_units
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, k), generator=g).to(torch.uint8)
    assert torch.equal(unpack_uintx(pack_uintx(codes, bits), bits, k), codes)
