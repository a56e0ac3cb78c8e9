"""qt.compile / qt.warmup / `quantrt warmup` on CPU, for real: Inductor compiles C++ kernels here, and a
fresh process must load them from the cache entry instead of compiling again. Inputs are fp32 (the reference
backend) so eager and compiled outputs can be compared tightly."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

import quantrt
from quantrt import QuantConfig, QuantizedTransformer, RecompileError
from quantrt.cache import CacheEntry, CacheWarning
from quantrt.compile import bucket, fingerprint_fields, pad_inputs, repeated_blocks, signature

# compiled vs eager: Inductor fuses and reorders fp32 reductions
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4)}
MODE = "default"  # max-autotune on CPU picks among the same C++ kernels; the CLI test below uses it


def mlp(seed: int = 0, hidden: int = 96) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 64), nn.SiLU(), nn.Linear(64, 48))


def quantized_mlp(scheme: str = "int8wo", **kwargs) -> QuantizedTransformer:
    return QuantizedTransformer.from_model(mlp(**kwargs), QuantConfig(scheme, backend="reference"), progress=False)


WARM_IN_FRESH_PROCESS = textwrap.dedent("""
    import json, sys, torch, torch.nn as nn
    from quantrt import QuantConfig, QuantizedTransformer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.SiLU(), nn.Linear(64, 48))
    qt = QuantizedTransformer.from_model(model, QuantConfig("int8wo", backend="reference"), progress=False)
    qt.compile(mode="default", cache_dir=sys.argv[1], strict=True)
    rows = [int(m) for m in sys.argv[2].split(",")]
    report = qt.warmup([torch.randn(m, 64) for m in rows], progress=False)
    print(json.dumps({"status": qt._compiled.entry.status, "fields": qt._compiled.entry.fields,
                      "table": str(report), "rows": [dict(r.__dict__) for r in report]}))
