"""Bit packing of unsigned integer codes along the last (K) dimension.

An X-bit code is split into bit planes of 4, 2 and 1 bits (uint3 = 2 + 1, uint5 = 4 + 1, uint6 = 4 + 2,
uint7 = 4 + 2 + 1; 1, 2, 4 and 8 bits are one plane), so that every plane packs a whole number of codes
into a byte and an X-bit weight really takes X bits. The planes are stored one after another along the
last dimension of one uint8 tensor, most significant plane first:

    packed[..., plane_offset(p) + k // per] bit (k % per) * width  holds plane p of code k,  per = 8 // width

so a row of K codes takes K * X / 8 bytes. Kernels read a plane with
`(byte >> ((k % per) * width)) & (2**width - 1)` and reassemble `code = sum(plane_p << shift_p)`.
"""

import torch

_PLANES: dict[int, tuple[int, ...]] = {
    1: (1,),
    2: (2,),
    3: (2, 1),
    4: (4,),
    5: (4, 1),
    6: (4, 2),
    7: (4, 2, 1),
    8: (8,),
}


def plane_widths(bits: int) -> tuple[int, ...]:
    """Widths of the bit planes of a `bits`-bit code, most significant first."""
    if bits not in _PLANES:
        raise ValueError(f"codes of {bits} bits cannot be packed; bits must be in 1..8")
    return _PLANES[bits]


def k_alignment(bits: int) -> int:
    """K must be a multiple of this for `bits`-bit codes to fill whole bytes in every plane."""
    return max(8 // w for w in plane_widths(bits))


def packed_bytes(k: int, bits: int) -> int:
    """Bytes that one row of `k` codes of `bits` bits takes."""
    return k * bits // 8


def _check_k(k: int, bits: int) -> None:
    if k % k_alignment(bits):
        raise ValueError(
            f"cannot pack {k} codes of {bits} bits per row: K must be a multiple of {k_alignment(bits)}"
        )


def pack_uintx(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit codes [..., K] (any integer dtype, values in [0, 2**bits)) into uint8
    [..., K * bits / 8] in the plane layout of this module."""
    k = codes.shape[-1]
    _check_k(k, bits)
    codes = codes.to(torch.int32)
    planes = []
    shift = bits
    for width in plane_widths(bits):
        shift -= width
        plane = (codes >> shift) & ((1 << width) - 1)
        per = 8 // width
        plane = plane.reshape(*codes.shape[:-1], k // per, per)
        lanes = torch.arange(per, device=codes.device, dtype=torch.int32) * width
        planes.append((plane << lanes).sum(dim=-1, dtype=torch.int32).to(torch.uint8))
    return torch.cat(planes, dim=-1)


def unpack_uintx(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_uintx`: uint8 [..., K * bits / 8] -> uint8 codes [..., K]."""
    _check_k(k, bits)
    if packed.shape[-1] != packed_bytes(k, bits):
        raise ValueError(
            f"packed rows of {packed.shape[-1]} bytes do not hold {k} codes of {bits} bits "
            f"(expected {packed_bytes(k, bits)} bytes)"
        )
    packed = packed.to(torch.int32)
    codes = torch.zeros(*packed.shape[:-1], k, dtype=torch.int32, device=packed.device)
    offset = 0
    shift = bits
    for width in plane_widths(bits):
        shift -= width
        per = 8 // width
        nbytes = k // per
        plane_bytes = packed[..., offset : offset + nbytes]
        lanes = torch.arange(per, device=packed.device, dtype=torch.int32) * width
        plane = (plane_bytes.unsqueeze(-1) >> lanes) & ((1 << width) - 1)
        codes |= plane.reshape(*packed.shape[:-1], k) << shift
        offset += nbytes
    return codes.to(torch.uint8)
