"""The GPU check in one command, sized for a short visit to a GPU machine: precompile the kernels, parity
of every weight-only format and path against float64, torch.compile without graph breaks, speed against
bf16 cuBLAS and peers with the targets. The same as `quantrt bench check`; the check itself is
quantrt.bench.check (see its docstring), benchmarks/GPU_SESSION.md says how to run it on the GPU machine.

    python benchmarks/gpu_check.py [--out-dir DIR] [--budget-s 450] [--steps parity,compile] [--cpu-smoke]

Runs from a checkout that is not installed (the GPU machine puts only the carried wheels on PYTHONPATH):
the package layout that pyproject.toml declares (quantrt = runtime/, with its subpackages such as
quantrt.bench = runtime/bench/; quantrt.kernels = kernels/) is then linked into a temporary folder put first
on sys.path and PYTHONPATH, so that the processes the check starts (the precompile's workers) import the
same checkout.

A CPU smoke run (--cpu-smoke, or no CUDA) runs the kernels in Triton's interpreter, which must be on before
triton is imported, and `import quantrt` imports it: the script turns it on first.
"""

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def use_checkout() -> None:
    """Make `import quantrt` load this checkout, here and in the processes this one starts."""
    spec = importlib.util.find_spec("quantrt")
    if spec is not None and spec.origin and Path(spec.origin).resolve() == ROOT / "runtime" / "__init__.py":
        return  # installed from here (pip install -e .)
    site = Path(tempfile.mkdtemp(prefix="quantrt-checkout-"))
    package = site / "quantrt"
    package.mkdir()
    for entry in (ROOT / "runtime").iterdir():  # modules and subpackages (backends/, bench/) alike
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "kernels").symlink_to(ROOT / "kernels")
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))


def use_interpreter_off_cuda(argv: list[str]) -> None:
    """TRITON_INTERPRET=1 (unless set) for a CPU smoke run, before anything imports triton (torch does not):
    quantrt.bench.check turns it on too, but only after `import quantrt` has imported triton, too late for
    triton's own language functions."""
    if "--cpu-smoke" in argv or not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


if __name__ == "__main__":
    use_interpreter_off_cuda(sys.argv[1:])
    use_checkout()
    from quantrt.bench.check import main

    sys.exit(main())
