"""GPU verification of quantrt's Triton weight-only kernels (issue 3), run on an H100/H200:

1. parity: bf16 and fp16 activations, every weight-only format, M in (1, 7, 16, 33, 128, 1024, 4096),
   FLUX shapes (3072x3072, 12288x3072, 3072x12288) and LLM shapes (4096x4096, 4096x14336), N x K of the
   weight. The op's own choice (heuristic configs, no tuning) and each applicable forced path (splitk
   up to M 64, gemm from 16, dequant from 128) against an fp32 reference on the same GPU.
2. torch.compile(fullgraph=True, mode="max-autotune", dynamic=False) of a quantized layer: no graph
   break (torch._dynamo.explain), the Triton kernel present in Inductor's code, eager == compiled.
3. timing: median of triton.testing.do_bench_cudagraph (CUDA-graph replays, so that Python launch
   overhead does not hide the kernels) of bf16 torch.mm against the autotuned op, M in
   (1, 16, 1024, 4096), on 8192x28672 and 16384x16384, with the HBM floor (weight + x + out bytes over
   the measured copy bandwidth).

Writes a markdown report (GPU, versions, date, command, tables) to benchmarks/results/. --quick runs fewer
formats and shapes. --cpu-smoke checks the script's plumbing on CPU through the Triton interpreter on
tiny shapes (fp16, no compile, no timing); it says nothing about GPUs.

    python benchmarks/gpu_verify.py [--quick] [--out FILE] [--skip-compile] [--skip-timing]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

FULL_SCHEMES = [("int8wo", None), ("int8wo", 128), ("int4wo", 128), ("uint1wo", 64), ("uint2wo", 64), ("uint3wo", 64),
                ("uint5wo", 64), ("uint6wo", 64), ("uint7wo", 64), ("float8wo_e4m3", None), ("float8wo_e5m2", None),
                ("fp3_e1m1", None), ("fp4_e2m1", None), ("fp5_e2m2", None), ("fp6_e3m2", None), ("fp6_e2m3", None),
                ("fp7_e3m3", None), ("fp7_e5m1", None)]
QUICK_SCHEMES = [("int8wo", None), ("int4wo", 128), ("uint3wo", 64), ("float8wo_e4m3", None), ("float8wo_e5m2", None),
                 ("fp6_e3m2", None)]
FULL_SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288), (4096, 4096), (4096, 14336)]
QUICK_SHAPES = [(3072, 3072), (4096, 14336)]
FULL_MS = [1, 7, 16, 33, 128, 1024, 4096]
QUICK_MS = [1, 7, 33, 1024]
COMPILE_SCHEMES = [("int8wo", None), ("int4wo", 128), ("uint3wo", 64), ("fp6_e3m2", None), ("float8wo_e4m3", None),
                   ("float8wo_e5m2", None)]
TIMING_SHAPES = [(8192, 28672), (16384, 16384)]
TIMING_MS = [1, 16, 1024, 4096]
TIMING_SCHEMES = [("int8wo", None), ("int4wo", 128), ("float8wo_e4m3", None), ("fp6_e3m2", None)]
# |y - ref| <= atol + rtol * |ref| against the fp32 reference, outputs O(1)
TOLERANCE = {"bfloat16": 2e-2, "float16": 4e-3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer formats, shapes and M values")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown report (default benchmarks/results/gpu_verify-<gpu>-<date>.md)")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile checks")
    parser.add_argument("--skip-timing", action="store_true", help="no timing table")
    parser.add_argument("--tuning-file", type=Path, default=None,
                        help="tuning table of the run (default: a fresh temporary file, never the user's own)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="check the script itself on CPU under TRITON_INTERPRET=1, tiny shapes")
    return parser.parse_args(argv)


def _rel_error(y, ref) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def _tolerance_ratio(y, ref, dtype) -> float:
    """max |y - ref| / (atol + rtol |ref|): <= 1 passes."""
    tol = TOLERANCE[str(dtype).removeprefix("torch.")]
    return float(((y.float() - ref).abs() / (tol + tol * ref.abs())).max()) if y.numel() else 0.0


def _layer(scheme, n: int, k: int, dtype, device):
    import torch
    from torch import nn

    import quantrt
    from quantrt.backends import get_backend

    linear = nn.Linear(k, n, bias=True, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, device=device) / k**0.5)
        linear.bias.copy_(torch.randn(n, device=device) * 0.1)
    return quantrt.QuantizedLinear.from_linear(linear, scheme, get_backend("triton"), name=scheme.name)


def _forced(layer, x, path: str):
    from quantrt.kernels.floatx import FP8_FORMATS, floatx_linear
    from quantrt.kernels.int8 import int8_linear
    from quantrt.kernels.uintx import uintx_linear

    s = layer.scheme
    if s.weight == "int8":
        return int8_linear(x, layer.qweight, layer.scale, layer.bias, path=path)
    if s.weight == "uintx":
        return uintx_linear(x, layer.qweight, layer.scale, layer.zero, layer.bias, s.bits, path=path)
    ebits, mbits = (s.ebits, s.mbits) if s.weight == "fpx" else FP8_FORMATS[s.fp8]
    return floatx_linear(x, layer.qweight, layer.scale, layer.bias, ebits, mbits, path=path)


def _paths(m: int) -> list[str]:
    return ["auto"] + [p for p, ok in (("splitk", m <= 64), ("gemm", m >= 16), ("dequant", m >= 128)) if ok]


def _scheme(name: str, group_size):
    from quantrt.schemes import resolve_scheme

    return resolve_scheme(name, group_size)


def _label(name: str, group_size) -> str:
    return name if group_size is None or name == "int4wo" and group_size == 128 else f"{name}-g{group_size}"


def parity(schemes, shapes, ms, dtypes, device, log) -> tuple[list[list], list[list]]:
    """Rows (format, dtype, cases, failures, worst relative error, worst tolerance ratio) and failures."""
    import torch

    os.environ["QUANTRT_AUTOTUNE"] = "0"  # heuristic configs: no benchmarking in the sweep
    summary, failures = [], []
    for name, group_size in schemes:
        scheme = _scheme(name, group_size)
        for dtype in dtypes:
            cases = bad = 0
            worst_rel = worst_ratio = 0.0
            for n, k in shapes:
                torch.manual_seed(n + k)
                layer = _layer(scheme, n, k, dtype, device)
                weight = layer.dequantize()
                for m in ms:
                    x = torch.randn(m, k, device=device, dtype=dtype)
                    ref = x.float() @ weight.T + layer.bias.float()
                    for path in _paths(m):
                        try:
                            y = layer(x) if path == "auto" else _forced(layer, x, path)
                            rel, ratio = _rel_error(y, ref), _tolerance_ratio(y, ref, dtype)
                            ok = bool(torch.isfinite(y).all()) and ratio <= 1
                            why = "" if ok else f"rel {rel:.2e}, tolerance ratio {ratio:.2f}"
                        except Exception as e:  # a kernel that does not compile or run is a failure to report
                            ok, rel, ratio, why = False, float("nan"), float("nan"), f"{type(e).__name__}: {e}"[:300]
                        cases += 1
                        worst_rel, worst_ratio = max(worst_rel, rel), max(worst_ratio, ratio)
                        if not ok:
                            bad += 1
                            failures.append([_label(name, group_size), str(dtype)[6:], f"{n}x{k}", m, path, why])
            log(f"parity {_label(name, group_size):18s} {str(dtype)[6:]:9s} {cases - bad}/{cases} pass, "
                f"worst rel {worst_rel:.2e}, worst tolerance ratio {worst_ratio:.2f}")
            summary.append([_label(name, group_size), str(dtype)[6:], cases, bad, f"{worst_rel:.2e}",
                            f"{worst_ratio:.2f}"])
    os.environ.pop("QUANTRT_AUTOTUNE", None)
    return summary, failures


def compile_checks(schemes, ms, device, log) -> list[list]:
    """Per (scheme, M), bf16, 3072x3072: compiled first (so that a tuning-table miss is benchmarked while
    torch.compile traces the op), then torch._dynamo.explain and eager. Row: graph breaks, graphs, the
    quantrt kernels in Inductor's code, whether the trace added a tuning pick, max |eager - compiled|,
    tolerance ratio of compiled vs the reference, compile seconds, verdict."""
    import torch
    from torch import nn
    from torch._inductor.utils import run_and_get_code

    import quantrt
    from quantrt.kernels import tuning

    rows = []
    n, k = 3072, 3072
    for name, group_size in schemes:
        for m in ms:
            torch._dynamo.reset()
            torch.manual_seed(m)
            model = nn.Sequential(nn.Linear(k, n)).to(device=device, dtype=torch.bfloat16)
            qt = quantrt.QuantizedTransformer.from_model(
                model, quantrt.QuantConfig(name, group_size=group_size, backend="triton"), progress=False)
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            layer = next(iter(qt.quantized_layers().values()))
            ref = x.float() @ layer.dequantize().T + layer.bias.float()
            try:
                picks = len(tuning.default_table().entries())
                compiled = torch.compile(qt, fullgraph=True, mode="max-autotune", dynamic=False)
                start = time.perf_counter()
                out, codes = run_and_get_code(compiled, x)
                seconds = time.perf_counter() - start
                traced_pick = len(tuning.default_table().entries()) > picks
                code = "\n".join(codes)
                kernels = [kname for kname in ("_matmul_kernel", "_dequantize_kernel") if kname in code]
                torch._dynamo.reset()
                explanation = torch._dynamo.explain(qt)(x)
                eager = qt(x)
                diff = float((out.float() - eager.float()).abs().max())
                ratio = _tolerance_ratio(out, ref, torch.bfloat16)
                ok = explanation.graph_break_count == 0 and kernels and ratio <= 1
                row = [_label(name, group_size), m, explanation.graph_break_count, explanation.graph_count,
                       ", ".join(kernels) or "none", "yes" if traced_pick else "no", f"{diff:.3g}", f"{ratio:.2f}",
                       f"{seconds:.1f}", "ok" if ok else "FAIL"]
            except Exception as e:
                row = [_label(name, group_size), m] + ["-"] * 7 + [f"FAIL {type(e).__name__}: {e}"[:300]]
            log(f"compile {row}")
            rows.append(row)
    return rows


def _bench(fn) -> tuple[float, str]:
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"), "graph"
    except Exception:  # capture can fail (e.g. a first call that still tunes); time launches instead
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), "launch"


def timing(schemes, shapes, ms, device, log) -> tuple[list[list], float]:
    """Rows (shape, M, format, path, us, bf16 us, speedup, floor us, % of floor) and the measured copy
    bandwidth in GB/s."""
    import torch
    import triton.testing

    from quantrt.bench_kernels import scheme_format
    from quantrt.kernels import common

    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    bandwidth = 2 * src.numel() / (copy_ms * 1e-3)  # bytes read + written per second
    del src, dst
    log(f"device copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows = []
    for n, k in shapes:
        torch.manual_seed(n)
        dense = (torch.randn(n, k, device=device) / k**0.5).to(torch.bfloat16)
        layers = {}
        for name, group_size in schemes:
            layers[_label(name, group_size)] = _layer(_scheme(name, group_size), n, k, torch.bfloat16, device)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            base_ms, how = _bench(lambda: torch.mm(x, dense.T))
            rows.append([f"{n}x{k}", m, "bf16 torch.mm", "cuBLAS", f"{base_ms * 1e3:.1f}", "1.00",
                         f"{(2 * n * k + 2 * m * (n + k)) / bandwidth * 1e6:.1f}", "-", how])
            for label, layer in layers.items():
                layer(x)  # tunes on a miss, outside the CUDA graph
                zero = getattr(layer, "zero", None)
                stored = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scale, zero) if t is not None)
                floor_us = (stored + 2 * m * (n + k)) / bandwidth * 1e6
                t_ms, how = _bench(lambda: layer(x))
                fmt = scheme_format(layer.scheme)
                config = common.select_config(x, layer.qweight, layer.scale, zero, layer.bias, fmt)
                rows.append([f"{n}x{k}", m, label, config.path, f"{t_ms * 1e3:.1f}", f"{base_ms / t_ms:.2f}",
                             f"{floor_us:.1f}", f"{100 * floor_us / (t_ms * 1e3):.0f}%", how])
                log(f"timing {rows[-1]}")
        del layers, dense
        torch.cuda.empty_cache()
    return rows, bandwidth / 1e9


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before quantrt imports triton kernels
    import torch
    import triton

    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)

    if args.cpu_smoke:
        device, dtypes = torch.device("cpu"), [torch.float16]
        schemes, shapes, ms = QUICK_SCHEMES, [(80, 256)], [1, 7, 33]
        gpu = "CPU (Triton interpreter smoke run)"
    else:
        if not torch.cuda.is_available():
            print("gpu_verify needs a CUDA GPU (or --cpu-smoke to check the script on CPU)", file=sys.stderr)
            return 2
        device, dtypes = torch.device("cuda"), [torch.bfloat16, torch.float16]
        schemes = QUICK_SCHEMES if args.quick else FULL_SCHEMES
        shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
        ms = QUICK_MS if args.quick else FULL_MS
        gpu = torch.cuda.get_device_name()
    started = time.perf_counter()
    now = datetime.datetime.now(datetime.timezone.utc)
    lines += [f"# quantrt Triton kernels on {gpu}", "",
              f"- date: {now:%Y-%m-%d %H:%M} UTC",
              f"- command: `{' '.join(['python'] + sys.argv)}`",
              f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}",
              ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"- {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
                     f"capability {props.major}.{props.minor}")
    tuning_file = args.tuning_file or Path(tempfile.mkdtemp(prefix="quantrt-tuning-")) / "tuning.json"
    os.environ["QUANTRT_TUNING_FILE"] = str(tuning_file)  # never the user's own table
    lines.append(f"- tuning table: `{tuning_file}`")
    summary, failures = parity(schemes, shapes, ms, dtypes, device, log)
    lines += ["", "## Parity with the fp32 reference", "",
              f"Shapes (N x K): {', '.join(f'{n}x{k}' for n, k in shapes)}; M: {', '.join(map(str, ms))}; paths: "
              "the op's choice (heuristic configs) and each forced path (splitk M <= 64, gemm M >= 16, dequant "
              f"M >= 128). Pass: finite and |y - ref| <= tol * (1 + |ref|), tol {TOLERANCE}.", "",
              _table(["format", "x dtype", "cases", "failures", "worst rel. error", "worst tolerance ratio"], summary)]
    if failures:
        lines += ["", "### Failures", "", _table(["format", "x dtype", "NxK", "M", "path", "why"], failures[:200])]
    compile_rows = []
    if not args.skip_compile and device.type == "cuda":
        compile_schemes = COMPILE_SCHEMES[:3] if args.quick else COMPILE_SCHEMES
        compile_rows = compile_checks(compile_schemes, [1, 1024] if args.quick else [1, 33, 1024], device, log)
        lines += ["", "## torch.compile(fullgraph=True, mode=\"max-autotune\", dynamic=False), bf16, 3072x3072", "",
                  "Compiled first: on a tuning-table miss the op benchmarks its candidates while torch.compile "
                  "traces it (\"pick from trace\"); eager then reads the same pick.", "",
                  _table(["format", "M", "graph breaks", "graphs", "kernels in Inductor code", "pick from trace",
                          "max |eager - compiled|", "tolerance ratio", "compile s", "result"], compile_rows)]
    timing_rows = []
    if not args.skip_timing and device.type == "cuda":
        timing_schemes = TIMING_SCHEMES[:2] if args.quick else TIMING_SCHEMES
        timing_rows, bandwidth = timing(timing_schemes, TIMING_SHAPES[:1] if args.quick else TIMING_SHAPES,
                                        TIMING_MS, device, log)
        lines += ["", "## Timing, bf16 activations (median, microseconds)", "",
                  f"Measured device copy bandwidth: {bandwidth:.0f} GB/s. floor = (weight + x + out bytes) / that "
                  "bandwidth (memory-bound floor; compute-bound at large M). Our op autotuned; path = the tuned "
                  "pick. timing: graph = CUDA-graph replays, launch = eager launches. Weights exceed L2.", "",
                  _table(["N x K", "M", "format", "path", "us", "speedup vs bf16", "floor us", "% of floor",
                          "timing"], timing_rows)]
    failed = sum(row[3] for row in summary) + sum(row[-1] != "ok" for row in compile_rows)
    lines += ["", f"Total: {failed} failing checks; {time.perf_counter() - started:.0f} s.", ""]
    out = args.out or (Path(__file__).parent / "results" /
                       f"gpu_verify-{gpu.replace(' ', '_').replace('/', '_')}-{now:%Y%m%d-%H%M}.md")
    if args.cpu_smoke and args.out is None:
        out = Path(tempfile.mkdtemp(prefix="quantrt-smoke-")) / "gpu_verify-smoke.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}; {failed} failing checks")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
