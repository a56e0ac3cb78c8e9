"""`quantrt bench model` (quantrt.bench.model) in its CPU smoke run: a row per (model, scheme, provider) and
the autoquant row with its plan, the results table and the targets; the targets and the autoquant comparison
on given rows; bad arguments are one clear line. The numbers of a smoke run are not checked."""

import importlib.util
from collections import Counter

import pytest
import torch

from quantrt import AutoquantPlan
from quantrt.__main__ import main
from quantrt.bench import model as benchmark
from quantrt.models import build_flux, build_llm

from .results import HAS_MATPLOTLIB, cells, read_csv, section


def test_model_smoke_rows_and_files(tmp_path):
    argv = ["bench", "model", "--cpu-smoke", "--out-dir", str(tmp_path), "--schemes", "int8wo,fp6_e3m2"]
    assert main(argv) == 0
    markdown_path = next(tmp_path.glob("*-cpu-model-cpu-smoke.md"))
    markdown = markdown_path.read_text()
    rows = read_csv(markdown_path.with_suffix(".csv"))
    assert list(rows[0]) == benchmark.CSV_HEADERS
    got = [(r["model"], r["scheme"], r["provider"]) for r in rows]
    flux = [("flux", "bf16", "torch"), ("flux", "int8wo", "quantrt"), ("flux", "int8wo", "torchao"),
            ("flux", "fp6_e3m2", "quantrt"), ("flux", "fp6_e3m2", "torchao"), ("flux", "autoquant", "quantrt")]
    assert got[:6] == flux
    if importlib.util.find_spec("transformers") is None:
        assert got[6:] == [("llm", "bf16", "torch")]
        assert rows[6]["note"] == "skipped: transformers is not installed (pip install transformers)"
    else:
        assert got[6:] == [("llm", *key[1:]) for key in flux]
    by_key = {key: r for key, r in zip(got, rows)}
    assert by_key[("flux", "fp6_e3m2", "torchao")]["note"].startswith("skipped: torchao")
    for key in [("flux", "int8wo", "quantrt"), ("flux", "int8wo", "torchao"), ("flux", "fp6_e3m2", "quantrt")]:
        row = by_key[key]
        assert row["eager_ms"] and not row["compiled_ms"], row  # the smoke run compiles nothing by default
        assert 0 < float(row["error_eager"]) < 0.1, row  # int8 / fp6 weights on a bf16 model
        assert 0 < float(row["weight_gb"]) < float(by_key[("flux", "bf16", "torch")]["weight_gb"])
    results = section(markdown, "Results")
    assert len(results) == 2 + len(rows)
    assert cells(results[0]) == benchmark.TABLE_HEADERS
    autoquant_rows = [r for r in rows if r["scheme"] == "autoquant"]
    targets = section(markdown, "Targets")
    assert len(targets) == 2 + 4 + len(autoquant_rows) and all("not measured" in line for line in targets[2:])
    assert "command: `quantrt bench model --cpu-smoke" in markdown
    for row in autoquant_rows:
        _check_autoquant_row(row, markdown_path, markdown)
    if not HAS_MATPLOTLIB:
        assert "matplotlib is not installed" in markdown


def _linear_names(model: str) -> set[str]:
    module = build_flux("tiny") if model == "flux" else build_llm("tiny")
    return {name for name, m in module.named_modules() if type(m) is torch.nn.Linear}


def _check_autoquant_row(row, markdown_path, markdown) -> None:
    """The autoquant row is timed like the others (or skipped with its reason), and its plan file chooses,
    for every Linear layer of the model, one of the smoke run's two candidates within 5% or full precision."""
    assert not row["note"].startswith("FAILED"), row
    if not row["eager_ms"]:
        assert row["note"].startswith("skipped: "), row
        return
    assert 0 < float(row["error_eager"]) < 0.1, row
    # not compared with bf16's: the backends autoquant picks by (noisy CPU) time store differently, and a
    # layer served by quanto keeps quantrt's codes and quanto's copy of them
    assert float(row["weight_gb"]) > 0, row
    plan_path = markdown_path.with_name(f"{markdown_path.stem}-{row['model']}-autoquant-plan.json")
    plan = AutoquantPlan.from_json(plan_path.read_text())
    assert set(plan.layers) == _linear_names(row["model"])
    assert [c["scheme"] for c in plan.candidates] == ["int8wo", "fp6_e3m2"] and plan.max_error == 0.05
    chosen = Counter()
    for name, layer in plan.layers.items():
        trial = layer.chosen
        if trial is None:
            assert layer.reason, name
            chosen["full precision"] += 1
        else:
            assert trial.scheme in ("int8wo", "fp6_e3m2") and 0 <= trial.error <= 0.05, (name, trial)
            chosen[trial.scheme] += 1
    assert chosen["int8wo"] > 0  # int8 weights err ~0.5% per layer, fp6 (reference only on CPU) ~10x slower
    assert row["detail"].startswith(f"{len(plan.layers)} layers: ")
    for scheme, count in chosen.items():
        assert f"{scheme} x {count}" in row["detail"], row
    assert f"- {row['model']}: {row['detail']}; plan measured in " in markdown
    assert plan_path.name in markdown


def test_model_targets():
    def row(scheme, provider, speedup):
        return benchmark.Row("flux", scheme, provider, compiled_ms=1.0, compiled_speedup=speedup)

    rows = [row("bf16", "torch", 1.0), row("int8wo", "quantrt", 1.2), row("int4wo", "quantrt", 1.5),
            row("int8dq", "quantrt", 0.8), row("int4wo", "torchao", 0.5)]
    every, best = benchmark.check_targets(rows)
    assert every.status == "met" and "slowest int8wo 1.20x" in every.detail  # int8dq is not weight-only
    assert best.status == "met" and "int4wo 1.50x" in best.detail
    rows[2].compiled_speedup = 0.9
    every, best = benchmark.check_targets(rows)
    assert every.status == "NOT met" and "below bf16: int4wo" in every.detail
    assert best.status == "NOT met"


