"""Compile-first serving: `torch.compile(fullgraph=True, mode="max-autotune")`, one static graph per shape
bucket, graphs persisted in the cache entry of the model's fingerprint (runtime/cache.py), and warmup.

What quantrt sets, openly and only while one of its own compilations runs (a call with a shape it has not
compiled yet in this process): `TORCHINDUCTOR_CACHE_DIR` (and `TRITON_CACHE_DIR` when the user has not set
it) point into the entry's working folder, so the compiled kernels land in the entry; Dynamo's
`recompile_limit` is raised to the number of buckets this model compiles, so that more buckets than the
default limit (8) never drop the model to eager. Both are restored when the call returns. Every other Inductor
and Dynamo setting is the user's.

`warmup(..., aot=True)` also packages each shape ahead of time (runtime/aot.py): torch.export + AOTInductor into
the entry's `aot/` folder, weights left out. A process that warms the same shapes with aot=True loads those
packages and serves them without Dynamo tracing or Inductor; a shape whose export or packaging fails stays on
the torch.compile path, and the report and `summary()` say why.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import json
import os
import platform
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .aot import (INFERENCE_MODES, AotRunner, AotUnavailable, build_package, inductor_configs, load_package,
                  unpackageable_reason)
from .cache import CacheEntry, CacheWarning, Timeout
from .devices import device_name
from .examples import as_call
from .kernels.tuning import default_table, m_bucket
from .modules import QuantizedLinear
from .tables import format_table
from .version import __version__, distribution_version


class RecompileError(RuntimeError):
    """A shape that was not warmed reached a model compiled with strict=True."""


@dataclass(frozen=True)
class CompileOptions:
    """How `QuantizedTransformer.compile` compiles. `shapes`: "exact" gives every distinct input shape its own
    static graph (right for any model); "pad" pads the row dimensions of tensor inputs up to a bucket (dim 0,
    and dim -2 of inputs with 3 or more dims; buckets 1, 2, 4, ..., 4096, then multiples of 1024) and slices
    the outputs back, which is only right for models whose rows do not interact (MLP stacks, Linear-only
    models), never for attention over the padded dimension."""

    mode: str | None = "max-autotune"
    fullgraph: bool = True
    regional: bool = False
    shapes: str = "exact"
    strict: bool = False
    options: dict[str, Any] | None = None  # Inductor options, instead of `mode`

    def __post_init__(self):
        if self.shapes not in ("exact", "pad"):
            raise ValueError(f"shapes={self.shapes!r}: choose 'exact' (one graph per distinct input shape) or 'pad' "
                             f"(row-wise models only: rows padded up to a bucket)")
        if self.mode is not None and self.options:
            raise ValueError("give either mode= or options= (torch.compile accepts one of them), not both")

    def fingerprint_fields(self) -> dict[str, Any]:
        # strict changes no graph: entries are shared between strict and lenient processes
        return {k: v for k, v in asdict(self).items() if k != "strict"}


def bucket(n: int) -> int:
    """The padded size of a row dimension: the next power of two up to 4096, then the next multiple of 1024."""

    return max(n, m_bucket(n)) if n > 0 else 0


def _describe(value: Any) -> Any:
    """What a compiled graph depends on in one input: a tensor's shape, dtype and device; a Python scalar's
    value (Dynamo specializes on it); the same for containers, recursively."""
    if isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape), str(value.dtype).removeprefix("torch."), value.device.type]
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [_describe(v) for v in value]]
    if isinstance(value, dict):
        return ["dict", {str(k): _describe(v) for k, v in value.items()}]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__qualname__


def grad_mode() -> str:
    """The autograd mode a call runs in: Dynamo compiles a separate graph for each."""
    if torch.is_inference_mode_enabled():
        return "inference_mode"
    return "grad" if torch.is_grad_enabled() else "no_grad"


GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}


def signature(args: tuple, kwargs: dict) -> str:
    """A stable key of the input shapes and the autograd mode (the same across processes)."""
    return json.dumps([grad_mode(), _describe(list(args)), _describe(dict(sorted(kwargs.items())))],
                      separators=(",", ":"))


def _grad_mode_of(key: str) -> str | None:
    """The autograd mode a signature key was made in; None for a key that is not one (an edited manifest)."""
    try:
        mode = json.loads(key)[0]
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return mode if isinstance(mode, str) else None


def shape_label(args: tuple, kwargs: dict) -> str:
    """A short human-readable form of the tensor shapes: `hidden_states=1x64x32 txt_ids=16x3`, and the autograd
    mode when it is not no_grad (the mode warmup uses by default)."""
    parts = [f"{i}={'x'.join(map(str, a.shape))}" for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    parts += [f"{k}={'x'.join(map(str, v.shape))}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    mode = grad_mode()
    return " ".join(parts + ([f"[{mode}]"] if mode != "no_grad" else [])) or "(no tensors)"


def _pad_rows(t: torch.Tensor, dims: list[tuple[int, int, int]]) -> torch.Tensor:
    for dim, size, padded in dims:
        if padded != size:
            shape = list(t.shape)
            shape[dim] = padded - size
            t = torch.cat([t, t.new_zeros(shape)], dim=dim)
    return t


def pad_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict, dict[int, int]]:
    """Pad the row dimensions of every floating tensor input (see CompileOptions); returns the padded inputs
    and {padded size: original size} to slice the outputs with."""
    sizes: dict[int, int] = {}

    def pad(value):
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2):
            return value
        dims = [0] + ([value.dim() - 2] if value.dim() >= 3 else [])
        plan = [(d, value.shape[d], bucket(value.shape[d])) for d in dims]
        for _, size, padded in plan:
            if sizes.setdefault(padded, size) != size:
                raise ValueError(f"shapes='pad': two inputs have row sizes {sizes[padded]} and {size} that pad to "
                                 f"the same bucket {padded}; compile with shapes='exact'")
        return _pad_rows(value, plan)

    return tuple(pad(a) for a in args), {k: pad(v) for k, v in kwargs.items()}, sizes


def unpad_outputs(output: Any, sizes: dict[int, int]) -> Any:
    if isinstance(output, torch.Tensor):
        if output.dim() >= 1 and output.shape[0] in sizes:
            output = output[: sizes[output.shape[0]]]
        if output.dim() >= 3 and output.shape[-2] in sizes:
            output = output[..., : sizes[output.shape[-2]], :]
        return output
    if isinstance(output, (list, tuple)) and not hasattr(output, "_fields"):
        return type(output)(unpad_outputs(o, sizes) for o in output)
    if isinstance(output, dict):
        for key in list(output.keys()):
            output[key] = unpad_outputs(output[key], sizes)
        return output
    return output


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks regional compilation compiles: modules whose class is named in the model's
    `_repeated_blocks` (diffusers), else the members of every ModuleList of 2 or more modules of one class
    (transformers' decoder layers, say)."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            if not any(isinstance(b, nn.Linear) or any(b is p for p in blocks) for b in module):
                blocks.extend(module)
    return blocks


def structure_hash(model: nn.Module) -> str:
    """A hash of what the compiled graphs depend on: module classes, every parameter and buffer's name, shape
    and dtype, each quantized layer's scheme and backend, and the model's own config. Not the weights."""

    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"{name}:{type(module).__module__}.{type(module).__qualname__}\n".encode())
        if isinstance(module, QuantizedLinear):
            digest.update(f"{module.scheme.name}/{module.scheme.group_size}/{module.backend.name}\n".encode())
        for key, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is not None:
                digest.update(f"{key}:{tuple(t.shape)}:{t.dtype}:{t.device.type}\n".encode())
    config = getattr(model, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(map(str, value))
    return str(value)


def compile_settings() -> dict[str, Any]:
    """Inductor's and AOT autograd's settings, as far as Inductor's own cache keys see them (their portable
    part). A process whose settings differ (torchao's `set_inductor_config=True` turns on coordinate descent
    tuning and int_mm fusion, say) misses every graph compiled under the others."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    settings = {"inductor": inductor_config.save_config_portable(), "functorch": functorch_config.save_config_portable()}
    return json.loads(json.dumps(settings, default=_jsonable, sort_keys=True))


