"""Automatic per-layer choice of scheme and backend ("autoquant"), within an error budget.

    qt = quantrt.autoquant(model, example_inputs, candidates=["int8wo", "int4wo"], max_error=0.05)
    qt = QuantizedTransformer.from_model(model, QuantConfig("autoquant", ...), example_inputs=[...])

What is measured, per nn.Linear layer (`measure`):

1. Capture: forward pre-hooks record the layer's real inputs while the model runs on the example inputs:
   up to `max_rows` rows [rows, K] (evenly thinned when it saw more, so memory stays at about
   layers x max_rows x K activations), how many rows each call had (the shapes to time), and the largest |x|
   (the static fp8 scale of float8_static_activation_float8_weight).
2. For each candidate scheme and each backend that could serve it on this layer and device, the layer is
   quantized and measured:
   - error: the relative L2 error of the layer's output, ||y_q - y||_2 / ||y||_2 over the captured rows, in
     float64, where y is the unquantized layer's output (its own dtype, bias included) and y_q the quantized
     layer's output through that backend. It is what the layer adds, not the model's end-to-end error.
   - time: for each row count M the layer saw, the timer's milliseconds for one call on an [M, K] input (the
     captured rows repeated), times how often M occurred: the layer's time over one pass of the examples.
     Default timer (`DefaultTimer`): on CUDA the median of triton.testing.do_bench (it flushes L2 between
     calls); elsewhere the median of `repeats` perf_counter samples, each at least 1 ms of repeated calls.
   - bytes: what the layer keeps in memory (QuantizedLinear.storage_bytes): its buffers, which save_pretrained
     writes, plus any copy its backend keeps beside them (quanto's 4/2-bit packing, torchao's unpacked intX codes),
     so objective="memory" prefers a backend whose weight is a view of the buffers.
   A candidate that cannot run (K not a multiple of its group size, a backend that cannot serve it, a
   backend that fails) is recorded with its reason and skipped. Times are of the eager layer; a compiled
   model fuses around it, so the end-to-end effect is for the model benchmark to show.
3. Choice: among measured candidates with error <= max_error, the fastest (objective="speed", ties: fewer
   bytes) or the smallest (objective="memory", ties: faster); full precision where none fits. The next in
   that order is the runner-up. A None candidate lets the unquantized layer compete (error 0).

Backends measured: the one asked for (QuantConfig backend= or QUANTRT_BACKEND), else every backend that
`select_backend` could pick, in its order; on CPU the Triton interpreter is not measured unless asked for
(it proves kernel code and is no deploy target).

The plan (`AutoquantPlan`) is JSON: `save_pretrained` stores it in quantrt_config.json ("autoquant_plan"),
`from_pretrained` restores it as `qt.autoquant_plan`, the compile cache keeps it with `plan.to_json()`. It
holds for the device name and the torch/triton/torchao/optimum-quanto/quantrt versions it was measured with
(`is_valid_for`). Loading a saved model never measures: its stored weights are the chosen schemes, and
measuring again needs the full-precision weights. A plan that is stale there warns, and each layer's backend
is then chosen afresh for the device (backend "auto"). `autoquant(model, inputs, plan=plan)` reuses a valid
plan for the same full-precision model without measuring, and measures again where it is stale.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .backends import ORDER, backend_and_reason, requested_backend
from .devices import device_name
from .examples import run_examples
from .config import QuantConfig
from .interop import to_quant_config
from .kernels.quantize import FP8_DTYPES
from .metrics import relative_error
from .modules import LayerReport, QuantizedLinear, init_act_scale
from .schemes import Scheme, resolve_scheme
from .serialization import CONFIG_NAME, CheckpointError
from .tables import format_table
from .version import __version__, distribution_version


PLAN_FORMAT = 1
ERROR_METRIC = "relative_l2"
# the packages whose versions change what a layer computes or how fast: a plan holds for these only
VERSIONED_PACKAGES = ("torch", "triton", "torchao", "optimum-quanto", "quantrt")
FULL_PRECISION = "torch"  # the backend name of an unquantized layer, as in LayerReport


@dataclass(frozen=True)
class TimingKey:
    """What a timer is asked to time: one call of `layer` in `scheme` (None: the unquantized layer)
    through `backend` on an input of `rows` rows, on `device` ("cpu", "cuda:0")."""

    layer: str
    scheme: str | None
    group_size: int | None
    backend: str
    rows: int
    device: str


# timer(fn, key) -> milliseconds of one call of fn (which runs the layer once on the input of key.rows rows)
Timer = Callable[[Callable[[], Any], TimingKey], float]


class DefaultTimer:
    """Milliseconds of one call. CUDA: median of triton.testing.do_bench (CUDA events, L2 flushed between
    calls), or of CUDA events without triton. Elsewhere: median of `repeats` perf_counter samples, each
    looping the call for at least `min_sample_s` so that it is not clock noise."""

    def __init__(self, repeats: int = 5, min_sample_s: float = 1e-3):
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.repeats, self.min_sample_s = repeats, min_sample_s

    def __call__(self, fn: Callable[[], Any], key: TimingKey) -> float:
        if key.device.startswith("cuda"):
            return self._cuda(fn)
        fn()  # warm-up: first calls build caches and pick kernels
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        number = max(1, min(10_000, math.ceil(self.min_sample_s / max(once, 1e-7))))
        samples = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples.append((time.perf_counter() - start) / number)
        return statistics.median(samples) * 1e3

    def _cuda(self, fn: Callable[[], Any]) -> float:
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, return_mode="median"))
        fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(max(self.repeats, 10)):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        return statistics.median(samples)


@dataclass
class Trial:
    """One candidate scheme through one backend on one layer. `skipped` says why it could not be measured
    (then ms, error and bytes are None). scheme None is the unquantized layer."""

    scheme: str | None
    group_size: int | None
    backend: str
    ms: float | None = None
    error: float | None = None
    bytes: int | None = None
    skipped: str | None = None

    @property
    def measured(self) -> bool:
        return self.skipped is None and self.ms is not None and self.error is not None

    @property
    def label(self) -> str:
        """'int4wo/torchao', 'int4wo(g64)/reference' where the group is not the scheme's default,
        'full precision'."""
        if self.scheme is None:
            return "full precision"
        name = self.scheme
        if self.group_size != resolve_scheme(self.scheme).group_size:
            name += f"(g{self.group_size})" if self.group_size else "(per channel)"
        return f"{name}/{self.backend}"

    def to_scheme(self) -> Scheme | None:
        if self.scheme is None:
            return None
        return resolve_scheme(self.scheme, self.group_size if self.group_size else -1)


@dataclass
class LayerChoice:
    """What autoquant measured and chose for one Linear layer. `choice` and `runner_up` index `trials`;
    choice None keeps the layer in full precision for `reason`. `calls`: rows per call -> how many calls."""

    out_features: int
    in_features: int
    dtype: str
    calls: dict[int, int]
    full_precision_ms: float | None
    full_precision_bytes: int
    trials: list[Trial] = field(default_factory=list)
    choice: int | None = None
    runner_up: int | None = None
    reason: str = ""

    @property
    def chosen(self) -> Trial | None:
        return None if self.choice is None else self.trials[self.choice]

    @property
    def second(self) -> Trial | None:
        return None if self.runner_up is None else self.trials[self.runner_up]


@dataclass
class AutoquantPlan:
    """Per layer: the scheme and backend autoquant chose, with every candidate's time, error and bytes, and
    where it was measured (device name, package versions). JSON with `to_json` / `from_json`."""

    device: str
    versions: dict[str, str | None]
    max_error: float
    objective: str
    candidates: list[dict[str, Any] | None]
    layers: dict[str, LayerChoice]
    error_metric: str = ERROR_METRIC
    format_version: int = PLAN_FORMAT

    def scheme_for(self, name: str) -> Scheme | None:
        """The scheme chosen for layer `name` (None: full precision)."""
        chosen = self.layers[name].chosen
        return None if chosen is None else chosen.to_scheme()

    def backend_for(self, name: str) -> str:
        chosen = self.layers[name].chosen
        return FULL_PRECISION if chosen is None or chosen.scheme is None else chosen.backend

    def overrides(self) -> dict[str, QuantConfig | None]:
        """Layer -> QuantConfig(scheme, backend=chosen backend), or None for full precision: the per-module
        overrides of QuantConfig that apply this plan."""
        modules = {}
        for name, layer in self.layers.items():
            chosen = layer.chosen
            if chosen is None or chosen.scheme is None:
                modules[name] = None
            else:
                modules[name] = QuantConfig(chosen.scheme, group_size=chosen.group_size, backend=chosen.backend)
        return modules

    def stale_reason(self, device: torch.device | str) -> str | None:
        """Why this plan's timings do not hold on `device` with the installed packages (None: they do)."""
        here = device_name(device)
        if here != self.device:
            return f"it was measured on {self.device!r}, this device is {here!r}"
        now = current_versions()
        changed = [f"{k} {self.versions.get(k)} -> {now.get(k)}" for k in VERSIONED_PACKAGES
                   if self.versions.get(k) != now.get(k)]
        if changed:
            return f"package versions changed since it was measured ({', '.join(changed)})"
        return None

    def is_valid_for(self, device: torch.device | str) -> bool:
        """Whether the plan's timings hold here: same device name and package versions."""
        return self.stale_reason(device) is None

    def matches(self, config: QuantConfig) -> str | None:
        """Why this plan does not answer `config` (other candidates, max_error or objective), or None."""
        options = config.to_dict()
        for key in ("candidates", "max_error", "objective"):
            if getattr(self, key) != options[key]:
                return f"it was made for {key}={getattr(self, key)!r}, the config asks for {options[key]!r}"
        return None

    def describe(self, name: str) -> str:
        """One line for summary(): the choice, its time and error, and the runner-up."""
        layer = self.layers[name]
        chosen = layer.chosen
        if chosen is None:
            return f"autoquant: full precision, {layer.reason}"
        text = f"autoquant: {_trial_text(chosen, self.objective)}"
        second = layer.second
        if second is None:
            return text + f" (no runner-up within max_error {self.max_error:.2%})"
        return text + f" (runner-up {_trial_text(second, self.objective)})"

    def table(self) -> str:
        """A markdown table: layer, choice, ms, error, bytes, runner-up, full-precision ms."""

        rows = []
        for name, layer in self.layers.items():
            chosen, second = layer.chosen, layer.second
            rows.append([name, f"{layer.out_features}x{layer.in_features}",
                         chosen.label if chosen else "full precision",
                         _ms(chosen.ms if chosen else layer.full_precision_ms),
                         f"{chosen.error:.2%}" if chosen else "0",
                         chosen.bytes if chosen else layer.full_precision_bytes,
                         second.label if second else "-", _ms(layer.full_precision_ms)])
        return format_table(["layer", "NxK", "choice", "ms", "error", "bytes", "runner-up", "full ms"], rows)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for layer in data["layers"].values():
            layer["calls"] = {str(rows): count for rows, count in layer["calls"].items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoquantPlan:
        try:
            if data["format_version"] != PLAN_FORMAT:
                raise ValueError(f"format version {data['format_version']!r}, this quantrt reads {PLAN_FORMAT}")
            layers = {}
            for name, layer in data["layers"].items():
                layer = dict(layer)
                layer["trials"] = [Trial(**trial) for trial in layer["trials"]]
                layer["calls"] = {int(rows): int(count) for rows, count in layer["calls"].items()}
                layers[name] = LayerChoice(**layer)
                for index in (layers[name].choice, layers[name].runner_up):
                    if index is not None and not 0 <= index < len(layers[name].trials):
                        raise ValueError(f"layer {name!r} points at trial {index} of {len(layers[name].trials)}")
            return cls(**{**data, "layers": layers})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"not a valid autoquant plan: {type(e).__name__}: {e}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> AutoquantPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"an autoquant plan is JSON, this is not: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"an autoquant plan is a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g} ms"


def _trial_text(trial: Trial, objective: str) -> str:
    size = f", {trial.bytes:,} B" if objective == "memory" else ""
    return f"{trial.label} {_ms(trial.ms)}, err {trial.error:.2%}{size}"


def current_versions() -> dict[str, str | None]:
    """Installed versions of VERSIONED_PACKAGES (None where not installed)."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        if name == "torch":
            versions[name] = torch.__version__
        elif name == "quantrt":
            versions[name] = __version__
        else:
            versions[name] = distribution_version(name)
    return versions


@dataclass
class Captured:
    """A layer's inputs seen on the example inputs: up to max_rows rows [rows, K], rows per call -> count,
    and the largest |x|."""

    rows: torch.Tensor | None = None
    calls: Counter = field(default_factory=Counter)
    amax: float = 0.0


def _thin(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows spread evenly over `rows` (a copy), or all of them if there are fewer."""
    if rows.shape[0] <= count:
        return rows.clone()
    index = torch.linspace(0, rows.shape[0] - 1, count, device=rows.device).round().long()
    return rows.index_select(0, index)


@torch.no_grad()
def capture_activations(model: nn.Module, example_inputs: Iterable[Any], names: Sequence[str],
                        max_rows: int = 256) -> dict[str, Captured]:
    """Run `model` on every example input and record the inputs of its Linear layers `names` (at most
    `max_rows` rows each, evenly thinned)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    captured = {name: Captured() for name in names}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["input"]
            flat = x.detach().reshape(-1, x.shape[-1])
            seen = captured[name]
            seen.calls[flat.shape[0]] += 1
            if flat.shape[0] == 0:
                return
            seen.amax = max(seen.amax, float(flat.abs().amax()))
            flat = _thin(flat, max_rows)
            seen.rows = flat if seen.rows is None else _thin(torch.cat([seen.rows, flat]), max_rows)

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name), with_kwargs=True) for name in names]
    try:
        run_examples(model, example_inputs, "autoquant")
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _rows_of(rows: torch.Tensor, count: int) -> torch.Tensor:
    """An input of `count` rows made of the captured rows, repeated as needed: [count, K]."""
    if count <= rows.shape[0]:
        return rows[:count]
    return rows.repeat(math.ceil(count / rows.shape[0]), 1)[:count]


def _backends_to_try(scheme: Scheme, device: torch.device, shape: tuple[int, int], dtype: torch.dtype,
                     argument: str) -> list[tuple[str, Any, str | None]]:
    """(backend name, backend, why it cannot serve: None if it can) of every backend to measure."""
    requested = requested_backend(argument)
    names = ORDER if requested == "auto" else (requested,)
    backends = []
    for name in names:
        backend, reason = backend_and_reason(name, scheme, device, shape, dtype)
        if reason is None and name == "triton" and device.type != "cuda" and requested == "auto":
            reason = ("on CPU the Triton interpreter is not measured (it proves kernel code, it is no deploy "
                      "target); ask for it with backend='triton'")
        backends.append((name, backend, reason))
    return backends


class _LayerFailed(Exception):
    """The layer itself raised while being timed (as opposed to the timer)."""


def _time(timer: Timer, run: Callable[[torch.Tensor], Any], rows: torch.Tensor, calls: Counter,
          key: TimingKey) -> float:
    """The layer's milliseconds over one pass of the example inputs: per row count M, timer x calls. A
    failure of the layer raises _LayerFailed; the timer's own errors go through as they are."""
    def guarded(x: torch.Tensor) -> Any:
        try:
            return run(x)
        except Exception as e:
            raise _LayerFailed(f"on {tuple(x.shape)} inputs: {type(e).__name__}: {e}") from e

    total = 0.0
    for count, times in sorted(calls.items()):
        if count == 0:
            continue
        x = _rows_of(rows, count)
        ms = float(timer(lambda: guarded(x), TimingKey(key.layer, key.scheme, key.group_size, key.backend, count,
                                                       key.device)))
        if not math.isfinite(ms) or ms < 0:
            raise ValueError(f"the timer returned {ms} ms for {key}; it must return milliseconds >= 0")
        total += ms * times
    return total


def _measure_layer(name: str, linear: nn.Linear, seen: Captured, config: QuantConfig, timer: Timer) -> LayerChoice:
    weight = linear.weight
    device, shape = weight.device, (linear.out_features, linear.in_features)
    full_bytes = sum(p.numel() * p.element_size() for p in linear.parameters())
    layer = LayerChoice(*shape, dtype=str(weight.dtype).removeprefix("torch."),
                        calls={int(k): int(v) for k, v in sorted(seen.calls.items())},
                        full_precision_ms=None, full_precision_bytes=full_bytes)
    if seen.rows is None:
        layer.reason = "the example inputs never reached this layer"
        return layer
    x = seen.rows
    reference = linear(x)
    key = TimingKey(name, None, None, FULL_PRECISION, 0, str(device))
    layer.full_precision_ms = _time(timer, linear, x, seen.calls, key)
    for scheme in config.candidates:
        if scheme is None:
            layer.trials.append(Trial(None, None, FULL_PRECISION, layer.full_precision_ms, 0.0, full_bytes))
            continue
        unsupported = scheme.unsupported_reason(*shape)
        if unsupported:
            layer.trials.append(Trial(scheme.name, scheme.group_size, "any", skipped=unsupported))
            continue
        stored: dict[str, torch.Tensor] | Exception | None = None  # quantized once, served by each backend
        for backend_name, backend, reason in _backends_to_try(scheme, device, shape, weight.dtype, config.backend):
            trial = Trial(scheme.name, scheme.group_size, backend_name, skipped=reason)
            layer.trials.append(trial)
            if reason is not None:
                continue
            if stored is None:
                try:
                    stored = _quantize_weight(name, linear, scheme)
                except Exception as e:
                    stored = e
            if isinstance(stored, Exception):
                trial.skipped = f"failed to quantize: {type(stored).__name__}: {stored}"
                continue
            _measure_trial(trial, name, linear, scheme, stored, backend, seen, reference, timer)
    layer.choice, layer.runner_up, layer.reason = _choose(layer.trials, config.max_error, config.objective)
    return layer


def _quantize_weight(name: str, linear: nn.Linear, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The tensors `scheme` stores for `linear`'s weight (QuantizedLinear.set_weight's checks included)."""
    probe = QuantizedLinear(linear.in_features, linear.out_features, scheme, bias=False, dtype=linear.weight.dtype,
                            device="meta", name=name)
    probe.set_weight(linear.weight.detach())
    return {key: tensor for key, tensor in probe.tensors().items() if not tensor.is_meta}


def _layer_from(name: str, linear: nn.Linear, scheme: Scheme, stored: dict[str, torch.Tensor],
                backend) -> QuantizedLinear:
    """A QuantizedLinear of `linear` holding `stored` (shared, not copied), served by `backend`."""
    layer = QuantizedLinear(linear.in_features, linear.out_features, scheme, linear.bias is not None,
                            dtype=linear.weight.dtype, device="meta", backend=backend, name=name)
    for key, tensor in stored.items():
        setattr(layer, key, tensor)
    init_act_scale(layer, None, linear.weight.device)  # NaN here: the caller sets it, as quantrt.calibrate would
    if linear.bias is not None:
        layer.bias = linear.bias.detach()
    backend.prepare(layer)
    return layer


def _measure_trial(trial: Trial, name: str, linear: nn.Linear, scheme: Scheme, stored: dict[str, torch.Tensor],
                   backend, seen: Captured, reference: torch.Tensor, timer: Timer) -> None:
    try:
        quantized = _layer_from(name, linear, scheme, stored, backend)
        if "act_scale" in quantized.tensors():  # what quantrt.calibrate sets after quantizing
            quantized.act_scale.fill_(max(seen.amax, 1e-12) / torch.finfo(FP8_DTYPES["e4m3"]).max)
            quantized.calibrated = True
        error = relative_error(quantized(seen.rows), reference)
    except Exception as e:  # a backend that fails on this layer is a candidate that cannot run, not a crash
        trial.skipped = f"failed: {type(e).__name__}: {e}"
        return
    if not math.isfinite(error):
        trial.skipped = f"its output has NaN/Inf on the captured inputs (relative error {error})"
        return
    key = TimingKey(name, scheme.name, scheme.group_size, backend.name, 0, str(linear.weight.device))
    try:
        trial.ms = _time(timer, quantized, seen.rows, seen.calls, key)
    except _LayerFailed as e:
        trial.skipped = f"failed {e}"
        return
    trial.error, trial.bytes = error, quantized.storage_bytes()


def _choose(trials: list[Trial], max_error: float, objective: str) -> tuple[int | None, int | None, str]:
    """(choice, runner-up, why full precision) among `trials`."""
    within = [i for i, t in enumerate(trials) if t.measured and t.error <= max_error]
    if objective == "memory":
        ranked = sorted(within, key=lambda i: (trials[i].bytes, trials[i].ms, i))
    else:
        ranked = sorted(within, key=lambda i: (trials[i].ms, trials[i].bytes, i))
    if ranked:
        return ranked[0], (ranked[1] if len(ranked) > 1 else None), ""
    measured = [t for t in trials if t.measured]
    if measured:
        closest = min(measured, key=lambda t: t.error)
        return None, None, (f"no candidate within max_error {max_error:.2%} (closest: {closest.label} "
                            f"err {closest.error:.2%})")
    reasons = "; ".join(f"{t.label}: {t.skipped}" for t in trials[:4])
    return None, None, f"no candidate could run ({reasons}{'; ...' if len(trials) > 4 else ''})"


def _layers_to_measure(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Linear]]:
    """The Linear layers autoquant chooses for: not skipped and not given by a user override."""
    return [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear
            and config.skipped(name) is None and not config.override(name)[0]]


@torch.no_grad()
def measure(model: nn.Module, example_inputs: Iterable[Any], config: QuantConfig, *, timer: Timer | None = None,
            repeats: int = 5, max_rows: int = 256, progress: bool | None = None) -> AutoquantPlan:
    """Measure every candidate on every Linear layer of `model` (full precision, on its device) at the
    shapes of `example_inputs`, and choose per layer (module docstring). Does not change `model`."""
    if not config.is_autoquant:
        raise ValueError(f"measure needs QuantConfig('autoquant', ...), got {config!r}")
    linears = _layers_to_measure(model, config)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer left to choose for (none, or all of them "
                         f"skipped by modules_to_not_convert / modules)")
    devices = {linear.weight.device for _, linear in linears}
    if len(devices) > 1:
        raise ValueError(f"autoquant times layers on one device; {type(model).__name__}'s Linear layers are on "
                         f"{sorted(map(str, devices))}: move the model to one device first")
    device = devices.pop()
    if device.type == "meta":
        raise ValueError("the model's weights are on the meta device: load them before autoquant measures")
    timer = timer or DefaultTimer(repeats)
    captured = capture_activations(model, example_inputs, [name for name, _ in linears], max_rows)
    layers = {}
    bar = tqdm(linears, desc="autoquant", unit="layer", disable=(not progress) if progress is not None else None)
    for name, linear in bar:
        layers[name] = _measure_layer(name, linear, captured.pop(name), config, timer)
    options = config.to_dict()
    return AutoquantPlan(device=device_name(device), versions=current_versions(), max_error=config.max_error,
                         objective=config.objective, candidates=options["candidates"], layers=layers)


def apply_plan(config: QuantConfig, plan: AutoquantPlan | None) -> QuantConfig:
    """`config` (autoquant) with `plan`'s choices as per-module overrides: a config quantize_ can apply.
    With plan None: `config` as the user gave it, without the overrides of the plan it carries."""
    options = config.to_dict()
    modules = dict(config.modules)
    if config.autoquant_plan is not None:
        modules = {name: value for name, value in modules.items() if name not in config.autoquant_plan.layers}
    resolved = QuantConfig("autoquant", candidates=options["candidates"], max_error=config.max_error,
                           objective=config.objective, modules_to_not_convert=config.modules_to_not_convert,
                           modules={**modules, **(plan.overrides() if plan else {})}, backend=config.backend,
                           activation_scale=config.activation_scale)
    resolved.autoquant_plan = plan
    return resolved


def _reuse_problem(plan: AutoquantPlan, model: nn.Module, config: QuantConfig) -> str | None:
    """Why `plan` cannot stand for measuring `model` with `config` here, or None."""
    linears = _layers_to_measure(model, config)
    device = linears[0][1].weight.device if linears else torch.device("cpu")
    problem = plan.matches(config) or plan.stale_reason(device)
    if problem:
        return problem
    shapes = {name: (m.out_features, m.in_features, str(m.weight.dtype).removeprefix("torch.")) for name, m in linears}
    planned = {name: (layer.out_features, layer.in_features, layer.dtype) for name, layer in plan.layers.items()}
    if shapes != planned:
        differ = sorted(set(shapes.items()) ^ set(planned.items()))[:3]
        return f"its layers are not this model's (first differences: {differ})"
    return None


def autoquant_config(config: QuantConfig | None, candidates: Sequence[str | Scheme | QuantConfig | None] | None,
                     max_error: float | None, objective: str | None) -> tuple[QuantConfig, AutoquantPlan | None]:
    """The QuantConfig("autoquant", ...) that `quantrt.autoquant`'s options ask for (`config`, or `candidates`,
    `max_error` and `objective`, not both), without a plan, and the plan `config` carried (None if none)."""
    if config is None:
        return QuantConfig("autoquant", candidates=candidates, max_error=max_error, objective=objective), None
    config = to_quant_config(config)
    if not config.is_autoquant:
        raise ValueError(f"autoquant needs QuantConfig('autoquant', ...), got {config!r}")
    if candidates is not None or max_error is not None or objective is not None:
        raise TypeError("give candidates, max_error and objective either in config or as arguments, not both")
    return apply_plan(config, None), config.autoquant_plan


def choose_config(model: nn.Module, examples: list[Any], config: QuantConfig, plan: AutoquantPlan | None = None, *,
                  timer: Timer | None = None, repeats: int = 5, max_rows: int = 256,
                  progress: bool | None = None) -> QuantConfig:
    """`config` (an autoquant config without a plan) with each layer's scheme and backend chosen by measuring them
    on `examples` (module docstring), or taken from `plan` while it is valid for `model` here."""
    if plan is not None:
        problem = _reuse_problem(plan, model, config)
        if problem:
            warnings.warn(f"not reusing the autoquant plan: {problem}; measuring again", stacklevel=3)
            plan = None
    if plan is None:
        plan = measure(model, examples, config, timer=timer, repeats=repeats, max_rows=max_rows, progress=progress)
    return apply_plan(config, plan)


def explain(reports: list[LayerReport], plan: AutoquantPlan, stale: str | None = None) -> list[LayerReport]:
    """Set each planned layer's `why` (summary()) to the plan's choice and runner-up, noting a stale plan."""
    for report in reports:
        if report.name in plan.layers:
            report.why = plan.describe(report.name) + (f"; stale plan: {stale}" if stale else "")
    return reports


def restore_plan(config: QuantConfig, metadata: dict[str, Any], device: torch.device, backend: str | None,
                 path: Any = "") -> str | None:
    """Attach the plan saved in `metadata` (quantrt_config.json) to `config` on load. Where the plan is
    stale for `device`, or a backend was asked for, each layer's backend is chosen afresh (the plan's
    backends become "auto"). Returns why the plan is stale (None: valid or no plan); warns if stale."""
    if "autoquant_plan" not in metadata:
        return None
    try:
        plan = AutoquantPlan.from_dict(metadata["autoquant_plan"])
    except ValueError as e:
        raise CheckpointError(f"{path}: the autoquant_plan in {CONFIG_NAME} is damaged ({e}); delete that key to "
                              f"load the model without its plan") from e
    config.autoquant_plan = plan
    stale = plan.stale_reason(device)
    if stale:
        warnings.warn(f"{path}: the autoquant plan is stale: {stale}. The stored layers load as that plan chose "
                      f"them, with backends chosen for this device; to choose again for this device, run "
                      f"quantrt.autoquant on the original full-precision model (the quantized weights are not "
                      f"enough to measure the other schemes)", stacklevel=3)
    if stale or backend is not None:
        for name in plan.layers:
            override = config.modules.get(name)
            if override is not None:
                override.backend = "auto"
    return stale
