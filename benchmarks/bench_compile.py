"""Cold compile vs warm start from quantrt's compile cache (also `quantrt bench compile`); the benchmark itself
is quantrt.bench.compile (see its docstring).

    python benchmarks/bench_compile.py [--sizes tiny,full] [--regional no|yes|both] [--shape 1x4096x512]
"""

import sys

from quantrt.bench.compile import main

if __name__ == "__main__":
    sys.exit(main())
