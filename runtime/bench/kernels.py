"""Kernel microbenchmark (`quantrt bench kernels`, `python benchmarks/bench_kernels.py`): one weight-only
linear y = x @ W^T, x [M, K] bf16, W [N, K] stored in each weight-only format, timed for bf16 torch.mm
(cuBLAS, the baseline), quantrt (its Triton kernels on CUDA), torchao, optimum-quanto and gemlite, on the
shapes and M values of design.md ("Performance method").

Method:
- Every provider computes from the same quantized codes: quantrt quantizes the weight once; torchao and
  optimum-quanto weights are built from quantrt's stored tensors by quantrt's own backends (the torchao
  config the scheme maps onto, e.g. tinygemm int4 on CUDA, or quanto's optimized CUDA kernels), gemlite's
  by its documented `gemlite.helper` builders from the same codes, scales and zero points. Each provider's
  output is compared with x @ dequantize(W)^T in float32 (column "rel. err"), so that a peer wired wrongly
  shows instead of looking fast.
- Timing: `quantrt.bench.common.time_rotated`: the weights (and inputs) are copied until the copies of
  one call set exceed twice the L2 cache, each call of a CUDA graph touches its own copy, the graph's
  replay is timed by the median of triton.testing.do_bench (which flushes L2 before each replay), per call
  = that over the number of calls. quantrt's kernels are autotuned on their first call, before the
  capture, into a fresh tuning table (or `--tuning-file`), never the user's own.
- Floors: bytes = the format's stored weight (codes + scales + zero points, as quantrt stores them; bf16:
  2 N K) + x (2 M K) + y (2 M N); memory floor = bytes / the measured copy bandwidth, compute floor =
  2 M N K / the measured bf16 torch.mm rate, both measured in the same run
  (`quantrt.bench.common.measure_roofline`).
  "% of floor" = max(memory, compute floor) / time; "% of HBM floor" = memory floor / time. Peers are held
  to the format's floor (what their own storage costs is the column "stored MB").

A provider that is not installed or cannot serve a format gets a row with the reason instead of a time.
Without CUDA (or with --cpu-smoke) a reduced run checks the benchmark itself: small shapes, few M, quantrt's
pure-torch reference in place of its kernels (the Triton interpreter is not timed), a perf_counter timer.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends import get_backend
from ..kernels.packing import unpack_uintx
from ..metrics import relative_error
from ..modules import QuantizedLinear
from ..schemes import Scheme, resolve_scheme
from ..tables import format_table
from ..version import distribution_version
from .common import (DEFAULT_REP_MS, DEFAULT_WARMUP_MS, Outputs, Roofline, Run, geometric_mean, l2_bytes,
                     measure_roofline, pick_device, private_tuning_table, script_main, smoke_threads, stored_bytes,
                     time_rotated)
from .report import (PLOT_MISSING, CsvLog, TargetResult, cell, csv_headers, device_title, failed_note, note_cell,
                     percent_cell, pyplot, targets_table, write_text)

# The Triton kernel modules (quantrt.kernels.formats, floatx, autotune) are imported by the functions that use
# them: triton.jit decides at import whether a kernel runs in the interpreter, and `quantrt bench check`, which
# builds on this module, turns the interpreter on only after its arguments are parsed.

FORMATS = ("int8wo", "int4wo", "uint1wo", "uint2wo", "uint3wo", "uint4wo", "uint5wo", "uint6wo", "uint7wo",
           "float8wo_e4m3", "float8wo_e5m2", "fp3_e1m1", "fp4_e2m1", "fp5_e2m2", "fp6_e3m2", "fp7_e3m3")
# N x K of the weight: FLUX.1-dev's linears (attention, MLP in and out, single-block out, AdaLN), then LLM-like
FLUX_SHAPES = ((3072, 3072), (12288, 3072), (3072, 12288), (3072, 15360), (18432, 3072), (9216, 3072))
LLM_SHAPES = ((4096, 4096), (4096, 14336), (8192, 28672), (16384, 16384))
SHAPES = FLUX_SHAPES + LLM_SHAPES
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 4608)
PROVIDERS = ("quantrt", "torchao", "quanto", "gemlite")
BASELINE = "bf16 torch.mm"

QUICK_FORMATS = ("int8wo", "int4wo", "uint3wo", "float8wo_e4m3", "fp6_e3m2")
QUICK_SHAPES = ((3072, 3072), (8192, 28672), (16384, 16384))
QUICK_MS = (1, 16, 1024, 4096)
# the CPU smoke run: K a multiple of 128 (int4wo's group) and of every packing width
SMOKE_SHAPES = ((96, 256), (64, 384))
SMOKE_MS = (1, 16, 64)

# issue 3's speed targets, checked on quantrt's rows
TARGET_SHAPES = ((8192, 28672), (16384, 16384))
TARGET_SMALL_M = 16
TARGET_SPEEDUPS = {"int4wo": 3.5, "int8wo": 1.85}
TARGET_HBM_FRACTION = 0.85
TARGET_LARGE_M = 1024
TARGET_LARGE_M_SPEEDUP = 0.95
# FLUX.1-dev at 1024x1024 runs its linears at M = 4096 image + 512 text tokens
FLUX_TARGET_M = 4608
FLUX_TARGET_SPEEDUP = 0.97

MAX_COPIES = 64


class ProviderSkip(Exception):
    """A provider cannot serve a format here; the message is the reason."""


@dataclass
class Row:
    """One timed (or skipped) point: a provider computing one format at one shape and M."""

    n: int
    k: int
    m: int
    format: str
    provider: str
    kernel: str = ""
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    speedup: float | None = None
    floor_ms: float | None = None
    bound: str = ""
    floor_fraction: float | None = None
    hbm_fraction: float | None = None
    stored_mb: float | None = None
    rel_error: float | None = None
    timing: str = ""
    copies: int = 0
    note: str = ""

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.k}"


CSV_HEADERS = csv_headers(Row)
TABLE_HEADERS = ["N x K", "M", "format", "provider", "kernel", "ms", "TFLOP/s", "GB/s", "speed-up vs bf16",
                 "floor ms", "bound", "% of floor", "% of HBM floor", "stored MB", "rel. err", "timing", "note"]


def table_row(r: Row) -> list[str]:
    """A point's row of the "All points" table (TABLE_HEADERS)."""
    return [r.shape, str(r.m), r.format, r.provider, r.kernel or "-", cell(r.ms, 4), cell(r.tflops), cell(r.gbps),
            cell(r.speedup), cell(r.floor_ms, 4), r.bound or "-", percent_cell(r.floor_fraction),
            percent_cell(r.hbm_fraction), cell(r.stored_mb), cell(r.rel_error, 2), r.timing or "-", note_cell(r.note)]


