"""The GPU check in one command (`quantrt bench check`, `python benchmarks/gpu_check.py`), sized for a short
visit to a GPU machine. Four steps, in this order, each writing its rows to the markdown and CSV files as
it goes (a run cut short still leaves every number it measured), each bounded by a share of one time
budget (`--budget-s`, default 450 s) and skipped with a note where the budget left cannot fit it:

1. precompile: `quantrt.kernels.variants.compile_all(device="cuda", processes=os.cpu_count())` compiles
   every kernel variant the tuner can pick, in parallel, into Triton's cache, so that the later steps do
   not compile one variant at a time; "not available" where the kernels have no such function.
2. parity: every weight-only format (int8 per channel and per group of 128; uint1..uint7 per group of 64
   and int4 = uint4 per group of 128; fp3..fp7; fp8 e4m3 and e5m2 per channel, e4m3 per tensor), x in
   bf16 and fp16, N x K = 3088 x 2048 (N not a multiple of 64), M 1, 16, 64, 4608 and then 7, 333, through
   the kernel functions (int8_linear, uintx_linear, floatx_linear, fp8_linear) with each path of the
   kernels' PATHS forced where it applies (gemv M <= 64, gemm M >= 16, dequant M >= 128) and with no path
   (the op's tuned pick, tuned into a private table). Reference: x.double() @ W.double().T + bias, W from
   the format's own dequantizer (kernels/quantize.py). A case passes when the output is finite and
   |y - ref| <= tol * (1 + |ref|) everywhere, tol per x dtype (TOLERANCE). Triton compiles a kernel per
   divisibility of its integer arguments, so the cases run cheapest first (`parity_blocks`): the M values,
   N, K and K / group of the precompiled variants before those that compile at every call.
3. compile: torch.compile(fullgraph=True, dynamic=False) of nn.Sequential(nn.Linear) quantized by
   QuantizedTransformer.from_model(QuantConfig(scheme, backend="triton")): int8wo, float8wo_e4m3 and
   int4wo at M 1 and 4608, then fp6_e3m2 and uint3wo at M 1, each after one eager call (which tunes;
   the parity step's picks serve: same shape): no graph break, one graph, a quantrt Triton kernel in
   Inductor's code (on CUDA), the compiled output within tolerance of eager and of the float64 reference.
   Then the same layer packaged ahead of time (quantrt.aot: torch.export + AOTInductor, weights left out and
   bound from the layer; int8wo and int4wo at M 16): a quantrt Triton kernel in the package (on CUDA), its
   output within tolerance of eager and of the float64 reference.
4. speed: bf16 torch.mm (cuBLAS) against quantrt int8wo (per channel), float8wo_e4m3 (per channel) and
   int4wo (uint4, group 128), each the op's own tuned pick, torchao's int8 and fp8 weight-only, and
   torch's own int4 kernel (torch._weight_int4pack_mm), on 8192x8192, 3072x3072, 12288x3072 and
   3072x15360 at M 1, 16, 4608, timed as `quantrt bench kernels` times
   (quantrt.bench.kernels.run_kernels: weights and inputs rotated beyond L2, CUDA-graph replays, do_bench
   medians, the measured roofline). Then the speed targets (quantrt.bench.kernels.check_targets): at M <= 16
   on 8192x8192 int4wo >= 3.5x and int8wo >= 1.85x of bf16 at >= 85% of the HBM floor; every format >= 0.95x
   of bf16 at M >= 1024; >= 0.97x on FLUX.1-dev's shapes at M = 4608.

How the budget is shared: each step has a planned duration and a minimum (GPU_PLAN). A step may use the
budget left minus the planned durations of the steps after it, never less than its own minimum and never
so much that a later step loses its minimum; a step whose minimum does not fit is skipped. Inside a step the
cases stop at that cap (a note counts the cases not run), and SIGALRM ends a single call that runs on
HARD_STOP_GRACE_S past it (a tuning miss that compiles, say).

Exit code 1 when a parity or compile check failed (quantrt's speed rows count too where their output is
off: rel. err above SPEED_REL_ERROR); speed targets are reported, never failed.

--cpu-smoke (automatic without CUDA): the same steps on tiny shapes, x in fp16 and fp32 (the Triton
interpreter gets bf16 wrong), the kernels through Triton's interpreter (TRITON_INTERPRET=1, set here
before the kernels are imported), results in a temporary folder unless --out-dir. It checks the check,
not the kernels' speed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import math
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import triton

from ..aot import build_package, inductor_configs, load_package
from ..config import QuantConfig
from ..formats import ATEN_INT4_KERNEL
from ..kernels import quantize, tuning
from ..kernels.packing import unpack_uintx
from ..metrics import relative_error
from ..tables import format_table
from ..transformer import QuantizedTransformer
from .common import (DEFAULT_REP_MS, DEFAULT_WARMUP_MS, Run, measure_roofline, pick_device, private_tuning_table,
                     script_main, smoke_threads, stored_bytes)
from .kernels import (BASELINE, TABLE_HEADERS, Built, Plan, ProviderSkip, build_quantrt, build_torchao, check_targets,
                      run_kernels, table_row)
from .kernels import Row as KernelRow
from .report import (CsvLog, MarkdownLog, TargetResult, cell, csv_headers, device_title, dtype_name, error_text,
                     markdown_text)

# The Triton kernel modules (quantrt.kernels.matmul, autotune, int8, uintx, floatx, variants) are imported by the
# functions that use them, never above: triton.jit decides at import whether a kernel runs in the interpreter,
# which `enable_interpreter` turns on only once the arguments are parsed, and a kernel module that does not
# import is what the parity step reports, not a reason for the check not to start.

STEPS = ("precompile", "parity", "compile", "speed")
KERNELS_PACKAGE = f"{__package__.rpartition('.')[0]}.kernels"  # quantrt.kernels, as this checkout is imported


@dataclass(frozen=True)
class StepPlan:
    """A step's share of the budget: what it is expected to take, and below what it is not worth starting."""

    planned_s: float
    min_s: float


# Estimates for an H100/H200 from a cold machine, kernels precompiled (benchmarks/GPU_SESSION.md has the
# arithmetic); the smoke run's are generous, it is bounded by its tiny shapes
GPU_PLAN = {"precompile": StepPlan(90, 20), "parity": StepPlan(140, 40), "compile": StepPlan(60, 20),
            "speed": StepPlan(150, 60)}
SMOKE_PLAN = {"precompile": StepPlan(10, 1), "parity": StepPlan(60, 5), "compile": StepPlan(40, 5),
              "speed": StepPlan(20, 2)}
SUMMARY_RESERVE_S = 10  # kept back from every step for the summary and the files
HARD_STOP_GRACE_S = 20
DEFAULT_BUDGET_S = 450

# |y - ref| <= tol * (1 + |ref|) against the float64 reference, outputs O(1): about 10x the rounding of
# the weight to x's dtype for tl.dot plus the output's rounding
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
# quantrt's timed points are checked too (large shapes): relative L2 error against the float32 reference
SPEED_REL_ERROR = 2e-2


@dataclass(frozen=True)
class FormatCase:
    """One weight-only storage format as the kernel functions take it."""

    label: str  # "int4-g128", "fp6_e3m2", "fp8_e4m3-tensor"
    family: str  # "int8", "uintx", "floatx", "fp8"
    bits: int = 8
    group_size: int | None = None  # None: one scale per output channel
    ebits: int = 0
    mbits: int = 0
    fp8: str = ""  # "e4m3" or "e5m2"
    per_tensor: bool = False


