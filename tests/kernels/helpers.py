"""Shared by the kernel tests: inputs, the float64 reference and the tolerance per activation dtype."""

import torch

# |y - ref| <= atol + rtol * |ref| against the float64 reference; outputs are O(1). fp16 rounds the output
# and, on the tl.dot paths, every dequantized weight to 11 significant bits; fp32 only reorders sums.
TOLERANCES = {
    torch.float32: dict(atol=5e-6, rtol=5e-6),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
DTYPES = [torch.float16, torch.float32]
DTYPE_IDS = ["fp16", "fp32"]
# (path, M, with bias): both kernel paths at M in (1, 7, 33), with and without bias
CASES = [("gemv", 1, True), ("gemv", 7, False), ("gemv", 33, True),
         ("gemm", 1, False), ("gemm", 7, True), ("gemm", 33, False)]
CASE_IDS = [f"{path}-M{m}-{'bias' if bias else 'nobias'}" for path, m, bias in CASES]
N = 80  # not a multiple of the CPU configs' BLOCK_N (32)


def inputs(m: int, n: int, k: int, dtype: torch.dtype, bias: bool):
    """x [m, k], a float weight [n, k] with O(1) outputs, bias [n] or None; all fresh random."""
    x = torch.randn(m, k, dtype=dtype)
    weight = (torch.randn(n, k) / k**0.5).to(dtype)
    return x, weight, (torch.randn(n) * 0.1).to(dtype) if bias else None


def assert_linear_close(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """y must be x @ weight^T + bias (weight: the float32 dequantized weight), in x.dtype, to the
    dtype's tolerance."""
    ref = x.double() @ weight.double().T
    if bias is not None:
        ref += bias.double()
    assert y.dtype == x.dtype and y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, **TOLERANCES[x.dtype])
