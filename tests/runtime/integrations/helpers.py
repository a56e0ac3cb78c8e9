"""What the integration tests share: which layers a model quantized, bit-for-bit state comparison, and a large
random safetensors checkpoint written tensor by tensor."""

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

from quantrt import QuantizedLinear

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def linears(model: nn.Module) -> list[str]:
    """The layers left as nn.Linear (full precision)."""
    return [name for name, module in model.named_modules() if type(module) is nn.Linear]


def quantized(model: nn.Module) -> dict[str, str]:
    """{layer: scheme name} of the QuantizedLinear layers."""
    return {name: module.scheme.name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


def same_state(model: nn.Module, expected: nn.Module) -> None:
    """Bit for bit: the same state_dict keys, dtypes and values, and the same layers quantized the same way."""
    state, want = model.state_dict(), expected.state_dict()
    assert state.keys() == want.keys(), sorted(set(state) ^ set(want))[:10]
    differ = [k for k in state if state[k].dtype != want[k].dtype or not torch.equal(state[k], want[k])]
    assert not differ, differ[:10]
    assert quantized(model) == quantized(expected)


def write_random_checkpoint(shapes: dict[str, torch.Tensor], file: Path, dtype: torch.dtype = torch.bfloat16,
                            seed: int = 0) -> int:
    """A safetensors file of random tensors (normal, std 0.02; 1-d ones around 1) with the shapes of `shapes`
    (a meta state_dict), written one tensor at a time so that the test never holds the model. Returns its bytes
    of tensor data."""
    generator = torch.Generator().manual_seed(seed)
    header, offset = {}, 0
    for name, tensor in shapes.items():
        size = tensor.numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(tensor.shape), "data_offsets": [offset,
                                                                                                          offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for tensor in shapes.values():
            value = torch.randn(tensor.shape, generator=generator).mul_(0.02)
            if tensor.dim() == 1:
                value += 1
            f.write(value.to(dtype).reshape(-1).view(torch.uint8).numpy().tobytes())
    return offset


PEAK_RSS_SCRIPT = """
import json, sys, torch, quantrt
from {module} import {cls}

def status(field):  # bytes; VmHWM: the peak RSS since the last reset
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))

def load(path):
    return {cls}.from_pretrained(path, quantization_config=quantrt.QuantConfig("int8wo"), {dtype}=torch.bfloat16)

load(sys.argv[1])  # imports and first-call setup
with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to VmRSS (Linux >= 4.0)
    f.write("5")
before = status("VmRSS")
model = load(sys.argv[2])
quantized = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({{"growth": status("VmHWM") - before, "quantized": quantized}}))
"""


def peak_rss_of_loading(module: str, cls: str, dtype_argument: str, warm: Path, folder: Path) -> dict[str, int]:
    """In a fresh process: load `warm` (imports and first-call setup), then measure the peak RSS growth of loading
    `folder` with `cls.from_pretrained(..., quantization_config=QuantConfig("int8wo"))` in bf16; with the bytes of
    the loaded model's state."""
    script = PEAK_RSS_SCRIPT.format(module=module, cls=cls, dtype=dtype_argument)
    result = subprocess.run([sys.executable, "-c", script, str(warm), str(folder)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