@dataclass
class Built:
    """A provider's calls, one per rotated weight copy, and what it says of itself."""

    calls: list[Callable[[torch.Tensor], torch.Tensor]]
    kernel: str
    stored_bytes: int
    kernel_for: Callable[[torch.Tensor], str] | None = None  # the kernel a given x takes, where it depends on M


def build_quantrt(layers: list[QuantizedLinear], device: torch.device) -> Built:
    """quantrt's Triton kernels on CUDA; off CUDA its pure-torch reference (the interpreter is not timed)."""
    if device.type != "cuda":
        return Built(list(layers), "reference (CPU smoke: dequantize + F.linear)", layers[0].storage_bytes())
    layer = layers[0]
    reason = layer.backend.unavailable_reason(layer.scheme, device)
    if reason:
        raise ProviderSkip(reason)
    from ..backends.triton import weight_format  # Triton kernels: imported late (note at the imports)
    from ..kernels import autotune  # Triton kernels: imported late (note at the imports)

    fmt = weight_format(layer.scheme.storage)

    def kernel_for(x: torch.Tensor) -> str:
        zero = getattr(layer, "zero", None)
        config = autotune.select_config(x, layer.qweight, layer.scale, zero, None, fmt)
        tile = "" if config.path == "dequant" else f" {config.block_m}x{config.block_n}x{config.block_k}"
        return f"triton {config.path}{tile}"

    return Built(list(layers), "triton", layer.storage_bytes(), kernel_for)


