"""End-to-end benchmark (`quantrt bench model`, `python benchmarks/bench_transformer.py`): whole models with
random weights, bf16 against each scheme through quantrt and through torchao's own `quantize_` with the
torchao config that quantrt maps the scheme onto (`quantrt.backends.torchao.torchao_config`), eager and
compiled.

Models:
- flux: diffusers' FluxTransformer2DModel at FLUX.1-dev's dimensions (`quantrt.models.build_flux("full")`,
  12B parameters) at 1024x1024: 4096 image + 512 text tokens, batch 1.
- llm: a transformers LlamaForCausalLM at Llama-3-8B's dimensions (`quantrt.models.build_llm("8b")`, built on
  the meta device with accelerate, then materialized on the GPU) at a decode-like shape: batch 1, 1 token
  (`--llm-tokens`, `--llm-batch`), no KV cache. Skipped with the reason when transformers is not installed.

Per (model, scheme, provider), on a freshly built model (the same random weights every time; one model in
GPU memory at a time): eager time per forward (median of `--repeats` after a warmup call, CUDA events), peak
GPU memory (torch.cuda.max_memory_allocated over those forwards: weights, activations and workspace), weight
bytes (every parameter and buffer as stored, torchao's and quanto's tensor subclasses by their inner tensors),
the output's relative L2 error against the bf16 model's eager output; then torch.compile(fullgraph=True,
mode="max-autotune") (or `--regional`: the repeated blocks only, each with the same arguments; or
`--compile-mode`), the first call's seconds (compilation and autotuning), and the same time, memory and error
of the compiled forward. quantrt uses backend="auto" (its Triton kernels for weight-only schemes on CUDA);
torchao quantizes the same layers (those the scheme can store), without its Inductor settings
(set_inductor_config=False: quantrt never changes global Inductor settings, and both sides compile alike).

Autoquant (issue 9; `--no-autoquant` leaves it out): per model, one more row, scheme "autoquant" provider
"quantrt": a freshly built model goes through `quantrt.autoquant` on the inputs the benchmark times (so the
layers are measured at the shapes timed), choosing per Linear layer among `--autoquant-candidates` (default:
the run's schemes; in the CPU smoke run the first two) within `--autoquant-max-error` (the relative L2 error
each layer's output may add, default 0.05), objective speed, with autoquant's default timer; then it is
measured exactly like the fixed-scheme rows. Its plan is written as JSON next to the results
(`<stem>-<model>-autoquant-plan.json`, `quantrt.AutoquantPlan.from_json` reads it) and the markdown counts
the layers per chosen scheme and backend. Measuring takes a while on a large model: every candidate through
every backend that can serve it, on every layer.

GGUF (issue 21): for a GGUF block type (`--schemes q4_k,q8_0`, in the default schemes) the provider
"diffusers-gguf" is diffusers' own GGUF path on the same numbers: every Linear layer quantrt stores in that type
becomes diffusers' GGUFLinear holding the same GGUF blocks (quantrt's quantizer, written in GGUF's layout by
quantrt.checkpoints.gguf.gguf_block_bytes), which dequantizes its weight on every forward; quantrt serves the
same blocks from its fused kernels. The provider pairs with GGUF schemes only.

Targets (issue 7): every weight-only scheme, through quantrt, at least as fast as bf16 when both are
compiled; the best quantrt scheme >= 1.4x bf16 compiled; each GGUF scheme through quantrt at least as fast as
diffusers' GGUF path, both compiled. Reported, not a target: whether autoquant's compiled
forward is faster than every fixed quantrt scheme's, with the errors side by side. Without CUDA (or with
--cpu-smoke) a reduced run checks the benchmark itself: the tiny FLUX and Llama configs, few schemes, a CPU
timer, nothing compiled unless `--compile` is given.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..backends.torchao import TorchaoCannotServe, torchao_config
from ..calibrate import calibrate
from ..compile import repeated_blocks
from ..checkpoints.gguf import gguf_block_bytes
from ..config import AUTOQUANT_MAX_ERROR, QuantConfig
from ..formats import GgufFormat
from ..kernels.quantize import quantize_gguf_fields
from ..metrics import relative_error
from ..models import FLUX_SIZES, FLUX_TOKENS, LLM_SIZES, build_flux, build_llm, flux_inputs
from ..schemes import Scheme, resolve_scheme
from ..tables import format_table
from ..version import distribution_version
from ..transformer import QuantizedTransformer, autoquant
from .common import (Outputs, Run, median_ms, pick_device, private_tuning_table, script_main, smoke_threads,
                     stored_bytes, synchronize)
from .report import (PLOT_MISSING, CsvLog, TargetResult, cell, csv_headers, device_title, dtype_name, failed_note,
                     note_cell, pyplot, targets_table, write_text)

MODELS = ("flux", "llm")
SCHEMES = ("int8wo", "int4wo", "uint3wo", "float8wo_e4m3", "float8wo_e5m2", "fp6_e3m2", "q4_k", "q8_0")
SMOKE_SCHEMES = ("int8wo", "int4wo", "fp6_e3m2")
PROVIDERS = ("quantrt", "torchao", "diffusers-gguf")
GGUF_PROVIDER = "diffusers-gguf"  # diffusers' GGUFLinear: GGUF schemes only
BASELINE = "bf16"
TARGET_BEST_SPEEDUP = 1.4
AUTOQUANT = "autoquant"  # the autoquant row's scheme column
AUTOQUANT_SMOKE_CANDIDATES = 2  # the CPU smoke run's default candidates: the first two of its schemes


class ModelSkip(Exception):
    """A model or provider cannot run here; the message is the reason."""


@dataclass
class ModelCase:
    """One model of the benchmark: how to build it afresh (same weights each time), its inputs, and how to
    take the output tensor from what its forward returns."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[[nn.Module], dict[str, Any]]  # the forward's keyword arguments, from the bf16 model
    output: Callable[[Any], torch.Tensor]


