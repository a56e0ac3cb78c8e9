"""What the benchmarks of `quantrt bench` share besides their result files (quantrt.bench.report): the
run's device and where its files go, timing (triton.testing.do_bench on CUDA, a perf_counter median on
CPU), the measured HBM bandwidth and matmul rate that the floors are counted against, byte counting of
quantized tensors of any library, and the `main` of a benchmark script.

Results land in `<out-dir>/<UTC date-time>-<device>-<benchmark>.{md,csv,png}`; `--out-dir` defaults to
`benchmarks/results` under the working directory (a run from the checkout puts them next to the
scripts), and a CPU smoke run without `--out-dir` writes to a fresh temporary folder instead, so that CI
never litters the results folder with CPU numbers that say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Generic, Sequence, TypeVar

import torch
import torch.nn as nn

from ..cli import quiet_library_logs
from .report import TargetResult, header_lines

# do_bench's warmup and repetition times per point (ms): short enough for sweeps of thousands of points,
# long enough for a stable median
DEFAULT_WARMUP_MS = 25
DEFAULT_REP_MS = 100
CPU_REPEATS = 3


def device_label(device: torch.device) -> str:
    """The device's name as a file-name fragment: NVIDIA_H100_80GB_HBM3, cpu."""
    if device.type == "cuda":
        return re.sub(r"[^A-Za-z0-9.]+", "_", torch.cuda.get_device_name(device)).strip("_")
    return device.type


def pick_device(cpu_smoke: bool, echo: Callable[[str], None] = print) -> torch.device:
    """CUDA unless the smoke run is asked for; without CUDA the smoke run is what runs, said out loud."""
    if cpu_smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        echo("no CUDA device: running the reduced CPU smoke run (checks the benchmark works, not its numbers)")
        return torch.device("cpu")
    return torch.device("cuda")


@dataclass
class Run:
    """One benchmark run: where it runs, how it was asked for, and where its files go."""

    benchmark: str  # "kernels", "model"
    device: torch.device
    command: str
    out_dir: Path
    smoke: bool
    started: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc))

    @classmethod
    def create(cls, benchmark: str, device: torch.device, prog: str, argv: Sequence[str],
               out_dir: Path | None) -> Run:
        smoke = device.type != "cuda"
        if out_dir is None:
            out_dir = (Path(tempfile.mkdtemp(prefix=f"quantrt-bench-{benchmark}-")) if smoke
                       else Path("benchmarks") / "results")
        command = " ".join([prog, *(shlex.quote(a) for a in argv)])
        return cls(benchmark, device, command, Path(out_dir), smoke)

    @property
    def stem(self) -> Path:
        """The results' path without suffix: <out_dir>/<date>-<device>-<benchmark>[-cpu-smoke]."""
        suffix = "-cpu-smoke" if self.smoke else ""
        return self.out_dir / f"{self.started:%Y-%m-%d-%H%M%S}-{device_label(self.device)}-{self.benchmark}{suffix}"

    def header_lines(self, title: str) -> list[str]:
        """The markdown head of this run's results file (quantrt.bench.report.header_lines)."""
        return header_lines(title, self.started, self.command, self.device, self.smoke)


RowT = TypeVar("RowT")


@dataclass
class Outputs(Generic[RowT]):
    """What a `bench kernels` / `bench model` run wrote and measured."""

    markdown: Path
    csv: Path
    plot: Path | None
    rows: list[RowT]
    targets: list[TargetResult]

    @property
    def failures(self) -> list[RowT]:
        """Points that failed to build or run (a provider that cannot serve is skipped, not failed)."""
        return [r for r in self.rows if r.note.startswith("FAILED")]


@contextlib.contextmanager
def smoke_threads(smoke: bool):
    """One intra-op thread during a CPU smoke run, restored after: its matmuls are tiny, and on a shared CI
    machine OpenMP's spinning threads make each of them milliseconds instead of microseconds."""
    if not smoke:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def private_tuning_table(device: torch.device, path: Path | None):
    """On CUDA, QUANTRT_TUNING_FILE points at `path` (or a fresh temporary table) while the block runs, and
    is restored after: the benchmark tunes quantrt's kernels as a fresh deployment would, never reading nor
    filling the user's own table. Yields the table's path (None off CUDA, where nothing is tuned)."""
    if device.type != "cuda":
        yield None
        return
    path = path or Path(tempfile.mkdtemp(prefix="quantrt-tuning-")) / "tuning.json"
    previous = os.environ.get("QUANTRT_TUNING_FILE")
    os.environ["QUANTRT_TUNING_FILE"] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop("QUANTRT_TUNING_FILE", None)
        else:
            os.environ["QUANTRT_TUNING_FILE"] = previous