def _backend_weights(layers: list[QuantizedLinear], backend_name: str, device: torch.device) -> tuple[list, str]:
    """The torchao / quanto weight that quantrt's `backend_name` backend builds from each layer's codes."""
    backend = get_backend(backend_name)
    reason = "not part of this build" if backend is None else backend.unavailable_reason(layers[0].scheme, device)
    if reason:
        raise ProviderSkip(reason)
    weights, config = [], ""
    for layer in layers:
        twin = copy.deepcopy(layer)
        twin.backend = backend
        backend.prepare(twin)
        weights.append(twin.backend_weight)
        config = getattr(twin, "backend_config", "")
    return weights, config


def _linear_calls(weights: list) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    return [(lambda x, w=w: F.linear(x, w)) for w in weights]


def build_torchao(layers: list[QuantizedLinear], device: torch.device) -> Built:
    weights, config = _backend_weights(layers, "torchao", device)
    version = distribution_version("torchao")
    return Built(_linear_calls(weights), f"torchao {version} {config}", stored_bytes(weights[0]))


def build_quanto(layers: list[QuantizedLinear], device: torch.device) -> Built:
    weights, qtype = _backend_weights(layers, "quanto", device)
    kind = type(weights[0]).__name__
    version = distribution_version("optimum-quanto")
    return Built(_linear_calls(weights), f"quanto {version} {qtype} ({kind})", stored_bytes(weights[0]))


def gemlite_unavailable_reason(scheme: Scheme, device: torch.device) -> str | None:
    """Why gemlite cannot serve `scheme` on `device`, or None."""
    if distribution_version("gemlite") is None:
        return "gemlite is not installed"
    if device.type != "cuda":
        return "gemlite runs on CUDA only"
    builder = scheme.storage.gemlite_builder
    if builder is None:
        return (f"gemlite packs 1, 2, 4 and 8-bit integer weights and fp8 ones, not {scheme.storage.name} "
                f"({scheme.name})")
    if builder == "A16W8_INT8" and scheme.group_size is not None:
        return "gemlite's int8 weight-only path (A16W8_INT8) takes one scale per output channel"
    return None


def build_gemlite(layers: list[QuantizedLinear], device: torch.device) -> Built:
    """gemlite's GemLiteLinearTriton built with its gemlite.helper builders from quantrt's codes: int8 and
    fp8 as A16W8 (pre-quantized weight + per-channel scale), uintX as A16Wn (HQQ's (W_q - zero) * scale,
    quantrt's convention) with quantrt's group size."""
    scheme = layers[0].scheme
    reason = gemlite_unavailable_reason(scheme, device)
    if reason:
        raise ProviderSkip(reason)
    from gemlite import helper  # optional, and CUDA only

    builder = scheme.storage.gemlite_builder
    modules = []
    for layer in layers:
        dtype = layer.scale.dtype
        if builder == "A16W8_INT8":
            module = helper.A16W8_INT8(device=str(device), dtype=dtype).from_weights(layer.qweight, scales=layer.scale)
        elif builder == "A16W8_FP8":
            fp8 = scheme.storage.code_dtype
            module = helper.A16W8_FP8(device=str(device), dtype=dtype, fp8=fp8).from_weights(
                layer.qweight.view(fp8), scales=layer.scale)
        else:
            codes = unpack_uintx(layer.qweight, scheme.bits, layer.in_features)
            module = helper.A16Wn(device=str(device), dtype=dtype).from_weights(
                codes, layer.scale, layer.zero, scheme.bits, scheme.group_size)
        modules.append(module)
    version = distribution_version("gemlite")
    return Built([(lambda x, g=g: g(x)) for g in modules], f"gemlite {version} {type(modules[0]).__name__}",
                 stored_bytes(modules[0]))