@dataclass
class Row:
    model: str
    scheme: str
    provider: str
    detail: str = ""
    eager_ms: float | None = None
    compiled_ms: float | None = None
    eager_speedup: float | None = None
    compiled_speedup: float | None = None
    peak_eager_gb: float | None = None
    peak_compiled_gb: float | None = None
    weight_gb: float | None = None
    error_eager: float | None = None
    error_compiled: float | None = None
    compile_s: float | None = None
    note: str = ""


CSV_HEADERS = csv_headers(Row)
TABLE_HEADERS = ["model", "scheme", "provider", "backends / config", "eager ms", "compiled ms", "eager speed-up",
                 "compiled speed-up", "peak GB eager", "peak GB compiled", "weight GB", "rel. err eager",
                 "rel. err compiled", "compile s", "note"]


@dataclass
class AutoquantOptions:
    """How the autoquant row runs: its candidates (scheme names), the error budget per layer, the results'
    path without suffix (plans go to <stem>-<model>-autoquant-plan.json), the default timer's repeats, and
    whether autoquant shows a progress bar (None: on a terminal)."""

    candidates: list[str]
    max_error: float
    stem: Path
    repeats: int = 5
    progress: bool | None = None

    def plan_path(self, model: str) -> Path:
        return self.stem.with_name(f"{self.stem.name}-{model}-{AUTOQUANT}-plan.json")


def table_row(r: Row) -> list[str]:
    """A row of the "Results" table (TABLE_HEADERS)."""
    return [r.model, r.scheme, r.provider, r.detail or "-", cell(r.eager_ms, 4), cell(r.compiled_ms, 4),
            cell(r.eager_speedup), cell(r.compiled_speedup), cell(r.peak_eager_gb), cell(r.peak_compiled_gb),
            cell(r.weight_gb), cell(r.error_eager, 2), cell(r.error_compiled, 2), cell(r.compile_s),
            note_cell(r.note)]


def flux_case(size: str, device: torch.device, dtype: torch.dtype) -> ModelCase:
    if importlib.util.find_spec("diffusers") is None:
        raise ModelSkip("diffusers is not installed (pip install \"quantrt[diffusers]\")")
    config = FLUX_SIZES[size]
    image, text = FLUX_TOKENS[size]
    return ModelCase(
        "flux", f"FluxTransformer2DModel {size} ({config['num_layers']} + {config['num_single_layers']} blocks), "
                f"{image} image + {text} text tokens, batch 1",
        lambda: build_flux(size, dtype=dtype, device=device), flux_inputs, lambda out: out[0])


def llm_case(size: str, tokens: int, batch: int, device: torch.device, dtype: torch.dtype) -> ModelCase:
    if importlib.util.find_spec("transformers") is None:
        raise ModelSkip("transformers is not installed (pip install transformers)")
    config = LLM_SIZES[size]
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config["vocab_size"], (batch, tokens), generator=generator).to(device)
    return ModelCase(
        "llm", f"LlamaForCausalLM {size} ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}), "
               f"batch {batch} x {tokens} token(s), no KV cache",
        lambda: build_llm(size, dtype=dtype, device=device), lambda model: {"input_ids": input_ids, "use_cache": False},
        lambda out: out.logits)


