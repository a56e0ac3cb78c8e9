"""The benchmarks (`quantrt bench kernels`, `quantrt bench model`) in their CPU smoke run: they work and write
what they promise (markdown, CSV, a plot or the reason for none), with a row per point. Their numbers are
not checked, except that every provider computes the same linear (relative error against float32)."""

import csv
import importlib.util
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from quantrt import AutoquantPlan
from quantrt import bench_common as bc
from quantrt import bench_kernels, bench_model
from quantrt.cli import main

KERNEL_FORMATS = ("int8wo", "int4wo", "uint3wo", "float8wo_e4m3", "fp6_e3m2")
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _section(markdown: str, title: str) -> list[str]:
    """The table lines under a '## title' heading."""
    lines = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    return [line for line in lines if line.startswith("|")]


def _cells(line: str) -> list[str]:
    """The cells of a markdown table line, without their padding."""
    return [cell.strip() for cell in line.strip().removeprefix("|").removesuffix("|").split("|")]


def _check_plot(outputs, markdown: str) -> None:
    if HAS_MATPLOTLIB:
        assert outputs.plot is not None and outputs.plot.stat().st_size > 0
    else:
        assert outputs.plot is None and "matplotlib is not installed" in markdown


@pytest.fixture(scope="module")
def kernel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    argv = ["bench", "kernels", "--cpu-smoke", "--out-dir", str(out), "--formats", ",".join(KERNEL_FORMATS)]
    assert main(argv) == 0
    files = sorted(out.iterdir())
    return out, files


def test_kernel_smoke_writes_markdown_csv_and_plot_or_reason(kernel_run):
    out, files = kernel_run
    markdowns = [f for f in files if f.suffix == ".md"]
    csvs = [f for f in files if f.suffix == ".csv"]
    assert len(markdowns) == 1 and len(csvs) == 1
    assert markdowns[0].name.endswith("-cpu-kernels-cpu-smoke.md")
    markdown = markdowns[0].read_text()
    assert f"command: `quantrt bench kernels --cpu-smoke --out-dir {out}" in markdown
    assert "torch " + torch.__version__ in markdown and "CPU smoke run" in markdown
    pngs = [f for f in files if f.suffix == ".png"]
    assert len(pngs) == (1 if HAS_MATPLOTLIB else 0)
    if not HAS_MATPLOTLIB:
        assert "matplotlib is not installed" in markdown


def test_kernel_smoke_has_a_row_per_shape_m_format_and_provider(kernel_run):
    out, files = kernel_run
    rows = _read_csv(next(f for f in files if f.suffix == ".csv"))
    assert list(rows[0]) == bench_kernels.CSV_HEADERS
    expected = {(n, k, m, fmt, provider) for n, k in bench_kernels.SMOKE_SHAPES for m in bench_kernels.SMOKE_MS
                for fmt, provider in [("bf16", bench_kernels.BASELINE)]
                + [(f, p) for f in KERNEL_FORMATS for p in bench_kernels.PROVIDERS]}
    got = [(int(r["n"]), int(r["k"]), int(r["m"]), r["format"], r["provider"]) for r in rows]
    assert sorted(got) == sorted(expected)
    for r in rows:
        # every point is timed or says why not; nothing failed
        assert (r["ms"] != "") != r["note"].startswith("skipped:"), r
        assert not r["note"].startswith("FAILED"), r
    by_key = {(r["format"], r["provider"]): r for r in rows}
    assert by_key[("fp6_e3m2", "torchao")]["note"].startswith("skipped: torchao")
    assert by_key[("uint3wo", "quanto")]["note"].startswith("skipped: quanto has no uint3")
    assert by_key[("int8wo", "gemlite")]["note"] == "skipped: gemlite runs on CUDA only" or (
        "not installed" in by_key[("int8wo", "gemlite")]["note"])
    for fmt in KERNEL_FORMATS:
        assert by_key[(fmt, "quantrt")]["ms"] != ""
    markdown = next(f for f in files if f.suffix == ".md").read_text()
    table = _section(markdown, "All points")
    assert _cells(table[0]) == bench_kernels.TABLE_HEADERS
    assert len(table) == 2 + len(rows)
    pivot = _section(markdown, "Speed-up over bf16 torch.mm")
    assert len(pivot) == 2 + len(bench_kernels.SMOKE_SHAPES) * len(KERNEL_FORMATS) * len(bench_kernels.PROVIDERS)
    targets = _section(markdown, "Speed targets (issue 3), quantrt")
    assert len(targets) == 2 + len(bench_kernels.check_targets([]))
    assert all("not measured" in line for line in targets[2:])