BUILDERS = {"quantrt": build_quantrt, "torchao": build_torchao, "quanto": build_quanto, "gemlite": build_gemlite}


@dataclass
class Plan:
    formats: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    ms: tuple[int, ...]
    providers: tuple[str, ...]


def rotation_copies(call_bytes: int, l2: int) -> int:
    """How many copies of a call's data make the rotation exceed twice the L2 cache (2 at least, so
    that rotation is always exercised, MAX_COPIES at most)."""
    return max(2, min(MAX_COPIES, math.ceil(2 * l2 / max(call_bytes, 1))))


class Inputs:
    """Random x [M, K] copies per M for one shape, made on demand and shared by every provider."""

    def __init__(self, k: int, device: torch.device, dtype: torch.dtype):
        self.k, self.device, self.dtype = k, device, dtype
        self._by_m: dict[int, list[torch.Tensor]] = {}

    def get(self, m: int, count: int) -> list[torch.Tensor]:
        xs = self._by_m.setdefault(m, [])
        while len(xs) < count:
            xs.append(torch.randn(m, self.k, device=self.device, dtype=self.dtype))
        return xs[:count]


def _measure(row: Row, built_calls: Sequence[Callable], xs: list[torch.Tensor], device: torch.device,
             counted_bytes: int, roofline: Roofline, warmup_ms: int, rep_ms: int) -> None:
    calls = [(lambda c=built_calls[i % len(built_calls)], x=x: c(x)) for i, x in enumerate(xs)]
    ms, how = time_rotated(calls, device, warmup_ms, rep_ms)
    flops = 2 * row.m * row.n * row.k
    memory_floor = roofline.memory_floor_ms(counted_bytes)
    compute_floor = roofline.compute_floor_ms(flops)
    row.ms, row.timing, row.copies = ms, how, len(calls)
    row.tflops = flops / (ms * 1e-3) / 1e12
    row.gbps = counted_bytes / (ms * 1e-3) / 1e9
    row.floor_ms = max(memory_floor, compute_floor)
    row.bound = "memory" if memory_floor >= compute_floor else "compute"
    row.floor_fraction = row.floor_ms / ms
    row.hbm_fraction = memory_floor / ms


