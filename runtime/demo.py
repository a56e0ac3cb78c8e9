"""The main job on an embedded default: quantize a FLUX-architecture transformer (random weights) with
several schemes, run it, and compare bytes, speed and output error with the unquantized model."""

from __future__ import annotations

import copy
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .calibrate import calibrate
from .config import QuantConfig
from .metrics import relative_error
from .models import build_flux, flux_inputs
from .tables import format_table
from .transformer import QuantizedTransformer, model_bytes

DEFAULT_SCHEMES = ("int8wo", "int4wo", "uint4wo", "float8wo_e4m3", "fp6_e3m2", "int8dq")


@dataclass
class DemoRow:
    scheme: str
    stored_bytes: int  # what save_pretrained writes: parameters and buffers
    resident_bytes: int  # in memory while serving: stored plus any copy a backend keeps beside it
    ratio_to_bf16: float  # resident bytes / the model's bf16 bytes
    ms_per_forward: float
    relative_error: float
    backends: str
    kept: list[str]  # layers kept in full precision, with why

    @property
    def weight_bytes(self) -> int:
        return self.resident_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_forward(model: torch.nn.Module, inputs: dict, device: torch.device, repeats: int) -> tuple[torch.Tensor, float]:
    """(output, median milliseconds per forward) after one untimed warmup call."""
    out = model(**inputs)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = model(**inputs)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return (out[0] if isinstance(out, tuple) else out), statistics.median(times)


def run_demo(size: str = "small", schemes: Sequence[str] = DEFAULT_SCHEMES, device: str | None = None,
             dtype: torch.dtype = torch.bfloat16, repeats: int = 3, backend: str = "auto",
             echo: Callable[[str], None] = print) -> list[DemoRow]:
    """Build the model, quantize a copy per scheme, and return (and print) one row per scheme."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configs = [QuantConfig(s, backend=backend) for s in schemes]  # bad names fail before the model is built
    echo(f"building FluxTransformer2DModel ({size}, random weights) on {device} in {dtype}")
    model = build_flux(size, dtype=dtype, device=device)
    inputs = flux_inputs(model)
    bf16_bytes = model_bytes(model, torch.bfloat16)
    echo(f"running the unquantized model ({repeats} timed forward{'s' if repeats != 1 else ''})")
    reference, ms = time_forward(model, inputs, device, repeats)
    full = model_bytes(model)
    rows = [DemoRow(f"none ({str(dtype).removeprefix('torch.')})", full, full, full / bf16_bytes, ms, 0.0, "torch", [])]
    for i, config in enumerate(configs, 1):
        start = time.perf_counter()
        echo(f"[{i}/{len(configs)}] {config.scheme.name}: quantizing, then {repeats} timed forward"
             f"{'s' if repeats != 1 else ''} ...")
        qt = QuantizedTransformer.from_model(copy.deepcopy(model), config, progress=False)
        if config.scheme.activation == "fp8_static":
            calibrate(qt, [inputs])
        out, ms = time_forward(qt, inputs, device, repeats)
        summary = qt.summary()
        used = Counter(r.backend for r in summary if r.quantized)
        kept = [f"{r.name} ({r.why.removeprefix('kept in full precision: ')})" for r in summary if not r.quantized]
        resident = qt.memory_footprint()
        rows.append(DemoRow(config.scheme.name, model_bytes(qt.model), resident, resident / bf16_bytes, ms,
                            relative_error(out, reference), ", ".join(f"{b} x{n}" for b, n in used.items()), kept))
        echo(f"      done in {time.perf_counter() - start:.1f} s")
        del qt
    table = format_table(
        ["scheme", "stored bytes", "resident bytes", "resident / bf16", "ms / forward", "rel. error",
         "backends (layers)"],
        [[r.scheme, f"{r.stored_bytes:,}", f"{r.resident_bytes:,}", f"{r.ratio_to_bf16:.3f}",
          f"{r.ms_per_forward:.1f}", f"{r.relative_error:.4f}", r.backends] for r in rows])
    tokens = inputs["hidden_states"].shape[1], inputs["encoder_hidden_states"].shape[1]
    echo(f"\nFLUX {size}: {tokens[0]} image + {tokens[1]} text tokens, batch 1, eager, median of {repeats}\n")
    echo(table)
    echo("\nstored: what save_pretrained writes; resident: in memory while serving, with any copy a backend "
         "keeps beside quantrt's buffers (summary() says which)")
    for r in rows:
        if r.kept:
            echo(f"{r.scheme} kept {len(r.kept)} layer{'s' if len(r.kept) != 1 else ''} in full precision: "
                 f"{'; '.join(r.kept)}")
    if device.type == "cpu":
        echo("CPU timings are for orientation only: on a shared CPU they move 2-4x between runs, and CPU speed "
             "says nothing about GPU speed (quantrt bench kernels measures that on a GPU)")
    return rows
