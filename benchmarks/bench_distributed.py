"""Quantized models across GPUs against one GPU: Llama tensor-parallel through transformers' tp_plan, FLUX
context-parallel through diffusers' ring and Ulysses attention (also `quantrt bench distributed`); the benchmark
itself is quantrt.bench.distributed (see its docstring). It starts one process per GPU itself.

    python benchmarks/bench_distributed.py [--world 2] [--models llm,flux] [--schemes int8wo,int4wo]
        [--llm-folder PATH] [--prompt 1024] [--new-tokens 32] [--cpu-smoke]
"""

import sys

from quantrt.bench.distributed import main

if __name__ == "__main__":
    sys.exit(main())
