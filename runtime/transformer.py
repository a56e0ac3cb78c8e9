"""`QuantizedTransformer`: a model whose Linear layers are quantized, usable wherever the model was."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .autoquant import AutoquantPlan, Timer, autoquant_config, choose_config, explain, restore_plan
from .backends import resident_bytes, select_backend
from .calibrate import calibrate
from .checkpoints.gguf import load_gguf_file
from .checkpoints.on_load import quantize_folder
from .checkpoints.routing import foreign_format, load_foreign
from .checkpoints.single_file import quantize_single_file
from .compile import CompiledForward, CompileOptions, bucket
from .config import QuantConfig
from .interop import to_quant_config
from .modules import LayerReport, QuantizedLinear, install_skeleton, quantize_
from .schemes import Scheme, resolve_scheme
from .serialization import (CONFIG_NAME, CheckpointError, build_skeleton, check_source_folder, dtype_name,
                            load_tensors, model_identity, parse_dtype, read_metadata, save_folder)
from .tables import format_table
from .version import __version__


SHARED_REASON_ROWS = 3  # a reason on this many rows or more is printed once, as a note


class ModelSummary(list):
    """A list of LayerReport that prints as a table; `serving`: (shape, served by, why) of the warmed shapes."""

    serving: list[tuple[str, str, str]] = []

    def __str__(self) -> str:
        # a reason that many layers share is printed once, below the table, and the rows point to it
        counts = Counter(r.why for r in self if r.why)
        shared = [why for why, count in counts.items() if count >= SHARED_REASON_ROWS]
        marks = {why: f"[{i}]" for i, why in enumerate(shared, 1)}
        rows = [[r.name, f"{r.out_features}x{r.in_features}", r.scheme, r.backend,
                 marks.get(r.why, r.why or "-"), r.bytes, f"{r.bytes / r.full_precision_bytes:.3f}"] for r in self]
        quantized = sum(r.quantized for r in self)
        total, full = sum(r.bytes for r in self), sum(r.full_precision_bytes for r in self)
        table = format_table(["layer", "NxK", "scheme", "backend", "why", "bytes", "ratio"], rows)
        notes = "".join(f"\n{marks[why]} {why} ({counts[why]} layers)" for why in shared)
        text = f"{table}{notes}\n{quantized}/{len(self)} Linear layers quantized; {total} bytes (was {full})"
        if self.serving:
            text += "\nwarmed shapes:\n" + format_table(["shape", "served by", "why"],
                                                        [[s, by, why or "-"] for s, by, why in self.serving])
        return text


class QuantizedTransformer(nn.Module):
    """Wraps a model (diffusers transformer, transformers LLM, any nn.Module with Linear layers) whose
    Linear layers were swapped for QuantizedLinear. Calls, `.config` and other attributes pass through to
    the wrapped model, so `pipeline.transformer = qt` works as a drop-in."""

    def __init__(self, model: nn.Module, quant_config: QuantConfig, reports: list[LayerReport]):
        super().__init__()
        self.model = model
        self.quant_config = quant_config
        self._reports = ModelSummary(reports)
        self._compiled = None  # a compile.CompiledForward once compile() ran
        self._generate_caches = {}  # (batch, length) -> the static KV cache compiled generate() reuses

    @classmethod
    def from_model(cls, model: nn.Module, config: str | QuantConfig | dict = "int8wo", *,
                   progress: bool | None = None, example_inputs: list[Any] | None = None) -> QuantizedTransformer:
        """Quantize `model` in place (its Linear layers are replaced) and wrap it. QuantConfig("autoquant")
        measures the candidates on `example_inputs` first (quantrt.autoquant)."""
        if isinstance(model, QuantizedTransformer):
            raise TypeError("this model is already a QuantizedTransformer; quantize the original model")
        config = to_quant_config(config)
        if config.is_autoquant and config.autoquant_plan is None:
            if example_inputs is None:
                raise ValueError("QuantConfig('autoquant') measures each layer on real activations: pass "
                                 "example_inputs=[...] (dicts of keyword arguments or tuples of positional ones)")
            return autoquant(model, example_inputs, config=config, progress=progress)
        if example_inputs is not None and not config.is_autoquant:
            raise ValueError(f"example_inputs are for QuantConfig('autoquant'); {config!r} does not use them")
        reports = quantize_(model, config, progress=progress)
        if not reports:
            raise ValueError(f"{type(model).__name__} has no nn.Linear layers: there is nothing to quantize")
        if config.autoquant_plan is not None:
            explain(reports, config.autoquant_plan)
        return cls(model, config, reports)

    def forward(self, *args, **kwargs):
        return (self._compiled or self.model)(*args, **kwargs)

    def compile(self, mode: str | None = "max-autotune", *, fullgraph: bool = True, regional: bool = False,
                shapes: str = "exact", strict: bool = False, options: dict[str, Any] | None = None,
                cache: bool = True, cache_dir: str | os.PathLike | None = None) -> QuantizedTransformer:
        """Compile the forward with torch.compile(fullgraph=True, mode="max-autotune", dynamic=False): one static
        graph per input shape bucket. `regional`: compile only the repeated blocks (diffusers'
        `_repeated_blocks`, else ModuleLists of same-class blocks): much faster to compile. `shapes`: "exact"
        (a graph per distinct shape) or "pad" (rows padded to buckets; row-wise models only, see
        CompileOptions). `strict`: once warmed, a shape that was not warmed raises RecompileError instead of
        compiling. `cache`: graphs and kernels are loaded from and saved to the entry of this model's
        fingerprint under `cache_dir` (default QUANTRT_CACHE_DIR, else ~/.cache/quantrt). Returns self."""
        options_ = CompileOptions(mode=None if options else mode, fullgraph=fullgraph, regional=regional,
                                  shapes=shapes, strict=strict, options=options)
        plan = self.autoquant_plan
        self._compiled = CompiledForward(self.model, options_, cache=cache, cache_dir=cache_dir,
                                         extra={"autoquant_plan": plan.to_dict()} if plan is not None else None)
        return self

    def warmup(self, examples, progress: bool | None = None, grad_mode: str = "no_grad", allow_new: bool = True,
               aot: bool = False):
        """Compile every example's shape bucket ahead of serving and save the graphs in the cache entry. Each
        example is a dict of keyword arguments, a tuple of positional ones, or a tensor. `grad_mode`: the
        autograd mode serving runs in, "no_grad" (diffusers pipelines, transformers' generate), "inference_mode"
        or "grad"; each is a separate graph. `allow_new=False` with compile(strict=True) checks a warm start:
        a shape that was not warmed raises RecompileError. `aot=True`: each shape is exported and compiled
        ahead of time with AOTInductor into the cache entry (weights left out: the package reads the model's own
        tensors), and a process that warms the same shapes with aot=True loads the packages and serves them
        without Dynamo tracing; a shape that cannot be exported stays on torch.compile, and the report and
        summary() say why. Compiles with the defaults first if compile() was not called. Returns a per-shape
        report (print it for a table)."""
        if self._compiled is None:
            self.compile()
        return self._compiled.warmup(examples, progress=progress, grad_mode=grad_mode, allow_new=allow_new, aot=aot)

    def generate(self, *args, **kwargs):
        """The wrapped model's `generate` (transformers). After compile(), its decode steps run the compiled
        forward (quantrt's cache entry, strict mode) on a static KV cache (`cache_implementation="static"`
        unless given), so every decode step of a batch size reuses one graph; the prefill runs eagerly, as
        transformers' own compiled generation does (a graph per prompt length would compile otherwise), and
        transformers' own compilation is off (`disable_compile=True`). The static cache is quantrt's: its
        length is the bucket of prompt + max_new_tokens (`_static_cache`), so one decode graph serves every
        generation of a batch size within a bucket; pass past_key_values or cache_implementation to choose
        your own. `warmup_generate` warms the decode steps ahead of serving."""
        generate = getattr(self.model, "generate", None)
        if generate is None:
            raise AttributeError(f"{type(self.model).__name__} has no generate(): it is not a transformers "
                                 f"generation model")
        if self._compiled is None:
            return generate(*args, **kwargs)
        if "past_key_values" not in kwargs and "cache_implementation" not in kwargs:
            kwargs["past_key_values"] = self._static_cache(args[0] if args else kwargs.get("input_ids"),
                                                           kwargs.get("max_new_tokens"))
        kwargs.setdefault("disable_compile", True)
        compiled = self._compiled
        compiled.fn  # torch.compile wraps the model now (it does so on first use), before __call__ is routed below
        # transformers' decode loop calls `self.__call__` (an instance attribute wins over the class's), its
        # prefill `self(...)` (the class's): only the decode steps go through the compiled forward, whose
        # torch.compile holds the class's __call__, so nothing recurses
        self.model.__call__ = lambda *a, **k: compiled(*a, **k)
        try:
            return generate(*args, **kwargs)
        finally:
            del self.model.__call__

    def _static_cache(self, input_ids: torch.Tensor | None, max_new_tokens: int | None):
        """A static KV cache for a generation of `input_ids` [batch, prompt] plus `max_new_tokens`, its length
        the bucket of their sum (compile.bucket: 1, 2, 4, ... 4096, then multiples of 1024), so that every
        generation in a bucket runs one decode graph. One cache per (batch, length) is kept and reset."""
        from transformers import StaticCache  # generation needs transformers; quantrt does not


        if input_ids is None:
            raise ValueError("compiled generate() needs input_ids (the prompt), as the first argument or input_ids=")
        batch, prompt = input_ids.shape
        config = getattr(self.model, "generation_config", None)
        if max_new_tokens is None:
            max_new_tokens = getattr(config, "max_new_tokens", None)
        if max_new_tokens is None:
            max_new_tokens = max(1, getattr(config, "max_length", prompt + 20) - prompt)
        length = bucket(prompt + max_new_tokens)
        cache = self._generate_caches.get((batch, length))
        if cache is None:
            cache = self._generate_caches[(batch, length)] = StaticCache(config=self.model.config,
                                                                         max_cache_len=length)
        else:
            cache.reset()
        return cache

    def warmup_generate(self, prompt_lengths: Iterable[int], batch_size: int = 1, max_new_tokens: int = 3,
                        **generate_kwargs):
        """Compile the decode step of `generate` for `batch_size` ahead of serving, and save it in the cache
        entry, by generating `max_new_tokens` (at least 2) from a dummy prompt of each length: this warms the
        cache-length bucket of each prompt length + max_new_tokens (serve with the same max_new_tokens, or
        any that stays in the bucket). Returns a
        per-shape report, as `warmup` does. Compiles with the defaults first if compile() was not called."""
        if max_new_tokens < 2:
            raise ValueError(f"max_new_tokens={max_new_tokens}: the first new token comes from the prefill, so "
                             f"warming the decode step needs at least 2")
        if self._compiled is None:
            self.compile()
        device = next(self.model.parameters()).device
        with torch.no_grad(), self._compiled.recording() as report:
            for length in prompt_lengths:
                ids = torch.zeros(batch_size, int(length), dtype=torch.long, device=device)
                self.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                              **generate_kwargs)
        return report

    @property
    def config(self):
        """The wrapped model's own config (diffusers/transformers), or None."""
        return getattr(self.model, "config", None)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or "model" not in self._modules:
                raise
            return getattr(self._modules["model"], name)

    @property
    def autoquant_plan(self):
        """The AutoquantPlan that chose each layer's scheme and backend, or None if not autoquantized."""
        return self.quant_config.autoquant_plan

    def quantized_layers(self) -> dict[str, QuantizedLinear]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, QuantizedLinear)}

    def summary(self) -> ModelSummary:
        """Per Linear layer: name, shape, scheme, backend and why, bytes; after warmup, per warmed shape what
        serves it (an AOT package or torch.compile) and why. `print(qt.summary())`."""
        summary = ModelSummary(self._reports)
        summary.serving = self._compiled.serving() if self._compiled is not None else []
        return summary

    def memory_footprint(self) -> int:
        """Bytes the wrapped model keeps in memory: its parameters and buffers plus the tensors its layers'
        backends built from them (quanto's and torchao's weights, `Backend.derived_tensors`), each storage
        counted once (`resident_bytes`). A backend tensor that is a view of a layer's buffers (quanto's int8
        and fp8 codes, torchao's int8 codes) adds nothing; one the backend repacked into storage of its own
        (quanto's int4/int2 packing, torchao's unpacked intX codes, float32 scale copies) adds its size, so
        this can exceed what save_pretrained writes. `summary()` gives the same per layer."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        for layer in self.quantized_layers().values():
            tensors += layer.backend.derived_tensors(layer)
        return resident_bytes(tensors)

    def extra_repr(self) -> str:
        return f"quant_config={self.quant_config!r}"

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                        overwrite: bool = False) -> None:
        """Save to a folder: safetensors shards of the stored tensors (packed codes, scales, unquantized
        parameters) and quantrt_config.json. Nothing is pickled. The folder is written beside `path` and
        swapped into place; a non-empty `path` is written only with overwrite=True and only if it is a
        quantrt folder (has quantrt_config.json): then quantrt's files are replaced and the folder's other
        files (a README, .git/) are kept; any other folder is never written (FileExistsError). Per-module
        overrides are stored by layer name: a "re:" pattern is resolved here against this model's layers,
        since a loader never evaluates a regex read from a file."""
        layers = {}
        for name, layer in self.quantized_layers().items():
            layers[name] = {"scheme": layer.scheme.name, "group_size": layer.scheme.group_size,
                            "format": layer.scheme.format, "backend": layer.backend.name,
                            "in_features": layer.in_features, "out_features": layer.out_features,
                            "bias": layer.bias is not None, "dtype": dtype_name(layer.scale.dtype)}
        linears = [report.name for report in self._reports]
        metadata = {"quantrt_version": __version__, "quant_config": resolved_quant_config(self.quant_config, linears),
                    "model": model_identity(self.model), "layers": layers,
                    "kept": {r.name: r.why for r in self._reports if not r.quantized}}
        if self.autoquant_plan is not None:
            metadata["autoquant_plan"] = self.autoquant_plan.to_dict()
        save_folder(path, self.model, metadata, max_shard_size=max_shard_size, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        torch_dtype: torch.dtype | None = None, backend: str | None = None,
                        model: nn.Module | Callable[[], nn.Module] | None = None,
                        quantization: str | QuantConfig | dict | None = None,
                        progress: bool | None = None, verify_checksums: bool = True) -> QuantizedTransformer:
        """Load a folder that `save_pretrained` wrote. The skeleton is built on the meta device and each
        stored tensor goes straight to `device` as stored (no requantization). Backends are chosen for
        `device` (a model saved on a GPU runs on a CPU through the fallbacks); `backend` overrides the saved
        choice. `torch_dtype` casts the floating tensors (scales, unquantized parameters). `model` is the
        skeleton (module or zero-argument factory) for models that are not diffusers/transformers classes.
        `verify_checksums`: check every file's sha256 against the one recorded at save time before any tensor
        is read (about 1.7 GB/s per core), so that a corrupted file is an error, not a wrong result.
        A folder that optimum-quanto or torchao wrote (quantization_map.json, or config.json's
        quantization_config, or torchao's safetensors metadata) loads through quantrt.checkpoints: each
        weight becomes the quantrt scheme that stores the same numbers, or the layer is refused with why."""
        device = usable_device(device)
        check_source_folder(path)
        if quantization is not None and (Path(path) / CONFIG_NAME).is_file():
            raise ValueError(f"{path} is a quantrt folder: it is already quantized, and it loads as stored: drop "
                             f"quantization=. To quantize with {quantization!r}, pass the unquantized model's folder")
        foreign = foreign_format(path)
        if foreign is not None:
            if quantization is not None:
                raise ValueError(f"{path} is already quantized ({foreign} checkpoint); load it without quantization=, "
                                 f"or pass the unquantized model's folder to quantize it with {quantization!r}")
            skeleton, config, kept = load_foreign(foreign, path, device, torch_dtype, backend, model)
            check_stored_scales(skeleton, f"{path} ({foreign} checkpoint)")
            return cls(skeleton.eval(), config, _attach_backends(skeleton, config, device, kept))
        if quantization is not None:
            config = to_quant_config(quantization)
            if backend is not None:
                config.backend = backend
            skeleton, kept = quantize_folder(path, config, device, torch_dtype, model, progress)
            return cls(skeleton.eval(), config, _attach_backends(skeleton, config, device, kept))
        metadata = read_metadata(path)
        config = QuantConfig.from_dict(metadata["quant_config"])
        if backend is not None:
            config.backend = backend

        stale = restore_plan(config, metadata, device, backend, path)
        skeleton = build_skeleton(metadata["model"], model, source=str(Path(path) / CONFIG_NAME))
        for name, record in metadata["layers"].items():
            try:
                linear = skeleton.get_submodule(name)
            except AttributeError as e:
                raise CheckpointError(f"layer {name!r} of the checkpoint does not exist in the rebuilt model") from e
            if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != (
                    record["out_features"], record["in_features"]):
                raise CheckpointError(f"layer {name!r} is {linear} in the rebuilt model but the checkpoint has a "
                                      f"{record['out_features']}x{record['in_features']} Linear")
            scheme = resolve_scheme(record["scheme"], record["group_size"] if record["group_size"] else -1)
            dtype = torch_dtype or parse_dtype(record["dtype"])
            install_skeleton(skeleton, name, scheme, dtype, record["bias"])

        def cast(name: str, tensor: torch.Tensor) -> torch.Tensor:
            # act_scale stays float32; codes are integers; everything else follows torch_dtype
            if torch_dtype is None or not tensor.is_floating_point() or name.endswith(".act_scale"):
                return tensor
            return tensor.to(torch_dtype)

        load_tensors(skeleton, path, metadata, device, cast, verify=verify_checksums)
        check_stored_scales(skeleton, str(path))
        skeleton.to(device)  # buffers that are not saved (rotary tables, say) follow
        reports = _attach_backends(skeleton, config, device, metadata.get("kept", {}))
        if config.autoquant_plan is not None:
            explain(reports, config.autoquant_plan, stale)
        return cls(skeleton.eval(), config, reports)

    @classmethod
    def from_single_file(cls, file: str | os.PathLike, quantization: str | QuantConfig | dict | None = None, *,
                         config: dict | str | os.PathLike | None = None, device: str | torch.device = "cpu",
                         torch_dtype: torch.dtype | None = None, backend: str | None = None,
                         progress: bool | None = None) -> QuantizedTransformer:
        """Load one .safetensors file in the model's original layout (e.g. BFL's flux1-dev.safetensors), as
        diffusers' FluxTransformer2DModel.from_single_file does (its own key conversion), quantizing each
        Linear weight as it is read so the full-precision model is never whole in memory. `config`: the
        diffusers config (a dict, or a folder with its config.json); None infers it from
        quantrt.models.FLUX_SIZES when the file's shapes match one (the model hub is never asked). A .gguf file
        loads as stored, without requantizing (quantrt.checkpoints.gguf: `quantization`, optional there, only
        keeps layers in full precision and picks backends; `torch_dtype` defaults to float32)."""
        device = usable_device(device)
        if Path(file).suffix == ".gguf":
            quant_config = to_quant_config(quantization) if quantization is not None else None
            if backend is not None and quant_config is not None:
                quant_config.backend = backend
            skeleton, loaded, kept = load_gguf_file(file, quant_config, config, device, torch_dtype, progress)
            loaded.backend = backend or loaded.backend
            return cls(skeleton.eval(), loaded, _attach_backends(skeleton, loaded, device, kept))
        if quantization is None:
            raise ValueError(f"{file}: from_single_file quantizes a .safetensors file while it loads: pass "
                             f"quantization= (a scheme such as 'int8wo', or a QuantConfig)")
        quant_config = to_quant_config(quantization)
        if backend is not None:
            quant_config.backend = backend
        skeleton, kept = quantize_single_file(file, quant_config, config, device, torch_dtype, progress)
        return cls(skeleton.eval(), quant_config, _attach_backends(skeleton, quant_config, device, kept))


def usable_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, refused with the fix where this torch cannot reach it (a CUDA device on a
    CPU build or a machine without a visible GPU), before any work."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build of torch" if torch.version.cuda is None else "no visible CUDA GPU"
            raise ValueError(f"device={str(device)!r}, but this machine has {build} (torch {torch.__version__}): "
                             f"load with device='cpu', or install torch for your CUDA and check "
                             f"CUDA_VISIBLE_DEVICES")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r}, but only {torch.cuda.device_count()} CUDA device(s) are "
                             f"visible: use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def resolved_quant_config(config: QuantConfig, layers: list[str]) -> dict[str, Any]:
    """`config.to_dict()` with its per-module overrides by exact layer name: each "re:<regex>" override is
    replaced by the layers of `layers` it matches (exact names still win over it, as in QuantConfig.override).
    What save_pretrained stores, so that loading never evaluates a regex read from a file; the per-layer
    schemes are in the file's "layers" anyway, and the overrides keep the backend each layer asked for."""
    data = config.to_dict()

    def stored(value: QuantConfig | None) -> dict[str, Any] | None:
        # an override's own `modules` never apply (only its scheme and backend do): left out with their patterns
        return None if value is None else dict(value.to_dict(), modules={})

    modules = {name: stored(value) for name, value in config.modules.items() if not name.startswith("re:")}
    for name in layers:
        if name not in modules:
            matched, value = config.override(name)
            if matched:
                modules[name] = stored(value)
    data["modules"] = modules
    return data


