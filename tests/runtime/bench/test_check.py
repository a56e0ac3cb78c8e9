"""The GPU check (`quantrt bench check`, quantrt.bench.check, benchmarks/gpu_check.py) in its CPU dry run: every step runs and
writes its rows, every format gets parity rows through every path, a kernel that computes wrong values or
raises fails the run (exit code 1), a step that does not fit the budget is skipped with a note, and the
time limits stop what runs past them."""

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from quantrt.__main__ import main as quantrt_main
from quantrt.bench import check as benchmark
from quantrt.bench.check import Budget, StepPlan, StepTimeout, hard_stop
from quantrt.bench.kernels import check_targets
from quantrt.bench.report import dtype_name

from .results import read_csv

ROOT = Path(__file__).resolve().parents[3]


def _files(out):
    markdowns = sorted(out.glob("*.md"))
    csvs = sorted(out.glob("*.csv"))
    assert len(markdowns) == 1 and len(csvs) == 1, sorted(out.iterdir())
    return markdowns[0].read_text(), read_csv(csvs[0]), markdowns[0]


def _summary(markdown: str) -> dict[str, str]:
    """step -> status, from the summary table."""
    table = markdown.split("## Summary\n", 1)[1]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    return {row[0]: row[1] for row in cells[1:]}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("check")
    assert benchmark.main(["--cpu-smoke", "--out-dir", str(out)]) == 0
    return _files(out)


def test_every_step_runs_and_writes_its_section(smoke_run):
    markdown, rows, path = smoke_run
    assert path.name.endswith("-cpu-check-cpu-smoke.md")
    assert "command: `python benchmarks/gpu_check.py --cpu-smoke --out-dir" in markdown
    assert "torch " + torch.__version__ in markdown and "kernels source hash:" in markdown
    for title in benchmark.STEP_TITLES.values():
        assert f"## {title}\n" in markdown
    summary = _summary(markdown)
    assert list(summary) == list(benchmark.STEPS)
    # off CUDA the interpreted kernels are not precompiled; every other step runs to its end
    assert summary["precompile"] in ("skipped", "not available")
    assert [summary[s] for s in ("parity", "compile", "speed")] == ["ok", "ok", "ok"]
    assert {r["step"] for r in rows} == {*benchmark.STEPS, "target"}
    assert list(rows[0]) == benchmark.CSV_HEADERS
    assert "Total: 0 failing checks" in markdown


def test_parity_rows_for_every_format_dtype_and_path_without_failures(smoke_run):
    markdown, rows, _ = smoke_run
    parity = [r for r in rows if r["step"] == "parity"]
    plan = benchmark.SMOKE_PARITY
    dtypes = {dtype_name(d) for d in plan.dtypes}
    paths = set(benchmark.kernel_paths()) & set(plan.path_ms)
    got = Counter((r["format"], r["dtype"], r["path"]) for r in parity)
    for fmt in benchmark.FORMATS:
        for dtype in dtypes:
            for path in paths | {"tuned"}:
                assert got[(fmt.label, dtype, path)] > 0, (fmt.label, dtype, path)
    assert {int(r["m"]) for r in parity} == {*plan.ms, *plan.odd_ms}
    assert all(r["status"] == "ok" and 0 <= float(r["error_ratio"]) <= 1 for r in parity), \
        [r for r in parity if r["status"] != "ok"][:3]
    # every case of the grid ran, none was left for lack of time
    assert len(parity) == len(benchmark.parity_cases(benchmark.FORMATS, plan, benchmark.kernel_paths()))
    assert f"{len(parity)} of {len(parity)} cases run, 0 failed." in markdown
    assert "### Parity failures" not in markdown


def test_compile_and_speed_rows(smoke_run):
    markdown, rows, _ = smoke_run
    compiled = [r for r in rows if r["step"] == "compile" and r["check"] == "torch.compile"]
    assert [(r["format"], int(r["m"])) for r in compiled] == list(benchmark.SMOKE_COMPILE.cases)
    assert all(r["status"] == "ok" and r["graph_breaks"] == "0" and r["graphs"] == "1" for r in compiled), compiled
    packaged = [r for r in rows if r["step"] == "compile" and r["check"] == "aot package"]
    assert [(r["format"], int(r["m"])) for r in packaged] == list(benchmark.SMOKE_AOT)
    assert all(r["status"] == "ok" and float(r["error_ratio"]) <= 1 for r in packaged), packaged
    speed = [r for r in rows if r["step"] == "speed"]
    timed = {(r["check"], r["format"]) for r in speed if r["ms"]}
    assert ("bf16 torch.mm", "bf16") in timed
    assert {("quantrt", f) for f in benchmark.SPEED_FORMATS} <= timed
    # torch's int4 kernel runs on int4wo (or says why not); torchao only where this check asks for it
    int4 = [r for r in speed if r["check"] == "torch-int4" and r["format"] == "int4wo"]
    assert int4 and all(r["ms"] or r["note"].startswith("skipped:") for r in int4)
    assert all(r["status"] != "FAIL" and "WRONG OUTPUT" not in r["note"] for r in speed), speed
    targets = [r for r in rows if r["step"] == "target"]
    assert len(targets) == len(check_targets([])) and "### Speed targets" in markdown