def _floatx(ebits: int, mbits: int) -> FormatCase:
    return FormatCase(f"fp{1 + ebits + mbits}_e{ebits}m{mbits}", "floatx", 1 + ebits + mbits, None, ebits, mbits)


# in order of need: what serving uses most first, so that a run cut short has checked those
FORMATS = (FormatCase("int4-g128", "uintx", 4, 128), FormatCase("int8", "int8"),
           FormatCase("fp8_e4m3", "fp8", fp8="e4m3"), FormatCase("int8-g128", "int8", group_size=128),
           FormatCase("fp8_e5m2", "fp8", fp8="e5m2"), FormatCase("fp8_e4m3-tensor", "fp8", fp8="e4m3", per_tensor=True),
           _floatx(3, 2), _floatx(2, 1), *(FormatCase(f"uint{b}-g64", "uintx", b, 64) for b in (3, 2, 1, 4, 5, 6, 7)),
           _floatx(1, 1), _floatx(2, 2), _floatx(2, 3), _floatx(3, 3), _floatx(5, 1))
FORMATS_BY_LABEL = {f.label: f for f in FORMATS}


@dataclass(frozen=True)
class ParityPlan:
    """The parity grid. Triton compiles a kernel per divisibility of its integer arguments (by 16, or == 1),
    so `ms` are the M values whose kernels the precompile step compiled (M 1, 16, 64, 4608, with N, K
    and K / group size multiples of 16 as in quantrt.kernels.variants), checked first; `odd_ms` compile
    one variant per call and come after."""

    n: int
    k: int
    ms: tuple[int, ...]
    odd_ms: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]  # the first is the one whose every tuning candidate is precompiled
    # the M range (first, last or None) where a forced path is checked
    path_ms: dict[str, tuple[int, int | None]]


# N = 3088 = 48 * 64 + 16: partial tiles for every BLOCK_N above 16; K / 64 and K / 128 multiples of 16
GPU_PARITY = ParityPlan(3088, 2048, (1, 16, 64, 4608), (7, 333), (torch.bfloat16, torch.float16),
                        {"gemv": (1, 64), "gemm": (16, None), "dequant": (128, None)})
# the interpreter's CPU configs have 32-wide N tiles and 64-wide K tiles: N = 40 ends in a partial tile, K =
# 128 holds two groups of 64; dequant from M 16 so that a smoke run reaches it
SMOKE_PARITY = ParityPlan(40, 128, (1, 16), (7,), (torch.float16, torch.float32),
                          {"gemv": (1, 64), "gemm": (16, None), "dequant": (16, None)})
WANTED_PATHS = ("gemv", "gemm", "dequant")


@dataclass(frozen=True)
class CompilePlan:
    n: int
    k: int
    dtype: torch.dtype
    cases: tuple[tuple[str, int], ...]  # (scheme, M), in order of need


# the parity step's shape and M buckets: where it tuned, its picks serve the eager calls here too. int4wo
# after int8wo and float8wo_e4m3: a tuning miss of a format whose variants were not precompiled compiles
# every candidate
GPU_COMPILE = CompilePlan(3088, 2048, torch.bfloat16,
                          tuple((s, m) for m in (1, 4608) for s in ("int8wo", "float8wo_e4m3", "int4wo"))
                          + (("fp6_e3m2", 1), ("uint3wo", 1)))
SMOKE_COMPILE = CompilePlan(40, 128, torch.float16, (("int8wo", 7), ("float8wo_e4m3", 7), ("int4wo", 7)))
# the AOT packages checked after the torch.compile cases: (scheme, M), each one AOTInductor build
GPU_AOT = (("int8wo", 16), ("int4wo", 16))
SMOKE_AOT = (("int8wo", 7),)


@dataclass(frozen=True)
class SpeedPlan:
    shapes: tuple[tuple[int, int], ...]
    ms: tuple[int, ...]
    target_shapes: tuple[tuple[int, int], ...]  # where the small-M targets are judged


# per shape in this order: int4wo last, its tuning misses compile every candidate where its variants (group
# size 128) were not precompiled
SPEED_FORMATS = ("int8wo", "float8wo_e4m3", "int4wo")
SPEED_PROVIDERS = ("quantrt", "torchao", "torch-int4")
# 8192x8192 first: the small-M targets; the FLUX shapes after it share their kernels' specialization
GPU_SPEED = SpeedPlan(((8192, 8192), (3072, 3072), (12288, 3072), (3072, 15360)), (1, 16, 4608), ((8192, 8192),))
SMOKE_SPEED = SpeedPlan(((96, 256),), (1, 16), ((96, 256),))


@dataclass
class CheckRow:
    """One line of the CSV: a precompiled variant, a parity case, a compile check, a timed point or a target."""

    step: str  # precompile, parity, compile, speed, target
    check: str = ""  # parity: forced / tuned; speed: the provider
    format: str = ""
    dtype: str = ""
    path: str = ""
    n: int | None = None
    k: int | None = None
    m: int | None = None
    kernel: str = ""
    status: str = ""  # ok, FAIL, skipped, met, NOT met, ...
    error_ratio: float | None = None  # max |y - ref| / (tol * (1 + |ref|)) against float64: <= 1 passes
    eager_error_ratio: float | None = None  # compile: the same ratio of compiled against eager
    rel_error: float | None = None
    graph_breaks: int | None = None
    graphs: int | None = None
    seconds: float | None = None
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    speedup: float | None = None
    floor_fraction: float | None = None
    hbm_fraction: float | None = None
    timing: str = ""
    note: str = ""


CSV_HEADERS = csv_headers(CheckRow)


@dataclass
class StepResult:
    name: str
    status: str  # ok, FAILED, cut short, skipped, not available
    seconds: float = 0.0
    cap_s: float | None = None
    failures: list[str] = field(default_factory=list)  # failing parity / compile checks
    detail: str = ""
    targets: list[TargetResult] = field(default_factory=list)  # the speed step's


@dataclass
class CheckOutputs:
    """What a check run wrote; `failures` (failing parity and compile checks) decides the exit code."""

    markdown: Path
    csv: Path
    steps: list[StepResult]

    @property
    def failures(self) -> list[str]:
        return [f for step in self.steps for f in step.failures]


class StepTimeout(BaseException):
    """A step ran past its time cap. A BaseException, so that the `except Exception` of a kernel's tuner or
    of a benchmark point does not swallow it."""


@contextlib.contextmanager
def hard_stop(seconds: float) -> Iterator[None]:
    """Raise StepTimeout in the main thread after `seconds` (SIGALRM); nothing where there is no SIGALRM or
    this is not the main thread (the step's own checks between cases still stop it)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise StepTimeout(f"hard stop after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Budget:
    """The run's time budget, shared out among the selected steps (see the module docstring)."""

    def __init__(self, total_s: float, plan: dict[str, StepPlan], steps: Sequence[str], started: float):
        self.total_s, self.plan, self.steps = total_s, plan, list(steps)
        self.deadline = started + total_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def cap(self, step: str) -> float:
        """Seconds `step` may use now (below its plan's min_s: skip it)."""
        later = self.steps[self.steps.index(step) + 1:]
        free = self.left() - SUMMARY_RESERVE_S
        give = free - sum(self.plan[s].planned_s for s in later)
        most = free - sum(self.plan[s].min_s for s in later)
        return min(max(give, self.plan[step].min_s), most)