def test_kernel_smoke_providers_compute_the_same_linear(kernel_run):
    # rel. err of each provider against x @ dequantize(W)^T in float32: bf16 rounding only (quanto's int4
    # dequantizes in bf16), so a provider wired to other codes, scales or zero points shows here
    out, files = kernel_run
    for r in _read_csv(next(f for f in files if f.suffix == ".csv")):
        if r["ms"]:
            assert 0 <= float(r["rel_error"]) < 2e-2, r


def test_model_smoke_rows_and_files(tmp_path):
    argv = ["bench", "model", "--cpu-smoke", "--out-dir", str(tmp_path), "--schemes", "int8wo,fp6_e3m2"]
    assert main(argv) == 0
    markdown_path = next(tmp_path.glob("*-cpu-model-cpu-smoke.md"))
    markdown = markdown_path.read_text()
    rows = _read_csv(markdown_path.with_suffix(".csv"))
    assert list(rows[0]) == bench_model.CSV_HEADERS
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
    results = _section(markdown, "Results")
    assert len(results) == 2 + len(rows)
    assert _cells(results[0]) == bench_model.TABLE_HEADERS
    autoquant_rows = [r for r in rows if r["scheme"] == "autoquant"]
    targets = _section(markdown, "Targets")
    assert len(targets) == 2 + 4 + len(autoquant_rows) and all("not measured" in line for line in targets[2:])
    assert "command: `quantrt bench model --cpu-smoke" in markdown
    for row in autoquant_rows:
        _check_autoquant_row(row, markdown_path, markdown)
    if not HAS_MATPLOTLIB:
        assert "matplotlib is not installed" in markdown


def _linear_names(model: str) -> set[str]:
    from quantrt.models import build_flux, build_llm

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


def _kernel_row(fmt, n, k, m, speedup, hbm_fraction, provider="quantrt"):
    return bench_kernels.Row(n, k, m, fmt, provider, ms=1.0, speedup=speedup, hbm_fraction=hbm_fraction)


def test_kernel_targets_are_judged_on_the_worst_point():
    rows = [_kernel_row("int4wo", 8192, 28672, 1, 3.8, 0.9), _kernel_row("int4wo", 16384, 16384, 16, 3.6, 0.86),
            _kernel_row("int8wo", 8192, 28672, 1, 1.9, 0.95), _kernel_row("int8wo", 16384, 16384, 8, 1.84, 0.95),
            _kernel_row("int4wo", 3072, 3072, 1, 0.5, 0.1),  # not a target shape
            _kernel_row("int8wo", 8192, 28672, 32, 0.5, 0.1),  # M above the target's
            _kernel_row("int8wo", 8192, 28672, 1, 0.1, 0.1, provider="torchao"),  # a peer's row
            _kernel_row("fp6_e3m2", 3072, 3072, 1024, 0.97, 0.5), _kernel_row("uint3wo", 3072, 3072, 4096, 1.0, 0.5)]
    status = {t.target.split()[0]: t for t in bench_kernels.check_targets(rows)}
    assert status["int4wo"].status == "met"
    assert status["int8wo"].status == "NOT met" and "1.84x" in status["int8wo"].detail
    assert status["every"].status == "met" and "2 points" in status["every"].detail
    rows.append(_kernel_row("int4wo", 16384, 16384, 4608, 0.9, 0.5))
    status = {t.target.split()[0]: t for t in bench_kernels.check_targets(rows)}
    assert status["every"].status == "NOT met" and "int4wo 0.90x" in status["every"].detail
    rows[1].hbm_fraction = 0.8  # fast enough but under 85% of the HBM floor
    assert bench_kernels.check_targets(rows)[0].status == "NOT met"