def _quantize_quantrt(model: nn.Module, scheme: Scheme, inputs: dict) -> tuple[nn.Module, str]:
    qt = QuantizedTransformer.from_model(model, QuantConfig(scheme.name, group_size=scheme.group_size),
                                         progress=False)
    if scheme.activation == "fp8_static":
        calibrate(qt, [inputs])
    used = Counter(r.backend for r in qt.summary() if r.quantized)
    kept = sum(not r.quantized for r in qt.summary())
    detail = ", ".join(f"{b} x{n}" for b, n in used.items()) + (f", {kept} kept bf16" if kept else "")
    return qt.model, detail


def _counts(counter: Counter) -> str:
    return ", ".join(f"{name} x {count}" for name, count in counter.most_common())


def _autoquant_model(case: ModelCase, inputs: dict[str, Any], options: AutoquantOptions, row: Row) -> nn.Module:
    """A fresh model through quantrt.autoquant on the benchmark's inputs; writes the plan as JSON, puts the
    layers per chosen scheme (and backend) in row.detail and the measuring time and plan file in row.note."""
    model = case.build()
    start = time.perf_counter()
    qt = autoquant(model, [inputs], candidates=options.candidates, max_error=options.max_error,
                   repeats=options.repeats, progress=options.progress)
    seconds = time.perf_counter() - start
    plan = qt.autoquant_plan
    path = options.plan_path(case.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan.to_json())
    chosen = [layer.chosen for layer in plan.layers.values()]
    # Trial.label is "int4wo(g64)/torchao"; the scheme is what precedes the backend
    schemes = Counter(t.label.rsplit("/", 1)[0] if t and t.scheme else "full precision" for t in chosen)
    backends = Counter(t.backend for t in chosen if t and t.scheme)
    row.detail = f"{len(chosen)} layers: {_counts(schemes)}" + (f" (backends {_counts(backends)})" if backends else "")
    row.note = f"plan measured in {seconds:.1f} s: {path.name}"
    return qt.model


