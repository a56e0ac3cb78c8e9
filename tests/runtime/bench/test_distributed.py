"""`quantrt bench distributed` (quantrt.bench.distributed) in its CPU smoke run: 2 gloo ranks that it starts itself,
the tiny Llama on one process and tensor-parallel, the tiny FLUX on one process and with Ulysses attention (ring: a row
saying why it does not run on CPU); the files it writes, each rank's share of the weights, errors against one process;
bad arguments are one clear line."""

import math

from quantrt.__main__ import main
from quantrt.bench import distributed as benchmark

from .results import cells, read_csv


def test_distributed_smoke_rows_and_files(tmp_path):
    assert main(["bench", "distributed", "--cpu-smoke", "--out-dir", str(tmp_path)]) == 0
    markdown_path = next(tmp_path.glob("*-cpu-distributed-cpu-smoke.md"))
    markdown = markdown_path.read_text()
    rows = read_csv(markdown_path.with_suffix(".csv"))
    assert list(rows[0]) == benchmark.CSV_HEADERS
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert cells(table[0]) == benchmark.TABLE_HEADERS and len(table) == 2 + len(rows)
    assert "command: `quantrt bench distributed --cpu-smoke" in markdown
    by_point = {(r["model"], r["phase"], r["layout"]): r for r in rows}
    assert sorted(by_point) == sorted([("llm", "prefill", "single"), ("llm", "decode", "single"),
                                       ("llm", "prefill", "tp"), ("llm", "decode", "tp"),
                                       ("flux", "forward", "single"), ("flux", "forward", "ring"),
                                       ("flux", "forward", "ulysses")])
    assert by_point["flux", "forward", "ring"]["note"] == benchmark.RING_ON_CPU
    for (model, phase, layout), row in by_point.items():
        if layout == "ring":
            continue
        assert not row["note"], row
        assert float(row["ms"]) > 0 and float(row["throughput"]) > 0, row
        if layout == "single":
            assert row["ranks"] == "1" and not row["speedup"] and not row["error"], row
            continue
        assert row["ranks"] == "2" and float(row["speedup"]) > 0, row
        assert math.isfinite(float(row["error"])) and float(row["error"]) < 1e-5, row  # float32: rounding only
        single = int(by_point[model, phase, "single"]["bytes_per_rank"])
        held = int(row["bytes_per_rank"])
        # tensor parallel: each rank about half of the quantized layers; context parallel: all of them, replicated
        assert (held <= 0.55 * single) if layout == "tp" else (held == single), row


def test_bad_models_are_one_clear_line(tmp_path, capsys):
    assert main(["bench", "distributed", "--cpu-smoke", "--models", "llm,vit", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--models: 'llm,vit'" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())