def check_stored_scales(model: nn.Module, source: str) -> None:
    """Every quantized layer's stored scales and zero points are finite, or a CheckpointError names the
    layer: a NaN or Inf there makes every output NaN (or fails deep inside a backend), and quanto and torchao
    folders carry no checksums (a quantrt folder's can be recomputed by whoever edits it)."""
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        for key in ("scale", "zero"):
            tensor = getattr(module, key, None)
            if tensor is None or not tensor.is_floating_point() or tensor.device.type == "meta":
                continue
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise CheckpointError(f"{source}: layer {name!r} has {bad} NaN/Inf values in its stored {key} "
                                      f"({dtype_name(tensor.dtype)} {list(tensor.shape)}); its outputs would be NaN. The "
                                      f"checkpoint is damaged: re-download or re-save it (or, if you passed torch_dtype, "
                                      f"the stored values may not fit that dtype: load without it)")


def _attach_backends(model: nn.Module, config: QuantConfig, device: torch.device,
                     kept: dict[str, str]) -> list[LayerReport]:
    """Choose each QuantizedLinear's backend for `device`, prepare it, and report every Linear layer."""
    reports = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            module.backend, how = select_backend(module.scheme, device, config.backend_for(name), name,
                                                 shape=(module.out_features, module.in_features),
                                                 dtype=module.scale.dtype)
            module.backend_reason = how
            if module.scheme.activation == "fp8_static":
                module.calibrated = bool(torch.isfinite(module.act_scale).all())
            module.backend.prepare(module)
            fp_bytes = module.in_features * module.out_features * module.scale.element_size() + (
                module.bias.numel() * module.bias.element_size() if module.bias is not None else 0)
            reports.append(LayerReport(name, module.out_features, module.in_features, module.scheme.name,
                                       module.backend.name, how, module.storage_bytes(), fp_bytes))
        elif type(module) is nn.Linear:
            fp_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
            reports.append(LayerReport(name, module.out_features, module.in_features, "none", "torch",
                                       kept.get(name, ""), fp_bytes, fp_bytes))
    return reports


