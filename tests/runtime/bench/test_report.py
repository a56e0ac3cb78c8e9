"""The benchmarks' result files and what goes in them (quantrt.bench.report): the environment header, cells,
the targets table, CSV and markdown files written at once or a row at a time."""

import csv
import datetime
from dataclasses import dataclass

import torch

from quantrt.bench import report


@dataclass
class Point:
    name: str
    ms: float | None = None


def test_header_names_the_run_and_its_environment(monkeypatch):
    monkeypatch.setenv("QUANTRT_BACKEND", "reference")
    monkeypatch.delenv("QUANTRT_CACHE_DIR", raising=False)
    started = datetime.datetime(2026, 5, 6, 7, 8, tzinfo=datetime.timezone.utc)
    lines = report.header_lines("Kernels on cpu", started, "quantrt bench kernels", torch.device("cpu"), smoke=True)
    assert lines[:5] == ["# Kernels on cpu", "", "- date: 2026-05-06 07:08 UTC", "- command: `quantrt bench kernels`",
                         f"- device: {report.describe_device(torch.device('cpu'))}"]
    assert any(line.startswith("- **CPU smoke run**") for line in lines)
    assert f"torch {torch.__version__}" in lines[-2] and "gemlite " in lines[-2]
    assert "QUANTRT_BACKEND=reference" in lines[-1] and "QUANTRT_CACHE_DIR=(unset)" in lines[-1]
    assert not any("CPU smoke" in line for line in report.header_lines("t", started, "c", torch.device("cpu"), False))


def test_cells():
    assert [report.cell(v) for v in (None, float("nan"), 0.012345, 12345.6, 3)] == ["-", "-", "0.0123", "12,346", "3"]
    assert report.cell(1.23456, 4) == "1.235"
    assert [report.percent_cell(v) for v in (None, 0.854)] == ["-", "85%"]
    assert [report.note_cell(t) for t in ("", "a | b")] == ["-", "a / b"]
    assert report.markdown_row(["a|b", "c\nd", 1]) == "| a/b | c d | 1 |"
    assert report.dtype_name(torch.bfloat16) == "bfloat16"


def test_exception_notes_are_one_bounded_line():
    error = RuntimeError("line one\nline two " + "x" * 400)
    assert report.error_text(error).startswith("RuntimeError: line one line two ")
    assert len(report.error_text(error)) == report.NOTE_LIMIT
    assert report.failed_note(ValueError("bad")) == "FAILED: ValueError: bad"
    assert len(report.failed_note(error)) == report.NOTE_LIMIT


def test_targets_table():
    table = report.targets_table([report.TargetResult("int4wo >= 3.5x", "met", "2 points")])
    assert table.splitlines()[0].split() == ["|", "target", "|", "status", "|", "detail", "|"]
    assert report.TargetResult("a", "b", "c").cells() == ["a", "b", "c"]
    assert table.splitlines()[2] == "| int4wo >= 3.5x | met    | 2 points |"


def test_csv_files_at_once_and_a_row_at_a_time(tmp_path):
    assert report.csv_headers(Point) == ["name", "ms"]
    path = report.write_csv(tmp_path / "sub" / "all.csv", ["name", "ms"], [["a", None], ["b", 1.5]])
    assert path.read_text().splitlines() == ["name,ms", "a,", "b,1.5"]
    with report.CsvLog(tmp_path / "log.csv", report.csv_headers(Point)) as log:
        log.write(Point("a"))
        # flushed as it goes: what a run cut short leaves
        assert list(csv.DictReader(open(log.path, newline=""))) == [{"name": "a", "ms": ""}]
        log.write(Point("b", 2.0))
    assert log.path.read_text().splitlines() == ["name,ms", "a,", "b,2.0"]


def test_markdown_log_writes_tables_as_it_goes(tmp_path):
    with report.MarkdownLog(tmp_path / "run.md") as md:
        md.write("# title")
        md.table(["a", "b"])
        md.row(["x|y", 1])
        assert md.path.read_text() == "# title\n\n| a | b |\n|---|---|\n| x/y | 1 |\n"
    assert report.write_text(tmp_path / "t.md", ["one", "two"]).read_text() == "one\ntwo\n"
