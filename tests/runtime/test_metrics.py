import pytest
import torch

from quantrt.metrics import relative_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7,), (3, 33), (2, 5, 17)], ids=str)
def test_relative_error_is_the_l2_ratio_in_float64(dtype, shape):
    reference = torch.randn(shape, dtype=torch.float64)
    output = reference + 0.01 * torch.randn(shape, dtype=torch.float64)
    reference, output = reference.to(dtype), output.to(dtype)
    expected = torch.linalg.vector_norm(output.double() - reference.double()) / torch.linalg.vector_norm(
        reference.double())
    torch.testing.assert_close(torch.tensor(relative_error(output, reference), dtype=torch.float64), expected,
                               rtol=1e-12, atol=0)


def test_relative_error_of_zeros():
    zeros = torch.zeros(4, 8)
    assert relative_error(zeros, zeros) == 0.0
    error = relative_error(torch.ones(4, 8), zeros)  # a zero reference: huge, finite, never a division by zero
    assert error > 1e20 and error != float("inf")