def settings_difference(theirs: dict[str, Any], ours: dict[str, Any], most: int = 6) -> str:
    """`inductor.coordinate_descent_tuning: False there, True here; ...`. `theirs` comes from another entry's
    manifest, read unverified: a part that is not an object counts as empty."""
    def there(section: str) -> dict[str, Any]:
        values = theirs.get(section) if isinstance(theirs, dict) else None
        return values if isinstance(values, dict) else {}

    diffs = [f"{section}.{key}: {there(section).get(key)!r} there, {value!r} here"
             for section, values in ours.items() for key, value in values.items()
             if there(section).get(key) != value]
    return "; ".join(diffs[:most]) + (f"; and {len(diffs) - most} more" if len(diffs) > most else "")


ENVIRONMENT_FIELDS = ("quantrt", "torch", "triton", "python", "device")


def environment_fields(device: torch.device | str) -> dict[str, str]:
    """The fingerprint fields of this installation and `device` (ENVIRONMENT_FIELDS): compiled graphs, kernels
    and packages of another quantrt, torch, triton, Python or device are never used."""
    import triton

    return {"quantrt": distribution_version("quantrt") or __version__, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "device": device_name(device)}


def fingerprint_fields(model: nn.Module, options: CompileOptions) -> dict[str, Any]:
    first = next(iter(list(model.parameters()) + list(model.buffers())), None)
    device = first.device if first is not None else torch.device("cpu")
    settings = json.dumps(compile_settings(), sort_keys=True).encode()
    return {"model": structure_hash(model), **environment_fields(device), "compile": options.fingerprint_fields(),
            "settings": hashlib.sha256(settings).hexdigest()[:16]}