def test_a_wrong_or_failing_kernel_fails_the_parity_step(tmp_path, monkeypatch):
    from quantrt.kernels import floatx, int8

    original = int8.int8_linear

    def off_by_one(*args, **kwargs):
        return original(*args, **kwargs) + 1

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(int8, "int8_linear", off_by_one)
    monkeypatch.setattr(floatx, "fp8_linear", broken)
    argv = ["--cpu-smoke", "--steps", "parity", "--formats", "int8,fp8_e4m3,int4-g128", "--out-dir", str(tmp_path)]
    assert benchmark.main(argv) == 1
    markdown, rows, _ = _files(tmp_path)
    parity = [r for r in rows if r["step"] == "parity"]
    status = {fmt: {r["status"] for r in parity if r["format"] == fmt} for fmt in ("int8", "fp8_e4m3", "int4-g128")}
    assert status == {"int8": {"FAIL"}, "fp8_e4m3": {"FAIL"}, "int4-g128": {"ok"}}
    assert all("no kernel today" in r["note"] for r in parity if r["format"] == "fp8_e4m3")
    failed = sum(r["status"] == "FAIL" for r in parity)
    assert f"Total: {failed} failing checks" in markdown and "exit code 1" in markdown
    assert "### Parity failures" in markdown and _summary(markdown)["parity"] == "FAILED"


def test_a_step_that_does_not_fit_the_budget_is_skipped_with_a_note(tmp_path):
    assert benchmark.main(["--cpu-smoke", "--budget-s", "0", "--out-dir", str(tmp_path)]) == 0
    markdown, rows, _ = _files(tmp_path)
    assert set(_summary(markdown).values()) == {"skipped"}
    assert [r["step"] for r in rows] == list(benchmark.STEPS)
    assert all(r["status"] == "skipped" and "needs at least" in r["note"] for r in rows)


def test_budget_keeps_the_later_steps_minimums():
    plan = {"a": StepPlan(100, 10), "b": StepPlan(50, 20), "c": StepPlan(30, 5)}
    budget = Budget(1000, plan, ["a", "b", "c"], time.monotonic())
    reserve = benchmark.SUMMARY_RESERVE_S

    def left(seconds):
        budget.deadline = time.monotonic() + seconds

    left(400)  # room for all: a gets what the later steps' plans leave
    assert budget.cap("a") == pytest.approx(400 - reserve - 80, abs=1)
    left(reserve + 60)  # a would get nothing after b's and c's plans: its minimum, the later minimums kept
    assert budget.cap("a") == pytest.approx(plan["a"].min_s, abs=1)
    left(reserve + 30)  # a's minimum would eat b's and c's: a is skipped
    assert budget.cap("a") < plan["a"].min_s
    assert budget.cap("c") == pytest.approx(30, abs=1)  # the last step takes what is left


def test_hard_stop_is_not_swallowed_by_except_exception():
    swallowed = False
    start = time.monotonic()
    with pytest.raises(StepTimeout):
        with hard_stop(0.2):
            try:
                time.sleep(5)
            except Exception:
                swallowed = True
    assert not swallowed and time.monotonic() - start < 2


def test_precompile_records_every_variant(tmp_path, monkeypatch):
    from quantrt.kernels import variants

    calls = []

    def compile_all(device=None, processes=None):
        calls.append((device, processes))
        return [{"variant": "int8/bfloat16/gemv/M1", "seconds": 0.5, "error": None},
                {"variant": "uint3/bfloat16/gemm/M4608", "seconds": 1.5, "error": "RuntimeError: out of resources"}]

    monkeypatch.setattr(variants, "compile_all", compile_all)
    monkeypatch.setattr(benchmark, "kernels_interpreted", lambda: False)
    assert benchmark.main(["--cpu-smoke", "--steps", "precompile", "--out-dir", str(tmp_path)]) == 0
    markdown, rows, _ = _files(tmp_path)
    assert calls == [("cpu", os.cpu_count())]
    assert [(r["format"], r["status"]) for r in rows] == [("int8/bfloat16/gemv/M1", "ok"),
                                                          ("uint3/bfloat16/gemm/M4608", "FAILED")]
    assert "compile_all: 2 variants" in markdown and "1 reported an error" in markdown