""")


def run_fresh(cache, rows: str) -> dict:
    out = subprocess.run([sys.executable, "-c", WARM_IN_FRESH_PROCESS, str(cache), rows], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    """A cache folder in which a fresh process warmed the quantized MLP for M in (1, 7, 33), and that process's
    report. (A fresh process, as in a deployment: this test process has compiled and imported other things,
    and Inductor's cache keys see some of that global state.)"""
    cache = tmp_path_factory.mktemp("cache")
    return cache, run_fresh(cache, "1,7,33")


def test_warmup_compiles_each_shape_and_writes_an_entry(warmed):
    cache, cold = warmed
    assert cold["status"] == "new"
    assert [r["status"] for r in cold["rows"]] == ["cold"] * 3
    assert all(r["cache_misses"] >= 1 and r["recompiles"] == 0 for r in cold["rows"])
    manifest = CacheEntry(cold["fields"], root=cache).verify()
    assert sorted(v["shape"] for v in manifest.shapes.values()) == ["0=1x64", "0=33x64", "0=7x64"]
    assert any(name.startswith("inductor/") and name.endswith(".so") for name in manifest.files), \
        "the compiled kernels themselves must be in the entry"
    assert "0=33x64" in cold["table"] and "cold seconds" in cold["table"]


@pytest.mark.parametrize("m", [1, 7, 33, 5], ids=lambda m: f"M{m}")
def test_compiled_output_matches_eager(warmed, m):
    qt = quantized_mlp().compile(mode=MODE, cache_dir=warmed[0])
    x = torch.randn(m, 64)
    with torch.no_grad():
        compiled = qt(x)
        eager = qt.model(x)
    torch.testing.assert_close(compiled, eager, **TOLERANCE[torch.float32])


def test_a_fresh_process_loads_the_entry_without_compiling_again(warmed):
    cache, cold = warmed
    entry = CacheEntry(cold["fields"], root=cache).path
    before = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    fresh = run_fresh(cache, "1,7,33")
    after = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    assert after == before, "a run that compiled nothing new must leave the entry as it was"
    assert fresh["status"] == "loaded"
    for row, cold_row in zip(fresh["rows"], cold["rows"]):
        assert row["status"] == "warm", row
        assert row["cache_misses"] == 0 and row["cache_hits"] >= 1, row
        assert row["recompiles"] == 0, row
        assert row["cold_seconds"] == pytest.approx(cold_row["seconds"])


def test_strict_mode_refuses_a_shape_that_was_not_warmed(warmed):
    cache, _ = warmed
    qt = quantized_mlp().compile(mode=MODE, cache_dir=cache, strict=True)
    with torch.no_grad(), pytest.raises(RecompileError, match=r"0=2x64 were not warmed.*Warmed shapes: .*0=7x64"):
        qt(torch.randn(2, 64))


def test_strict_mode_still_lets_warmup_add_shapes(warmed):
    cache, _ = warmed
    qt = quantized_mlp().compile(mode=MODE, cache_dir=cache, strict=True)
    report = qt.warmup([torch.randn(11, 64)], progress=False)
    assert report[0].status == "cold"
    with torch.no_grad():
        qt(torch.randn(11, 64))
    with torch.no_grad(), pytest.raises(RecompileError, match="0=12x64 were not warmed"):
        qt(torch.randn(12, 64))


class Scaled(nn.Module):
    """A model whose forward reads a Python float: Dynamo guards on its value."""

    def __init__(self):
        super().__init__()
        self.inner = mlp()
        self.scale = 0.5

    def forward(self, x):
        return self.inner(x) * self.scale


def test_strict_mode_refuses_a_guard_recompile_of_a_warmed_shape():
    qt = QuantizedTransformer.from_model(Scaled(), QuantConfig("int8wo", backend="reference"), progress=False)
    qt.compile(mode=MODE, cache=False, strict=True)
    qt.warmup([torch.randn(3, 64)], progress=False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = qt.model(x)
        torch.testing.assert_close(qt(x), expected, rtol=1e-5, atol=1e-5)
        qt.model.scale = 0.25  # the graph guarded on 0.5: serving it would recompile
        with pytest.raises(RecompileError, match=r"0=3x64 were warmed, but this call would recompile"):
            qt(x)


def test_another_autograd_mode_is_another_graph_and_strict_says_so(tmp_path):
    qt = quantized_mlp().compile(mode=MODE, cache=False, strict=True)
    qt.warmup([torch.randn(3, 64)], progress=False)  # no_grad, as pipelines serve
    with torch.no_grad():
        qt(torch.randn(3, 64))
    with pytest.raises(RecompileError, match=r"0=3x64 \[grad\] were not warmed.*serve under torch.no_grad"):
        qt(torch.randn(3, 64))
    with torch.inference_mode(), pytest.raises(RecompileError, match=r"\[inference_mode\]"):
        qt(torch.randn(3, 64))
    with pytest.raises(ValueError, match="grad_mode='training'"):
        qt.warmup([torch.randn(3, 64)], grad_mode="training")


def test_other_inductor_settings_are_another_entry_and_the_miss_is_explained(tmp_path):
    import torch._inductor.config as inductor_config

    from quantrt.compile import CompileOptions, compile_settings

    options = CompileOptions(mode=MODE)
    ours = fingerprint_fields(quantized_mlp().model, options)
    with inductor_config.patch(coordinate_descent_tuning=True):  # what torchao's set_inductor_config does
        theirs = fingerprint_fields(quantized_mlp().model, options)
        their_settings = compile_settings()
    assert theirs != ours and {k for k in ours if ours[k] != theirs[k]} == {"settings"}
    entry = CacheEntry(theirs, root=tmp_path)  # warmed by a process with torchao's settings
    entry.inductor_dir.mkdir(parents=True)
    entry.commit({"k": {"shape": "0=1x64", "cold_s": 1.0}}, None, {}, extra={"settings": their_settings})
    with pytest.warns(CacheWarning, match=r"other Inductor settings \(inductor.coordinate_descent_tuning: "
                                          r"True there, False here\)"):
        qt = quantized_mlp().compile(mode=MODE, cache_dir=tmp_path)
    assert qt._compiled.entry.status == "new"


def test_a_malformed_sibling_entry_does_not_break_the_explanation(tmp_path):
    """The sibling's manifest is read unverified to explain a miss: settings that are not an object (an edited
    manifest) count as unknown, not a crash."""
    import torch._inductor.config as inductor_config

    from quantrt.compile import CompileOptions

    with inductor_config.patch(coordinate_descent_tuning=True):
        theirs = fingerprint_fields(quantized_mlp().model, CompileOptions(mode=MODE))
    entry = CacheEntry(theirs, root=tmp_path)
    entry.inductor_dir.mkdir(parents=True)
    entry.commit({"k": {"shape": "0=1x64", "cold_s": 1.0}}, None, {}, extra={"settings": {"inductor": ["edited"]}})
    with pytest.warns(CacheWarning, match=r"other Inductor settings \(\w+\.\w+: None there"):
        qt = quantized_mlp().compile(mode=MODE, cache_dir=tmp_path)
    assert qt._compiled.entry.status == "new"


def test_strict_mode_names_the_warmed_shapes_of_an_entry_with_foreign_keys(tmp_path):
    """Shape keys that are not quantrt signatures (an edited manifest, valid otherwise) leave strict mode's error
    a RecompileError, not a JSON error."""
    from quantrt.compile import CompileOptions

    entry = CacheEntry(fingerprint_fields(quantized_mlp().model, CompileOptions(mode=MODE)), root=tmp_path)
    entry.inductor_dir.mkdir(parents=True)
    entry.commit({"not a signature": {"shape": "0=5x64", "cold_s": 1.0}}, None, {})
    qt = quantized_mlp().compile(mode=MODE, cache_dir=tmp_path, strict=True)
    assert qt._compiled.entry.status == "loaded"
    with torch.no_grad(), pytest.raises(RecompileError, match=r"0=2x64 were not warmed.*Warmed shapes: 0=5x64"):
        qt(torch.randn(2, 64))


WARM_WITH_THE_DEFAULT_CACHE_FOLDER = textwrap.dedent("""
    import json, torch, torch.nn as nn
    from quantrt import QuantConfig, QuantizedTransformer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    qt = QuantizedTransformer.from_model(model, QuantConfig("int8wo", backend="reference"), progress=False)
    qt.compile(mode="default")  # the cache folder: ~/.cache/quantrt
    report = qt.warmup([torch.randn(4, 32)], progress=False)
    entry = qt._compiled.entry
    print(json.dumps({"status": entry.status, "entry": str(entry.path), "work": str(entry.work_dir),
                      "rows": [dict(r.__dict__) for r in report]}))
""")


def test_a_cache_folder_with_a_space_compiles_and_a_fresh_process_hits_it(tmp_path):
    """A HOME with a space puts the default cache folder on a path with one, which Inductor's C++ compile command
    cannot take: quantrt compiles in a working folder without spaces and keeps the entry where it belongs."""
    home = tmp_path / "home with space"
    env = {k: v for k, v in os.environ.items() if k != "QUANTRT_CACHE_DIR"} | {"HOME": str(home)}
    runs = []
    for _ in ("cold", "warm"):  # two fresh processes
        out = subprocess.run([sys.executable, "-c", WARM_WITH_THE_DEFAULT_CACHE_FOLDER], env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["entry"].startswith(str(home / ".cache" / "quantrt" / "entries"))
    assert " " not in cold["work"] and " " not in warm["work"]
    assert cold["status"] == "new" and cold["rows"][0]["status"] == "cold"
    assert warm["status"] == "loaded" and warm["entry"] == cold["entry"]
    assert warm["rows"][0]["status"] == "warm", warm["rows"]
    assert warm["rows"][0]["cache_hits"] >= 1 and warm["rows"][0]["cache_misses"] == 0, warm["rows"]


def test_an_unusable_cache_folder_warns_and_compiles_without_it(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.warns(CacheWarning, match="compiling without the cache"):
        qt = quantized_mlp().compile(mode=MODE, cache_dir=not_a_folder)
    assert qt._compiled.entry is None


def test_a_changed_scheme_or_model_makes_a_new_entry():
    options = quantrt.compile.CompileOptions(mode=MODE)
    base = fingerprint_fields(quantized_mlp().model, options)
    assert fingerprint_fields(quantized_mlp(seed=1).model, options) == base, "weights are not part of it"
    assert fingerprint_fields(quantized_mlp("int4wo").model, options) != base
    assert fingerprint_fields(quantized_mlp(hidden=128).model, options) != base
    assert fingerprint_fields(quantized_mlp().model, quantrt.compile.CompileOptions(mode="max-autotune")) != base


def test_a_corrupt_entry_is_rebuilt(tmp_path):
    qt = quantized_mlp().compile(mode=MODE, cache_dir=tmp_path)
    qt.warmup([torch.randn(3, 64)], progress=False)
    entry = qt._compiled.entry
    # the largest file: the compiled kernels, or the FX graph entry where this process had them in memory
    victim = max((p for p in (entry.path / "inductor").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    with pytest.warns(CacheWarning, match=rf"{victim.name} does not match its checksum"):
        again = quantized_mlp().compile(mode=MODE, cache_dir=tmp_path)
    report = again.warmup([torch.randn(3, 64)], progress=False)
    assert again._compiled.entry.status == "rebuilt" and report[0].status == "cold"
    CacheEntry(entry.fields, root=tmp_path).verify()
    x = torch.randn(3, 64)
    torch.testing.assert_close(again(x), again.model(x), **TOLERANCE[torch.float32])


def test_two_processes_warming_one_entry_leave_one_valid_entry(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WARM_IN_FRESH_PROCESS, str(tmp_path), rows],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rows in ("2,9", "9,17")]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    entries = list((tmp_path / "entries").iterdir())
    assert len(entries) == 1
    fields = fingerprint_fields(quantized_mlp().model, quantrt.compile.CompileOptions(mode=MODE))
    manifest = CacheEntry(fields, root=tmp_path).verify()
    assert sorted(v["shape"] for v in manifest.shapes.values()) == ["0=17x64", "0=2x64", "0=9x64"]


def test_more_buckets_than_the_recompile_limit_stay_compiled(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    qt = QuantizedTransformer.from_model(model, QuantConfig("int8wo", backend="reference"), progress=False)
    qt.compile(mode=MODE, cache=False)
    limit = torch._dynamo.config.recompile_limit
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "ran eagerly" would be one
        report = qt.warmup([torch.randn(m, 32) for m in range(1, limit + 3)], progress=False)
    assert [r.status for r in report] == ["cold"] * (limit + 2)
    assert torch._dynamo.config.recompile_limit == limit, "the limit is raised only while compiling"


def test_pad_policy_shares_one_graph_per_bucket(tmp_path):
    qt = quantized_mlp().compile(mode=MODE, cache=False, shapes="pad")
    report = qt.warmup([torch.randn(5, 64), torch.randn(7, 64), torch.randn(2, 3, 64)], progress=False)
    assert [r.status for r in report] == ["cold", "already compiled", "cold"]
    assert report[0].shape == "0=8x64" and report[2].shape == "0=2x4x64"
    for shape in [(5, 64), (6, 64), (2, 3, 64), (1, 3, 64)]:
        x = torch.randn(shape)
        y = qt(x)
        assert y.shape == (*shape[:-1], 48)
        torch.testing.assert_close(y, qt.model(x), **TOLERANCE[torch.float32])


def test_bucket_sizes():
    assert [bucket(n) for n in (0, 1, 3, 8, 9, 4096, 4097, 5000)] == [0, 1, 4, 8, 16, 4096, 5120, 5120]
    args, kwargs, sizes = pad_inputs((torch.zeros(3, 5, 8),), {"mask": torch.zeros(3, 5, dtype=torch.bool)})
    assert args[0].shape == (4, 8, 8) and kwargs["mask"].shape == (3, 5) and sizes == {4: 3, 8: 5}


def test_signature_is_stable_and_sees_scalars():
    x = torch.zeros(2, 3)
    assert signature((x,), {"a": 1, "b": None}) == signature((torch.ones(2, 3),), {"b": None, "a": 1})
    assert signature((x,), {"a": 1}) != signature((x,), {"a": 2})
    assert signature((x,), {}) != signature((x.half(),), {})


def test_repeated_blocks_found_without_a_declaration():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))
            self.heads = nn.ModuleList([nn.Linear(8, 2), nn.Linear(8, 2)])  # Linears are not blocks

    stack = Stack()
    assert repeated_blocks(stack) == list(stack.layers)


def test_compile_options_are_checked():
    with pytest.raises(ValueError, match="shapes='bucketed'"):
        quantized_mlp().compile(shapes="bucketed", cache=False)
    with pytest.raises(ValueError, match="no `_repeated_blocks`"):
        quantized_mlp().compile(regional=True, cache=False)
    with pytest.raises(ValueError, match="at least one example"):
        quantized_mlp().compile(cache=False).warmup([])


@pytest.fixture(scope="module")
def tiny_flux_cli(tmp_path_factory):
    """`quantrt warmup` on the tiny FLUX demo model (max-autotune, the CLI's default), in a subprocess."""
    cache = tmp_path_factory.mktemp("flux-cache")
    command = [sys.executable, "-m", "quantrt.cli", "warmup", "--size", "tiny", "--dtype", "float32", "--backend",
               "reference", "--cache-dir", str(cache), "--shape", "64x16", "--shape", "2x16x8"]
    cold = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert cold.returncode == 0, cold.stderr[-3000:]
    return command, cache, cold.stdout


def test_cli_warmup_of_the_flux_demo_prints_a_table(tiny_flux_cli):
    _, _, stdout = tiny_flux_cli
    assert "| shape" in stdout and "hidden_states=2x16x32" in stdout
    assert "2 shape(s) compiled, 0 loaded from the cache" in stdout


def test_cli_warmup_check_in_a_fresh_process_is_all_hits(tiny_flux_cli):
    command, _, _ = tiny_flux_cli
    check = subprocess.run(command + ["--check"], capture_output=True, text=True, timeout=900)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-3000:]
    assert "cache hits 2, misses 0, recompiles 0" in check.stdout


def test_cli_warmup_check_fails_on_a_shape_that_was_not_warmed(tiny_flux_cli):
    command, _, _ = tiny_flux_cli
    check = subprocess.run(command + ["--check", "--shape", "16x4"], capture_output=True, text=True, timeout=900)
    assert check.returncode == 1
    assert "were not warmed" in check.stderr


def test_cli_warmup_check_without_an_entry_says_so(tmp_path):
    check = subprocess.run([sys.executable, "-m", "quantrt.cli", "warmup", "--check", "--dtype", "float32",
                            "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert check.returncode == 1 and "no valid cache entry" in check.stderr


def test_regional_compile_of_tiny_flux_matches_eager(tmp_path):
    from quantrt.models import build_flux, flux_inputs

    model = build_flux("tiny", dtype=torch.float32)
    qt = QuantizedTransformer.from_model(model, QuantConfig("int8wo", backend="reference"), progress=False)
    assert {type(b).__name__ for b in repeated_blocks(qt.model)} == {"FluxTransformerBlock",
                                                                    "FluxSingleTransformerBlock"}
    inputs = flux_inputs(qt.model, 16, 8)
    with torch.no_grad():
        eager = qt(**inputs)[0]
        qt.compile(mode=MODE, regional=True, cache_dir=tmp_path)
        report = qt.warmup([inputs], progress=False)
        compiled = qt(**inputs)[0]
    assert report[0].status == "cold" and report[0].recompiles == 0
    torch.testing.assert_close(compiled, eager, **TOLERANCE[torch.float32])


def test_the_autoquant_plan_goes_into_the_entry(tmp_path):
    def first_is_fastest(fn, key):  # a fixed timer: the plan does not depend on this machine's load
        return 1.0 if key.scheme == "int8wo" else 2.0

    qt = quantrt.autoquant(mlp(), [torch.randn(4, 64)], candidates=["int8wo", "int4wo"], max_error=0.5,
                           timer=first_is_fastest)
    qt.compile(mode=MODE, cache_dir=tmp_path)
    assert qt._compiled.extra["autoquant_plan"] == qt.autoquant_plan.to_dict()
    assert qt._compiled.entry.fields == fingerprint_fields(qt.model, quantrt.compile.CompileOptions(mode=MODE))


def test_cli_warmup_of_a_saved_folder_then_check(tmp_path):
    """`quantrt warmup FOLDER`: the model as from_pretrained loads it (dtype and backends as stored), so the
    serving process's fingerprint is the same: checked by `from_pretrained(FOLDER).compile()` finding the entry."""
    from quantrt.models import build_flux

    model = build_flux("tiny", dtype=torch.float32)
    QuantizedTransformer.from_model(model, QuantConfig("int4wo", group_size=32, backend="reference"),
                                    progress=False).save_pretrained(tmp_path / "flux-int4")
    command = [sys.executable, "-m", "quantrt.cli", "warmup", str(tmp_path / "flux-int4"), "--mode", MODE,
               "--cache-dir", str(tmp_path / "cache"), "--shape", "16x4"]
    cold = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert "1 shape(s) compiled" in cold.stdout
    check = subprocess.run(command + ["--check"], capture_output=True, text=True, timeout=900)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-3000:]
    assert "misses 0, recompiles 0" in check.stdout
    serving = QuantizedTransformer.from_pretrained(tmp_path / "flux-int4").compile(mode=MODE,
                                                                                  cache_dir=tmp_path / "cache")
    assert serving._compiled.entry.status == "loaded"
