"""`quantrt bench compile` (quantrt.bench.compile): the table, CSV and target verdicts of its configurations,
with the `quantrt warmup` processes it starts stood in for (tests/runtime/test_compile.py runs the real ones),
and the command line it starts them with."""

import argparse
import sys

import pytest

from quantrt.__main__ import main
from quantrt.bench import compile as benchmark


def _fake_warmup(calls: list, misses: int = 0):
    """A stand-in for warmup_process: cold 10 s from compile() on, warm 0.5 s with torch.compile and 0.2 s from AOT
    packages, with `misses` cache misses warm."""
    def warmup(args, report):
        calls.append(args)
        warm, aot = "--check" in args, "--aot" in args
        served = "aot package" if aot else "torch.compile"
        shapes = [{"seconds": 0.1 if warm else 9.0, "cache_hits": 1 if warm and not aot else 0,
                   "cache_misses": misses if warm else 1, "recompiles": 0, "served_by": served}]
        start = (0.2 if aot else 0.5) if warm else 10.0
        return {"shapes": shapes, "seconds_from_compile": start}, 2.0 if warm else 12.0

    return warmup


def _run(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    args = parser.parse_args(["--cpu-smoke", "--out-dir", str(tmp_path), *argv])
    return benchmark.run(args, "quantrt", ["bench", "compile"], echo=lambda _: None)


def test_bench_compile_reports_jit_and_aot_side_by_side(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(benchmark, "warmup_process", _fake_warmup(calls))
    out = _run(tmp_path, "--regional", "both")
    assert len(calls) == 6 and sum("--regional" in c for c in calls) == 2 and sum("--aot" in c for c in calls) == 2
    assert [(row[3], row[4], row[8]) for row in out.rows] == [
        ("no", "torch.compile", "5.0%"), ("yes", "torch.compile", "5.0%"), ("no", "aot package", "2.0%")]
    assert not out.failures
    text = out.markdown.read_text()
    assert "< 20%: met" in text and "< 5%: met" in text and "warm start s" in out.csv.read_text()
    assert out.markdown.name.endswith("-cpu-compile-cpu-smoke.md")


def test_a_warm_run_that_misses_the_cache_is_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "warmup_process", _fake_warmup([], misses=2))
    out = _run(tmp_path, "--regional", "no", "--aot", "no")
    assert out.failures == ["FLUX tiny, int8wo, mode=max-autotune, JIT, regional=False: 2 misses, 0 recompiles"]


def test_an_aot_warm_run_served_by_torch_compile_is_a_failure(tmp_path, monkeypatch):
    fake = _fake_warmup([])

    def not_packaged(args, report):
        result, seconds = fake(args, report)
        for shape in result["shapes"]:
            shape["served_by"] = "torch.compile"
        return result, seconds

    monkeypatch.setattr(benchmark, "warmup_process", not_packaged)
    out = _run(tmp_path, "--aot", "yes")
    assert len(out.rows) == 1 and "not only by AOT packages" in out.failures[0]


def test_warmup_runs_the_quantrt_program_in_a_fresh_process(tmp_path, monkeypatch):
    started = []

    class Done:
        returncode, stdout, stderr = 0, "", ""

    def fake_run(command, **kwargs):
        started.append(command)
        (tmp_path / "r.json").write_text('{"shapes": []}')
        return Done()

    monkeypatch.setattr(benchmark.subprocess, "run", fake_run)
    report, seconds = benchmark.warmup_process(["--size", "tiny"], tmp_path / "r.json")
    assert report == {"shapes": []} and seconds >= 0
    assert started == [[sys.executable, "-m", "quantrt", "warmup", "--size", "tiny", "--json", str(tmp_path / "r.json")]]


@pytest.mark.parametrize("argv, message", [(["--sizes", "huge"], "--sizes: huge; choose from")], ids=["bad-size"])
def test_bad_arguments_are_one_clear_line(argv, message, capsys, tmp_path):
    assert main(["bench", "compile", "--cpu-smoke", *argv, "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
