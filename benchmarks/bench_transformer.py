"""End-to-end: FLUX.1-dev-dimension FluxTransformer2DModel at 1024x1024 and an 8B Llama at a decode-like
shape, random weights, bf16 against each scheme through quantrt and through torchao, eager and compiled: the
same as `quantrt bench model`; the benchmark itself is quantrt.bench.model (see its docstring).

    python benchmarks/bench_transformer.py [--models flux,llm] [--schemes int8wo,int4wo] [--providers quantrt]
                                           [--regional] [--no-compile] [--out-dir DIR] [--cpu-smoke]
"""

import sys

from quantrt.bench.model import main

if __name__ == "__main__":
    sys.exit(main())