def _counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "hits": counters["inductor"]["fxgraph_cache_hit"],
            "misses": counters["inductor"]["fxgraph_cache_miss"]}


# the settings below are process-wide: one compilation of ours at a time, so that two threads compiling two
# models cannot restore each other's values
_COMPILE_ENV_LOCK = threading.RLock()


@contextlib.contextmanager
def _compile_env(inductor_dir: str | None, recompile_limit: int):
    """The settings a compilation of ours needs (see the module docstring), restored afterwards."""
    with _COMPILE_ENV_LOCK, _compile_settings(inductor_dir, recompile_limit):
        yield


@contextlib.contextmanager
def _compile_settings(inductor_dir: str | None, recompile_limit: int):
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    if inductor_dir is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir
        if saved["TRITON_CACHE_DIR"] is None:
            os.environ["TRITON_CACHE_DIR"] = os.path.join(inductor_dir, "triton")
    limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
    try:
        with torch._dynamo.config.patch(recompile_limit=limit,
                                        accumulated_recompile_limit=max(limit,
                                                                        torch._dynamo.config.accumulated_recompile_limit)):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class ShapeReport:
    """One shape bucket of a warmup or a check."""

    shape: str
    seconds: float  # the first call in this process: compile (cold, or warm from the cache) + one run
    cold_seconds: float | None  # the compile time when the entry first compiled this shape
    cache_hits: int
    cache_misses: int
    recompiles: int  # graphs compiled again for a shape already compiled in this process: must be 0
    kernel_picks: int  # quantrt kernel tuning picks made (Triton backend on a GPU), 0 when all were cached
    status: str  # "cold" (compiled), "warm" (from the cache entry), "missed" (in the entry, but compiled
    # again: Inductor's cache key saw other global state), or "already compiled" (earlier in this process)
    served_by: str = "torch.compile"  # or "aot package" (warmup(aot=True): no Dynamo, no Inductor at serving)
    note: str = ""  # why a shape asked for as an AOT package is served by torch.compile