def _quantize_torchao(model: nn.Module, scheme: Scheme, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """torchao's own quantize_ with the config quantrt maps `scheme` onto, on the layers the scheme can store
    (the layers quantrt quantizes too)."""
    try:
        config = torchao_config(scheme, device, dtype)  # imports torchao.quantization, or says why it cannot
    except TorchaoCannotServe as e:
        raise ModelSkip(str(e)) from e
    from torchao.quantization import quantize_  # optional and seconds to import; loaded by now
    names = {name for name, module in model.named_modules()
             if type(module) is nn.Linear and scheme.unsupported_reason(module.out_features, module.in_features) is None}
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
    return model, f"torchao {distribution_version('torchao')} {type(config).__name__} x{len(names)}"


def _quantize_diffusers_gguf(model: nn.Module, scheme: Scheme) -> tuple[nn.Module, str]:
    """diffusers' GGUF path on the layers quantrt stores as `scheme` (a GGUF block type): each becomes diffusers'
    GGUFLinear holding the blocks of quantrt's quantization of its weight (so both providers compute with the
    same numbers), dequantized on every forward."""
    try:
        import gguf
        from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter
    except ImportError as e:
        raise ModelSkip(f"diffusers' GGUF path needs diffusers and gguf ({e})") from e
    kind = scheme.name.upper()
    count = 0
    for name, linear in list(model.named_modules()):
        if type(linear) is not nn.Linear or scheme.unsupported_reason(linear.out_features, linear.in_features):
            continue
        weight = linear.weight.detach()
        blocks = gguf_block_bytes(quantize_gguf_fields(weight, scheme.name), kind)
        layer = GGUFLinear(linear.in_features, linear.out_features, linear.bias is not None,
                           compute_dtype=weight.dtype, device="meta")
        layer.weight = GGUFParameter(blocks, quant_type=gguf.GGMLQuantizationType[kind])
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        model.set_submodule(name, layer.requires_grad_(False))
        count += 1
        del weight, linear
    return model, f"diffusers {distribution_version('diffusers')} GGUFLinear x{count}"


def pairs(scheme: Scheme, provider: str) -> bool:
    """Whether the benchmark has a row for `scheme` through `provider`: diffusers' GGUF path serves GGUF block
    types only."""
    return provider != GGUF_PROVIDER or isinstance(scheme.storage, GgufFormat)


def _regional_compile(model: nn.Module, mode: str) -> int:
    """Compile, in place, the blocks that qt.compile(regional=True) compiles (quantrt.compile.repeated_blocks:
    diffusers' `_repeated_blocks`, else ModuleLists of same-class blocks); returns how many."""
    blocks = repeated_blocks(model)
    if not blocks:
        raise RuntimeError(f"--regional: {type(model).__name__} has no `_repeated_blocks` and no ModuleList of "
                           f"repeated blocks")
    for block in blocks:
        block.compile(fullgraph=True, mode=mode)
    return len(blocks)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


@torch.no_grad()
def measure(row: Row, case: ModelCase, model: nn.Module, inputs: dict[str, Any], device: torch.device,
            reference: torch.Tensor | None, repeats: int, compile_mode: str | None, regional: bool) -> torch.Tensor:
    """Fill `row` with eager (and, where `compile_mode` is set, compiled) numbers; returns the eager output."""
    row.weight_gb = stored_bytes(model) / 1e9

    def forward(module: nn.Module) -> torch.Tensor:
        return case.output(module(**inputs))

    _reset_peak(device)
    eager_out = forward(model).clone()
    row.eager_ms = median_ms(lambda: forward(model), device, warmup=0, repeats=repeats)
    row.peak_eager_gb = _peak_gb(device)
    if reference is not None:
        row.error_eager = relative_error(eager_out, reference)
    if compile_mode is None:
        return eager_out
    torch._dynamo.reset()  # each model compiles afresh, never against another model's guards
    if regional:
        _regional_compile(model, compile_mode)
        compiled = model
    else:
        compiled = torch.compile(model, fullgraph=True, mode=compile_mode)

    def compiled_forward() -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # max-autotune replays CUDA graphs: one step per call
        return forward(compiled)

    start = time.perf_counter()
    compiled_out = compiled_forward().clone()
    synchronize(device)
    row.compile_s = time.perf_counter() - start
    _reset_peak(device)
    row.compiled_ms = median_ms(compiled_forward, device, warmup=1, repeats=repeats)
    row.peak_compiled_gb = _peak_gb(device)
    row.error_compiled = relative_error(compiled_out, reference if reference is not None else eager_out)
    return eager_out


def _release(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: ModelCase, schemes: Sequence[str], providers: Sequence[str], device: torch.device,
             dtype: torch.dtype, repeats: int, compile_mode: str | None, regional: bool,
             echo: Callable[[str], None] = print, on_row: Callable[[Row], None] = lambda row: None,
             autoquant_options: AutoquantOptions | None = None) -> list[Row]:
    """bf16 first (its eager output is the reference), then each (scheme, provider) on a fresh model, then
    (with `autoquant_options`) the autoquant row. `on_row` sees each row as soon as it is final."""
    echo(f"{case.name}: {case.description}")
    base = Row(case.name, BASELINE, "torch", detail=f"{dtype_name(dtype)}, unquantized")
    model = None
    try:
        model = case.build()
        inputs = case.make_inputs(model)
        reference = measure(base, case, model, inputs, device, None, repeats, compile_mode, regional)
    except Exception as e:  # without the bf16 reference there is nothing to compare with: next model
        base.note = failed_note(e)
        echo(f"  {BASELINE}: {base.note}")
        on_row(base)
        return [base]
    finally:
        del model
        _release(device)
    base.eager_speedup = 1.0
    base.compiled_speedup = 1.0 if base.compiled_ms else None
    on_row(base)
    echo(f"  {BASELINE:14} {'torch':8} eager {base.eager_ms:.2f} ms"
         + (f", compiled {base.compiled_ms:.2f} ms" if base.compiled_ms else ""))
    rows = [base]
    for name in schemes:
        scheme = resolve_scheme(name)
        for provider in filter(functools.partial(pairs, scheme), providers):
            row = Row(case.name, scheme.name, provider)
            quantized = functools.partial(_fixed_scheme_model, case, scheme, provider, inputs, device, dtype, row)
            rows.append(_timed_row(row, quantized, case, inputs, device, base, reference, repeats, compile_mode,
                                   regional, echo, on_row))
    if autoquant_options is not None:
        row = Row(case.name, AUTOQUANT, "quantrt")
        quantized = functools.partial(_autoquant_model, case, inputs, autoquant_options, row)
        rows.append(_timed_row(row, quantized, case, inputs, device, base, reference, repeats, compile_mode,
                               regional, echo, on_row))
    return rows


def _fixed_scheme_model(case: ModelCase, scheme: Scheme, provider: str, inputs: dict[str, Any],
                        device: torch.device, dtype: torch.dtype, row: Row) -> nn.Module:
    """A fresh model quantized with `scheme` through `provider`; row.detail says how."""
    model = case.build()
    if provider == "quantrt":
        model, row.detail = _quantize_quantrt(model, scheme, inputs)
    elif provider == GGUF_PROVIDER:
        model, row.detail = _quantize_diffusers_gguf(model, scheme)
    else:
        model, row.detail = _quantize_torchao(model, scheme, device, dtype)
    return model


def _timed_row(row: Row, quantized: Callable[[], nn.Module], case: ModelCase, inputs: dict[str, Any],
               device: torch.device, base: Row, reference: torch.Tensor, repeats: int, compile_mode: str | None,
               regional: bool, echo: Callable[[str], None], on_row: Callable[[Row], None]) -> Row:
    """Measure the model `quantized()` builds into `row` (a failure or skip goes in its note), then free it."""
    model = None
    try:
        model = quantized()
        measure(row, case, model, inputs, device, reference, repeats, compile_mode, regional)
        row.eager_speedup = base.eager_ms / row.eager_ms
        if row.compiled_ms and base.compiled_ms:
            row.compiled_speedup = base.compiled_ms / row.compiled_ms
    except ModelSkip as e:
        row.note = f"skipped: {e}"
    except Exception as e:  # one failing (scheme, provider) is reported, the run goes on
        row.note = failed_note(e)
    finally:
        del model
        _release(device)
    on_row(row)
    timing = (f"eager {row.eager_ms:.2f} ms" + (f", compiled {row.compiled_ms:.2f} ms" if row.compiled_ms else "")
              if row.eager_ms else row.note)
    echo(f"  {row.scheme:14} {row.provider:8} {timing}")
    return row


def check_targets(rows: Sequence[Row]) -> list[TargetResult]:
    """Per model: every weight-only scheme through quantrt >= bf16 compiled speed; the best quantrt scheme
    >= 1.4x bf16 compiled; where there is an autoquant row, how it compares with the fixed schemes
    (informational, `autoquant_comparison`)."""
    results = []
    for model in dict.fromkeys(r.model for r in rows):
        ours = [r for r in rows if r.model == model and r.provider == "quantrt" and r.scheme != AUTOQUANT]
        timed = [r for r in ours if r.compiled_speedup is not None]
        weight_only = [r for r in timed if resolve_scheme(r.scheme).weight_only]
        text = f"{model}: every weight-only scheme (quantrt) >= bf16, compiled"
        if not weight_only:
            results.append(TargetResult(text, "not measured", "no compiled quantrt weight-only rows"))
        else:
            slow = min(weight_only, key=lambda r: r.compiled_speedup)
            below = [r.scheme for r in weight_only if r.compiled_speedup < 1.0]
            untimed = [r.scheme for r in ours if r.compiled_speedup is None and resolve_scheme(r.scheme).weight_only]
            detail = f"slowest {slow.scheme} {slow.compiled_speedup:.2f}x"
            detail += f"; below bf16: {', '.join(below)}" if below else ""
            detail += f"; not timed: {', '.join(untimed)}" if untimed else ""
            results.append(TargetResult(text, "NOT met" if below else "met", detail))
        text = f"{model}: best quantrt scheme >= {TARGET_BEST_SPEEDUP}x bf16, compiled"
        if not timed:
            results.append(TargetResult(text, "not measured", "no compiled quantrt rows"))
        else:
            best = max(timed, key=lambda r: r.compiled_speedup)
            results.append(TargetResult(text, "met" if best.compiled_speedup >= TARGET_BEST_SPEEDUP else "NOT met",
                                        f"best {best.scheme} {best.compiled_speedup:.2f}x"))
        results += gguf_comparisons([r for r in rows if r.model == model])
        auto = next((r for r in rows if r.model == model and r.scheme == AUTOQUANT), None)
        if auto is not None:
            results.append(autoquant_comparison(auto, ours))
    return results


def gguf_comparisons(rows: Sequence[Row]) -> list[TargetResult]:
    """One model's rows -> per GGUF scheme with a diffusers-gguf row: quantrt >= diffusers' GGUF path, compiled."""
    results = []
    for theirs in (r for r in rows if r.provider == GGUF_PROVIDER):
        text = f"{theirs.model}: {theirs.scheme} through quantrt >= diffusers' GGUF path, compiled"
        ours = next((r for r in rows if r.provider == "quantrt" and r.scheme == theirs.scheme), None)
        if ours is None or ours.compiled_ms is None or theirs.compiled_ms is None:
            missing = [f"{r.provider}: {r.note or 'not compiled'}" for r in (ours, theirs)
                       if r is not None and r.compiled_ms is None]
            results.append(TargetResult(text, "not measured", "; ".join(missing) or "no quantrt row"))
            continue
        ratio = theirs.compiled_ms / ours.compiled_ms
        errors = "" if ours.error_compiled is None or theirs.error_compiled is None else (
            f"; err quantrt {ours.error_compiled:.2%}, diffusers {theirs.error_compiled:.2%}")
        results.append(TargetResult(text, "met" if ratio >= 1.0 else "NOT met",
                                    f"{ratio:.2f}x: quantrt {ours.compiled_ms:.4g} ms, diffusers "
                                    f"{theirs.compiled_ms:.4g} ms{errors}"))
    return results


def autoquant_comparison(auto: Row, fixed: Sequence[Row]) -> TargetResult:
    """Whether the autoquant row's compiled forward is faster than every fixed quantrt scheme's, with each
    one's time and error against bf16 (compiled; eager numbers in the detail where nothing was compiled).
    Informational: status "yes", "no" or "not measured"."""
    text = f"{auto.model}: autoquant faster than every fixed quantrt scheme, compiled (informational)"

    def point(r: Row, compiled: bool) -> str:
        ms, error = (r.compiled_ms, r.error_compiled) if compiled else (r.eager_ms, r.error_eager)
        return f"{r.scheme} {cell(ms, 4)} ms err {'-' if error is None else f'{error:.2%}'}"

    if auto.eager_ms is None:
        return TargetResult(text, "not measured", f"autoquant row: {auto.note or 'not timed'}")
    compiled = auto.compiled_ms is not None
    timed = [r for r in fixed if (r.compiled_ms if compiled else r.eager_ms) is not None]
    untimed = [r.scheme for r in fixed if r not in timed]
    detail = "; ".join([point(auto, compiled), *(point(r, compiled) for r in timed)])
    detail += f"; not timed: {', '.join(untimed)}" if untimed else ""
    if not compiled or not timed:
        why = "not compiled, eager: " if not compiled else "no fixed scheme timed compiled; "
        return TargetResult(text, "not measured", why + detail)
    slower_than = [r.scheme for r in timed if r.compiled_ms <= auto.compiled_ms]
    lower_error = [r.scheme for r in timed if r.error_compiled is not None and auto.error_compiled is not None
                   and r.error_compiled < auto.error_compiled]
    detail += f"; not faster than: {', '.join(slower_than)}" if slower_than else ""
    detail += f"; lower error: {', '.join(lower_error)}" if lower_error else "; no fixed scheme has a lower error"
    return TargetResult(text, "no" if slower_than else "yes", detail)


def plot_speedups(rows: Sequence[Row], path: Path, title: str) -> Path | None:
    """Bars of the speed-up over bf16 per scheme and provider (compiled where measured, else eager), one
    panel per model. None when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    models = list(dict.fromkeys(r.model for r in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4), squeeze=False)
    for axis, model in zip(axes.flat, models):
        schemes = list(dict.fromkeys(r.scheme for r in rows if r.model == model and r.provider != "torch"))
        width = 0.8 / len(PROVIDERS)
        compiled = any(r.compiled_speedup is not None for r in rows if r.model == model)
        for i, provider in enumerate(PROVIDERS):
            values = []
            for scheme in schemes:
                match = [r for r in rows if r.model == model and r.scheme == scheme and r.provider == provider]
                value = (match[0].compiled_speedup if compiled else match[0].eager_speedup) if match else None
                values.append(value or 0.0)
            axis.bar([j + i * width for j in range(len(schemes))], values, width, label=provider)
        axis.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(schemes))], schemes, rotation=30, ha="right")
        axis.set_ylabel(f"speed-up vs bf16 ({'compiled' if compiled else 'eager'})")
        axis.set_title(model)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def autoquant_lines(rows: Sequence[Row], options: AutoquantOptions | None) -> list[str]:
    """The markdown's autoquant section: per model, the layers per chosen scheme and backend, how long
    measuring took and the plan file (or why there is none)."""
    if options is None:
        return []
    lines = ["", "## Autoquant", "",
             f"Per layer, the fastest of {', '.join(options.candidates)} (each through every backend that can "
             f"serve it) whose output error on the timed inputs is at most {options.max_error:.2%}, else full "
             f"precision. The plan (every candidate's time, error and bytes per layer) is the JSON file named.", ""]
    for r in rows:
        if r.scheme == AUTOQUANT:
            lines.append(f"- {r.model}: " + "; ".join(part for part in (r.detail, r.note) if part))
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: flux, llm (default: both)")
    parser.add_argument("--schemes", help=f"comma-separated schemes (default: {','.join(SCHEMES)}; CPU smoke: "
                                          f"{','.join(SMOKE_SCHEMES)})")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="comma-separated: quantrt, torchao, diffusers-gguf (diffusers' GGUF path, with the "
                             "GGUF schemes only; default: all)")
    parser.add_argument("--flux-size", choices=tuple(FLUX_SIZES), help="default: full (CPU smoke: tiny)")
    parser.add_argument("--llm-size", choices=tuple(LLM_SIZES), help="default: 8b (CPU smoke: tiny)")
    parser.add_argument("--llm-tokens", type=int, default=1, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--llm-batch", type=int, default=1, help="sequences (default: %(default)s)")
    parser.add_argument("--repeats", type=int, help="timed forwards per point, median (default: 10; CPU smoke: 1)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time the compiled model too (default: yes on CUDA, no in the CPU smoke run)")
    parser.add_argument("--compile-mode", default="max-autotune",
                        help="torch.compile mode (default: %(default)s); fullgraph=True always")
    parser.add_argument("--regional", action="store_true",
                        help="compile only the repeated blocks (FLUX's transformer blocks, Llama's decoder layers), "
                             "each with fullgraph=True and the same mode: minutes less compilation")
    parser.add_argument("--autoquant", action=argparse.BooleanOptionalAction, default=True,
                        help="add an autoquant row per model: quantrt.autoquant on the timed inputs, its plan "
                             "written as <results>-<model>-autoquant-plan.json (default: yes)")
    parser.add_argument("--autoquant-candidates",
                        help=f"comma-separated schemes autoquant chooses among per layer (default: the run's "
                             f"schemes; CPU smoke: the first {AUTOQUANT_SMOKE_CANDIDATES} of them)")
    parser.add_argument("--autoquant-max-error", type=float, default=AUTOQUANT_MAX_ERROR,
                        help="the relative L2 error each layer's output may add under autoquant (default: "
                             "%(default)s)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="reduced CPU run that checks the benchmark works (automatic without CUDA)")
    parser.add_argument("--out-dir", type=Path, help="results folder (default: benchmarks/results; a temporary "
                                                     "folder for a CPU smoke run)")
    parser.add_argument("--tuning-file", type=Path,
                        help="quantrt's tuning table to read and fill (default: a fresh temporary one)")


def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"--{what}: {', '.join(unknown) or 'nothing given'}; choose from {', '.join(allowed)}")
    return names


def _autoquant_candidates(args: argparse.Namespace, schemes: Sequence[str], smoke: bool) -> list[str]:
    """The autoquant row's candidates, after checking them and --autoquant-max-error."""
    if not args.autoquant_candidates:
        candidates = list(schemes[:AUTOQUANT_SMOKE_CANDIDATES] if smoke else schemes)
    else:
        try:
            candidates = [resolve_scheme(s).name for s in args.autoquant_candidates.split(",") if s.strip()]
            QuantConfig(AUTOQUANT, candidates=candidates)
        except ValueError as e:
            raise ValueError(f"--autoquant-candidates: {e}") from e
    try:
        QuantConfig(AUTOQUANT, candidates=candidates, max_error=args.autoquant_max_error)
    except ValueError as e:
        raise ValueError(f"--autoquant-max-error: {e}") from e
    return candidates


def run(args: argparse.Namespace, prog: str, argv: Sequence[str], echo: Callable[[str], None] = print) -> Outputs[Row]:
    """Run the model benchmark as `args` say and write its markdown, CSV and PNG."""
    device = pick_device(args.cpu_smoke, echo)
    smoke = device.type != "cuda"
    models = _names(args.models, MODELS, "models")  # bad arguments fail before anything is written
    providers = _names(args.providers, PROVIDERS, "providers")
    schemes = [resolve_scheme(s).name for s in (args.schemes.split(",") if args.schemes else
                                                 SMOKE_SCHEMES if smoke else SCHEMES) if s.strip()]
    if args.llm_tokens < 1 or args.llm_batch < 1:
        raise ValueError("--llm-tokens and --llm-batch must be at least 1")
    candidates = _autoquant_candidates(args, schemes, smoke) if args.autoquant else None
    run_info = Run.create("model", device, prog, argv, args.out_dir)
    dtype = torch.bfloat16
    repeats = args.repeats or (1 if smoke else 10)
    compile_mode = args.compile_mode if (args.compile if args.compile is not None else not smoke) else None
    flux_size = args.flux_size or ("tiny" if smoke else "full")
    llm_size = args.llm_size or ("tiny" if smoke else "8b")
    rows: list[Row] = []
    descriptions = []
    stem = run_info.stem
    autoquant_options = (AutoquantOptions(candidates, args.autoquant_max_error, stem, repeats=1 if smoke else 5,
                                          progress=False if smoke else None) if args.autoquant else None)
    with (smoke_threads(smoke), private_tuning_table(device, args.tuning_file) as tuning,
          CsvLog(stem.with_suffix(".csv"), CSV_HEADERS) as csv_log):
        echo(f"writing {csv_log.path} as models are measured")
        for name in models:
            try:
                case = (flux_case(flux_size, device, dtype) if name == "flux" else
                        llm_case(llm_size, args.llm_tokens, args.llm_batch, device, dtype))
            except ModelSkip as e:
                echo(f"{name}: skipped: {e}")
                descriptions.append(f"- {name}: skipped: {e}")
                rows.append(Row(name, BASELINE, "torch", note=f"skipped: {e}"))
                csv_log.write(rows[-1])
                continue
            descriptions.append(f"- {name}: {case.description}")
            rows += run_case(case, schemes, providers, device, dtype, repeats, compile_mode, args.regional, echo,
                             csv_log.write, autoquant_options)
    targets = check_targets(rows)
    where = device_title(device)
    plot = plot_speedups(rows, stem.with_suffix(".png"), f"quantrt end to end on {where}: speed-up over bf16")
    compiled = ("not compiled" if compile_mode is None else
                f"torch.compile(fullgraph=True, mode={compile_mode!r})" + (", regional (repeated blocks)"
                                                                           if args.regional else ""))
    lines = run_info.header_lines(f"End-to-end transformer benchmark on {where}")
    lines += ["- models, bf16, random weights:", *(f"  {d}" for d in descriptions),
              f"- schemes: {', '.join(schemes)}; providers: {', '.join(providers)}; {compiled}; median of "
              f"{repeats} forward(s) after a warmup call" + (" (CUDA events)" if device.type == "cuda" else ""),
              "- quantrt tuning table: " + (f"{tuning} (filled on each model's first forward)" if tuning else
                                           "none (nothing is tuned off CUDA)"),
              "- rel. err = ||y - y_bf16|| / ||y_bf16|| against the bf16 model's eager output; peak GB = "
              "torch.cuda.max_memory_allocated over the timed forwards (weights included); weight GB = every "
              "parameter and buffer as stored",
              "- autoquant: " + (f"candidates {', '.join(candidates)}, max_error {args.autoquant_max_error:g} per "
                                 f"layer (relative L2 error of its output on the timed inputs), objective speed"
                                 if candidates else "off (--no-autoquant)"),
              "", "## Targets", "",
              targets_table(targets),
              "", "## Results", "",
              format_table(TABLE_HEADERS, [table_row(r) for r in rows]),
              *autoquant_lines(rows, autoquant_options),
              "", f"Plot: `{plot.name}`" if plot else f"Plot: none, {PLOT_MISSING}"]
    markdown = write_text(stem.with_suffix(".md"), lines)
    csv_path = csv_log.path
    echo("\n" + format_table(TABLE_HEADERS, [table_row(r) for r in rows]))
    echo("\n" + targets_table(targets))
    if plot is None:
        echo(PLOT_MISSING)
    echo(f"wrote {markdown}, {csv_path}" + (f", {plot}" if plot else ""))
    return Outputs(markdown, csv_path, plot, rows, targets)


def main(argv: Sequence[str] | None = None, prog: str = "python benchmarks/bench_transformer.py") -> int:
    """`python benchmarks/bench_transformer.py`: the same as `quantrt bench model`."""
    return script_main(sys.modules[__name__], argv, prog)