import os

# The Triton interpreter runs kernels on CPU tensors; it must be on before triton.jit decorates anything.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    # fresh but reproducible random inputs per test
    torch.manual_seed(0)