def model_bytes(model: nn.Module, as_dtype: torch.dtype | None = None) -> int:
    """Bytes of a model's parameters and buffers; with `as_dtype`, as if its floating tensors were stored
    in that dtype (e.g. the bf16 size of an fp32 model)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        size = torch.empty((), dtype=as_dtype).element_size() if as_dtype and t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


def autoquant(model: nn.Module, example_inputs: Iterable[Any], *,
              candidates: Sequence[str | Scheme | QuantConfig | None] | None = None, max_error: float | None = None,
              objective: str | None = None, config: QuantConfig | None = None, plan: AutoquantPlan | None = None,
              timer: Timer | None = None, repeats: int = 5, max_rows: int = 256,
              progress: bool | None = None) -> QuantizedTransformer:
    """Choose each Linear layer's scheme and backend by measuring them on `example_inputs` (quantrt.autoquant's
    module docstring), quantize `model` in place accordingly, and wrap it. Options: `candidates`, `max_error`,
    `objective`, or a QuantConfig("autoquant", ...) as `config` (whose modules_to_not_convert, modules and
    backend apply too). `plan`: a plan from an earlier run on this model (qt.autoquant_plan, the compile
    cache), used without measuring while it is valid here. `timer(fn, TimingKey) -> ms` replaces the
    default timer; `max_rows` caps the captured rows per layer. `qt.autoquant_plan` holds the plan."""
    if isinstance(model, QuantizedTransformer):
        raise TypeError("this model is already a QuantizedTransformer; autoquant the original model")
    examples = list(example_inputs) if not isinstance(example_inputs, (dict, torch.Tensor)) else [example_inputs]
    config, carried = autoquant_config(config, candidates, max_error, objective)
    config = choose_config(model, examples, config, plan or carried, timer=timer, repeats=repeats, max_rows=max_rows,
                           progress=progress)
    qt = QuantizedTransformer.from_model(model, config, progress=progress)
    if any(layer.scheme.activation == "fp8_static" for layer in qt.quantized_layers().values()):
        calibrate(qt.model, examples)
    return qt
