"""LoRA on a quantized FLUX transformer: unfused cost and fused against unfused (also `quantrt bench lora`); the
benchmark itself is quantrt.bench.lora (see its docstring).

    python benchmarks/bench_lora.py [--size full] [--ranks 16,64] [--scheme int8wo] [--compile] [--cpu-smoke]
"""

import sys

from quantrt.bench.lora import main

if __name__ == "__main__":
    sys.exit(main())
