"""`quantrt bench compile` (`python benchmarks/bench_compile.py`): cold compile against a warm start from the
compile cache, with torch.compile's graphs (JIT) and with AOT packages (`warmup --aot`), side by side.

Each measurement is its own process, as in a deployment: a cold run (`quantrt warmup [--aot]` into an empty cache
folder) and then a warm run (`quantrt warmup [--aot] --check`, a fresh process that loads the entry). Reported per
configuration: the start, from `qt.compile()` to every warmed shape served once (compilation or loading from the
cache, plus one forward each: what a replica waits for before serving), the whole process's wall time (imports,
model building and quantization included), Inductor cache hits/misses and recompiles of the warm run, and the
warm/cold ratio. Targets: JIT warm under 20% of cold on the tiny model and 10% at FLUX.1-dev dimensions on a GPU
(issue "Compile-first"); AOT warm under 5% and 3% (issue "Start hot in a fraction of a second").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..models import FLUX_TOKENS
from ..tables import format_table
from .common import Run, pick_device, script_main
from .report import cell, write_csv, write_text

TARGETS = {"jit": {"tiny": 0.20, "full": 0.10}, "aot": {"tiny": 0.05, "full": 0.03}}
HEADERS = ["model", "scheme", "mode", "regional", "served by", "shapes", "cold start s", "warm start s", "warm/cold",
           "target", "cold process s", "warm process s", "warm hits", "warm misses", "warm recompiles"]


def warmup_process(args: list[str], report: Path) -> tuple[dict, float]:
    """Run `quantrt warmup ARGS --json REPORT` in a fresh process; its JSON report and wall seconds."""
    command = [sys.executable, "-m", "quantrt", "warmup", *args, "--json", str(report)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    # `--check` exits 1 on a cache miss or a recompile: still a measurement, reported as a failure
    if done.returncode not in (0, 1) or not report.is_file():
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                           f"{done.stderr[-4000:]}")
    return json.loads(report.read_text()), seconds


def measure(size: str, scheme: str, mode: str, regional: bool, shapes: list[str], device: torch.device,
            dtype: str, backend: str, aot: bool = False) -> list[object]:
    """One configuration, cold then warm, as its row of the table (HEADERS). `aot`: warm up with --aot (the warm
    run must serve every shape from its package)."""
    with tempfile.TemporaryDirectory(prefix="quantrt-bench-compile-") as tmp:
        args = ["--size", size, "--scheme", scheme, "--mode", mode, "--device", device.type, "--dtype", dtype,
                "--backend", backend, "--cache-dir", str(Path(tmp) / "cache")]
        args += ["--regional"] if regional else []
        args += ["--aot"] if aot else []
        for shape in shapes:
            args += ["--shape", shape]
        cold, cold_wall = warmup_process(args, Path(tmp) / "cold.json")
        warm, warm_wall = warmup_process(args + ["--check"], Path(tmp) / "warm.json")
    cold_s, warm_s = cold["seconds_from_compile"], warm["seconds_from_compile"]
    ratio = warm_s / cold_s
    target = TARGETS["aot" if aot else "jit"].get(size)
    verdict = "-" if target is None else f"< {target:.0%}: {'met' if ratio < target else 'NOT met'}"
    served = sorted({r["served_by"] for r in warm["shapes"]})
    return [f"FLUX {size}", scheme, mode, "yes" if regional else "no", ", ".join(served), " ".join(shapes),
            cell(cold_s), cell(warm_s), f"{ratio:.1%}", verdict, cell(cold_wall), cell(warm_wall),
            sum(r["cache_hits"] for r in warm["shapes"]), sum(r["cache_misses"] for r in warm["shapes"]),
            sum(r["recompiles"] for r in warm["shapes"])]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=None,
                        help="comma-separated FLUX sizes (tiny, small, full); default: tiny,full on CUDA, tiny on CPU")
    parser.add_argument("--scheme", default="int8wo", help="quantization scheme (default: %(default)s)")
    parser.add_argument("--mode", default="max-autotune", help="torch.compile mode (default: %(default)s)")
    parser.add_argument("--regional", choices=("no", "yes", "both"), default="both",
                        help="whole-model and/or regional compilation (default: %(default)s)")
    parser.add_argument("--aot", choices=("no", "yes", "both"), default="both",
                        help="torch.compile's graphs (no), AOT packages (yes; whole model, warmup --aot), or both "
                             "side by side (default: %(default)s)")
    parser.add_argument("--shape", action="append", metavar="SHAPE",
                        help="input shape (see `quantrt warmup --help`); default: each size's standard shape")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--backend", default="auto", help="backend for every layer (default: %(default)s)")
    parser.add_argument("--cpu-smoke", action="store_true", help="run on the CPU even if CUDA is available")
    parser.add_argument("--out-dir", type=Path, help="where the results go (default: benchmarks/results on CUDA, "
                                                     "a temporary folder for a CPU smoke run)")


@dataclass
class Outputs:
    """What a `bench compile` run wrote and measured."""

    markdown: Path
    csv: Path
    rows: list[list[object]]
    failures: list[str] = field(default_factory=list)  # configurations whose warm run missed or recompiled


def run(args: argparse.Namespace, prog: str, argv: Sequence[str], echo: Callable[[str], None] = print) -> Outputs:
    """Measure each configuration `args` asks for and write the markdown table and the CSV."""
    device = pick_device(args.cpu_smoke, echo)
    run_info = Run.create("compile", device, prog, argv, args.out_dir)
    sizes = [s.strip() for s in (args.sizes or ("tiny,full" if device.type == "cuda" else "tiny")).split(",")]
    unknown = [s for s in sizes if s not in FLUX_TOKENS]
    if unknown:
        raise ValueError(f"--sizes: {', '.join(unknown)}; choose from {', '.join(FLUX_TOKENS)}")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    regional = {"no": [False], "yes": [True], "both": [False, True]}[args.regional]
    # AOT packages are of the whole model: regional compilation is a torch.compile option
    paths = [(region, False) for region in regional] if args.aot != "yes" else []
    paths += [(False, True)] if args.aot != "no" else []
    rows, failures = [], []
    for size in sizes:
        shapes = args.shape or ["x".join(map(str, FLUX_TOKENS[size]))]
        for region, aot in paths:
            name = f"FLUX {size}, {args.scheme}, mode={args.mode}, " + ("AOT" if aot else f"JIT, regional={region}")
            echo(f"{name}: cold, then warm ...")
            rows.append(measure(size, args.scheme, args.mode, region, shapes, device, dtype, args.backend, aot))
            echo(f"  cold {rows[-1][6]} s, warm {rows[-1][7]} s ({rows[-1][8]}), served by {rows[-1][4]}")
            if rows[-1][-2] or rows[-1][-1]:
                failures.append(f"{name}: {rows[-1][-2]} misses, {rows[-1][-1]} recompiles")
            if aot and rows[-1][4] != "aot package":
                failures.append(f"{name}: the warm run was served by {rows[-1][4]}, not only by AOT packages")
    table = format_table(HEADERS, rows)
    lines = run_info.header_lines("quantrt compile cache: cold compile vs warm start, JIT and AOT") + [
        "", "Each run is a fresh process: cold = `quantrt warmup [--aot]` into an empty cache folder, warm = "
        "`quantrt warmup [--aot] --check` on the entry it wrote. Start seconds: from `qt.compile()` to every "
        "warmed shape served once (compilation or cache load, plus one forward each). Process seconds: the whole "
        "command (imports, model building and quantization included).", "", table]
    markdown = write_text(run_info.stem.with_suffix(".md"), lines)
    csv_path = write_csv(run_info.stem.with_suffix(".csv"), HEADERS, rows)
    echo(table)
    echo(f"wrote {markdown}, {csv_path}")
    return Outputs(markdown, csv_path, rows, failures)


def main(argv: Sequence[str] | None = None, prog: str = "python benchmarks/bench_compile.py") -> int:
    """`python benchmarks/bench_compile.py`: the same as `quantrt bench compile`."""
    return script_main(sys.modules[__name__], argv, prog)


if __name__ == "__main__":
    sys.exit(main())
