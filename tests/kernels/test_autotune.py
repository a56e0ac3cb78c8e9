import pytest
import torch

from quantrt.kernels import autotune, tuning
from quantrt.kernels import quantize as Q
from quantrt.kernels.formats import GGUF, INT8, UINTX, WeightFormat
from quantrt.kernels.matmul import CPU_CONFIGS, GEMV_REGISTERS, KernelConfig, fit
from quantrt.kernels.packing import GGUF_BLOCKS

INT8_FORMAT = WeightFormat(INT8, 8)


def test_cpu_never_benchmarks(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTRT_TUNING_FILE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(autotune, "benchmark", lambda *a: pytest.fail("benchmarked on CPU"))
    x, q, s = torch.randn(7, 64), torch.zeros(48, 64, dtype=torch.int8), torch.ones(48, 1)
    assert autotune.select_config(x, q, s, None, None, INT8_FORMAT).path == "gemv"
    assert autotune.select_config(torch.randn(33, 64), q, s, None, None, INT8_FORMAT).path == "gemm"
    assert not (tmp_path / "tuning.json").exists()


@pytest.mark.parametrize("m", [1, 8, 64, 1024, 4608])
@pytest.mark.parametrize("fmt, group_size", [(INT8_FORMAT, 0), (WeightFormat(UINTX, 4), 128),
                                             (WeightFormat(UINTX, 3), 32)], ids=["int8", "uint4-g128", "uint3-g32"])
def test_candidates_are_pruned_to_what_compiles(m, fmt, group_size):
    n, k = 3072, 12288
    configs = autotune.candidates(fmt, m, n, k, group_size, shared_memory=227 * 1024)
    paths = {c.path for c in configs}
    assert paths == {"gemv"} if m <= 16 else ("gemv" in paths) == (m <= 64)
    assert ("dequant" in paths) == (m >= 128)
    for c in configs:
        if c.path == "dequant":
            continue
        assert not group_size or group_size % c.block_k == 0 or c.block_k % group_size == 0
        assert c.block_m == 1 or min(c.block_n, c.block_k) >= 16  # tl.dot needs 16 on GPUs
        assert c.block_k >= 32  # one 32-bit word of the 1-bit plane
        if c.path == "gemv":
            assert c.block_m == (1 if m == 1 else max(16, tuning.m_bucket(m)))
        if c.block_m == 1:
            assert c.block_n * c.block_k // (32 * c.num_warps) <= GEMV_REGISTERS
    assert 0 < len(configs) <= 40


def test_heuristics_off_cuda():
    fmt = WeightFormat(UINTX, 4)
    cpu = torch.device("cpu")
    assert autotune.heuristic(fmt, 1, 80, 160, 32, cpu).block_m == 1
    assert autotune.heuristic(fmt, 7, 80, 160, 32, cpu) == fit(CPU_CONFIGS["gemv"], 7)
    assert autotune.heuristic(fmt, 4096, 80, 160, 32, cpu).path == "gemm"  # dequant is chosen on CUDA only
    assert autotune.heuristic(fmt, 7, 80, 160, 32, cpu, path="dequant").path == "dequant"


@pytest.mark.parametrize("m, block_m", [(1, 1), (2, 16), (16, 16), (17, 32), (64, 64), (300, 64)])
def test_gemv_covers_all_of_m_in_one_row_tile(m, block_m):
    assert fit(KernelConfig("gemv", block_m=16), m).block_m == block_m
    assert fit(KernelConfig("gemm", block_m=128), m).block_m == 128


def test_synthetic_tensors_leave_the_callers_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    args = (torch.empty(3, 64), torch.empty(8, 64, dtype=torch.int8), torch.empty(8, 1), None, None)
    generator = torch.Generator().manual_seed(0)
    synthetic = autotune._synthetic(args, INT8_FORMAT, generator)
    assert synthetic[3] is None and synthetic[1].dtype == torch.int8
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["q4_1", "q3_k", "q4_k"])
def test_synthetic_gguf_block_scales_are_finite(name):
    """Random bytes would make fp16 NaN / Inf block scales, and every config would then fail its validation."""
    blocks = GGUF_BLOCKS[name]
    fmt = WeightFormat(GGUF, blocks.bits, gguf=name)
    k = 512
    args = (torch.empty(3, k), torch.empty(8, blocks.code_bytes(k), dtype=torch.uint8),
            torch.empty(8, k // blocks.block * blocks.param_bytes, dtype=torch.uint8), None, None)
    x, qweight, block_scales, _, _ = autotune._synthetic(args, fmt, torch.Generator().manual_seed(0))
    fields = Q.unpack_gguf(qweight, block_scales, name, k)
    assert all(torch.isfinite(fields[key]).all() for key in ("d", "dmin") if key in fields)
    assert torch.isfinite(Q.dequantize_gguf(qweight, block_scales, name, k)).all()


class _FakeCuda:
    """Just enough of a CUDA device for select_config's bookkeeping on CPU tensors."""

    def __init__(self, monkeypatch, capturing: bool = False):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        props = type("Props", (), {"shared_memory_per_block_optin": 227 * 1024, "multi_processor_count": 132})
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: props)


def _cuda_like(t: torch.Tensor) -> torch.Tensor:
    # select_config only asks x.device.type; a meta-free CPU tensor whose device reads "cuda"
    class Tensor(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda")
    return t.as_subclass(Tensor)


def test_no_benchmark_while_capturing_a_cuda_graph(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTRT_TUNING_FILE", str(tmp_path / "tuning.json"))
    _FakeCuda(monkeypatch, capturing=True)
    monkeypatch.setattr(autotune, "benchmark", lambda *a: pytest.fail("benchmarked while capturing"))
    monkeypatch.setattr(autotune, "heuristic", lambda *a, **k: KernelConfig("gemm"))
    x = _cuda_like(torch.randn(7, 64))
    q, s = torch.zeros(48, 64, dtype=torch.int8), torch.ones(48, 1)
    assert autotune.select_config(x, q, s, None, None, INT8_FORMAT) == KernelConfig("gemm")
    assert not (tmp_path / "tuning.json").exists()


def test_no_benchmark_while_torch_compile_traces(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTRT_TUNING_FILE", str(tmp_path / "tuning.json"))
    _FakeCuda(monkeypatch)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(autotune, "benchmark", lambda *a: pytest.fail("benchmarked while tracing"))
    monkeypatch.setattr(autotune, "heuristic", lambda *a, **k: KernelConfig("gemm"))
    x = _cuda_like(torch.randn(7, 64))
    q, s = torch.zeros(48, 64, dtype=torch.int8), torch.ones(48, 1)
    assert autotune.select_config(x, q, s, None, None, INT8_FORMAT) == KernelConfig("gemm")


def test_a_pick_that_fails_validation_is_never_persisted(monkeypatch, tmp_path):
    """The fastest config is checked once against the dequantize path; a wrong one is skipped with a
    warning and the next fastest that validates is persisted."""
    monkeypatch.setenv("QUANTRT_TUNING_FILE", str(tmp_path / "tuning.json"))
    _FakeCuda(monkeypatch)
    fast_wrong, slow_right = KernelConfig("gemv", block_n=16), KernelConfig("gemm", block_m=32)
    monkeypatch.setattr(autotune, "candidates", lambda *a: [fast_wrong, slow_right])
    monkeypatch.setattr(autotune, "benchmark", lambda args, fmt, configs: {fast_wrong: 1.0, slow_right: 2.0})
    monkeypatch.setattr(autotune, "validate", lambda args, fmt, config: 0.5 if config == fast_wrong else 0.0)
    x = _cuda_like(torch.randn(7, 64))
    q, s = torch.zeros(48, 64, dtype=torch.int8), torch.ones(48, 1)
    with pytest.warns(UserWarning, match="off by 5.00e-01"):
        assert autotune.select_config(x, q, s, None, None, INT8_FORMAT) == slow_right
    entries = tuning.TuningTable(tmp_path / "tuning.json").entries()
    assert list(entries.values()) == [slow_right.to_dict()]
    assert autotune.SOURCE_HASH in next(iter(entries))


def test_validate_measures_a_wrong_config(monkeypatch):
    """validate() itself: the kernel against the dequantize path, on synthetic tensors (interpreter)."""
    args = (torch.empty(5, 64), torch.empty(40, 64, dtype=torch.int8), torch.empty(40, 1), None, None)
    assert autotune.validate(args, INT8_FORMAT, CPU_CONFIGS["gemv"]) < 1e-5
    real_run = autotune.run
    monkeypatch.setattr(autotune, "run", lambda *a: real_run(*a) * (1.0 if a[-1].path == "dequant" else 1.5))
    assert autotune.validate(args, INT8_FORMAT, CPU_CONFIGS["gemv"]) == pytest.approx(0.5, rel=1e-4)


def test_source_hash_covers_every_kernel_source():
    assert set(autotune.SOURCE_FILES) >= {"formats.py", "matmul.py", "autotune.py", "packing.py"}
