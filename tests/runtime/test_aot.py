"""quantrt.aot through qt.warmup(aot=True), on CPU for real: AOTInductor builds C++ packages of a quantized MLP here,
and a fresh process serves them without Dynamo (no graph traced), reading the model's own tensors (no copy of the
weights in a package); shapes that cannot be packaged stay on torch.compile and say why; eight processes load one
entry at once while a warmup holds its lock."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from filelock import FileLock

from quantrt import QuantConfig, QuantizedTransformer, RecompileError
from quantrt.aot import AotRunner, inductor_configs, unpackageable_reason
from quantrt.archive import export_entry, import_archive
from quantrt.cache import CacheEntry
from quantrt.compile import compile_settings

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5)}  # an AOT package against eager: Inductor's fp32 fusion
ROWS = (1, 33)

# serves the quantized MLP from the cache entry in a fresh process: what a replica runs at start
SERVE_IN_FRESH_PROCESS = textwrap.dedent("""
    import json, sys, time, torch, torch.nn as nn
    from torch._dynamo.utils import counters
    from quantrt import QuantConfig, QuantizedTransformer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.SiLU(), nn.Linear(64, 48))
    qt = QuantizedTransformer.from_model(model, QuantConfig(sys.argv[3]), progress=False)
    rows = [int(m) for m in sys.argv[2].split(",")]
    inputs = [torch.randn(m, 64, generator=torch.Generator().manual_seed(m)) for m in rows]
    start = time.perf_counter()
    qt.compile(mode="default", cache_dir=sys.argv[1], strict=True)
    report = qt.warmup(inputs, progress=False, aot=True, allow_new=sys.argv[4] == "new")
    with torch.no_grad():
        served = [qt(x) for x in inputs]
    seconds = time.perf_counter() - start
    with torch.no_grad():
        errors = [(y - qt.model(x)).abs().max().item() for x, y in zip(inputs, served)]
    print(json.dumps({"rows": [dict(r.__dict__) for r in report], "graphs": counters["stats"]["unique_graphs"],
                      "errors": errors, "fields": qt._compiled.entry.fields, "seconds": seconds,
                      "summary": str(qt.summary())}))