def test_kernel_targets_on_other_small_m_shapes_and_flux_at_4608():
    rows = [_kernel_row("int4wo", 8192, 8192, 1, 3.6, 0.9), _kernel_row("int8wo", 8192, 8192, 16, 1.9, 0.9),
            _kernel_row("int8wo", 3072, 3072, 4608, 0.99, 0.3), _kernel_row("int4wo", 12288, 3072, 4608, 0.98, 0.3),
            _kernel_row("int4wo", 8192, 8192, 4608, 0.5, 0.3)]  # not a FLUX shape
    status = {t.target.split()[0]: t for t in bench_kernels.check_targets(rows, small_m_shapes=((8192, 8192),))}
    assert status["int4wo"].status == "met" and status["int8wo"].status == "met"
    assert status["FLUX.1-dev"].status == "met" and "2 points, 0 below" in status["FLUX.1-dev"].detail
    assert status["every"].status == "NOT met"  # the 8192x8192 point at M 4608
    rows[3].speedup = 0.96
    status = {t.target.split()[0]: t for t in bench_kernels.check_targets(rows, small_m_shapes=((8192, 8192),))}
    assert status["FLUX.1-dev"].status == "NOT met" and "int4wo 0.96x (12288x3072)" in status["FLUX.1-dev"].detail
    assert bench_kernels.check_targets(rows)[0].status == "not measured"  # issue 3's shapes are not in the rows


def test_model_targets():
    def row(scheme, provider, speedup):
        return bench_model.Row("flux", scheme, provider, compiled_ms=1.0, compiled_speedup=speedup)

    rows = [row("bf16", "torch", 1.0), row("int8wo", "quantrt", 1.2), row("int4wo", "quantrt", 1.5),
            row("int8dq", "quantrt", 0.8), row("int4wo", "torchao", 0.5)]
    every, best = bench_model.check_targets(rows)
    assert every.status == "met" and "slowest int8wo 1.20x" in every.detail  # int8dq is not weight-only
    assert best.status == "met" and "int4wo 1.50x" in best.detail
    rows[2].compiled_speedup = 0.9
    every, best = bench_model.check_targets(rows)
    assert every.status == "NOT met" and "below bf16: int4wo" in every.detail
    assert best.status == "NOT met"


def test_model_autoquant_comparison_is_reported_not_judged():
    def row(scheme, ms, error, provider="quantrt"):
        return bench_model.Row("flux", scheme, provider, eager_ms=2 * ms, compiled_ms=ms, compiled_speedup=2.0 / ms,
                               error_eager=error, error_compiled=error)

    auto = row("autoquant", 0.9, 0.02)
    rows = [row("bf16", 2.0, None, "torch"), row("int8wo", 1.0, 0.01), row("int4wo", 0.95, 0.05),
            row("int4wo", 0.5, 0.05, "torchao"), auto]  # torchao's row is no fixed quantrt scheme
    every, best, comparison = bench_model.check_targets(rows)
    assert "slowest int8wo 2.00x" in every.detail and "best int4wo 2.11x" in best.detail  # autoquant: no scheme
    assert comparison.status == "yes" and "(informational)" in comparison.target
    assert comparison.detail.startswith("autoquant 0.9 ms err 2.00%; int8wo 1 ms err 1.00%; int4wo 0.95 ms err")
    assert comparison.detail.endswith("; lower error: int8wo")
    auto.compiled_ms = 0.97
    comparison = bench_model.check_targets(rows)[2]
    assert comparison.status == "no" and "not faster than: int4wo" in comparison.detail
    auto.compiled_ms = auto.error_compiled = None
    comparison = bench_model.check_targets(rows)[2]
    assert comparison.status == "not measured" and comparison.detail.startswith("not compiled, eager: autoquant 1.8 ms")
    failed = bench_model.Row("flux", "autoquant", "quantrt", note="FAILED: RuntimeError: out of memory")
    comparison = bench_model.check_targets([*rows[:4], failed])[2]
    assert comparison.status == "not measured" and "out of memory" in comparison.detail