@dataclass
class CheckContext:
    """What every step writes to and reads from."""

    device: torch.device
    smoke: bool
    markdown: MarkdownLog
    csv: CsvLog
    echo: Callable[[str], None]
    args: argparse.Namespace
    deadline: float = math.inf  # the running step's cap, on time.monotonic()

    def out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline

    def record(self, row: CheckRow) -> None:
        self.csv.write(row)


def kernel_paths() -> tuple[str, ...]:
    """The kernels' forced paths (quantrt.kernels.matmul.PATHS)."""
    from ..kernels import matmul  # Triton kernels: imported late (note at the imports)

    return tuple(matmul.PATHS)


def kernels_interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (quantrt.kernels.matmul.interpreting)."""
    from ..kernels import matmul  # Triton kernels: imported late (note at the imports)

    return matmul.interpreting()


def kernels_source_hash() -> str:
    """The hash of the kernels' source that keys the tuning table: which kernels these results are of."""
    try:
        from ..kernels import autotune  # Triton kernels: imported late (note at the imports)
    except Exception as e:  # a kernel module that does not import: the parity step reports it
        return f"unknown ({error_text(e)})"
    return autotune.SOURCE_HASH


def enable_interpreter() -> None:
    """Off CUDA the kernels run in Triton's interpreter, which must be on before they are imported."""
    if f"{KERNELS_PACKAGE}.matmul" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def kernels_unavailable_reason(device: torch.device) -> tuple[str | None, bool]:
    """(why the kernels cannot be checked here, whether that is itself a failure) or (None, False)."""
    try:
        for name in ("int8", "uintx", "floatx"):  # the modules of the kernel functions the steps call
            importlib.import_module(f"{KERNELS_PACKAGE}.{name}")
        from ..kernels import matmul as module  # Triton kernels: imported late (note at the imports)
    except Exception as e:  # a kernel module that does not import is what this check is for
        return f"the kernels do not import: {type(e).__name__}: {e}", True
    if device.type != "cuda" and not module.interpreting():
        why = module.interpreter_mismatch() or "TRITON_INTERPRET=1 is not set"
        return f"no CUDA and the Triton interpreter is off ({why})", False
    return None, False


