"""The one identity of a device that compiled code and timings depend on."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch


@functools.cache
def cpu_model() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) ..."), or the best the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device | str) -> str:
    """A GPU's name and compute capability ("NVIDIA H100 80GB HBM3 (SM 9.0)"); a CPU's model, architecture and
    the vector ISA Inductor generates C++ for ("cpu: <model> (x86_64 AVX512)"). Cache entries and autoquant plans
    are valid only on the device of the same name."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (SM {major}.{minor})"
    if device.type == "cpu":
        return f"cpu: {cpu_model()} ({platform.machine()} {torch.backends.cpu.get_cpu_capability()})"
    return device.type


__all__ = ["cpu_model", "device_name"]