@torch.no_grad()
def run_kernels(plan: Plan, device: torch.device, roofline: Roofline, echo: Callable[[str], None] = print,
                warmup_ms: int = DEFAULT_WARMUP_MS, rep_ms: int = DEFAULT_REP_MS,
                on_row: Callable[[Row], None] | None = None,
                builders: Mapping[str, Callable[[list[QuantizedLinear], torch.device], Built]] = BUILDERS,
                ) -> list[Row]:
    """Every shape: the bf16 baseline row per M, then a row per (format, provider, M), timed or skipped.
    `on_row` sees each row as soon as it is final (an exception it raises that is no Exception, such as
    a time limit, ends the run there). `builders` maps plan.providers to their builders."""
    dtype = torch.bfloat16
    l2 = l2_bytes(device)
    quantrt_backend = get_backend("triton" if device.type == "cuda" else "reference")
    rows: list[Row] = []

    def add(*new: Row) -> None:
        rows.extend(new)
        for row in new:
            if on_row is not None:
                on_row(row)

    def report(row: Row) -> None:
        timing = f"{row.ms:.4f} ms, {row.speedup:.2f}x" if row.speedup is not None else row.note or "-"
        echo(f"{row.shape:>11} M={row.m:<5} {row.format:14} {row.provider:14} {timing}")

    for n, k in plan.shapes:
        torch.manual_seed(n * 100003 + k)
        dense = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
        inputs = Inputs(k, device, dtype)
        baseline: dict[int, float] = {}
        dense_copies = [dense] + [dense.clone() for _ in range(rotation_copies(2 * n * k, l2) - 1)]
        for m in plan.ms:
            row = Row(n, k, m, "bf16", BASELINE, kernel="cuBLAS" if device.type == "cuda" else "CPU torch.mm",
                      stored_mb=2 * n * k / 1e6)
            counted = 2 * n * k + 2 * m * (n + k)
            xs = inputs.get(m, rotation_copies(counted, l2))
            calls = [(lambda x, w=w: torch.mm(x, w.t())) for w in dense_copies]
            try:
                row.rel_error = relative_error(torch.mm(xs[0], dense.t()), xs[0].float() @ dense.float().t())
                _measure(row, calls, xs, device, counted, roofline, warmup_ms, rep_ms)
                row.speedup = 1.0
                baseline[m] = row.ms
            except Exception as e:  # the peers of this M then have no speed-up, but their times stand
                row.note = failed_note(e)
            add(row)
            report(row)
        del dense_copies
        linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(dense)
        for name in plan.formats:
            scheme = resolve_scheme(name)
            why = scheme.unsupported_reason(n, k)
            if why:
                add(*(Row(n, k, m, name, p, note=f"skipped: {why}") for m in plan.ms for p in plan.providers))
                continue
            first = QuantizedLinear.from_linear(linear, scheme, quantrt_backend, name=f"{name} {n}x{k}")
            weight_bytes = first.storage_bytes()
            layers = [first] + [copy.deepcopy(first) for _ in range(rotation_copies(weight_bytes, l2) - 1)]
            reference_weight = first.dequantize()  # float32 [N, K]
            for provider in plan.providers:
                try:
                    built = builders[provider](layers, device)
                except ProviderSkip as e:
                    add(*(Row(n, k, m, name, provider, note=f"skipped: {e}") for m in plan.ms))
                    continue
                except Exception as e:  # a provider that fails to build is reported, not fatal
                    add(*(Row(n, k, m, name, provider, note=f"FAILED to build: {type(e).__name__}: {e}"[:300])
                          for m in plan.ms))
                    continue
                for m in plan.ms:
                    row = Row(n, k, m, name, provider, kernel=built.kernel, stored_mb=built.stored_bytes / 1e6)
                    counted = weight_bytes + 2 * m * (n + k)
                    xs = inputs.get(m, rotation_copies(counted, l2))
                    try:
                        y = built.calls[0](xs[0])
                        row.rel_error = relative_error(y, xs[0].float() @ reference_weight.t())
                        if built.kernel_for is not None:
                            row.kernel = built.kernel_for(xs[0])
                        _measure(row, built.calls, xs, device, counted, roofline, warmup_ms, rep_ms)
                        row.speedup = baseline[m] / row.ms if m in baseline else None
                    except Exception as e:  # one failing point is reported, the sweep goes on
                        row.note = failed_note(e)
                    add(row)
                    report(row)
                del built
            del layers, first, reference_weight
        del dense, linear, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def check_targets(rows: Sequence[Row], provider: str = "quantrt",
                  small_m_shapes: Sequence[tuple[int, int]] = TARGET_SHAPES) -> list[TargetResult]:
    """The speed targets on `provider`'s rows: at M <= 16 on `small_m_shapes` (issue 3: 8192x28672 and
    16384x16384), int4wo >= 3.5x and int8wo >= 1.85x over bf16 torch.mm, each at >= 85% of the HBM floor;
    at M >= 1024 every format >= 0.95x of bf16 (every shape measured); on FLUX.1-dev's shapes at M = 4608
    every format >= 0.97x."""
    timed = [r for r in rows if r.provider == provider and r.speedup is not None]
    small_m_shapes = tuple(tuple(shape) for shape in small_m_shapes)
    results = []
    for name, target in TARGET_SPEEDUPS.items():
        text = (f"{name} >= {target}x over bf16 torch.mm and >= {TARGET_HBM_FRACTION:.0%} of the HBM floor, "
                f"M <= {TARGET_SMALL_M}, {' and '.join(f'{n}x{k}' for n, k in small_m_shapes)}")
        points = [r for r in timed if r.format == name and (r.n, r.k) in small_m_shapes and r.m <= TARGET_SMALL_M]
        if not points:
            results.append(TargetResult(text, "not measured", "no such rows in this run"))
            continue
        slow = min(points, key=lambda r: r.speedup)
        far = min(points, key=lambda r: r.hbm_fraction)
        met = slow.speedup >= target and far.hbm_fraction >= TARGET_HBM_FRACTION
        results.append(TargetResult(text, "met" if met else "NOT met",
                                    f"{len(points)} points; slowest {slow.speedup:.2f}x ({slow.shape}, M={slow.m}); "
                                    f"lowest {far.hbm_fraction:.0%} of the HBM floor ({far.shape}, M={far.m})"))
    results.append(speedup_floor_target(
        f"every format >= {TARGET_LARGE_M_SPEEDUP}x of bf16 torch.mm at M >= {TARGET_LARGE_M}, every shape",
        [r for r in timed if r.m >= TARGET_LARGE_M], TARGET_LARGE_M_SPEEDUP, with_m=True))
    results.append(speedup_floor_target(
        f"FLUX.1-dev shapes: every format >= {FLUX_TARGET_SPEEDUP}x of bf16 torch.mm at M = {FLUX_TARGET_M} "
        f"({', '.join(f'{n}x{k}' for n, k in FLUX_SHAPES)})",
        [r for r in timed if (r.n, r.k) in FLUX_SHAPES and r.m == FLUX_TARGET_M], FLUX_TARGET_SPEEDUP, with_m=False))
    return results


