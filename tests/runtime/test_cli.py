"""The `quantrt` program: the core commands of quantrt.cli (info, demo, quantize, warmup, cache) and the `bench` command
that quantrt.bench adds through quantrt.__main__ (loaded only for `bench`)."""

import importlib.metadata
import subprocess
import sys

import pytest

from quantrt import cli
from quantrt.__main__ import main


def test_cli_demo_and_info_in_process(capsys):
    assert main(["demo", "--size", "tiny", "--schemes", "int4wo", "--repeats", "1", "--backend", "reference"]) == 0
    assert "int4wo" in capsys.readouterr().out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "| scheme" in out and "reference" in out and "fp6_e3m2" in out


def test_cli_bad_scheme_is_one_clear_line(capsys):
    assert main(["demo", "--size", "tiny", "--schemes", "int4w0"]) == 1
    err = capsys.readouterr().err
    assert "Did you mean 'int4wo'" in err and "Traceback" not in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "quantrt", "demo", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--size" in out and "FLUX.1-dev" in out


def test_console_script_is_the_program():
    try:
        scripts = importlib.metadata.entry_points(group="console_scripts", name="quantrt")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("quantrt is not installed")
    assert [s.value for s in scripts] == ["quantrt.__main__:main"]


def test_python_m_quantrt_lists_bench_and_its_benchmarks_options():
    top = subprocess.run([sys.executable, "-m", "quantrt", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "bench" in top and "warmup" in top and "`bench check` (the GPU check)" in top
    kernels = subprocess.run([sys.executable, "-m", "quantrt", "bench", "kernels", "--help"], capture_output=True,
                             text=True, check=True).stdout
    assert "usage: quantrt bench kernels" in kernels
    for option in ("--formats", "--shapes", "--ms", "--providers", "--quick", "--cpu-smoke", "--out-dir",
                   "--tuning-file", "--warmup-ms", "--rep-ms"):
        assert option in kernels
    assert "Kernel microbenchmark" in kernels  # the benchmark module's docstring


def test_the_core_command_line_has_no_bench_command(capsys):
    """quantrt.cli alone (`python -m quantrt.cli`): the core commands; `bench` comes from quantrt.__main__."""
    assert cli.main(["info"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["bench", "kernels"])
    assert "invalid choice: 'bench'" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out


# prints the help, then which benchmark modules the command line loaded
LOADED_BENCHMARKS = """
import sys
from quantrt.__main__ import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("loaded:", sorted(m for m in sys.modules if m.startswith("quantrt.bench.")))
"""
ALL_BENCHMARKS = ["quantrt.bench.check", "quantrt.bench.common", "quantrt.bench.compile", "quantrt.bench.distributed",
                  "quantrt.bench.kernels", "quantrt.bench.lora", "quantrt.bench.model", "quantrt.bench.report"]


@pytest.mark.parametrize("argv, loaded, in_help", [
    (["--help"], [], "bench compile"),
    (["info", "--help"], [], "--device"),
    (["bench", "--help"], ALL_BENCHMARKS, "cold compile against a warm start"),
    (["bench", "kernels", "--help"], ALL_BENCHMARKS, "--formats"),
], ids=["top-level", "info", "bench", "bench-kernels"])
def test_only_the_bench_command_imports_the_benchmarks(argv, loaded, in_help):
    out = subprocess.run([sys.executable, "-c", LOADED_BENCHMARKS, *argv], capture_output=True, text=True,
                         check=True).stdout
    help_text, _, modules = out.rpartition("loaded: ")
    assert in_help in help_text
    assert modules.strip() == str(loaded)


def test_no_quantrt_module_below_the_program_imports_the_benchmarks():
    """quantrt.bench is the top layer: importing the package and its command line loads none of it."""
    code = "import sys, quantrt, quantrt.cli; print(sorted(m for m in sys.modules if m.startswith('quantrt.bench')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bench_without_a_benchmark_prints_help(capsys):
    assert main(["bench"]) == 2
    out = capsys.readouterr().out
    assert "kernels" in out and "model" in out and "compile" in out and "check" in out


def test_a_benchmark_whose_library_is_missing_says_so_and_the_others_still_run(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "quantrt.bench.lora", None)  # importing it raises ImportError
    assert main(["bench", "lora"]) == 1
    assert 'quantrt bench lora cannot run' in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["bench", "compile", "--help"])
    assert done.value.code == 0 and "--cpu-smoke" in capsys.readouterr().out


def test_cli_cache_list_export_import_prune(tmp_path, capsys):
    from tests.runtime.test_archive import warmed_entry

    entry = warmed_entry(tmp_path / "build")
    assert main(["cache", "list", "--cache-dir", str(tmp_path / "build")]) == 0
    listed = capsys.readouterr().out
    assert entry.fingerprint[:16] in listed and "MLP" in listed and "usable here" in listed
    assert main(["cache", "export", entry.fingerprint[:10], str(tmp_path), "--cache-dir", str(tmp_path / "build")]) == 0
    exported = capsys.readouterr().out
    archive = next(tmp_path.glob("quantrt-cache-*.tar.gz"))
    digest = exported.split("sha256 ")[1].split()[0]
    assert f"quantrt cache import {archive.name} --sha256 {digest}" in exported
    replica = ["--cache-dir", str(tmp_path / "replica")]
    assert main(["cache", "import", str(archive), "--sha256", digest, *replica]) == 0
    assert "2 shape(s), 1 AOT package(s)" in capsys.readouterr().out
    assert main(["cache", "import", str(archive), *replica]) == 1
    assert "installed already: pass --overwrite" in capsys.readouterr().err
    assert main(["cache", "prune", "--older-than", "0", "--dry-run", *replica]) == 0
    assert "would remove" in capsys.readouterr().out and entry.fingerprint in {
        p.name for p in (tmp_path / "replica" / "entries").iterdir()}
    assert main(["cache", "prune", "--older-than", "0", *replica]) == 0
    assert "1 item(s)" in capsys.readouterr().out and not any((tmp_path / "replica" / "entries").iterdir())
    assert main(["cache", "import", str(tmp_path / "missing.tar.gz"), *replica]) == 1
    assert "does not exist" in capsys.readouterr().err