""")


def serve_fresh(cache, rows=ROWS, scheme="int8wo", allow_new=True) -> dict:
    out = subprocess.run([sys.executable, "-c", SERVE_IN_FRESH_PROCESS, str(cache), ",".join(map(str, rows)), scheme,
                          "new" if allow_new else "check"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.SiLU(), nn.Linear(64, 48))


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """A cache folder in which a fresh process packaged the int8wo MLP (aten backend) for M in ROWS, and its
    report."""
    cache = tmp_path_factory.mktemp("aot-cache")
    return cache, serve_fresh(cache)


def test_warmup_with_aot_packages_each_shape_into_the_entry(packaged):
    cache, cold = packaged
    assert [(r["status"], r["served_by"]) for r in cold["rows"]] == [("cold", "aot package")] * 2
    assert cold["graphs"] == 0, "an AOT warmup exports, it does not trace with Dynamo"
    assert max(cold["errors"]) < 1e-5
    manifest = CacheEntry(cold["fields"], root=cache).verify()
    records = [shape["aot"] for shape in manifest.shapes.values()]
    assert len(records) == 2 and all(f"aot/{r['package']}" in manifest.files for r in records)
    assert "aot package" in cold["summary"] and "warmed shapes" in cold["summary"]


def test_a_fresh_process_serves_the_packages_without_tracing(packaged):
    cache, cold = packaged
    warm = serve_fresh(cache, allow_new=False)
    assert [(r["status"], r["served_by"]) for r in warm["rows"]] == [("warm", "aot package")] * 2
    assert warm["graphs"] == 0, "served from the packages: Dynamo traced nothing"
    assert max(warm["errors"]) < 1e-5
    assert [r["cold_seconds"] for r in warm["rows"]] == pytest.approx([r["seconds"] for r in cold["rows"]])
    # the start of a replica (compile() to every warmed shape served once) is a small part of the cold build
    assert warm["seconds"] < 0.25 * sum(r["seconds"] for r in cold["rows"])


def test_a_package_reads_the_models_own_tensors_and_follows_replaced_ones(tmp_path):
    qt = QuantizedTransformer.from_model(mlp(), QuantConfig("int8wo"), progress=False)
    qt.compile(mode="default", cache_dir=tmp_path, strict=True)
    settings = compile_settings()
    x = torch.randn(33, 64)
    qt.warmup([torch.randn(m, 64) for m in ROWS], progress=False, aot=True)  # built in this process
    # AOTInductor's build leaves the process's Inductor settings (and so every later fingerprint) as they were
    assert compile_settings() == settings
    runner = next(iter(qt._compiled.aot_runners.values()))
    assert isinstance(runner, AotRunner)
    state = {**dict(qt.model.named_parameters()), **dict(qt.model.named_buffers())}
    # every constant of the package is one of the model's tensors, in the same memory: no copy of the weights
    assert {b.name for b in runner.bindings} == set(state)
    assert all(b.tensor.data_ptr() == state[b.name].data_ptr() for b in runner.bindings)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(qt(x), qt.model(x), **TOLERANCE[torch.float32])

    check()
    with torch.no_grad():
        qt.model[0].bias.add_(1.0)  # in place: the package reads it
    check()
    qt.model[2].scale = qt.model[2].scale * 2  # a new tensor: bound again before the call
    check()
    with pytest.raises(RecompileError, match="were not warmed"):
        with torch.no_grad():
            qt(torch.randn(5, 64))


def test_inductor_settings_keep_weights_out_of_the_package():
    configs = inductor_configs("max-autotune", None)
    assert configs["max_autotune"] and "triton.cudagraphs" not in configs
    assert configs["aot_inductor.package_constants_in_so"] is False
    assert configs["cpp.weight_prepack"] is False and configs["freezing"] is False


def test_shapes_that_cannot_be_packaged_stay_on_torch_compile_and_say_why(tmp_path, monkeypatch):
    fp8 = QuantizedTransformer.from_model(mlp(), QuantConfig("float8wo_e4m3"), progress=False)  # torchao on CPU
    assert "torchao backend through tensor subclasses" in unpackageable_reason(fp8.model)
    unexportable = QuantizedTransformer.from_model(mlp(), QuantConfig("int8wo", backend="reference"), progress=False)
    assert unpackageable_reason(unexportable.model) is None
    export = torch.export.export

    def failing_export(model, *args, **kwargs):  # what torch.export does with a model it cannot trace
        if model is unexportable.model:
            raise torch._dynamo.exc.UserError(torch._dynamo.exc.UserErrorType.DYNAMIC_CONTROL_FLOW,
                                              "data-dependent control flow")
        return export(model, *args, **kwargs)

    monkeypatch.setattr(torch.export, "export", failing_export)
    for qt, why in ((fp8, "through tensor subclasses"), (unexportable, "torch.export failed: UserError")):
        qt.compile(mode="default", cache_dir=tmp_path)
        x = torch.randn(7, 64)
        report = qt.warmup([x], progress=False, aot=True)
        assert report[0].served_by == "torch.compile" and why in report[0].note, report[0].note
        assert why in str(report) and why in str(qt.summary())
        with torch.no_grad():
            torch.testing.assert_close(qt(x), qt.model(x), atol=1e-4, rtol=1e-4)
        manifest = CacheEntry(qt._compiled.entry.fields, root=tmp_path).verify()
        assert why in next(iter(manifest.shapes.values()))["aot_failed"]  # not exported again by the next process


def test_an_autograd_warmup_is_not_packaged(tmp_path):
    qt = QuantizedTransformer.from_model(mlp(), QuantConfig("int8wo", backend="reference"), progress=False)
    qt.compile(mode="default", cache=False)
    report = qt.warmup([torch.randn(3, 64)], progress=False, aot=True, grad_mode="grad")
    assert report[0].served_by == "torch.compile" and "inference only" in report[0].note


LOAD_AND_SERVE = textwrap.dedent("""
    import json, sys, torch, torch.nn as nn
    from torch._dynamo.utils import counters
    from quantrt import QuantConfig, QuantizedTransformer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.SiLU(), nn.Linear(64, 48))
    qt = QuantizedTransformer.from_model(model, QuantConfig("int8wo"), progress=False)
    qt.compile(mode="default", cache_dir=sys.argv[1], strict=True)
    report = qt.warmup([torch.randn(1, 64), torch.randn(33, 64)], progress=False, aot=True, allow_new=False)
    with torch.no_grad():
        qt(torch.randn(33, 64))
    print(json.dumps({"served_by": [r.served_by for r in report], "graphs": counters["stats"]["unique_graphs"]}))
""")


def test_eight_processes_load_one_entry_at_once_while_its_lock_is_held(packaged):
    cache, cold = packaged
    entry = CacheEntry(cold["fields"], root=cache)
    with FileLock(entry.lock.lock_file, timeout=0):  # a warmup holding the entry's write lock: readers never wait
        processes = [subprocess.Popen([sys.executable, "-c", LOAD_AND_SERVE, str(cache)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(8)]
        results = [p.communicate(timeout=600) for p in processes]
    for process, (stdout, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr[-3000:]
        served = json.loads(stdout.strip().splitlines()[-1])
        assert served == {"served_by": ["aot package"] * 2, "graphs": 0}


def test_a_replica_that_imports_the_exported_entry_serves_with_zero_compiles(packaged, tmp_path):
    cache, cold = packaged
    archive, digest = export_entry(CacheEntry(cold["fields"], root=cache).fingerprint, tmp_path / "entry.tar.gz",
                                   cache)
    replica = tmp_path / "replica-cache"
    import_archive(archive, replica, expected_sha256=digest)
    served = serve_fresh(replica, allow_new=False)
    assert [(r["status"], r["served_by"]) for r in served["rows"]] == [("warm", "aot package")] * 2
    assert served["graphs"] == 0 and max(served["errors"]) < 1e-5


def test_cli_warmup_aot_then_check_in_a_fresh_process(tmp_path):
    """The deploy-pipeline commands on the tiny FLUX demo model: `quantrt warmup --aot`, then, as a replica starts,
    `quantrt warmup --aot --check`: every shape served by its package, nothing compiled."""
    command = [sys.executable, "-m", "quantrt.cli", "warmup", "--size", "tiny", "--dtype", "float32", "--mode",
               "default", "--cache-dir", str(tmp_path), "--shape", "64x16", "--aot"]
    cold = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert "1 shape(s) compiled, 0 loaded from the cache, 1 served by AOT packages" in cold.stdout
    check = subprocess.run(command + ["--check"], capture_output=True, text=True, timeout=900)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-3000:]
    assert "| warm   | aot package" in check.stdout and "misses 0, recompiles 0" in check.stdout