def speedup_floor_target(text: str, points: Sequence[Row], floor: float, with_m: bool) -> TargetResult:
    """The target "every point's speed-up over bf16 >= floor" over `points`: met, NOT met (how many fall below,
    the slowest), or not measured."""
    if not points:
        return TargetResult(text, "not measured", "no such rows in this run")
    slow = min(points, key=lambda r: r.speedup)
    below = sum(r.speedup < floor for r in points)
    where = f"{slow.shape}, M={slow.m}" if with_m else slow.shape
    return TargetResult(text, "met" if not below else "NOT met",
                        f"{len(points)} points, {below} below; slowest {slow.format} {slow.speedup:.2f}x ({where})")


def speedup_pivot(rows: Sequence[Row], ms: Sequence[int]) -> tuple[list[str], list[list[str]]]:
    """Speed-up over bf16 per (shape, format, provider) across M."""
    table: dict[tuple[str, str, str], dict[int, str]] = {}
    for r in rows:
        if r.provider == BASELINE:
            continue
        table.setdefault((r.shape, r.format, r.provider), {})[r.m] = "-" if r.speedup is None else f"{r.speedup:.2f}"
    headers = ["N x K", "format", "provider", *(f"M={m}" for m in ms)]
    return headers, [[*key, *(cells.get(m, "-") for m in ms)] for key, cells in table.items()]


