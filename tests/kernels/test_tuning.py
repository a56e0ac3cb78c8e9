import json

import pytest
import torch

from quantrt.kernels import tuning
from quantrt.kernels.matmul import KernelConfig

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
    config = KernelConfig("gemv", block_m=1, block_n=8, block_k=512, num_stages=2)
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
