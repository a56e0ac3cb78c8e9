"""Reading what a benchmark run wrote: its CSV rows and the tables of its markdown file."""

import csv
import importlib.util
from pathlib import Path

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a results CSV, as dicts keyed by its header."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def section(markdown: str, title: str) -> list[str]:
    """The table lines under a '## title' heading."""
    lines = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    return [line for line in lines if line.startswith("|")]


def cells(line: str) -> list[str]:
    """The cells of a markdown table line, without their padding."""
    return [cell.strip() for cell in line.strip().removeprefix("|").removesuffix("|").split("|")]
