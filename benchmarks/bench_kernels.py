"""Weight-only matmul kernels against bf16 torch.mm, torchao, optimum-quanto and gemlite: the same as
`quantrt bench kernels`; the benchmark itself is quantrt.bench.kernels (see its docstring for the method).

    python benchmarks/bench_kernels.py [--quick] [--formats int4wo,int8wo] [--shapes llm] [--ms 1,16,4096]
                                       [--providers quantrt,torchao] [--out-dir DIR] [--cpu-smoke]
"""

import sys

from quantrt.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
