"""`quantrt bench lora` (`python benchmarks/bench_lora.py`): LoRA on a quantized FLUX transformer (issue 18):
what an unfused LoRA costs, and how fused compares to unfused.

Per rank, on diffusers' FluxTransformer2DModel (quantrt.models.build_flux, random weights) with a random LoRA on
every Linear layer that quantrt quantizes (A ~ N(0, 1/in), B scaled so that scale·BA is ~20% of W's norm):
- time per forward (median, CUDA events or perf_counter) of the quantized model without a LoRA, with the LoRA
  unfused (PEFT's QuantizedLoraLinear beside the quantized matmul: two more small matmuls per layer), and fused
  (fuse_lora: W + scale·BA re-quantized into the scheme: the base forward's cost); the unfused overhead in %;
- relative L2 error of each against the full-precision model with the LoRA merged into its float weights (the
  output the LoRA's author meant): unfused keeps the LoRA exact and only W is quantized, fused also rounds BA.

On CUDA: --size full, bf16, backend auto; --compile times torch.compile(fullgraph=True) forwards instead.
Without CUDA (or --cpu-smoke): the small FLUX in float32 on the reference backend, one thread, 5 repeats.
Needs peft (in the `bench` extra).
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model

from ..config import QuantConfig
from ..integrations import peft as lora_integration
from ..metrics import relative_error
from ..models import FLUX_SIZES, build_flux, flux_inputs
from ..modules import QuantizedLinear, quantize_
from .common import Outputs, Run, median_ms, pick_device, script_main, smoke_threads
from .report import (CsvLog, MarkdownLog, cell, csv_headers, device_title, dtype_name, failed_note, markdown_row,
                     note_cell)

DELTA = 0.2  # ‖scale·BA‖ / ‖W‖ per layer: a strong style LoRA
TABLE_HEADERS = ["rank", "no LoRA ms", "unfused ms", "overhead", "fused ms", "error unfused", "error fused",
                 "error no LoRA", "note"]


@dataclass
class Row:
    """One rank's measurements (times in ms, errors relative L2 against the float model with the LoRA merged)."""

    rank: int
    base_ms: float | None = None
    unfused_ms: float | None = None
    overhead: float | None = None  # unfused_ms / base_ms - 1
    fused_ms: float | None = None
    error_unfused: float | None = None
    error_fused: float | None = None
    error_base: float | None = None
    note: str = ""

    def cells(self) -> list[str]:
        """The row of the markdown table (TABLE_HEADERS)."""
        overhead = "-" if self.overhead is None else f"{100 * self.overhead:+.0f}%"
        return [str(self.rank), cell(self.base_ms), cell(self.unfused_ms), overhead, cell(self.fused_ms),
                cell(self.error_unfused), cell(self.error_fused), cell(self.error_base), note_cell(self.note)]


CSV_HEADERS = csv_headers(Row)


def random_lora(model: nn.Module, names: Sequence[str], rank: int, seed: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """{layer: (A [rank, in], B [out, rank])} in float32, with ‖BA‖ = DELTA·‖W‖ (LoRA scale 1)."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name in names:
        weight = model.get_submodule(name).weight.detach().float().cpu()
        a = torch.randn(rank, weight.shape[1], generator=generator) / weight.shape[1] ** 0.5
        b = torch.randn(weight.shape[0], rank, generator=generator)
        b *= DELTA * weight.norm() / (b @ a).norm()
        lora[name] = (a, b)
    return lora


def forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's output (no autograd)."""
    with torch.no_grad():
        return model(**inputs)[0]


def merged_reference(full: nn.Module, lora: dict[str, tuple[torch.Tensor, ...]],
                     inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 output of the full-precision model with the LoRA merged into its weights."""
    merged = copy.deepcopy(full)
    with torch.no_grad():
        for name, (a, b) in lora.items():
            layer = merged.get_submodule(name)
            layer.weight.copy_((layer.weight.float() + (b @ a).to(layer.weight.device)).to(layer.weight.dtype))
    return forward(merged, inputs).float()


def measure_rank(rank: int, full: nn.Module, base: nn.Module, names: Sequence[str], inputs: dict[str, torch.Tensor],
                 timed: Callable[[nn.Module], float]) -> Row:
    """One rank: the base, unfused and fused forwards' times and errors."""
    lora = random_lora(full, names, rank, seed=rank)
    reference = merged_reference(full, lora, inputs)
    model = copy.deepcopy(base)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(names)), model)
    with torch.no_grad():
        for name, (a, b) in lora.items():
            layer = model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    base_ms = timed(base)  # again per rank, next to the LoRA's: a shared machine drifts
    unfused_ms = timed(model)
    error_unfused = relative_error(forward(model, inputs).float(), reference)
    for layer in model.modules():
        if isinstance(layer, lora_integration.QuantizedLoraLinear):
            layer.merge()
    fused_ms = timed(model)
    error_fused = relative_error(forward(model, inputs).float(), reference)
    error_base = relative_error(forward(base, inputs).float(), reference)
    return Row(rank, base_ms, unfused_ms, unfused_ms / base_ms - 1, fused_ms, error_unfused, error_fused, error_base)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=tuple(FLUX_SIZES), help="FLUX size (default: full; CPU smoke: small)")
    parser.add_argument("--ranks", default="16,64", help="comma-separated LoRA ranks (default: %(default)s)")
    parser.add_argument("--scheme", default="int8wo", help="quantization scheme (default: %(default)s)")
    parser.add_argument("--backend", help="backend for every layer (default: auto on CUDA, reference on CPU)")
    parser.add_argument("--repeats", type=int, help="timed forwards per point, median (default: 20; CPU smoke: 5)")
    parser.add_argument("--compile", action="store_true", help="time torch.compile(fullgraph=True) forwards")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="reduced CPU run that checks the benchmark works (automatic without CUDA)")
    parser.add_argument("--out-dir", type=Path, help="results folder (default: benchmarks/results; a temporary "
                                                     "folder for a CPU smoke run)")


