"""`quantrt bench compile` (quantrt.bench.compile): the table, CSV and target verdicts of its configurations,
with the `quantrt warmup` processes it starts stood in for (tests/runtime/test_compile.py runs the real ones),
and the command line it starts them with."""

import argparse
import sys

import pytest

from quantrt.__main__ import main
from quantrt.bench import compile as benchmark


def _fake_warmup(calls: list, misses: int = 0):
    """A stand-in for warmup_process: cold 10 s a shape, warm 0.5 s, with `misses` cache misses warm."""
    def warmup(args, report):
        calls.append(args)
        warm = "--check" in args
        shapes = [{"seconds": 0.5 if warm else 10.0, "cache_hits": 1 if warm else 0,
                   "cache_misses": misses if warm else 1, "recompiles": 0}]
        return {"shapes": shapes}, 2.0 if warm else 12.0

    return warmup


def _run(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    args = parser.parse_args(["--cpu-smoke", "--out-dir", str(tmp_path), *argv])
    return benchmark.run(args, "quantrt", ["bench", "compile"], echo=lambda _: None)


def test_bench_compile_reports_each_configuration(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(benchmark, "warmup_process", _fake_warmup(calls))
    out = _run(tmp_path, "--regional", "both")
    assert len(calls) == 4 and sum("--regional" in c for c in calls) == 2
    assert [row[7] for row in out.rows] == ["5.0%", "5.0%"] and not out.failures
    assert "< 20%: met" in out.markdown.read_text() and "cold compile s" in out.csv.read_text()
    assert out.markdown.name.endswith("-cpu-compile-cpu-smoke.md")


def test_a_warm_run_that_misses_the_cache_is_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "warmup_process", _fake_warmup([], misses=2))
    out = _run(tmp_path, "--regional", "no")
    assert out.failures == ["FLUX tiny regional=False: 2 misses, 0 recompiles"]


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