def tolerance_ratio(y: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """How far y is from ref against the tolerance: max |y - ref| / (tol * (1 + |ref|)), so <= 1 passes; inf
    where y is not finite."""
    if y.numel() == 0:
        return 0.0
    y = y.double()
    if not bool(torch.isfinite(y).all()):
        return math.inf
    return float(((y - ref).abs() / (tol * (1 + ref.abs()))).max())



@dataclass
class QuantizedWeight:
    """A format's stored tensors for one weight, the kernel call, and the float32 weight they decode to."""

    case: FormatCase
    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    dequantized: torch.Tensor  # float32 [N, K]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, path: str | None) -> torch.Tensor:
        # Triton kernels, imported late (note at the imports); their functions are looked up at call time, so
        # that a test can swap one for a broken one
        from ..kernels import floatx, int8, uintx

        c = self.case
        if c.family == "int8":
            return int8.int8_linear(x, self.qweight, self.scale, bias, path=path)
        if c.family == "uintx":
            return uintx.uintx_linear(x, self.qweight, self.scale, self.zero, bias, c.bits, path=path)
        if c.family == "floatx":
            return floatx.floatx_linear(x, self.qweight, self.scale, bias, c.ebits, c.mbits, path=path)
        return floatx.fp8_linear(x, self.qweight, self.scale, bias, c.fp8, path=path)


def quantize_case(case: FormatCase, w: torch.Tensor) -> QuantizedWeight:
    """w [N, K] in the activation dtype -> its stored format (kernels/quantize.py), scales in w's dtype."""
    n, k = w.shape
    if case.family == "int8":
        q, s = quantize.quantize_int8(w, case.group_size)
        return QuantizedWeight(case, q, s, None, quantize.dequantize_int8(q, s))
    if case.family == "uintx":
        q, s, z = quantize.quantize_uintx(w, case.bits, case.group_size)
        return QuantizedWeight(case, q, s, z, quantize.dequantize_uintx(q, s, z, case.bits, k))
    if case.family == "floatx":
        q, s = quantize.quantize_floatx(w, case.ebits, case.mbits)
        return QuantizedWeight(case, q, s, None, quantize.dequantize_floatx(q, s, case.ebits, case.mbits, k))
    q, s = quantize.quantize_fp8(w, case.fp8, per_tensor=case.per_tensor)
    return QuantizedWeight(case, q, s, None, quantize.dequantize_fp8(q, s))


@dataclass(frozen=True)
class ParityCase:
    kind: str  # "forced" (path given) or "tuned" (no path)
    format: FormatCase
    dtype: torch.dtype
    m: int
    path: str | None


@dataclass(frozen=True)
class ParityBlock:
    """A run of parity cases: one kind, dtypes, M values and formats, format-major within each dtype."""

    kind: str  # "forced" or "tuned"
    dtypes: tuple[torch.dtype, ...]
    ms: tuple[int, ...]
    formats: tuple[FormatCase, ...]
    cheapest_first: bool = False  # formats ordered by the first block's time for them (precompiled first)


ODD_M_FIRST_FORMATS = 3  # partial M tiles early: the top formats' forced paths at the odd M values


def parity_blocks(formats: Sequence[FormatCase], plan: ParityPlan) -> list[ParityBlock]:
    """The parity grid in the order it runs, so that a run cut short has checked what matters most for the
    time it had. In the first dtype (bf16 on a GPU, what serving runs): the forced paths at the precompiled
    M values (their kernels load from Triton's cache where the precompile covered them); the forced paths at
    the odd M values for the first formats (the only partial M tiles: M values that are multiples of the
    tiles have none); the tuned picks at the precompiled M values (a tuning miss benchmarks every
    candidate: cheap where they are precompiled, a compile each where not, hence the formats in the order
    of the first block's time for them). Then the other dtypes' forced paths, the remaining odd M values,
    and what compiles most: the tuned picks in the other dtypes and at the odd M values."""
    formats, first, others = tuple(formats), plan.dtypes[:1], plan.dtypes[1:]
    top, rest = formats[:ODD_M_FIRST_FORMATS], formats[ODD_M_FIRST_FORMATS:]
    blocks = [ParityBlock("forced", first, plan.ms, formats),
              ParityBlock("forced", first, plan.odd_ms, top),
              ParityBlock("tuned", first, plan.ms, formats, cheapest_first=True),
              ParityBlock("forced", others, plan.ms, formats),
              ParityBlock("forced", first, plan.odd_ms, rest),
              ParityBlock("forced", others, plan.odd_ms, formats),
              ParityBlock("tuned", others, plan.ms, formats, cheapest_first=True),
              ParityBlock("tuned", plan.dtypes, plan.odd_ms, formats, cheapest_first=True)]
    return [b for b in blocks if b.dtypes and b.ms and b.formats]


def block_cases(block: ParityBlock, plan: ParityPlan, paths: Sequence[str],
                formats: Sequence[FormatCase] | None = None) -> list[ParityCase]:
    """The cases of `block` (its formats in the order `formats` gives, if given)."""
    def applies(path: str, m: int) -> bool:
        first, last = plan.path_ms[path]
        return m >= first and (last is None or m <= last)

    known = [p for p in paths if p in plan.path_ms]
    cases = []
    for dtype in block.dtypes:
        for fmt in formats or block.formats:
            for m in block.ms:
                if block.kind == "tuned":
                    cases.append(ParityCase("tuned", fmt, dtype, m, None))
                else:
                    cases += [ParityCase("forced", fmt, dtype, m, p) for p in known if applies(p, m)]
    return cases


def parity_cases(formats: Sequence[FormatCase], plan: ParityPlan, paths: Sequence[str]) -> list[ParityCase]:
    """Every case of the grid (in the blocks' order, each block's formats as given)."""
    return [case for block in parity_blocks(formats, plan) for case in block_cases(block, plan, paths)]


def _tuning_entries(device: torch.device) -> dict[str, dict]:
    if device.type != "cuda":
        return {}
    return tuning.default_table().entries()


def _describe_config(config: dict) -> str:
    tile = f"{config.get('block_m')}x{config.get('block_n')}x{config.get('block_k')}"
    return f"{config.get('path')} {tile} w{config.get('num_warps')} s{config.get('num_stages')}"


def step_precompile(ctx: CheckContext, result: StepResult) -> None:
    try:
        from ..kernels import variants  # Triton kernels: imported late (note at the imports)
    except Exception as e:  # a variants module that does not import: said, and the check goes on
        ctx.markdown.write("", f"precompile: not available (quantrt.kernels.variants does not import: {error_text(e)})")
        ctx.record(CheckRow("precompile", status="not available", note=error_text(e)))
        result.status, result.detail = "not available", error_text(e)
        return
    compile_all = getattr(variants, "compile_all", None)
    if compile_all is None:
        why = "quantrt.kernels.variants has no compile_all"
        ctx.markdown.write("", f"precompile: not available ({why}); kernels compile on first use in the steps below")
        ctx.record(CheckRow("precompile", status="not available", note=why))
        result.status, result.detail = "not available", why
        return
    if ctx.device.type != "cuda" and kernels_interpreted():
        why = "the kernels run in Triton's interpreter here: there is nothing to compile"
        ctx.markdown.write("", f"precompile: skipped ({why}; compile_all is there)")
        ctx.record(CheckRow("precompile", status="skipped", note=why))
        result.status, result.detail = "skipped", why
        return
    processes = os.cpu_count() or 1
    device = str(ctx.device)
    ctx.echo(f"precompile: compile_all(device={device!r}, processes={processes})")
    start = time.perf_counter()
    try:
        variants_done = compile_all(device=device, processes=processes)
    except Exception as e:  # reported; the kernels then compile lazily in the later steps
        wall = time.perf_counter() - start
        ctx.markdown.write("", f"precompile: compile_all FAILED after {wall:.1f} s: {error_text(e)}")
        ctx.record(CheckRow("precompile", status="FAILED", seconds=wall, note=error_text(e)))
        result.status, result.detail = "FAILED", error_text(e)
        return
    wall = time.perf_counter() - start
    entries = [v if isinstance(v, dict) else {"variant": repr(v)} for v in (variants_done or [])]
    errors = 0
    for entry in entries:
        error = entry.get("error")
        errors += bool(error)
        note = "; ".join(f"{k}={v}" for k, v in entry.items() if k not in ("variant", "seconds") and v is not None)
        seconds = entry.get("seconds")
        ctx.record(CheckRow("precompile", format=str(entry.get("variant", "")), status="FAILED" if error else "ok",
                            seconds=float(seconds) if isinstance(seconds, (int, float)) else None, note=note))
    total = sum(float(e["seconds"]) for e in entries if isinstance(e.get("seconds"), (int, float)))
    ctx.markdown.write("", f"compile_all: {len(entries)} variants in {wall:.1f} s wall with {processes} processes "
                           f"(their own seconds add up to {total:.1f} s); {errors} reported an error.")
    slowest = sorted((e for e in entries if isinstance(e.get("seconds"), (int, float))),
                     key=lambda e: -float(e["seconds"]))[:10]
    if slowest:
        ctx.markdown.table(["slowest variants", "seconds"])
        for entry in slowest:
            ctx.markdown.row([entry.get("variant", ""), f"{float(entry['seconds']):.2f}"])
    failed = [e for e in entries if e.get("error")]
    if failed:
        ctx.markdown.table(["variants that did not compile", "error"])
        for entry in failed[:20]:
            ctx.markdown.row([entry.get("variant", ""), str(entry["error"])[:300]])
    result.detail = f"{len(entries)} variants, {wall:.1f} s wall, {errors} errors"


def _kernels_unavailable(ctx: CheckContext, result: StepResult, step: str) -> bool:
    """Record that `step` cannot check the kernels here (a failure where they do not import, else a skip);
    False where they can be checked."""
    reason, is_failure = kernels_unavailable_reason(ctx.device)
    if not reason:
        return False
    ctx.markdown.write("", f"{step}: not checked: {reason}")
    ctx.record(CheckRow(step, status="FAIL" if is_failure else "skipped", note=reason))
    result.status, result.detail = ("FAILED" if is_failure else "skipped"), reason
    if is_failure:
        result.failures.append(f"{step}: {reason}")
    return True


def step_parity(ctx: CheckContext, result: StepResult) -> None:
    if _kernels_unavailable(ctx, result, "parity"):
        return
    plan = SMOKE_PARITY if ctx.smoke else GPU_PARITY
    formats = ctx.args.parity_formats
    paths = kernel_paths()
    notes = [f"path {p} is not in the kernels' PATHS {paths}: not checked" for p in WANTED_PATHS if p not in paths]
    notes += [f"path {p} of the kernels' PATHS has no M range in this check: not checked"
              for p in paths if p not in plan.path_ms]
    ranges = ", ".join(f"{p} M {lo}..{hi or ''}" for p, (lo, hi) in plan.path_ms.items() if p in paths)
    autotune_off = os.environ.get("QUANTRT_AUTOTUNE") == "0"
    tuned_how = ("the heuristic config (QUANTRT_AUTOTUNE=0)" if autotune_off else
                 "the tuned pick (candidates benchmarked on a miss, into the run's private tuning table)"
                 if ctx.device.type == "cuda" else "the heuristic config (nothing is tuned off CUDA)")
    ctx.markdown.write(
        "", f"N x K = {plan.n} x {plan.k}, bias, M in {', '.join(map(str, plan.ms))} first (on CUDA the M values of "
            f"the precompiled variants), then {', '.join(map(str, plan.odd_ms))} (a compile per variant), x in "
            f"{' and '.join(dtype_name(d) for d in plan.dtypes)}. forced: each path of the kernels' PATHS "
            f"({', '.join(paths)}) where it applies ({ranges}); tuned: no path, {tuned_how}. Reference: "
            "x.double() @ W.double().T + bias, W the format's own dequantizer. Pass: finite and "
            "|y - ref| <= tol * (1 + |ref|); err/tol = the largest ratio (<= 1 passes); tol: "
            + ", ".join(f"{dtype_name(d)} {t:g}" for d, t in TOLERANCE.items() if d in plan.dtypes) + ".",
        *(f"- note: {n}" for n in notes))
    blocks = parity_blocks(formats, plan)
    total = sum(len(block_cases(b, plan, paths)) for b in blocks)
    ctx.markdown.write("", "Order (what a cut-short run has checked): " + "; ".join(
        f"{b.kind} {'/'.join(dtype_name(d) for d in b.dtypes)} M {','.join(map(str, b.ms))} "
        + (f"({len(b.formats)} formats, the fastest in the first block first)" if b.cheapest_first
           else f"({', '.join(f.label for f in b.formats)})" if len(b.formats) <= ODD_M_FIRST_FORMATS
           else f"({len(b.formats)} formats)") for b in blocks) + ".")
    ctx.markdown.table(["pass", "format", "x dtype", "M", "paths", "cases", "failed", "worst err/tol",
                        "worst rel. err", "seconds"])
    failures: list[list[str]] = []
    run_count = 0
    first_block_seconds: dict[FormatCase, float] = {}
    try:
        for index, block in enumerate(blocks):
            order = (sorted(block.formats, key=lambda f: first_block_seconds.get(f, math.inf))
                     if block.cheapest_first else block.formats)
            cases = block_cases(block, plan, paths, order)
            for (kind, fmt, dtype), unit in itertools.groupby(cases, key=lambda c: (c.kind, c.format, c.dtype)):
                unit = list(unit)
                if ctx.out_of_time():
                    return
                start = time.perf_counter()
                done: list[tuple[bool, float, float]] = []
                try:
                    for case in unit:
                        if ctx.out_of_time():
                            break
                        done.append(_parity_case(ctx, plan, case, failures))
                finally:
                    run_count += len(done)
                    seconds = time.perf_counter() - start
                    if index == 0:
                        first_block_seconds[fmt] = first_block_seconds.get(fmt, 0.0) + seconds
                    if done:
                        bad = sum(not ok for ok, _, _ in done)
                        worst_ratio = max(r for _, r, _ in done)
                        worst_rel = max(e for _, _, e in done)
                        unit_paths = ", ".join(dict.fromkeys(c.path or "tuned" for c in unit[:len(done)]))
                        unit_ms = ",".join(str(m) for m in dict.fromkeys(c.m for c in unit[:len(done)]))
                        ctx.markdown.row([kind, fmt.label, dtype_name(dtype), unit_ms, unit_paths, len(done), bad,
                                          cell(worst_ratio), cell(worst_rel, 2), f"{seconds:.1f}"])
                        ctx.echo(f"parity {kind:6} {fmt.label:16} {dtype_name(dtype):9} M {unit_ms:12} "
                                 f"{len(done) - bad}/{len(done)} pass, worst err/tol {cell(worst_ratio)}, "
                                 f"{seconds:.1f} s")
    finally:
        _weights_cache.clear()  # the last format's weights and float64 references: GPU memory for the next steps
        not_run = total - run_count
        ctx.markdown.write("", f"{run_count} of {total} cases run, {len(failures)} failed"
                               + (f", {not_run} not run (time budget)" if not_run else "") + ".")
        if failures:
            ctx.markdown.write("", "### Parity failures")
            ctx.markdown.table(["pass", "format", "x dtype", "M", "path", "why"])
            for row in failures[:200]:
                ctx.markdown.row(row)
        result.failures += [f"parity {' '.join(map(str, row[:5]))}: {row[5]}" for row in failures]
        result.detail = (f"{run_count}/{total} cases, {len(failures)} failed"
                         + (f", {not_run} not run" if not_run else ""))
        if failures:
            result.status = "FAILED"
        elif not_run:
            result.status = "cut short"


def _parity_case(ctx: CheckContext, plan: ParityPlan, case: ParityCase,
                 failures: list[list[str]]) -> tuple[bool, float, float]:
    """Run one case, write its CSV row; (passed, err/tol, rel. err)."""
    weights = _parity_weights(ctx.device, plan, case.format, case.dtype)
    x, ref = weights.input(case.m)
    tol = TOLERANCE[case.dtype]
    kernel = "forced path" if case.path else ""
    before = _tuning_entries(ctx.device) if case.path is None else {}
    try:
        y = weights.quantized.linear(x, weights.bias, case.path)
        if case.path is None:
            picks = [v for key, v in _tuning_entries(ctx.device).items() if key not in before]
            kernel = (f"tuned: {_describe_config(picks[0])}" if picks else
                      "table pick or heuristic" if ctx.device.type == "cuda" else "heuristic (off CUDA)")
        if tuple(y.shape) != tuple(ref.shape) or y.dtype != x.dtype:
            raise AssertionError(f"output {y.dtype} {tuple(y.shape)}, expected {x.dtype} {tuple(ref.shape)}")
        ratio, rel = tolerance_ratio(y, ref, tol), relative_error(y, ref)
        ok = ratio <= 1
        why = "" if ok else ("non-finite output" if math.isinf(ratio) else f"err/tol {ratio:.3g}, rel. err {rel:.2e}")
    except Exception as e:  # a kernel that does not compile or run fails its case; the sweep goes on
        ok, ratio, rel, why = False, math.inf, math.inf, error_text(e)
    path = case.path or "tuned"
    ctx.record(CheckRow("parity", case.kind, case.format.label, dtype_name(case.dtype), path, plan.n, plan.k, case.m,
                        kernel, "ok" if ok else "FAIL", ratio, rel, note=why))
    if not ok:
        failures.append([case.kind, case.format.label, dtype_name(case.dtype), str(case.m), path, why])
    return ok, ratio, rel


class _ParityWeights:
    """One format's weight, bias and inputs for one x dtype, seeded so that every pass sees the same data."""

    def __init__(self, device: torch.device, plan: ParityPlan, case: FormatCase, dtype: torch.dtype):
        self.device, self.plan, self.dtype = device, plan, dtype
        seed = FORMATS.index(case) if case in FORMATS else len(FORMATS)
        generator = torch.Generator(device=device).manual_seed(1000 + seed)
        w = torch.randn(plan.n, plan.k, device=device, generator=generator) / plan.k**0.5
        self.quantized = quantize_case(case, w.to(dtype))
        self.bias = (torch.randn(plan.n, device=device, generator=generator) * 0.1).to(dtype)
        self._weight = self.quantized.dequantized.double()  # [N, K]
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def input(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [m, K] in the dtype and its float64 reference output [m, N]."""
        if m not in self._inputs:
            generator = torch.Generator(device=self.device).manual_seed(m)
            x = torch.randn(m, self.plan.k, device=self.device, generator=generator).to(self.dtype)
            self._inputs = {m: (x, x.double() @ self._weight.T + self.bias.double())}  # one M at a time
        return self._inputs[m]


_weights_cache: dict[tuple, _ParityWeights] = {}


def _parity_weights(device: torch.device, plan: ParityPlan, case: FormatCase, dtype: torch.dtype) -> _ParityWeights:
    key = (device, plan.n, plan.k, case, dtype)
    if key not in _weights_cache:
        _weights_cache.clear()  # one (format, dtype) at a time: the cases come grouped
        _weights_cache[key] = _ParityWeights(device, plan, case, dtype)
    return _weights_cache[key]


def _kernel_names_in(code: str) -> list[str]:
    """The quantrt Triton kernels (jit functions named *kernel* in quantrt.kernels) that `code` mentions."""
    names = set()
    for name, module in list(sys.modules.items()):
        if name.startswith(f"{KERNELS_PACKAGE}.") and module is not None:
            names.update(attr for attr, value in vars(module).items()
                         if isinstance(value, triton.runtime.jit.JITFunction) and "kernel" in attr)
    return sorted(n for n in names if n in code)


def step_compile(ctx: CheckContext, result: StepResult) -> None:
    if _kernels_unavailable(ctx, result, "compile"):
        return
    plan = SMOKE_COMPILE if ctx.smoke else GPU_COMPILE
    mode = ctx.args.compile_mode
    need_kernel = ctx.device.type == "cuda"  # off CUDA the traced op is the pure-torch reference
    ctx.markdown.write(
        "", f"torch.compile(fullgraph=True, dynamic=False, mode={mode!r}) of nn.Sequential(nn.Linear({plan.k}, "
            f"{plan.n})) quantized with QuantConfig(scheme, backend=\"triton\"), x {dtype_name(plan.dtype)}; one "
            "eager call first (it tunes on a miss; a trace never tunes). Pass: no graph break, one graph, "
            + ("a quantrt Triton kernel in Inductor's code, " if need_kernel else "")
            + "the compiled output within tolerance of eager and of the float64 reference (err/tol <= 1).")
    ctx.markdown.table(["scheme", "M", "graph breaks", "graphs", "kernels in Inductor code", "err/tol vs eager",
                        "err/tol vs float64", "compile s", "result"])
    done = 0
    cases = [(scheme, m, "torch.compile") for scheme, m in plan.cases]
    cases += [(scheme, m, "aot package") for scheme, m in (SMOKE_AOT if ctx.smoke else GPU_AOT)]
    try:
        for scheme, m, how in cases:
            if ctx.out_of_time():
                break
            if how == "aot package":
                row = _aot_case(ctx, plan, scheme, m, mode, need_kernel)
            else:
                row = _compile_case(ctx, plan, scheme, m, mode, need_kernel)
            done += 1
            ctx.record(row)
            ctx.markdown.row([f"{scheme} ({how})" if how != "torch.compile" else scheme, m, cell(row.graph_breaks),
                              cell(row.graphs), row.kernel or "-", cell(row.eager_error_ratio), cell(row.error_ratio),
                              cell(row.seconds), row.status + (f": {row.note}" if row.note else "")])
            ctx.echo(f"compile {scheme:14} M={m:<5} {how:13} {row.status} {row.note}")
            if row.status != "ok":
                result.failures.append(f"compile {scheme} M={m} ({how}): {row.note}")
    finally:
        torch._dynamo.reset()
        not_run = len(cases) - done
        ctx.markdown.write("", f"{done} of {len(cases)} compile checks run, {len(result.failures)} failed"
                               + (f", {not_run} not run (time budget)" if not_run else "") + ".")
        result.detail = f"{done}/{len(cases)} checks, {len(result.failures)} failed"
        result.status = "FAILED" if result.failures else "cut short" if not_run else "ok"


def _quantized_linear(ctx: CheckContext, plan: CompilePlan, scheme: str,
                      m: int) -> tuple[QuantizedTransformer, torch.Tensor, torch.Tensor]:
    """nn.Sequential(nn.Linear(K, N)) quantized with `scheme` through the triton backend, an input x [m, K] and the
    float64 reference x @ W^T + b of its dequantized weight."""
    torch.manual_seed(m)
    model = nn.Sequential(nn.Linear(plan.k, plan.n)).to(device=ctx.device, dtype=plan.dtype)
    qt = QuantizedTransformer.from_model(model, QuantConfig(scheme, backend="triton"), progress=False)
    layer = next(iter(qt.quantized_layers().values()))
    x = torch.randn(m, plan.k, device=ctx.device, dtype=plan.dtype)
    return qt, x, x.double() @ layer.dequantize().double().T + layer.bias.double()


def _compile_case(ctx: CheckContext, plan: CompilePlan, scheme: str, m: int, mode: str,
                  need_kernel: bool) -> CheckRow:
    """One compile check, as its CSV row."""
    from torch._dynamo.utils import counters  # torch's compiler internals: only where a compile is checked
    from torch._inductor.utils import run_and_get_code

    row = CheckRow("compile", "torch.compile", scheme, dtype_name(plan.dtype), "", plan.n, plan.k, m)
    tol = TOLERANCE[plan.dtype]
    try:
        qt, x, ref = _quantized_linear(ctx, plan, scheme, m)
        with torch.no_grad():
            eager = qt.model(x)
            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(qt.model, fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)
            start = time.perf_counter()
            out, codes = run_and_get_code(compiled, x)
            row.seconds = time.perf_counter() - start
        row.graph_breaks = sum(counters["graph_break"].values())
        row.graphs = counters["stats"]["unique_graphs"]
        kernels = _kernel_names_in("\n".join(codes))
        row.kernel = ", ".join(kernels)
        row.eager_error_ratio = tolerance_ratio(out, eager.double(), tol)
        row.error_ratio = tolerance_ratio(out, ref, tol)
        row.rel_error = relative_error(out, ref)
        problems = []
        if row.graph_breaks:
            problems.append(f"{row.graph_breaks} graph breaks")
        if row.graphs != 1:
            problems.append(f"{row.graphs} graphs")
        if need_kernel and not kernels:
            problems.append("no quantrt Triton kernel in Inductor's code")
        if row.eager_error_ratio > 1:
            problems.append(f"compiled vs eager err/tol {row.eager_error_ratio:.3g}")
        if row.error_ratio > 1:
            problems.append(f"compiled vs float64 err/tol {row.error_ratio:.3g}")
        row.status, row.note = ("FAIL", "; ".join(problems)) if problems else ("ok", "")
    except Exception as e:  # a graph break under fullgraph=True raises; so does a kernel that fails
        row.status, row.note = "FAIL", error_text(e)
    return row


def _aot_case(ctx: CheckContext, plan: CompilePlan, scheme: str, m: int, mode: str, need_kernel: bool) -> CheckRow:
    """One AOT package check (quantrt.aot, as `warmup(aot=True)` builds them), as its CSV row."""
    row = CheckRow("compile", "aot package", scheme, dtype_name(plan.dtype), "", plan.n, plan.k, m)
    tol = TOLERANCE[plan.dtype]
    try:
        qt, x, ref = _quantized_linear(ctx, plan, scheme, m)
        with tempfile.TemporaryDirectory(prefix="quantrt-check-aot-") as folder, torch.no_grad():
            eager = qt.model(x)  # tunes on a miss, so that the package bakes the pick
            start = time.perf_counter()
            built = build_package(qt.model, (x,), {}, Path(folder), "check", inductor_configs(mode, None))
            out = load_package(qt.model, Path(folder), "check")(x)
            row.seconds = time.perf_counter() - start
            with zipfile.ZipFile(Path(folder) / built["package"]) as package:
                code = "\n".join(package.read(name).decode(errors="replace") for name in package.namelist()
                                 if name.endswith((".cpp", ".py", ".json", ".h")))
        row.kernel = ", ".join(_kernel_names_in(code))
        row.eager_error_ratio = tolerance_ratio(out, eager.double(), tol)
        row.error_ratio = tolerance_ratio(out, ref, tol)
        row.rel_error = relative_error(out, ref)
        problems = []
        if need_kernel and not row.kernel:
            problems.append("no quantrt Triton kernel in the package")
        if row.eager_error_ratio > 1:
            problems.append(f"package vs eager err/tol {row.eager_error_ratio:.3g}")
        if row.error_ratio > 1:
            problems.append(f"package vs float64 err/tol {row.error_ratio:.3g}")
        row.status, row.note = ("FAIL", "; ".join(problems)) if problems else ("ok", "")
    except Exception as e:  # an export or AOTInductor failure is what this case reports
        row.status, row.note = "FAIL", error_text(e)
    return row


def build_torch_int4(layers: list, device: torch.device) -> Built:
    """torch's own int4 kernel (tinygemm: torch._weight_int4pack_mm on CUDA, its _for_cpu twin off CUDA)
    from quantrt's int4 codes. tinygemm computes w = (q - 8) * scale + offset per group; quantrt stores
    w = (q - zero) * scale, so offset = (8 - zero) * scale."""
    scheme = layers[0].scheme
    if scheme.storage.aten_kernel != ATEN_INT4_KERNEL:  # the CPU twin of the CUDA kernel timed here
        raise ProviderSkip("torch's int4 kernel serves 4-bit integer weights only")
    if scheme.group_size not in (32, 64, 128, 256):
        raise ProviderSkip(f"torch's int4 kernel takes groups of 32, 64, 128 or 256, not {scheme.group_size}")
    inner_k_tiles = 8  # tinygemm's tile of K: 8 x 16 codes; K must be a multiple of 128
    k = layers[0].in_features
    if k % (inner_k_tiles * 16):
        raise ProviderSkip(f"torch's int4 kernel needs K % {inner_k_tiles * 16} == 0, K is {k}")
    calls = []
    try:
        for layer in layers:
            codes = unpack_uintx(layer.qweight, 4, k)  # uint8 [N, K], 0..15
            scale = layer.scale.float()  # [N, K / group]
            offset = (8 - layer.zero.float()) * scale
            scales_and_offsets = torch.stack([scale, offset], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            if device.type == "cuda":  # [N, K / 2] bytes, even column in the high nibble
                packed = torch._convert_weight_to_int4pack(((codes[:, ::2] << 4) | codes[:, 1::2]).contiguous(),
                                                           inner_k_tiles)
                mm = torch._weight_int4pack_mm
            else:
                packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), inner_k_tiles)
                mm = torch._weight_int4pack_mm_for_cpu
            calls.append(lambda x, p=packed, sz=scales_and_offsets, mm=mm, g=scheme.group_size: mm(x, p, g, sz))
        calls[0](torch.randn(1, k, device=device, dtype=torch.bfloat16))  # fails here rather than at every point
    except Exception as e:  # an op missing from this torch build, or one that rejects the layout
        raise ProviderSkip(f"torch's int4 kernel does not run here: {error_text(e)}") from e
    stored = stored_bytes(packed) + stored_bytes(scales_and_offsets)
    name = "torch._weight_int4pack_mm" if device.type == "cuda" else "torch._weight_int4pack_mm_for_cpu"
    return Built(calls, f"{name} (tinygemm)", stored)


def _build_torchao(layers: list, device: torch.device) -> Built:
    if layers[0].scheme.storage.has_zero:  # the integer codes with zero points: the int4 formats
        raise ProviderSkip("this check times torchao for int8 and fp8; int4 is torch's own int4 kernel (torch-int4)")
    return build_torchao(layers, device)


SPEED_BUILDERS = {"quantrt": build_quantrt, "torchao": _build_torchao, "torch-int4": build_torch_int4}


def step_speed(ctx: CheckContext, result: StepResult) -> None:
    plan = SMOKE_SPEED if ctx.smoke else GPU_SPEED
    roofline = measure_roofline(ctx.device)
    ctx.echo(roofline.describe())
    ctx.markdown.write(
        "", f"- {roofline.describe()}",
        f"- formats {', '.join(SPEED_FORMATS)} (quantrt: the op's tuned pick); providers {BASELINE}, "
        f"{', '.join(SPEED_PROVIDERS)}; shapes (N x K) {', '.join(f'{n}x{k}' for n, k in plan.shapes)}; "
        f"M {', '.join(map(str, plan.ms))}; x bf16, no bias",
        "- method as in `quantrt bench kernels` (quantrt.bench.kernels.run_kernels): each call touches its own "
        "copy of W and x (copies beyond twice the L2 cache), the calls captured in a CUDA graph whose replay "
        "do_bench times (median; 'launch' where capture failed; 'cpu' off CUDA); floor = max(bytes / bandwidth, "
        f"2MNK / matmul rate); rel. err against x @ W^T in float32: quantrt's rows fail above {SPEED_REL_ERROR:.0%}, "
        "a peer's row above that is wired wrongly and its time means nothing")
    ctx.markdown.table(TABLE_HEADERS)
    rows: list[KernelRow] = []

    def on_row(row: KernelRow) -> None:
        rows.append(row)
        wrong = row.rel_error is not None and row.rel_error > SPEED_REL_ERROR and row.provider != BASELINE
        if wrong:
            row.note = (row.note + "; " if row.note else "") + f"WRONG OUTPUT: rel. err {row.rel_error:.2e}"
            if row.provider == "quantrt":
                result.failures.append(f"speed {row.format} {row.shape} M={row.m}: rel. err {row.rel_error:.2e}")
        ctx.record(CheckRow("speed", row.provider, row.format, "bfloat16", "", row.n, row.k, row.m, row.kernel,
                            "FAIL" if wrong and row.provider == "quantrt" else
                            "FAILED" if row.note.startswith("FAILED") else
                            "skipped" if row.note.startswith("skipped") else "ok",
                            rel_error=row.rel_error, ms=row.ms, tflops=row.tflops, gbps=row.gbps,
                            speedup=row.speedup, floor_fraction=row.floor_fraction, hbm_fraction=row.hbm_fraction,
                            timing=row.timing, note=row.note))
        ctx.markdown.row(table_row(row))
        if ctx.out_of_time():
            raise StepTimeout("time cap reached")

    shapes_done = 0
    try:
        for shape in plan.shapes:
            if ctx.out_of_time():
                break
            run_kernels(Plan(SPEED_FORMATS, (shape,), plan.ms, SPEED_PROVIDERS), ctx.device, roofline,
                           ctx.echo, ctx.args.warmup_ms, ctx.args.rep_ms, on_row=on_row, builders=SPEED_BUILDERS)
            shapes_done += 1
    finally:
        targets = check_targets(rows, small_m_shapes=plan.target_shapes)
        ctx.markdown.write("", "### Speed targets (quantrt; reported, not failed)")
        ctx.markdown.table(["target", "status", "detail"])
        for target in targets:
            ctx.markdown.row([target.target, target.status, target.detail])
            ctx.record(CheckRow("target", status=target.status, format=target.target, note=target.detail))
        result.targets = targets
        timed = sum(r.ms is not None for r in rows)
        result.detail = (f"{timed} points timed on {shapes_done}/{len(plan.shapes)} shapes; targets: "
                         + ", ".join(f"{t.target.split(' ')[0]} {t.status}" for t in targets))
        if result.failures:
            result.status = "FAILED"
        elif shapes_done < len(plan.shapes):
            result.status = "cut short"


STEP_FUNCTIONS: dict[str, Callable[[CheckContext, StepResult], None]] = {
    "precompile": step_precompile, "parity": step_parity, "compile": step_compile, "speed": step_speed}
STEP_TITLES = {"precompile": "1. Precompile (quantrt.kernels.variants.compile_all)",
               "parity": "2. Parity with the float64 reference", "compile": "3. torch.compile(fullgraph=True)",
               "speed": "4. Speed against bf16 cuBLAS and peers"}


def run_step(name: str, ctx: CheckContext, budget: Budget) -> StepResult:
    """Run one step within its cap; a step that errors or runs out of time still returns its result."""
    plan = budget.plan[name]
    cap = budget.cap(name)
    ctx.markdown.write("", f"## {STEP_TITLES[name]}", "")
    if cap < plan.min_s:
        why = (f"skipped: it needs at least {plan.min_s:.0f} s and {max(cap, 0):.0f} s are left for it "
               f"({budget.left():.0f} s of the budget left, the later steps' minimums and "
               f"{SUMMARY_RESERVE_S} s for the summary kept back)")
        ctx.markdown.write(why)
        ctx.record(CheckRow(name, status="skipped", note=why))
        ctx.echo(f"{name}: {why}")
        return StepResult(name, "skipped", cap_s=cap, detail=why)
    ctx.markdown.write(f"Time cap {cap:.0f} s (planned {plan.planned_s:.0f} s, {budget.left():.0f} s of the budget left).")
    ctx.echo(f"== {name}: cap {cap:.0f} s, {budget.left():.0f} s of the budget left")
    start = time.monotonic()
    ctx.deadline = start + cap
    result = StepResult(name, "ok", cap_s=cap)  # the step fills it in as it goes: kept when it is cut short
    try:
        with hard_stop(min(cap + HARD_STOP_GRACE_S, max(budget.left(), 1.0))):
            STEP_FUNCTIONS[name](ctx, result)
    except StepTimeout as e:
        result.status = "FAILED" if result.failures else "cut short"
        result.detail = f"{result.detail}; " * bool(result.detail) + f"stopped at its time cap ({e})"
        ctx.markdown.write("", f"**{name} cut short**: {e} (cap {cap:.0f} s).")
    except Exception as e:  # a bug or a broken device: the later steps still run
        detail = error_text(e)
        result.status = "FAILED"
        result.detail = f"{result.detail}; " * bool(result.detail) + f"error: {detail}"
        ctx.markdown.write("", f"**{name} FAILED with an error**: {detail}", "", "```",
                           traceback.format_exc()[-3000:], "```")
        if name in ("parity", "compile"):
            result.failures.append(f"{name}: {detail}")
    finally:
        ctx.deadline = math.inf
    result.seconds = time.monotonic() - start
    ctx.echo(f"== {name}: {result.status} in {result.seconds:.0f} s; {result.detail}")
    return result


def _parse_steps(text: str | None) -> list[str]:
    if not text:
        return list(STEPS)
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise ValueError(f"--steps: unknown step(s) {unknown}; choose from {', '.join(STEPS)}")
    return [s for s in STEPS if s in steps]  # always in the check's order


def _parse_formats(text: str | None) -> tuple[FormatCase, ...]:
    if not text:
        return FORMATS
    labels = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in labels if s not in FORMATS_BY_LABEL]
    if unknown or not labels:
        raise ValueError(f"--formats: unknown format(s) {unknown}; choose from {', '.join(FORMATS_BY_LABEL)}")
    return tuple(FORMATS_BY_LABEL[s] for s in labels)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="the whole run's time budget in seconds, shared out among the steps "
                             "(default: %(default)s: about 8 minutes of a device call with the wheel install)")
    parser.add_argument("--steps", help=f"comma-separated steps to run, in the check's order "
                                        f"(default: all: {','.join(STEPS)})")
    parser.add_argument("--formats", help="comma-separated formats for the parity step (default: all: "
                                          f"{','.join(FORMATS_BY_LABEL)})")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode of the compile step (default: %(default)s; max-autotune costs "
                             "more time than the visit has)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny CPU run through Triton's interpreter that checks the check (automatic "
                             "without CUDA)")
    parser.add_argument("--out-dir", type=Path, help="results folder (default: benchmarks/results; a temporary "
                                                     "folder for a CPU smoke run)")
    parser.add_argument("--tuning-file", type=Path,
                        help="quantrt's tuning table to read and fill (default: a fresh temporary one)")
    parser.add_argument("--warmup-ms", type=int, default=DEFAULT_WARMUP_MS, help="do_bench warmup (ms), speed step")
    parser.add_argument("--rep-ms", type=int, default=DEFAULT_REP_MS, help="do_bench repetition time (ms), "
                                                                             "speed step")


def run(args: argparse.Namespace, prog: str, argv: Sequence[str], echo: Callable[[str], None] = print
        ) -> CheckOutputs:
    """Run the check as `args` say; write its markdown and CSV as it goes."""
    started = time.monotonic()
    steps = _parse_steps(args.steps)  # bad arguments fail before anything is written
    args.parity_formats = _parse_formats(args.formats)
    device = pick_device(args.cpu_smoke, echo)
    smoke = device.type != "cuda"
    if smoke:
        enable_interpreter()
    run_info = Run.create("check", device, prog, argv, args.out_dir)
    plan = SMOKE_PLAN if smoke else GPU_PLAN
    budget = Budget(args.budget_s, plan, steps, started)
    stem = run_info.stem
    results: list[StepResult] = []
    with (smoke_threads(smoke), private_tuning_table(device, args.tuning_file) as tuning_path,
          CsvLog(stem.with_suffix(".csv"), CSV_HEADERS) as csv_log, MarkdownLog(stem.with_suffix(".md")) as md):
        echo(f"writing {md.path} and {csv_log.path} as the check goes")
        md.write(*run_info.header_lines(f"quantrt GPU check on {device_title(device)}"))
        md.write(f"- kernels source hash: {kernels_source_hash()}; paths: {', '.join(_safe(kernel_paths))}",
                 f"- quantrt tuning table: {tuning_path or 'none (nothing is tuned off CUDA)'}",
                 f"- budget {args.budget_s:.0f} s from the start of the run; steps "
                 + ", ".join(f"{s} (planned {plan[s].planned_s:.0f} s, at least {plan[s].min_s:.0f} s)" for s in steps))
        ctx = CheckContext(device, smoke, md, csv_log, echo, args)
        for name in steps:
            results.append(run_step(name, ctx, budget))
        failures = [f for r in results for f in r.failures]
        summary = _summary_lines(results, failures, time.monotonic() - started)
        md.write("", "## Summary", "", *summary)
    for line in summary:
        echo(line)
    echo(f"wrote {md.path}, {csv_log.path}")
    return CheckOutputs(md.path, csv_log.path, results)


def _safe(fn: Callable[[], Sequence[str]]) -> Sequence[str]:
    try:
        return fn()
    except Exception as e:  # the kernels may not import mid-rewrite; the parity step reports it
        return [f"unknown ({error_text(e)})"]


def _summary_lines(results: list[StepResult], failures: list[str], seconds: float) -> list[str]:
    lines = format_table(["step", "status", "seconds", "cap s", "detail"],
                         [[r.name, r.status, f"{r.seconds:.0f}", "-" if r.cap_s is None else f"{r.cap_s:.0f}",
                           markdown_text(r.detail)] for r in results]).splitlines()
    for r in results:
        for target in r.targets:
            lines.append(f"- target: {target.status}: {target.target} ({target.detail})")
    lines += [f"- failing: {f}" for f in failures[:30]]
    if len(failures) > 30:
        lines.append(f"- ... and {len(failures) - 30} more failing checks (see the CSV)")
    lines += ["", f"Total: {len(failures)} failing checks (parity, compile, quantrt's speed rows with a wrong output; "
                  f"speed targets are reported, not failed); {seconds:.0f} s; exit code {1 if failures else 0}."]
    return lines


def main(argv: Sequence[str] | None = None, prog: str = "python benchmarks/gpu_check.py") -> int:
    """`python benchmarks/gpu_check.py`: the same as `quantrt bench check`."""
    return script_main(sys.modules[__name__], argv, prog)


if __name__ == "__main__":
    sys.exit(main())