def test_precompile_without_compile_all_says_so(tmp_path, monkeypatch):
    from quantrt.kernels import variants

    monkeypatch.delattr(variants, "compile_all")
    assert benchmark.main(["--cpu-smoke", "--steps", "precompile", "--out-dir", str(tmp_path)]) == 0
    markdown, rows, _ = _files(tmp_path)
    assert "precompile: not available" in markdown and rows[0]["status"] == "not available"


def test_cli_bench_check(tmp_path, capsys):
    assert quantrt_main(["bench", "check", "--cpu-smoke", "--steps", "speed", "--out-dir", str(tmp_path)]) == 0
    markdown, rows, _ = _files(tmp_path)
    assert "command: `quantrt bench check --cpu-smoke --steps speed" in markdown
    assert {r["step"] for r in rows} == {"speed", "target"}
    assert "Total: 0 failing checks" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--steps", "parity,warmup"], "--steps: unknown step(s) ['warmup']"),
    (["--formats", "int9"], "--formats: unknown format(s) ['int9']"),
], ids=["bad-step", "bad-format"])
def test_bad_arguments_are_one_clear_line(argv, message, tmp_path, capsys):
    assert quantrt_main(["bench", "check", "--cpu-smoke", *argv, "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_gpu_check_script_imports_quantrt_from_an_uninstalled_checkout():
    # the GPU machine has the checkout but no install: the script links runtime/ and kernels/ into the
    # package layout, for itself and for the processes it starts (the precompile's workers)
    hide_install = 'sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]'
    child = f"""
import sys
{hide_install}
import quantrt.kernels.matmul
print(quantrt.kernels.matmul.__file__)
"""
    code = f"""
import importlib.util, os, runpy, subprocess, sys
{hide_install}
assert importlib.util.find_spec("quantrt") is None  # as on the GPU machine: no install
runpy.run_path({str(ROOT / "benchmarks" / "gpu_check.py")!r})["use_checkout"]()
import quantrt, quantrt.kernels.matmul, quantrt.bench.check
print(quantrt.__file__, quantrt.kernels.matmul.__file__, quantrt.bench.check.main.__module__)
subprocess.run([sys.executable, "-c", {child!r}], check=True)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}).stdout.split()
    assert [str(Path(p).resolve()) for p in (out[0], out[1], out[3])] == [
        str(ROOT / "runtime" / "__init__.py"), str(ROOT / "kernels" / "matmul.py"), str(ROOT / "kernels" / "matmul.py")]
    assert out[2] == "quantrt.bench.check"


def test_gpu_check_script_smoke_run_turns_the_interpreter_on_itself(tmp_path):
    # the runbook's dry run, from a shell without TRITON_INTERPRET: the script turns the interpreter on before
    # `import quantrt` imports triton (the tests' conftest sets it for every other test)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--steps", "parity",
                           "--formats", "int8", "--out-dir", str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    markdown, rows, _ = _files(tmp_path)
    assert rows and all(r["status"] == "ok" for r in rows) and "TRITON_INTERPRET=1" in markdown


def test_a_step_past_its_time_cap_is_cut_short_and_counts_what_it_left(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "SUMMARY_RESERVE_S", 0)
    monkeypatch.setitem(benchmark.SMOKE_PLAN, "parity", StepPlan(1, 0.5))
    assert benchmark.main(["--cpu-smoke", "--steps", "parity", "--budget-s", "2", "--out-dir", str(tmp_path)]) == 0
    markdown, rows, _ = _files(tmp_path)
    total = len(benchmark.parity_cases(benchmark.FORMATS, benchmark.SMOKE_PARITY, benchmark.kernel_paths()))
    assert 0 < len(rows) < total
    assert f"{len(rows)} of {total} cases run, 0 failed, {total - len(rows)} not run (time budget)." in markdown
    assert _summary(markdown)["parity"] == "cut short"


def test_a_graph_break_fails_the_compile_step(tmp_path, monkeypatch):
    from quantrt.modules import QuantizedLinear

    forward = QuantizedLinear.forward

    def forward_with_a_break(self, x):
        torch._dynamo.graph_break()
        return forward(self, x)

    monkeypatch.setattr(QuantizedLinear, "forward", forward_with_a_break)
    assert benchmark.main(["--cpu-smoke", "--steps", "compile", "--out-dir", str(tmp_path)]) == 1
    markdown, rows, _ = _files(tmp_path)
    # torch.export traces through a Dynamo graph break (it does not use Dynamo): the AOT rows still pass
    assert [r["status"] for r in rows if r["check"] == "torch.compile"] == ["FAIL"] * len(benchmark.SMOKE_COMPILE.cases)
    assert [r["status"] for r in rows if r["check"] == "aot package"] == ["ok"] * len(benchmark.SMOKE_AOT)
    assert _summary(markdown)["compile"] == "FAILED" and "exit code 1" in markdown