def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache in bytes (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 1, repeats: int = CPU_REPEATS) -> float:
    """Median milliseconds of `repeats` calls after `warmup` untimed ones: CUDA events on CUDA (each call
    timed alone, after a synchronize), time.perf_counter off CUDA. For calls long enough that launch
    overhead does not matter (a whole model's forward)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def time_rotated(calls: Sequence[Callable[[], Any]], device: torch.device, warmup_ms: int = DEFAULT_WARMUP_MS,
                 rep_ms: int = DEFAULT_REP_MS) -> tuple[float, str]:
    """(milliseconds per call, how it was timed) of a list of calls that each touch their own copy of the
    data (weights and inputs rotated, together larger than L2).

    On CUDA: every call is run twice (a first call may tune or compile), then all of them are captured
    in one CUDA graph, so that Python and launch overhead do not hide the kernels, and the graph's replay
    is timed by the median of triton.testing.do_bench (which also flushes L2 before each replay); the
    time per call is that over len(calls). "graph". Where the capture fails, do_bench of the calls
    launched one by one: "launch". Off CUDA: the median of a few perf_counter timings of the list: "cpu".
    """
    if not calls:
        raise ValueError("time_rotated needs at least one call")

    def run_all() -> None:
        for call in calls:
            call()

    if device.type != "cuda":
        return median_ms(run_all, device) / len(calls), "cpu"
    import triton.testing  # CUDA only: the timer of do_bench


    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm on a side stream: what CUDA graph capture wants
        run_all()
        run_all()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_all()
        ms = triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return ms / len(calls), "graph"
    except Exception:  # a library whose call cannot be captured: time launches instead
        torch.cuda.synchronize(device)
        ms = triton.testing.do_bench(run_all, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return ms / len(calls), "launch"


@dataclass
class Roofline:
    """The measured limits of this device: copy bandwidth (bytes/s) and bf16 matmul rate (flop/s)."""

    bandwidth: float
    matmul_rate: float
    how: str

    def memory_floor_ms(self, nbytes: float) -> float:
        return nbytes / self.bandwidth * 1e3

    def compute_floor_ms(self, flops: float) -> float:
        return flops / self.matmul_rate * 1e3

    def describe(self) -> str:
        return (f"measured HBM bandwidth {self.bandwidth / 1e9:,.0f} GB/s, bf16 matmul rate "
                f"{self.matmul_rate / 1e12:,.1f} TFLOP/s ({self.how})")


def measure_roofline(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Roofline:
    """Bandwidth by a device-to-device copy of 1 GiB (bytes read + written over the median time) and the
    matmul rate by an 8192^3 `dtype` torch.mm (cuBLAS), both by do_bench medians; off CUDA a 64 MiB copy
    and a 512^3 matmul with the CPU timer (numbers for the smoke run's arithmetic only)."""
    if device.type == "cuda":
        import triton.testing  # CUDA only: the timer of do_bench

        src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
        bandwidth = 2 * src.numel() / (copy_ms * 1e-3)
        del src, dst
        n = 8192
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        mm_ms = triton.testing.do_bench(lambda: torch.mm(a, b), warmup=25, rep=200, return_mode="median")
        del a, b
        torch.cuda.empty_cache()
        how = f"1 GiB device copy; {n}^3 {str(dtype).removeprefix('torch.')} torch.mm; do_bench medians"
    else:
        src = torch.randn(2**24, device=device)
        dst = torch.empty_like(src)
        copy_ms = median_ms(lambda: dst.copy_(src), device, repeats=5)
        bandwidth = 2 * src.numel() * src.element_size() / (copy_ms * 1e-3)
        n = 512
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        mm_ms = median_ms(lambda: torch.mm(a, b), device, repeats=5)
        how = f"64 MiB CPU copy; {n}^3 torch.mm; perf_counter medians"
    return Roofline(bandwidth, 2 * n**3 / (mm_ms * 1e-3), how)


def stored_bytes(obj: Any) -> int:
    """Bytes that a weight takes as stored: a plain tensor's elements; a tensor subclass's inner tensors
    (torchao and optimum-quanto tensors flatten into them, `__tensor_flatten__`); a module's parameters,
    buffers and tensor attributes (gemlite keeps its packed weight as attributes), each tensor once."""
    seen: set[int] = set()

    def count(t: Any) -> int:
        if not isinstance(t, torch.Tensor) or id(t) in seen:
            return 0
        seen.add(id(t))
        if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(count(getattr(t, name)) for name in names)
        return t.numel() * t.element_size()

    if isinstance(obj, nn.Module):
        total = 0
        for module in obj.modules():
            tensors = [*module._parameters.values(), *module._buffers.values(),
                       *(v for v in vars(module).values() if isinstance(v, torch.Tensor))]
            total += sum(count(t) for t in tensors)
        return total
    return count(obj)


def geometric_mean(values: Sequence[float]) -> float:
    """The geometric mean of the positive, finite values (NaN when there are none)."""
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def script_main(module: ModuleType, argv: Sequence[str] | None, prog: str) -> int:
    """`main` of a benchmark script: parse `module.add_arguments`, run `module.run`, exit 1 on failed points."""
    parser = argparse.ArgumentParser(prog=prog, description=module.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    quiet_library_logs()
    return 1 if module.run(args, prog, argv).failures else 0
