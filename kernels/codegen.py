"""What Triton generates for a kernel on a GPU, read without one: compile for a GPU target through a stub
driver, then count what the code does (registers, spills, load widths, wgmma and its waits, pipelined
copies). The properties that decide speed on a GPU become facts a CPU-only CI can check.

    with target_driver(GPUTarget("cuda", 90, 32)):
        compiled = kernel.warmup(*args, grid=(1,), **constexprs)
    report = analyze(compiled)

Triton compiles to ttgir, ptx and a cubin without touching a device; `cuobjdump`, which Triton ships,
reads registers and stack (spill) use from the cubin. The kernels must have been decorated without
TRITON_INTERPRET=1 (the interpreter replaces them).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

SM90 = GPUTarget("cuda", 90, 32)


@contextlib.contextmanager
def target_driver(target: GPUTarget = SM90):
    """Make Triton compile for `target` on a machine without that GPU: a stub of the CUDA driver whose
    current target is `target` is the active driver until the block ends."""
    cuda_driver = triton.backends.backends["nvidia"].driver

    class StubDriver(cuda_driver):
        def __init__(self):  # no CUDA library is loaded
            pass

        def get_current_target(self):
            return target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(StubDriver())
    try:
        yield
    finally:
        try:
            driver.reset_active()
        except RuntimeError:  # no GPU driver to go back to: the next use looks for one again
            driver.set_active(None)


@dataclass
class CodegenReport:
    """What one compiled kernel does. Load widths are in bytes per thread and instruction."""

    registers: int
    stack_bytes: int  # spills (and local arrays): 0 means no spill
    local_bytes: int
    weight_load_bytes: list[int] = field(default_factory=list)  # ld.global with the evict_first hint
    weight_copy_bytes: list[int] = field(default_factory=list)  # cp.async under the evict_first policy
    async_copies: int = 0  # cp.async instructions (software-pipelined copies into shared memory)
    wgmma: int = 0
    wgmma_wait_pendings: list[int] = field(default_factory=list)
    mma_sync: int = 0

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0

    def to_dict(self) -> dict:
        return asdict(self)


_VECTOR_BYTES = {None: 1, "v2": 2, "v4": 4}
_TYPE_BYTES = {"8": 1, "16": 2, "32": 4, "64": 8, "128": 16}


def _load_bytes(instruction: str) -> int:
    # ld.global.L1::evict_first.L2::cache_hint.v4.b32 -> 16
    match = re.search(r"\.(v[24])?\.?[bufs](8|16|32|64|128)$", instruction)
    if match is None:
        raise ValueError(f"cannot read the width of {instruction!r}")
    return _VECTOR_BYTES[match.group(1)] * _TYPE_BYTES[match.group(2)]


def cuobjdump() -> Path:
    """Triton's bundled cuobjdump."""
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(cubin: bytes) -> dict[str, int]:
    """cuobjdump's resource usage of a one-kernel cubin: REG, STACK, SHARED, LOCAL, ..."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(cuobjdump()), "--dump-resource-usage", str(path)], capture_output=True,
                              text=True, check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(\w+)(?:\[\d+\])?:(\d+)", line)}


def analyze(compiled) -> CodegenReport:
    """Read a compiled kernel (`JITFunction.warmup`'s result for a CUDA target)."""
    ptx = compiled.asm["ptx"]
    usage = resource_usage(compiled.asm["cubin"])
    loads = re.findall(r"ld\.global\.L1::evict_first\S*", ptx)
    # cp.async ... [dst], [src], size, src-size, policy: the weights' copies carry the evict_first policy
    first_policies = set(re.findall(r"createpolicy\.fractional\.L2::evict_first\.b64 (%rd\d+)", ptx))
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global\S* \[[^\]]*\], \[[^\]]*\], (0x[0-9a-f]+|\d+)"
                        r"(?:, [^,;]+)?(?:, (%rd\d+))?;", ptx)
    return CodegenReport(
        registers=usage["REG"], stack_bytes=usage.get("STACK", 0), local_bytes=usage.get("LOCAL", 0),
        weight_load_bytes=sorted(_load_bytes(i) for i in loads),
        weight_copy_bytes=sorted(int(size, 0) for size, policy in copies if policy in first_policies),
        async_copies=len(re.findall(r"cp\.async\.c[ag]\.shared", ptx)),
        wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
        wgmma_wait_pendings=[int(p) for p in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)],
        mma_sync=len(re.findall(r"mma\.sync", ptx)),
    )
