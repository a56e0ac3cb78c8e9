"""LoRA on a quantized FLUX transformer (issue 18): what an unfused LoRA costs, and how fused compares to unfused.

    python benchmarks/bench_lora.py [--size full] [--ranks 16,64] [--scheme int8wo] [--compile] [--cpu-smoke]

Per rank, on diffusers' FluxTransformer2DModel (quantrt.models.build_flux, random weights) with a random LoRA on
every Linear layer that quantrt quantizes (A ~ N(0, 1/in), B scaled so that scale·BA is ~20% of W's norm):
- time per forward (median, CUDA events or perf_counter) of the quantized model without a LoRA, with the LoRA
  unfused (PEFT's QuantizedLoraLinear beside the quantized matmul: two more small matmuls per layer), and fused
  (fuse_lora: W + scale·BA re-quantized into the scheme: the base forward's cost); the unfused overhead in %;
- relative L2 error of each against the full-precision model with the LoRA merged into its float weights (the
  output the LoRA's author meant): unfused keeps the LoRA exact and only W is quantized, fused also rounds BA.

On CUDA: --size full, bf16, backend auto; --compile times torch.compile(fullgraph=True) forwards instead.
Without CUDA (or --cpu-smoke): the small FLUX in float32 on the reference backend, one thread, 5 repeats.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model

import quantrt
from quantrt import QuantConfig, QuantizedLinear
from quantrt.bench.common import median_ms, pick_device, smoke_threads
from quantrt.integrations import peft as lora_integration
from quantrt.metrics import relative_error
from quantrt.models import build_flux, flux_inputs

DELTA = 0.2  # ‖scale·BA‖ / ‖W‖ per layer: a strong style LoRA


def random_lora(model: nn.Module, names: list[str], rank: int, seed: int) -> dict[str, tuple[torch.Tensor, ...]]:
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
    with torch.no_grad():
        return model(**inputs)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default=None, help="FLUX size: tiny, small, full (default: full; smoke: small)")
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--scheme", default="int8wo")
    parser.add_argument("--backend", default=None, help="default: auto on CUDA, reference on CPU")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="time torch.compile(fullgraph=True) forwards")
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args(argv)
    device = pick_device(args.cpu_smoke)
    smoke = device.type == "cpu"
    size = args.size or ("small" if smoke else "full")
    dtype = torch.float32 if smoke else torch.bfloat16
    backend = args.backend or ("reference" if smoke else "auto")
    repeats = args.repeats or (5 if smoke else 20)
    lora_integration.register()

    with smoke_threads(smoke):
        full = build_flux(size, dtype=dtype, device=device)
        inputs = flux_inputs(full)
        base = copy.deepcopy(full)
        quantrt.quantize_(base, QuantConfig(args.scheme, backend=backend), progress=False)
        names = [name for name, layer in base.named_modules() if isinstance(layer, QuantizedLinear)]

        def timed(model: nn.Module) -> float:
            run = torch.compile(model, fullgraph=True) if args.compile else model
            return median_ms(lambda: forward(run, inputs), device, warmup=2 if args.compile else 1,
                             repeats=repeats)

        print(f"FLUX {size} {str(dtype).removeprefix('torch.')} on {device.type}, {args.scheme} backend={backend}, "
              f"{len(names)} quantized Linear layers with a LoRA, {'compiled' if args.compile else 'eager'}")
        print("| rank | no LoRA ms | unfused ms | overhead | fused ms | error unfused | error fused | error no LoRA |")
        print("|---|---|---|---|---|---|---|---|")
        for rank in [int(r) for r in args.ranks.split(",")]:
            lora = random_lora(full, names, rank, seed=rank)
            merged = copy.deepcopy(full)
            with torch.no_grad():
                for name, (a, b) in lora.items():
                    layer = merged.get_submodule(name)
                    layer.weight.copy_((layer.weight.float() + (b @ a).to(device)).to(dtype))
            reference = forward(merged, inputs).float()
            del merged
            model = copy.deepcopy(base)
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=names), model)
            with torch.no_grad():
                for name, (a, b) in lora.items():
                    layer = model.get_submodule(name)
                    layer.lora_A["default"].weight.copy_(a)
                    layer.lora_B["default"].weight.copy_(b)
            base_ms = timed(base)  # again per rank, next to the LoRA's: a shared machine drifts
            unfused_ms = timed(model)
            unfused_error = relative_error(forward(model, inputs).float(), reference)
            for layer in model.modules():
                if isinstance(layer, lora_integration.QuantizedLoraLinear):
                    layer.merge()
            fused_ms = timed(model)
            fused_error = relative_error(forward(model, inputs).float(), reference)
            plain_error = relative_error(forward(base, inputs).float(), reference)
            print(f"| {rank} | {base_ms:.1f} | {unfused_ms:.1f} | {100 * (unfused_ms / base_ms - 1):+.0f}% | {fused_ms:.1f} | "
                  f"{unfused_error:.4f} | {fused_error:.4f} | {plain_error:.3f} |")
            del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