def parse_ranks(text: str) -> list[int]:
    """--ranks as positive integers; a ValueError naming the option otherwise."""
    try:
        ranks = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1:
        raise ValueError(f"--ranks: {text!r}; give comma-separated positive integers, e.g. 16,64")
    return ranks


def run(args: argparse.Namespace, prog: str, argv: Sequence[str], echo: Callable[[str], None] = print) -> Outputs[Row]:
    """Measure each rank `args` asks for and write the markdown table and the CSV."""
    ranks = parse_ranks(args.ranks)  # bad arguments fail before anything is written
    if args.repeats is not None and args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    device = pick_device(args.cpu_smoke, echo)
    smoke = device.type != "cuda"
    run_info = Run.create("lora", device, prog, argv, args.out_dir)
    size = args.size or ("small" if smoke else "full")
    dtype = torch.float32 if smoke else torch.bfloat16
    backend = args.backend or ("reference" if smoke else "auto")
    repeats = args.repeats or (5 if smoke else 20)
    config = QuantConfig(args.scheme, backend=backend)
    lora_integration.register()
    rows: list[Row] = []
    stem = run_info.stem
    with (smoke_threads(smoke), MarkdownLog(stem.with_suffix(".md")) as markdown,
          CsvLog(stem.with_suffix(".csv"), CSV_HEADERS) as csv_log):
        full = build_flux(size, dtype=dtype, device=device)
        inputs = flux_inputs(full)
        base = copy.deepcopy(full)
        quantize_(base, config, progress=False)
        names = [name for name, layer in base.named_modules() if isinstance(layer, QuantizedLinear)]

        def timed(model: nn.Module) -> float:
            runs = torch.compile(model, fullgraph=True) if args.compile else model
            return median_ms(lambda: forward(runs, inputs), device, warmup=2 if args.compile else 1,
                             repeats=repeats)

        setup = (f"FLUX {size} {dtype_name(dtype)} on {device.type}, {args.scheme} backend={backend}, {len(names)} "
                 f"quantized Linear layers with a LoRA, {'compiled' if args.compile else 'eager'}")
        echo(setup)
        markdown.write(*run_info.header_lines(f"LoRA on a quantized FLUX transformer on {device_title(device)}"), "",
                       f"- {setup}; median of {repeats} forward(s) after a warmup call",
                       f"- random LoRA on every quantized layer, ‖scale·BA‖ = {DELTA}‖W‖; errors: relative L2 "
                       "against the full-precision model with the LoRA merged into its weights (unfused: only W is "
                       "quantized; fused: W + scale·BA re-quantized; no LoRA: the quantized base alone)")
        markdown.table(TABLE_HEADERS)
        echo(markdown_row(TABLE_HEADERS))
        for rank in ranks:
            try:
                row = measure_rank(rank, full, base, names, inputs, timed)
            except Exception as e:  # one rank failing (memory, a compile error) leaves the others measured
                row = Row(rank, note=failed_note(e))
            rows.append(row)
            markdown.row(row.cells())
            csv_log.write(row)
            echo(markdown_row(row.cells()))
    echo(f"wrote {markdown.path}, {csv_log.path}")
    return Outputs(markdown.path, csv_log.path, None, rows, [])


def main(argv: Sequence[str] | None = None, prog: str = "python benchmarks/bench_lora.py") -> int:
    """`python benchmarks/bench_lora.py`: the same as `quantrt bench lora`."""
    return script_main(sys.modules[__name__], argv, prog)


if __name__ == "__main__":
    sys.exit(main())
