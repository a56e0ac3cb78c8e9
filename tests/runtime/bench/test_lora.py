"""`quantrt bench lora` (quantrt.bench.lora) in its CPU smoke run on the tiny FLUX: the files it writes, a timing
and finite errors per rank, fused error not below unfused (fused also rounds BA); bad ranks are one clear line."""

import math

from quantrt.__main__ import main
from quantrt.bench import lora as benchmark

from .results import cells, read_csv


def test_lora_smoke_rows_and_files(tmp_path):
    argv = ["bench", "lora", "--cpu-smoke", "--size", "tiny", "--ranks", "16", "--repeats", "1",
            "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    markdown_path = next(tmp_path.glob("*-cpu-lora-cpu-smoke.md"))
    markdown = markdown_path.read_text()
    rows = read_csv(markdown_path.with_suffix(".csv"))
    assert list(rows[0]) == benchmark.CSV_HEADERS and [r["rank"] for r in rows] == ["16"]
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert cells(table[0]) == benchmark.TABLE_HEADERS and len(table) == 2 + len(rows)
    assert "command: `quantrt bench lora --cpu-smoke" in markdown
    for row in rows:
        assert not row["note"], row
        assert all(float(row[k]) > 0 for k in ("base_ms", "unfused_ms", "fused_ms")), row
        errors = {k: float(row[k]) for k in ("error_unfused", "error_fused", "error_base")}
        assert all(math.isfinite(e) for e in errors.values()), row
        assert 0 < errors["error_unfused"] < 0.05 and errors["error_base"] > 0.1, row  # int8 W; no LoRA at all
        assert errors["error_fused"] >= errors["error_unfused"] - 1e-3, row  # fused also rounds BA


def test_bad_ranks_are_one_clear_line(tmp_path, capsys):
    assert main(["bench", "lora", "--cpu-smoke", "--ranks", "16,x", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--ranks: '16,x'" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())