def test_model_smoke_without_autoquant(tmp_path):
    argv = ["bench", "model", "--cpu-smoke", "--out-dir", str(tmp_path), "--models", "flux", "--schemes", "int8wo",
            "--providers", "quantrt", "--no-autoquant"]
    assert main(argv) == 0
    markdown = next(tmp_path.glob("*.md")).read_text()
    rows = _read_csv(next(tmp_path.glob("*.csv")))
    assert [(r["scheme"], r["provider"]) for r in rows] == [("bf16", "torch"), ("int8wo", "quantrt")]
    assert not list(tmp_path.glob("*.json")) and "## Autoquant" not in markdown
    assert "- autoquant: off (--no-autoquant)" in markdown and len(_section(markdown, "Targets")) == 2 + 2


def test_rotation_copies_exceed_twice_l2():
    l2 = 50 * 2**20
    for nbytes in (1, 1 << 20, 5 * 2**20, 60 * 2**20, 2**30):
        copies = bench_kernels._copies(nbytes, l2)
        assert 2 <= copies <= bench_kernels.MAX_COPIES
        assert copies * nbytes >= 2 * l2 or copies == bench_kernels.MAX_COPIES
    assert bench_kernels._copies(1 << 20, 0) == 2  # off CUDA: rotation still exercised


def test_stored_bytes_counts_tensor_subclasses_by_their_inner_tensors():
    from quantrt.backends import torchao as ao

    if ao.torchao_version() is None:
        pytest.skip("torchao is not installed")
    from quantrt.backends import get_backend
    from quantrt.modules import QuantizedLinear
    from quantrt.schemes import resolve_scheme

    linear = torch.nn.Linear(256, 64, bias=False)
    layer = QuantizedLinear.from_linear(linear, resolve_scheme("int8wo"), get_backend("torchao"))
    weight = layer.backend_weight
    inner = [getattr(weight, name, None) for name in ("qdata", "scale", "zero_point")]
    assert bc.stored_bytes(weight) == sum(t.numel() * t.element_size() for t in inner if t is not None)
    assert bc.stored_bytes(weight) < 64 * 256 * 4 / 3  # int8 codes, not the float32 weight
    assert bc.stored_bytes(linear) == 64 * 256 * 4
    x = torch.randn(3, 256)
    torch.testing.assert_close(F.linear(x, weight), x @ layer.dequantize().T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["bench", "kernels", "--cpu-smoke", "--formats", "int8dq"], "quantizes activations"),
    (["bench", "kernels", "--cpu-smoke", "--shapes", "3072by3072"], "is not NxK"),
    (["bench", "kernels", "--cpu-smoke", "--providers", "bitsandbytes"], "unknown provider"),
    (["bench", "model", "--cpu-smoke", "--models", "sdxl"], "choose from flux, llm"),
    (["bench", "model", "--cpu-smoke", "--autoquant-candidates", "int8wo,int9wo"],
     "--autoquant-candidates: unknown quantization scheme 'int9wo'"),
    (["bench", "model", "--cpu-smoke", "--autoquant-max-error", "-0.1"], "--autoquant-max-error: max_error is"),
], ids=["activation-format", "bad-shape", "bad-provider", "bad-model", "bad-autoquant-candidate",
        "negative-autoquant-max-error"])
def test_bad_arguments_are_one_clear_line(argv, message, capsys, tmp_path):
    assert main([*argv, "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_bench_without_a_benchmark_prints_help(capsys):
    assert main(["bench"]) == 2
    out = capsys.readouterr().out
    assert "kernels" in out and "model" in out