class WarmupReport(list):
    """ShapeReports that print as a table."""

    entry: CacheEntry | None = None

    def __str__(self) -> str:

        rows = [[r.shape, r.status, r.served_by, f"{r.seconds:.2f}",
                 "-" if r.cold_seconds is None else f"{r.cold_seconds:.2f}", r.cache_hits, r.cache_misses,
                 r.recompiles, r.kernel_picks] for r in self]
        table = format_table(["shape", "status", "served by", "seconds", "cold seconds", "cache hits",
                              "cache misses", "recompiles", "kernel picks"], rows)
        notes = "".join(f"\n{r.shape}: {r.note}" for r in self if r.note)
        where = f"\ncache entry: {self.entry.path}" if self.entry is not None else ""
        return table + notes + where


class CompiledForward:
    """The compiled forward of one model: one static graph per shape bucket, persisted in a cache entry."""

    def __init__(self, model: nn.Module, options: CompileOptions, cache: bool = True,
                 cache_dir: str | os.PathLike | None = None, extra: dict[str, Any] | None = None):
        self.model = model
        # recorded in the entry's manifest (not in its fingerprint); `quantrt cache list` shows the model's class
        self.extra = {**(extra or {}), "settings": compile_settings(), "model_class": type(model).__name__}
        self.options = options
        self.entry: CacheEntry | None = None
        self.compiled_signatures: set[str] = set()  # compiled in this process
        self.warm_signatures: dict[str, dict[str, Any]] = {}  # in the cache entry (loaded or written)
        self.warmed = False  # strict mode raises on new shapes once this is set
        self._recording: tuple[WarmupReport, dict[str, dict[str, Any]]] | None = None  # inside recording()
        self._mutex = threading.RLock()
        self.aot_runners: dict[str, AotRunner] = {}  # signature -> the loaded package that serves it
        self.aot_notes: dict[str, str] = {}  # signature -> why it is not served by a package (warmup(aot=True))
        self._artifacts_loaded = False  # the entry's Mega-Cache artifacts: loaded before the first JIT compile
        kwargs = dict(fullgraph=options.fullgraph, dynamic=False)
        # torch >= 2.13: this model's graphs are its own; another model of the same classes neither reuses them
        # nor counts against their recompile limit. Without it a new shape may reuse another model's graph,
        # so "no graph compiled" says nothing and is not checked.
        self.isolated = "isolate_recompiles" in inspect.signature(torch.compile).parameters
        if self.isolated:
            kwargs["isolate_recompiles"] = True
        kwargs.update({"mode": options.mode} if options.options is None else {"options": options.options})
        if options.regional and not repeated_blocks(model):
            raise ValueError(f"regional compilation: {type(model).__name__} has no `_repeated_blocks` and no "
                             f"ModuleList of repeated blocks; compile the whole model (regional=False)")
        self._compile_kwargs = kwargs
        self._fn: Callable | None = None  # torch.compile'd on the first JIT compilation (`fn`)
        if cache:
            self.entry = CacheEntry(fingerprint_fields(model, options), root=cache_dir)
            try:
                self._load_entry()
                self.entry.inductor_dir.mkdir(parents=True, exist_ok=True)
            except (OSError, Timeout) as e:
                # a read-only or full cache folder, or a lock held for an hour: serve, compile without the cache
                reason = (f"its lock is held by another process" if isinstance(e, Timeout) else
                          f"it cannot be used ({e})")
                warnings.warn(f"quantrt cache: {self.entry.path}: {reason}; compiling without the cache",
                              CacheWarning, stacklevel=3)
                self.entry = None
                self.warm_signatures, self.warmed = {}, False

    @property
    def fn(self) -> Callable:
        """The torch.compile'd model (or, regional, the model with its repeated blocks compiled), made on first use:
        setting up torch.compile imports Dynamo's and AOT autograd's machinery (about 0.6 s), which a process that
        serves only AOT packages never needs."""
        if self._fn is None:
            if self.options.regional:
                for block in repeated_blocks(self.model):
                    block.compile(**self._compile_kwargs)
                self._fn = self.model
            else:
                self._fn = torch.compile(self.model, **self._compile_kwargs)
        return self._fn

    def _load_entry(self) -> None:
        manifest = self.entry.load()
        if manifest is None:
            self._explain_missing_entry()
            return
        tuning = self.entry.work_dir / "tuning.json"
        if tuning.is_file():

            picks = json.loads(tuning.read_text())
            if picks:
                default_table().update(picks)
        self.warm_signatures = dict(manifest.shapes)
        self.warmed = bool(manifest.shapes)

    def _load_artifacts(self) -> None:
        """Hand the entry's Mega-Cache artifacts to Inductor, once, before the first torch.compile compilation
        (a process that serves only AOT packages never needs them)."""
        if self._artifacts_loaded or self.entry is None:
            return
        self._artifacts_loaded = True
        with _compile_env(str(self.entry.inductor_dir), 0):
            for artifact in self.entry.artifact_files():
                try:
                    torch.compiler.load_cache_artifacts(artifact.read_bytes())
                except Exception as e:  # noqa: BLE001 (Inductor's loader raises many kinds; the folder still serves)
                    warnings.warn(f"quantrt cache: {artifact.name} of {self.entry.path} was not loaded ({e})",
                                  CacheWarning, stacklevel=4)

    def _explain_missing_entry(self) -> None:
        """No entry for this fingerprint: if one exists for the same model under other Inductor settings, say
        which settings differ, since this process will compile cold."""
        for sibling in self.entry.siblings(differing_in="settings"):
            theirs = sibling.extra.get("settings", {})
            warnings.warn(f"quantrt cache: {self.entry.path.parent / sibling.fingerprint} holds this model's graphs "
                          f"compiled under other Inductor settings ({settings_difference(theirs, self.extra['settings'])}"
                          f"), so this process compiles cold. Warm up and serve with the same settings (torchao's "
                          f"set_inductor_config=True changes them)", CacheWarning, stacklevel=4)
            return

    def __call__(self, *args, **kwargs):
        sizes = None
        if self.options.shapes == "pad":
            args, kwargs, sizes = pad_inputs(args, kwargs)
        key = signature(args, kwargs)
        runner = self.aot_runners.get(key)
        if runner is not None:
            output = runner(*args, **kwargs)
        elif key in self.compiled_signatures:
            output = self._strict_call(args, kwargs) if self._serving_strictly() else self.fn(*args, **kwargs)
        elif self._recording is not None:
            output = self._warm_call(key, args, kwargs, *self._recording)
        else:
            output = self._first_call(key, args, kwargs)[0]
        return unpad_outputs(output, sizes) if sizes else output

    def _serving_strictly(self) -> bool:
        return self.options.strict and self.warmed and self._recording is None

    def _strict_call(self, args: tuple, kwargs: dict) -> Any:
        """A warmed signature in strict mode: its graph must serve as compiled. Dynamo also recompiles a graph of
        the same input shapes when one of its guards fails (a Python float or module attribute the graph read
        changed since warmup, such as a LoRA scale set by assignment); under the "fail_on_recompile" stance
        that is an error too, reported as a RecompileError."""
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self.fn(*args, **kwargs)
        except RuntimeError as e:
            if "recompile" not in str(e).lower() or isinstance(e, RecompileError):
                raise
            reason = str(e).strip().splitlines()[0]
            raise RecompileError(f"strict mode: inputs {shape_label(args, kwargs)} were warmed, but this call would "
                                 f"recompile their graph: something the graph depends on changed since warmup (a "
                                 f"Python number or module attribute it reads, e.g. a scale assigned as a float): "
                                 f"{reason}. Keep it fixed while serving or hold it in a tensor (filled in place), "
                                 f"or compile with strict=False") from e

    @contextlib.contextmanager
    def recording(self) -> Iterator[WarmupReport]:
        """Calls made inside the block warm up as `warmup` does: a shape not compiled yet is compiled (or
        loaded from the entry), also in strict mode, reported, and saved to the cache entry when the block
        ends. For inputs a caller cannot write down, such as the decode steps of transformers' generate."""
        report, new_shapes = WarmupReport(), {}
        self._recording = (report, new_shapes)
        try:
            yield report
        finally:
            self._recording = None
            self.warmed = True
            self.warm_signatures.update(new_shapes)
            if self.entry is not None and (new_shapes or self.entry.status != "loaded"):
                self._commit(new_shapes)
            report.entry = self.entry

    def _warm_call(self, key: str, args: tuple, kwargs: dict, report: WarmupReport,
                   new_shapes: dict[str, dict[str, Any]]) -> Any:

        known = self.warm_signatures.get(key)
        picks = len(default_table().entries())
        output, delta, seconds = self._first_call(key, args, kwargs, warming=True)
        missed = bool(known) and delta["misses"] > 0
        label = shape_label(args, kwargs)
        report.append(ShapeReport(label, seconds, known["cold_s"] if known else seconds, delta["hits"],
                                  delta["misses"], 0, len(default_table().entries()) - picks,
                                  "missed" if missed else "warm" if known else "cold"))
        if not known or missed:
            new_shapes[key] = {"shape": label, "cold_s": known["cold_s"] if known else seconds, "last_s": seconds}
        return output

    def _first_call(self, key: str, args: tuple, kwargs: dict,
                    warming: bool = False) -> tuple[Any, dict[str, int], float]:
        """Compile (or load from the cache) and run the graph of a shape this process has not compiled.
        `warming`: called by warmup, which may add shapes in strict mode too."""
        with self._mutex:
            if key in self.compiled_signatures:
                return self.fn(*args, **kwargs), {"graphs": 0, "hits": 0, "misses": 0}, 0.0
            if self.options.strict and self.warmed and not warming and key not in self.warm_signatures:
                warmed = "; ".join(v["shape"] for v in self.warm_signatures.values()) or "none"
                modes = {mode for mode in map(_grad_mode_of, self.warm_signatures) if mode}
                hint = ""
                if modes and grad_mode() not in modes:
                    hint = (f" This call runs in autograd mode {grad_mode()!r} and the warmed graphs are for "
                            f"{', '.join(sorted(modes))}: serve under torch.no_grad() (or the warmed mode), or warm "
                            f"with grad_mode={grad_mode()!r}.")
                raise RecompileError(f"strict mode: inputs {shape_label(args, kwargs)} were not warmed, so serving "
                                     f"them would compile a new graph. Warmed shapes: {warmed}.{hint} Add them to "
                                     f"qt.warmup([...]) (or `quantrt warmup --shape`), or compile with "
                                     f"strict=False")
            self._load_artifacts()
            before = _counters()
            inductor_dir = str(self.entry.inductor_dir) if self.entry is not None else None
            start = time.perf_counter()
            with _compile_env(inductor_dir, 8 + 2 * (len(self.compiled_signatures) + 1)):
                output = self.fn(*args, **kwargs)
            seconds = time.perf_counter() - start
            delta = {k: v - before[k] for k, v in _counters().items()}
            if delta["graphs"] == 0 and self.isolated:
                message = (f"torch.compile compiled no graph for inputs {shape_label(args, kwargs)}: the model ran "
                           f"eagerly (Dynamo's recompile limit, or compilation disabled). Check "
                           f"TORCH_LOGS=recompiles")
                if self.options.strict:
                    raise RecompileError(message)
                warnings.warn(message, RuntimeWarning, stacklevel=3)
            self.compiled_signatures.add(key)
            return output, delta, seconds

    def warmup(self, examples: Iterable[Any], progress: bool | None = None, grad_mode: str = "no_grad",
               allow_new: bool = True, aot: bool = False) -> WarmupReport:
        """Compile every example's shape bucket (each example: a dict of keyword arguments, a tuple of
        positional ones, or one tensor), then write the cache entry. Returns a per-shape report.
        `grad_mode`: the autograd mode serving runs in ("no_grad", as diffusers pipelines and transformers'
        generate do; "inference_mode"; or "grad"): Dynamo compiles a separate graph for each. `allow_new=False`
        checks a warm start: in strict mode, a shape that is not in the entry raises RecompileError.
        `aot`: serve each shape from an AOTInductor package (the entry's, else exported and built now, weights
        left out), without Dynamo; a shape that cannot be packaged is compiled as without it, and its report row
        says why."""

        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode={grad_mode!r}: choose one of {', '.join(GRAD_MODES)}")
        examples = list(examples)
        if not examples:
            raise ValueError("warmup needs at least one example input (a dict of keyword arguments, a tuple of "
                             "positional arguments, or a tensor)")
        report = WarmupReport()
        new_shapes: dict[str, dict[str, Any]] = {}
        bar = tqdm(examples, desc="warming up", unit="shape",
                   disable=(not progress) if progress is not None else None)
        with GRAD_MODES[grad_mode]():
            for example in bar:
                args, kwargs = as_call(example)
                if self.options.shapes == "pad":
                    args, kwargs, _ = pad_inputs(args, kwargs)
                key, label = signature(args, kwargs), shape_label(args, kwargs)
                bar.set_postfix_str(label[:60])
                known = self.warm_signatures.get(key)
                note = ""
                if aot:
                    served = self._aot_warm(key, label, args, kwargs, known, grad_mode, allow_new)
                    if served is not None:
                        report.append(served[0])
                        if served[1] is not None:
                            new_shapes[key] = served[1]
                        continue
                    note = self.aot_notes[key]
                picks = len(default_table().entries())
                already = key in self.compiled_signatures
                if not already and _on_cuda(self.model):
                    # one eager call first: quantrt's kernels tune on eager calls only (never inside the
                    # trace), so the compiled graph bakes in the tuned configs, which the entry then keeps
                    self.model(*args, **kwargs)
                _, delta, seconds = self._first_call(key, args, kwargs, warming=allow_new)
                recompiles = self._recompiles(args, kwargs)
                # a shape in the entry that missed Inductor's cache anyway (the warming process had other global
                # state) was compiled again: it is saved again
                missed = bool(known) and delta["misses"] > 0
                status = ("already compiled" if already else "missed" if missed else "warm" if known else "cold")
                cold = known["cold_s"] if known else (seconds if not already else None)
                report.append(ShapeReport(label, seconds, cold, delta["hits"], delta["misses"], recompiles,
                                          len(default_table().entries()) - picks, status, note=note))
                failed_here = bool(note) and not (known or {}).get("aot_failed")
                if not already and (not known or missed or failed_here):
                    new_shapes[key] = {**(known or {}), "shape": label, "cold_s": cold, "last_s": seconds}
                    if failed_here:
                        new_shapes[key]["aot_failed"] = note
        self.warmed = True
        self.warm_signatures.update(new_shapes)
        if self.entry is not None and (new_shapes or self.entry.status != "loaded"):
            self._commit(new_shapes)
        report.entry = self.entry
        return report

    def _aot_warm(self, key: str, label: str, args: tuple, kwargs: dict, known: dict[str, Any] | None, mode: str,
                  allow_new: bool) -> tuple[ShapeReport, dict[str, Any] | None] | None:
        """Serve signature `key` from an AOT package: the entry's, or one exported and built now (unless
        `allow_new` is False). Returns its report row and, for a package built now, the manifest record of the
        shape; None when the shape stays on torch.compile, with `self.aot_notes[key]` saying why."""
        if key in self.aot_runners:
            return ShapeReport(label, 0.0, None, 0, 0, 0, 0, "already compiled", "aot package"), None
        record = (known or {}).get("aot")
        why = None
        if mode not in INFERENCE_MODES:
            why = f"an AOT package serves inference only (grad_mode={mode!r} needs autograd)"
        elif self.entry is None:
            why = "AOT packages are kept in the cache entry, and this model compiles without the cache"
        elif (known or {}).get("aot_failed"):
            why = f"{known['aot_failed']} (as recorded in the cache entry)"
        elif record is None and not allow_new:
            why = "the cache entry has no AOT package of this shape (a warmup with aot=True makes one)"
        elif record is None:
            # checked before exporting: a failed export leaves state behind that changes the torch.compile
            # graph's cache key in this process
            why = unpackageable_reason(self.model)
        if why is not None:
            self.aot_notes[key] = why if why.startswith("served by") else f"served by torch.compile: {why}"
            return None
        folder = self.entry.work_dir / "aot"
        start = time.perf_counter()
        with self._mutex:
            if record is not None:
                try:
                    self.aot_runners[key] = load_package(self.model, folder, key)
                    seconds = time.perf_counter() - start
                    return ShapeReport(label, seconds, record.get("cold_s"), 0, 0, 0, 0, "warm", "aot package"), None
                except AotUnavailable as e:
                    if not allow_new:
                        self.aot_notes[key] = f"served by torch.compile: the entry's AOT package does not load ({e})"
                        return None
                    warnings.warn(f"quantrt cache: the AOT package of {label} in {self.entry.path} does not serve "
                                  f"here ({e}); building it again", CacheWarning, stacklevel=4)
            if _on_cuda(self.model):
                self.model(*args, **kwargs)  # quantrt's kernels tune on an eager call; the package bakes the picks
            try:
                with _compile_env(str(self.entry.inductor_dir), 0):
                    built = build_package(self.model, args, kwargs, folder, key,
                                          inductor_configs(self.options.mode, self.options.options))
                self.aot_runners[key] = load_package(self.model, folder, key)
            except AotUnavailable as e:
                self.aot_notes[key] = f"served by torch.compile: {e}"
                return None
        seconds = time.perf_counter() - start
        built["cold_s"] = seconds
        shape_record = {**(known or {"shape": label, "cold_s": seconds}), "last_s": seconds, "aot": built}
        return ShapeReport(label, seconds, seconds, 0, 0, 0, 0, "cold", "aot package"), shape_record

    def serving(self) -> list[tuple[str, str, str]]:
        """(shape, served by, why) of every shape warmed in this process: "aot package" or "torch.compile", and
        why a shape asked for as an AOT package is not served by one."""
        rows = []
        for key in [*self.aot_runners, *sorted(self.compiled_signatures - set(self.aot_runners))]:
            shape = self.warm_signatures.get(key, {}).get("shape", key)
            if key in self.aot_runners:
                rows.append((shape, "aot package", ""))
            else:
                rows.append((shape, "torch.compile", self.aot_notes.get(key, "")))
        return rows

    def _recompiles(self, args: tuple, kwargs: dict) -> int:
        """Run a just-compiled shape again: graphs compiled by this second call are recompiles."""
        before = _counters()["graphs"]
        with _compile_env(str(self.entry.inductor_dir) if self.entry is not None else None, 0):
            self.fn(*args, **kwargs)
        return _counters()["graphs"] - before

    def _commit(self, shapes: dict[str, dict[str, Any]]) -> None:

        artifacts = torch.compiler.save_cache_artifacts()
        device = self.entry.fields["device"]
        # the tuning picks of this device; the key starts with the GPU's name (kernels/tuning.make_key)
        picks = {k: v for k, v in default_table().entries().items() if k.startswith(device.split(" (")[0])}
        try:
            self.entry.commit(shapes, artifacts[0] if artifacts else None, picks, self.extra)
        except Timeout:
            warnings.warn(f"quantrt cache: the lock of {self.entry.path} is held by another process; this "
                          f"warmup's graphs were not saved", CacheWarning, stacklevel=3)
        except OSError as e:
            warnings.warn(f"quantrt cache: {self.entry.path} could not be written ({e}); the graphs compiled "
                          f"in this process are not saved", CacheWarning, stacklevel=3)


def _on_cuda(model: torch.nn.Module) -> bool:
    """Whether the model's first parameter or buffer lives on a CUDA device."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor is not None and tensor.device.type == "cuda"


__all__ = ["CompileOptions", "CompiledForward", "ENVIRONMENT_FIELDS", "RecompileError", "ShapeReport", "WarmupReport",
           "bucket", "environment_fields", "repeated_blocks", "signature"]
