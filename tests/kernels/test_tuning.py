import json

import pytest
import torch

from quantrt.kernels import common, tuning
from quantrt.kernels.common import INT8, UINTX, KernelConfig, WeightFormat

KEY = tuning.make_key("NVIDIA H100 80GB HBM3", "0123abcd", "uint4/bfloat16", 3072, 12288, 128, 7)


def test_m_buckets():
    assert [tuning.m_bucket(m) for m in (0, 1, 2, 3, 5, 16, 17, 1000, 4096)] == [1, 1, 2, 4, 8, 16, 32, 1024, 4096]
    assert [tuning.m_bucket(m) for m in (4097, 5120, 5121, 9000)] == [5120, 5120, 6144, 9216]


def test_key_names_every_field():
    assert KEY.split("|") == ["NVIDIA H100 80GB HBM3", f"torch {torch.__version__}",
                              f"triton {tuning.triton.__version__}", "0123abcd", "uint4/bfloat16", "N=3072", "K=12288",
                              "group=128", "M=8"]
    same_bucket = [tuning.make_key("gpu", "h", "int8/float16", 1, 2, 0, m) for m in (5, 8)]
    assert same_bucket[0] == same_bucket[1]


def test_table_round_trips(tmp_path):
    path = tmp_path / "sub" / "tuning.json"
    config = KernelConfig("splitk", block_m=1, block_n=64, block_k=256, split_k=4)
    tuning.TuningTable(path).put(KEY, config.to_dict())
    fresh = tuning.TuningTable(path)
    assert KernelConfig.from_dict(fresh.get(KEY)) == config
    assert fresh.get(KEY.replace("M=8", "M=16")) is None
    assert json.loads(path.read_text())["version"] == tuning.VERSION
    assert not list(path.parent.glob("*.tmp"))  # the temporary file was renamed into place


def test_writers_merge(tmp_path):
    path = tmp_path / "tuning.json"
    first, second = tuning.TuningTable(path), tuning.TuningTable(path)
    first.entries(), second.entries()  # both loaded before either writes
    first.put("a", {"path": "gemm"})
    second.put("b", {"path": "dequant"})
    assert set(tuning.TuningTable(path).entries()) == {"a", "b"}


@pytest.mark.parametrize("text", ["{not json", '{"version": 1, "entries": [1, 2]}', '{"version": 99, "entries": {}}',
                                  '{"version": 1, "entries": {"k": 3}}', b"\xff\xfe garbage"],
                         ids=["not-json", "entries-not-a-dict", "other-version", "entry-not-a-config", "not-utf8"])
def test_corrupt_table_is_ignored_and_rebuilt(tmp_path, text):
    path = tmp_path / "tuning.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    table = tuning.TuningTable(path)
    with pytest.warns(UserWarning, match="corrupt"):
        assert table.get(KEY) is None
    table.put(KEY, {"path": "dequant"})
    assert tuning.TuningTable(path).get(KEY) == {"path": "dequant"}


def test_unwritable_table_keeps_the_pick(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    table = tuning.TuningTable(blocker / "tuning.json")  # its folder cannot be created
    with pytest.warns(UserWarning) as record:
        table.put(KEY, {"path": "gemm"})
    assert any("cannot be written" in str(w.message) for w in record)
    assert table.get(KEY) == {"path": "gemm"}


def test_default_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("QUANTRT_TUNING_FILE", raising=False)
    monkeypatch.setenv("QUANTRT_CACHE_DIR", str(tmp_path))
    assert tuning.default_path() == tmp_path / "tuning.json"
    assert tuning.default_table().path == tmp_path / "tuning.json"
    monkeypatch.setenv("QUANTRT_TUNING_FILE", str(tmp_path / "other.json"))
    assert tuning.default_table().path == tmp_path / "other.json"
    monkeypatch.delenv("QUANTRT_CACHE_DIR")
    monkeypatch.delenv("QUANTRT_TUNING_FILE")
    assert tuning.default_path().parts[-3:] == (".cache", "quantrt", "tuning.json")


def test_cpu_never_benchmarks(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTRT_TUNING_FILE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(common, "benchmark", lambda *a: pytest.fail("benchmarked on CPU"))
    x, q, s = torch.randn(7, 64), torch.zeros(48, 64, dtype=torch.int8), torch.ones(48, 1)
    fmt = WeightFormat(INT8, 8)
    assert common.select_config(x, q, s, None, None, fmt).path == "splitk"
    assert common.select_config(torch.randn(33, 64), q, s, None, None, fmt).path == "gemm"
    assert not (tmp_path / "tuning.json").exists()


@pytest.mark.parametrize("m", [1, 8, 64, 1024, 4608])
@pytest.mark.parametrize("fmt, group_size", [(WeightFormat(INT8, 8), 0), (WeightFormat(UINTX, 4), 128),
                                             (WeightFormat(UINTX, 3), 32)], ids=["int8", "uint4-g128", "uint3-g32"])
def test_candidates_are_pruned_to_what_compiles(m, fmt, group_size):
    n, k = 3072, 12288
    configs = common.candidates(fmt, m, n, k, group_size, shared_memory=227 * 1024)
    paths = {c.path for c in configs}
    assert paths == {"splitk"} if m <= 16 else ("splitk" in paths) == (m <= 64)
    assert ("dequant" in paths) == (m >= 128)
    lanes = common.lanes(fmt, k, group_size)
    for c in configs:
        if c.path == "dequant":
            continue
        rows = c.block_k // lanes
        assert not group_size or group_size % c.block_k == 0 or c.block_k % group_size == 0
        assert c.block_m == 1 or rows >= 16  # tl.dot needs K >= 16 on GPUs
        if c.path == "splitk":
            assert c.block_m == (1 if m == 1 else max(16, tuning.m_bucket(m)))
            assert c.split_k == 1 or k // c.split_k >= c.block_k
    assert len(configs) <= 40


def test_heuristics_off_cuda():
    fmt = WeightFormat(UINTX, 4)
    cpu = torch.device("cpu")
    assert common.heuristic(fmt, 1, 80, 160, 32, cpu).block_m == 1
    assert common.heuristic(fmt, 7, 80, 160, 32, cpu) == common.fit(common.CPU_CONFIGS["splitk"], 7)
    assert common.heuristic(fmt, 4096, 80, 160, 32, cpu).path == "gemm"  # dequant is chosen on CUDA only
    assert common.heuristic(fmt, 7, 80, 160, 32, cpu, path="dequant").path == "dequant"
