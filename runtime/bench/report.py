"""The benchmarks' result files and what goes in them: the environment header of a results file (date,
command, device, versions, environment variables), table cells, the speed-target table, markdown tables
and CSV files written all at once or a row at a time (so that a run cut short keeps every row it measured),
and matplotlib for the plots.

Every benchmark of `quantrt bench` writes through these, so that their files read alike; a runbook that
needs a results table calls them (or the CLI) instead of embedding its own code.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch

from ..tables import format_table
from ..version import distribution_version

DISTRIBUTIONS = ("quantrt", "torch", "triton", "torchao", "optimum-quanto", "gemlite", "diffusers", "transformers",
                 "accelerate", "matplotlib")
ENVIRONMENT_VARIABLES = ("TRITON_INTERPRET", "QUANTRT_BACKEND", "QUANTRT_AUTOTUNE", "QUANTRT_TUNING_FILE",
                         "QUANTRT_CACHE_DIR", "CUDA_VISIBLE_DEVICES")
TARGET_HEADERS = ["target", "status", "detail"]
PLOT_MISSING = "matplotlib is not installed (pip install \"quantrt[bench]\"): no plot"
NOTE_LIMIT = 300  # characters of an exception kept in a row's note


def describe_device(device: torch.device) -> str:
    """The device as a results file names it: a GPU's name, SMs, memory, compute capability and L2; a CPU's
    processor and cores."""
    if device.type != "cuda":
        return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 0)
    return (f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
            f"compute capability {props.major}.{props.minor}, L2 {l2 / 2**20:.0f} MiB")


def device_title(device: torch.device) -> str:
    """The device's short name for a title: the first part of describe_device."""
    return describe_device(device).split(",")[0]


def dtype_name(dtype: torch.dtype) -> str:
    """bfloat16, not torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def header_lines(title: str, started: datetime.datetime, command: str, device: torch.device,
                 smoke: bool) -> list[str]:
    """The markdown head of a results file: title, date, command, device, versions, environment."""
    lines = [f"# {title}", "",
             f"- date: {started:%Y-%m-%d %H:%M} UTC",
             f"- command: `{command}`",
             f"- device: {describe_device(device)}"]
    if smoke:
        lines.append("- **CPU smoke run**: small shapes and a CPU timer; it checks that the benchmark works, "
                     "its numbers say nothing about GPUs")
    versions = ", ".join(f"{name} {distribution_version(name) or 'not installed'}" for name in DISTRIBUTIONS)
    lines.append(f"- python {platform.python_version()}, {versions}")
    if device.type == "cuda":
        lines.append(f"- CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    lines.append("- environment: " + ", ".join(f"{v}={os.environ.get(v, '(unset)')}" for v in ENVIRONMENT_VARIABLES))
    return lines


@dataclass
class TargetResult:
    """One of a benchmark's speed targets and whether this run met it."""

    target: str
    status: str  # "met", "NOT met", "not measured"
    detail: str

    def cells(self) -> list[str]:
        """The target's row of the targets table (TARGET_HEADERS)."""
        return [self.target, self.status, self.detail]


def targets_table(targets: Sequence[TargetResult]) -> str:
    """The "target | status | detail" table of a run's speed targets."""
    return format_table(TARGET_HEADERS, [t.cells() for t in targets])


def cell(value: Any, digits: int = 3) -> str:
    """A table cell: '-' for missing values, floats to `digits` significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"
    return str(value)


def percent_cell(fraction: float | None) -> str:
    """A fraction as a whole percentage ("85%"), '-' when missing."""
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def note_cell(text: str) -> str:
    """A free-text cell of a markdown table: '|' (which would split the cell) as '/', '-' when empty."""
    return text.replace("|", "/") or "-"


def error_text(error: BaseException) -> str:
    """An exception on one line: "TypeName: message", at most NOTE_LIMIT characters."""
    return f"{type(error).__name__}: {error}".replace("\n", " ")[:NOTE_LIMIT]


def failed_note(error: BaseException) -> str:
    """The note of a point that failed: "FAILED: TypeName: message", at most NOTE_LIMIT characters."""
    return f"FAILED: {type(error).__name__}: {error}"[:NOTE_LIMIT]


def csv_headers(row_type: type) -> list[str]:
    """A row dataclass's CSV columns: its field names, in order."""
    return [f.name for f in fields(row_type)]


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """All rows at once (lists of values in `headers`' order; None is written as an empty cell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    return path


def write_text(path: Path, lines: Sequence[str]) -> Path:
    """A text file of `lines`, each ended by a newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


class FlushedFile:
    """A results file opened for writing (its folder made), closed by `with`; subclasses flush what they write,
    so that a run cut short (a time limit, a crashed GPU) still leaves every row it wrote."""

    def __init__(self, path: Path, newline: str | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: TextIO = open(path, "w", newline=newline)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CsvLog(FlushedFile):
    """A CSV file written a row at a time and flushed. Rows are dataclass instances with the fields of
    `headers`."""

    def __init__(self, path: Path, headers: Sequence[str]):
        super().__init__(path, newline="")
        self.headers = list(headers)
        self._writer = csv.writer(self._file)
        self._writer.writerow(self.headers)
        self._file.flush()

    def write(self, row: Any) -> None:
        self._writer.writerow(["" if getattr(row, h) is None else getattr(row, h) for h in self.headers])
        self._file.flush()


def markdown_text(value: Any) -> str:
    """A value as the text of one markdown table cell: '|' (which would split the cell) as '/', newlines as
    spaces."""
    return str(value).replace("|", "/").replace("\n", " ")


def markdown_row(cells: Sequence[Any]) -> str:
    """One line of a markdown table, unpadded (markdown_text of each cell)."""
    return "| " + " | ".join(markdown_text(c) for c in cells) + " |"


class MarkdownLog(FlushedFile):
    """A markdown file written a line at a time and flushed, like CsvLog. Tables are unpadded (their rows are
    written before the widths are known)."""

    def write(self, *lines: str) -> None:
        self._file.write("".join(line + "\n" for line in lines))
        self._file.flush()

    def table(self, headers: Sequence[str]) -> None:
        """Start a table: a blank line, the header row and the separator."""
        self.write("", markdown_row(headers), "|" + "|".join("---" for _ in headers) + "|")

    def row(self, cells: Sequence[Any]) -> None:
        self.write(markdown_row(cells))


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed (`pip install
    quantrt[bench]`); the benchmarks then say so (PLOT_MISSING) and skip their plot."""
    try:
        import matplotlib  # optional (quantrt[bench]), and seconds to import: only when a plot is drawn
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