def test_model_autoquant_comparison_is_reported_not_judged():
    def row(scheme, ms, error, provider="quantrt"):
        return benchmark.Row("flux", scheme, provider, eager_ms=2 * ms, compiled_ms=ms, compiled_speedup=2.0 / ms,
                               error_eager=error, error_compiled=error)

    auto = row("autoquant", 0.9, 0.02)
    rows = [row("bf16", 2.0, None, "torch"), row("int8wo", 1.0, 0.01), row("int4wo", 0.95, 0.05),
            row("int4wo", 0.5, 0.05, "torchao"), auto]  # torchao's row is no fixed quantrt scheme
    every, best, comparison = benchmark.check_targets(rows)
    assert "slowest int8wo 2.00x" in every.detail and "best int4wo 2.11x" in best.detail  # autoquant: no scheme
    assert comparison.status == "yes" and "(informational)" in comparison.target
    assert comparison.detail.startswith("autoquant 0.9 ms err 2.00%; int8wo 1 ms err 1.00%; int4wo 0.95 ms err")
    assert comparison.detail.endswith("; lower error: int8wo")
    auto.compiled_ms = 0.97
    comparison = benchmark.check_targets(rows)[2]
    assert comparison.status == "no" and "not faster than: int4wo" in comparison.detail
    auto.compiled_ms = auto.error_compiled = None
    comparison = benchmark.check_targets(rows)[2]
    assert comparison.status == "not measured" and comparison.detail.startswith("not compiled, eager: autoquant 1.8 ms")
    failed = benchmark.Row("flux", "autoquant", "quantrt", note="FAILED: RuntimeError: out of memory")
    comparison = benchmark.check_targets([*rows[:4], failed])[2]
    assert comparison.status == "not measured" and "out of memory" in comparison.detail


def test_model_smoke_without_autoquant(tmp_path):
    argv = ["bench", "model", "--cpu-smoke", "--out-dir", str(tmp_path), "--models", "flux", "--schemes", "int8wo",
            "--providers", "quantrt", "--no-autoquant"]
    assert main(argv) == 0
    markdown = next(tmp_path.glob("*.md")).read_text()
    rows = read_csv(next(tmp_path.glob("*.csv")))
    assert [(r["scheme"], r["provider"]) for r in rows] == [("bf16", "torch"), ("int8wo", "quantrt")]
    assert not list(tmp_path.glob("*.json")) and "## Autoquant" not in markdown
    assert "- autoquant: off (--no-autoquant)" in markdown and len(section(markdown, "Targets")) == 2 + 2


@pytest.mark.parametrize("argv, message", [
    (["--models", "sdxl"], "choose from flux, llm"),
    (["--autoquant-candidates", "int8wo,int9wo"], "--autoquant-candidates: unknown quantization scheme 'int9wo'"),
    (["--autoquant-max-error", "-0.1"], "--autoquant-max-error: max_error is"),
], ids=["bad-model", "bad-autoquant-candidate", "negative-autoquant-max-error"])
def test_bad_arguments_are_one_clear_line(argv, message, capsys, tmp_path):
    assert main(["bench", "model", "--cpu-smoke", *argv, "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_model_smoke_gguf_rows_against_diffusers_gguf_path(tmp_path):
    """A GGUF scheme through quantrt and through diffusers' GGUF path (GGUFLinear holding the same blocks): both
    rows timed, the same numbers up to diffusers' float16 dequantize; no diffusers-gguf row for another scheme."""
    argv = ["bench", "model", "--cpu-smoke", "--out-dir", str(tmp_path), "--models", "flux", "--schemes",
            "q8_0,int8wo", "--providers", "quantrt,diffusers-gguf", "--no-autoquant"]
    assert main(argv) == 0
    rows = read_csv(next(tmp_path.glob("*.csv")))
    assert [(r["scheme"], r["provider"]) for r in rows] == [("bf16", "torch"), ("q8_0", "quantrt"),
                                                            ("q8_0", "diffusers-gguf"), ("int8wo", "quantrt")]
    ours, theirs = rows[1], rows[2]
    assert ours["eager_ms"] and theirs["eager_ms"] and theirs["detail"].startswith("diffusers ")
    assert "GGUFLinear x" in theirs["detail"] and "kept" not in ours["detail"]  # every tiny FLUX layer takes Q8_0
    assert 0 < float(ours["error_eager"]) < 0.05
    assert float(theirs["error_eager"]) == pytest.approx(float(ours["error_eager"]), rel=0.2)
    targets = section(next(tmp_path.glob("*.md")).read_text(), "Targets")
    assert any("q8_0 through quantrt >= diffusers' GGUF path, compiled" in line and "not measured" in line
               for line in targets)


def test_model_gguf_comparison():
    def row(provider, ms):
        return benchmark.Row("flux", "q4_k", provider, compiled_ms=ms, compiled_speedup=1.0, error_compiled=0.01)

    rows = [row("quantrt", 2.0), row("diffusers-gguf", 5.0)]
    (met,) = benchmark.gguf_comparisons(rows)
    assert met.status == "met" and met.detail.startswith("2.50x: quantrt 2 ms, diffusers 5 ms")
    rows[0].compiled_ms = 6.0
    assert benchmark.gguf_comparisons(rows)[0].status == "NOT met"
