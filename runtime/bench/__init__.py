"""quantrt's benchmarks, `quantrt bench NAME` (entry scripts in the checkout's benchmarks/ folder):

- kernels (`quantrt.bench.kernels`, benchmarks/bench_kernels.py): one weight-only linear in every format,
  quantrt's Triton kernels against bf16 torch.mm (cuBLAS), torchao, optimum-quanto and gemlite, with the
  measured roofline and the speed targets;
- model (`quantrt.bench.model`, benchmarks/bench_transformer.py): FLUX and Llama end to end, bf16 against
  each scheme through quantrt and torchao, eager and compiled, plus an autoquant row;
- compile (`quantrt.bench.compile`, benchmarks/bench_compile.py): a cold compile against a warm start from
  the compile cache, each in its own process;
- lora (`quantrt.bench.lora`, benchmarks/bench_lora.py): a LoRA on a quantized FLUX, unfused cost per rank
  against the forward without it, fused against unfused error (needs peft);
- check (`quantrt.bench.check`, benchmarks/gpu_check.py): the GPU check in one bounded run: precompile,
  parity with float64, torch.compile without graph breaks, speed and targets;
- distributed (`quantrt.bench.distributed`, benchmarks/bench_distributed.py): quantized Llama tensor-parallel
  (transformers' tp_plan) and FLUX context-parallel (diffusers' ring and Ulysses) across GPUs against one GPU.

What they share: `quantrt.bench.common` (device, timing, roofline, byte counting) and `quantrt.bench.report`
(result files, the environment header, table cells, the targets table).

This package is the top layer of quantrt: it may import any quantrt module, and no quantrt module imports
it. The program `quantrt` (quantrt.__main__) adds the `bench` command with `add_bench_command`; a benchmark
module is imported only when the command is `bench` (its options and imports matter only then).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

BENCHMARKS = {  # `quantrt bench NAME`: the module quantrt.bench.NAME and its one-line summary
    "kernels": "weight-only matmul kernels against bf16 torch.mm, torchao, quanto, gemlite",
    "model": "FLUX and Llama end to end: bf16 against each scheme, eager and compiled",
    "compile": "cold compile against a warm start from the compile cache",
    "lora": "LoRA on a quantized FLUX: unfused cost per rank, fused against unfused error",
    "check": "the GPU check in one bounded run: precompile, parity, torch.compile, speed and targets",
    "distributed": "quantized Llama tensor-parallel and FLUX context-parallel across GPUs against one GPU",
}


def run_benchmark(args: argparse.Namespace) -> int:
    """`quantrt bench NAME`: run the benchmark module that parsed `args`; exit code 1 on failed points."""
    outputs = args.bench_module.run(args, "quantrt", args.argv)
    return 1 if outputs.failures else 0


def add_bench_command(commands: Any, load_benchmarks: bool) -> None:
    """Add `quantrt bench` and a sub-command per benchmark to `commands` (what
    ArgumentParser.add_subparsers returned). The benchmark modules (and what they import) are loaded only
    with `load_benchmarks`, which the program sets when the command is `bench`: their options and
    descriptions matter only then, and any other command starts faster without them."""
    bench = commands.add_parser("bench", help="`bench kernels`, `bench model`, `bench compile` (cold against warm "
                                      "start), `bench lora` and `bench check` (the GPU check); results in "
                                      "benchmarks/results/",
                                description="Benchmarks that write a markdown table, a CSV and a PNG plot to "
                                            "benchmarks/results/ (--out-dir). Without CUDA they run a reduced CPU "
                                            "smoke run that checks they work, not their numbers.")
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="benchmark")
    for name, summary in BENCHMARKS.items():
        if not load_benchmarks:
            benchmarks.add_parser(name, help=summary)
            continue
        # imported by name so that other commands never load it; a module of this package, below it
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ImportError as e:  # a library only this benchmark needs (lora: peft): the others still run
            missing = benchmarks.add_parser(name, help=f"{summary} (unavailable: {e})")
            missing.set_defaults(func=lambda args, e=e, name=name: print(
                f"quantrt bench {name} cannot run: {e}; pip install \"quantrt[bench]\"", file=sys.stderr) or 1)
            continue
        parser = benchmarks.add_parser(name, help=summary, description=module.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
        parser.set_defaults(func=run_benchmark, bench_module=module)
    bench.set_defaults(func=lambda args: bench.print_help() or 2)
