"""The launcher (kernels/matmul.py): one quantized linear call at small M is exactly one kernel launch and
no other op that writes memory (no copy or reorder of x, no reduction kernel, no memset), in the
interpreter as on a GPU, since both run the same Python launcher."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction

from quantrt.kernels import quantize as Q
from quantrt.kernels.floatx import floatx_linear
from quantrt.kernels.int8 import int8_linear
from quantrt.kernels.uintx import uintx_linear

from .helpers import N, assert_linear_close, inputs

# ops that allocate or only view memory: everything else writes
NON_WRITING = {"empty.memory_format", "empty_strided.default", "view.default", "_unsafe_view.default",
               "reshape.default", "as_strided.default", "t.default", "expand.default", "slice.Tensor",
               "select.int", "alias.default", "detach.default", "unsqueeze.default", "squeeze.dim"}


class Recorder(TorchDispatchMode):
    """The aten ops of a call, leaving out those the interpreter itself runs inside a launch (it copies
    every tensor argument to the host and back; a GPU launch does not)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.launches: list[str] = []
        self.inside_launch = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_launch:
            self.ops.append(func.__name__ if "." in func.__name__ else f"{func.__name__}.default")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    run = InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        rec.launches.append(self.fn.__name__)
        rec.inside_launch = True
        try:
            return run(self, *args, **kwargs)
        finally:
            rec.inside_launch = False
    monkeypatch.setattr(InterpretedFunction, "run", counted_run)
    return rec


# the family functions are what the quantrt:: ops run on a GPU (kernels/ops.py); a dispatch mode cannot
# look inside a custom op, so they are called directly
def _int8(x, w, b):
    q, s = Q.quantize_int8(w)
    return int8_linear, (x, q, s, b), Q.dequantize_int8(q, s)


def _uintx(bits):
    def make(x, w, b):
        q, s, z = Q.quantize_uintx(w, bits, 16)
        return uintx_linear, (x, q, s, z, b, bits), Q.dequantize_uintx(q, s, z, bits, x.shape[1])
    return make


def _fpx(ebits, mbits):
    def make(x, w, b):
        q, s = Q.quantize_floatx(w, ebits, mbits)
        return (floatx_linear, (x, q, s, b, ebits, mbits),
                Q.dequantize_floatx(q, s, ebits, mbits, x.shape[1]))
    return make


def _fp8(fp8):
    def make(x, w, b):
        q, s = Q.quantize_fp8(w, fp8)
        ebits, mbits = {"e4m3": (4, 3), "e5m2": (5, 2)}[fp8]
        return floatx_linear, (x, q.view(torch.uint8), s, b, ebits, mbits), Q.dequantize_fp8(q, s)
    return make


FORMATS = [_int8] + [_uintx(b) for b in range(1, 9)] + [_fpx(1, 1), _fpx(2, 1), _fpx(2, 2), _fpx(3, 2), _fpx(3, 3),
                                                         _fp8("e4m3"), _fp8("e5m2")]
FORMAT_IDS = (["int8"] + [f"uint{b}" for b in range(1, 9)]
              + ["fp3_e1m1", "fp4_e2m1", "fp5_e2m2", "fp6_e3m2", "fp7_e3m3", "fp8_e4m3", "fp8_e5m2"])


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("k", [160, 144], ids=["words-K160", "bytes-K144"])
@pytest.mark.parametrize("make", FORMATS, ids=FORMAT_IDS)
def test_small_m_call_is_one_launch_and_no_other_write(recorder, make, k, m):
    x, weight, b = inputs(m, N, k, torch.float16, True)
    op, args, dequantized = make(x, weight, b)
    with recorder:
        y = op(*args)
    assert recorder.launches == ["_matmul_kernel"]
    writes = [name for name in recorder.ops if name not in NON_WRITING]
    # conftest's poison_outputs allocates the output with torch.full (NaN) where the launcher calls empty
    assert writes == ["full.default"], f"ops that write memory beside the kernel: {writes}"
    assert_linear_close(y, x, dequantized, b)


def test_the_recorder_sees_a_copy(recorder):
    """The check above can fail: a call that copies x shows."""
    x, weight, b = inputs(16, N, 160, torch.float16, True)
    op, args, _ = _int8(x, weight, b)
    with recorder:
        op(args[0].t().contiguous().t(), *args[1:])
    assert "clone.default" in recorder.ops or "copy_.default" in recorder.ops