def plot_speedups(rows: Sequence[Row], path: Path, title: str) -> Path | None:
    """Speed-up over bf16 vs M, one panel per format, a line per provider (geometric mean over the
    shapes). None when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    formats = list(dict.fromkeys(r.format for r in rows if r.provider != BASELINE))
    columns = min(4, max(1, len(formats)))
    lines = max(1, math.ceil(len(formats) / columns))
    figure, axes = plt.subplots(lines, columns, figsize=(4 * columns, 3.2 * lines), squeeze=False)
    for axis, name in zip(axes.flat, formats):
        for provider in PROVIDERS:
            by_m: dict[int, list[float]] = {}
            for r in rows:
                if r.format == name and r.provider == provider and r.speedup is not None:
                    by_m.setdefault(r.m, []).append(r.speedup)
            if by_m:
                ms = sorted(by_m)
                axis.plot(ms, [geometric_mean(by_m[m]) for m in ms], marker="o", label=provider)
        axis.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        axis.set_xscale("log", base=2)
        axis.set_title(name)
        axis.set_xlabel("M")
        axis.set_ylabel("speed-up vs bf16")
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(formats):]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _parse_list(text: str | None, what: str) -> list[str] | None:
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ValueError(f"--{what} is empty")
    return items


def _parse_shapes(text: str | None) -> tuple[tuple[int, int], ...] | None:
    items = _parse_list(text, "shapes")
    if items is None:
        return None
    shapes = []
    for item in items:
        if item in ("flux", "llm", "all"):
            shapes += {"flux": FLUX_SHAPES, "llm": LLM_SHAPES, "all": SHAPES}[item]
            continue
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes: {item!r} is not NxK (e.g. 3072x12288) nor one of flux, llm, all")
        shapes.append((int(parts[0]), int(parts[1])))
    return tuple(dict.fromkeys(shapes))


def _parse_ms(text: str | None) -> tuple[int, ...] | None:
    items = _parse_list(text, "ms")
    if items is None:
        return None
    if not all(i.isdigit() and int(i) > 0 for i in items):
        raise ValueError(f"--ms takes positive integers, e.g. 1,16,1024; got {text!r}")
    return tuple(int(i) for i in items)


def make_plan(args: argparse.Namespace, smoke: bool) -> Plan:
    formats = _parse_list(args.formats, "formats")
    if formats is not None:
        for name in formats:
            if not resolve_scheme(name).weight_only:
                raise ValueError(f"--formats: {name} quantizes activations; this benchmark times weight-only "
                                 f"formats ({', '.join(FORMATS)})")
    providers = _parse_list(args.providers, "providers")
    for name in providers or ():
        if name not in PROVIDERS:
            raise ValueError(f"--providers: unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
    shapes, ms = _parse_shapes(args.shapes), _parse_ms(args.ms)
    if smoke:
        default_formats, default_shapes, default_ms = FORMATS, SMOKE_SHAPES, SMOKE_MS
    elif args.quick:
        default_formats, default_shapes, default_ms = QUICK_FORMATS, QUICK_SHAPES, QUICK_MS
    else:
        default_formats, default_shapes, default_ms = FORMATS, SHAPES, MS
    return Plan(tuple(formats or default_formats), tuple(shapes or default_shapes), tuple(ms or default_ms),
                tuple(providers or PROVIDERS))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--formats", help=f"comma-separated weight-only formats (default: all: {', '.join(FORMATS)})")
    parser.add_argument("--shapes", help="comma-separated N x K weight shapes, e.g. 3072x12288, or the sets flux, "
                                         "llm, all (default: all)")
    parser.add_argument("--ms", help=f"comma-separated M values (default: {','.join(map(str, MS))})")
    parser.add_argument("--providers", help=f"comma-separated peers to time besides bf16 torch.mm "
                                            f"(default: {','.join(PROVIDERS)})")
    parser.add_argument("--quick", action="store_true",
                        help=f"{len(QUICK_FORMATS)} formats, shapes {', '.join(f'{n}x{k}' for n, k in QUICK_SHAPES)}, "
                             f"M {','.join(map(str, QUICK_MS))} (what the speed targets need)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="reduced CPU run that checks the benchmark works (automatic without CUDA)")
    parser.add_argument("--out-dir", type=Path, help="results folder (default: benchmarks/results; a temporary "
                                                     "folder for a CPU smoke run)")
    parser.add_argument("--tuning-file", type=Path,
                        help="quantrt's tuning table to read and fill (default: a fresh temporary one)")
    parser.add_argument("--warmup-ms", type=int, default=DEFAULT_WARMUP_MS, help="do_bench warmup (ms)")
    parser.add_argument("--rep-ms", type=int, default=DEFAULT_REP_MS, help="do_bench repetition time (ms)")


def run(args: argparse.Namespace, prog: str, argv: Sequence[str], echo: Callable[[str], None] = print) -> Outputs[Row]:
    """Run the kernel benchmark as `args` say and write its markdown, CSV and PNG."""
    device = pick_device(args.cpu_smoke, echo)
    plan = make_plan(args, smoke=device.type != "cuda")  # bad arguments fail before anything is written
    run_info = Run.create("kernels", device, prog, argv, args.out_dir)
    stem = run_info.stem
    with (smoke_threads(run_info.smoke), private_tuning_table(device, args.tuning_file) as tuning,
          CsvLog(stem.with_suffix(".csv"), CSV_HEADERS) as csv_log):
        echo(f"writing {csv_log.path} as points are measured")
        roofline = measure_roofline(device)
        echo(roofline.describe())
        rows = run_kernels(plan, device, roofline, echo, args.warmup_ms, args.rep_ms, on_row=csv_log.write)
    targets = check_targets(rows)
    plot = plot_speedups(rows, stem.with_suffix(".png"),
                         f"quantrt kernels on {device_title(device)}: speed-up over bf16 "
                         f"torch.mm (geometric mean over {len(plan.shapes)} shapes)")
    lines = run_info.header_lines(f"Weight-only matmul kernels on {device_title(device)}")
    lines += [f"- {roofline.describe()}",
              f"- formats: {', '.join(plan.formats)}; shapes (N x K): "
              f"{', '.join(f'{n}x{k}' for n, k in plan.shapes)}; M: {', '.join(map(str, plan.ms))}; "
              f"providers: {BASELINE}, {', '.join(plan.providers)}; x and y bf16, no bias",
              f"- quantrt tuning table: {tuning or 'none (nothing is tuned off CUDA)'}",
              "- method: each call touches its own copy of W and x (copies of a call set exceed twice the L2 cache); "
              "the calls are captured in a CUDA graph whose replay is timed by the median of "
              "triton.testing.do_bench (timing 'graph'; 'launch' where capture failed; 'cpu' on CPU). "
              "bytes = the format's stored weight + x + y; floor = max(bytes / bandwidth, 2MNK / matmul rate); "
              "'% of floor' = floor / time (a read-mostly kernel can pass 100% of a floor counted from a copy's "
              "bandwidth). rel. err = ||y - x W^T|| / ||x W^T|| against the dequantized weight "
              "in float32.",
              "", "## Speed targets (issue 3), quantrt", "",
              targets_table(targets),
              "", "## Speed-up over bf16 torch.mm", "",
              format_table(*speedup_pivot(rows, plan.ms)),
              "", "## All points", "",
              format_table(TABLE_HEADERS, [table_row(r) for r in rows]),
              "", f"Plot: `{plot.name}`" if plot else f"Plot: none, {PLOT_MISSING}"]
    failed = [r for r in rows if r.note.startswith("FAILED")]
    if failed:
        lines += ["", f"{len(failed)} points FAILED (see the note column)."]
    markdown = write_text(stem.with_suffix(".md"), lines)
    csv_path = csv_log.path
    echo("\n" + targets_table(targets))
    if plot is None:
        echo(PLOT_MISSING)
    echo(f"wrote {markdown}, {csv_path}" + (f", {plot}" if plot else ""))
    return Outputs(markdown, csv_path, plot, rows, targets)


def main(argv: Sequence[str] | None = None, prog: str = "python benchmarks/bench_kernels.py") -> int:
    """`python benchmarks/bench_kernels.py`: the same as `quantrt bench kernels`."""
    return script_main(sys.modules[__name__], argv, prog)