"""Quantize while loading, shared by the diffusers and transformers quantizers (quantrt.integrations).

A loader builds the model on the meta device and hands the quantizer each checkpoint tensor in turn. Before that,
`QuantizeOnLoad.install` swaps every planned nn.Linear for an empty QuantizedLinear (`install_skeleton`); for a
full-precision checkpoint the layer also gets a placeholder `weight` buffer on meta, because both libraries only
load keys that the model's state_dict has. Each weight that reaches a placeholder is quantized at once
(`QuantizedLinear.set_weight`) and its full-precision source handed back to the OS (`PageReleaser`), so the model
is never whole in full precision. A quantrt checkpoint (pre-quantized) is copied as stored. `finish` checks that
every layer was filled, chooses the backends, and records the scheme of every Linear layer in the config that
the library writes to config.json (`StoredQuantConfig`).
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from ..backends import select_backend
from ..checkpoints.reader import SafetensorsReader, release_freed_memory
from ..config import QuantConfig
from ..modules import QuantizedLinear, init_act_scale, install_skeleton
from ..schemes import Scheme
from ..version import __version__

# madvise advice: reclaim these pages now (Linux >= 5.4). A clean page of a file mapping is dropped, to be read
# again if touched; a page with contents only in memory keeps them (swapped out, or left). Never MADV_DONTNEED,
# which zeroes anonymous memory and drops a private mapping's written pages: an address advised by mistake (a
# mapping replaced since /proc/self/maps was read) must not lose data
MADV_PAGEOUT = 21
PLACEHOLDER = "weight"  # the buffer a full-precision checkpoint's weight is loaded into, then quantized


class StoredQuantConfig(QuantConfig):
    """A QuantConfig as a diffusers or transformers model's config holds it after loading: `to_dict()` is the
    form the library writes into config.json's quantization_config: `quant_method: "quantrt"`, QuantConfig's own
    fields, and `modules` naming every Linear layer of the model exactly, with its scheme (or null: kept in full
    precision). `QuantConfig.from_dict` reads that back, and a reload quantizes exactly the layers named there,
    as stored (a regex of the original config is never read back from a file)."""

    layers: dict[str, dict[str, Any] | None] | None = None

    @classmethod
    def of(cls, config: QuantConfig | Mapping[str, Any]) -> StoredQuantConfig:
        """A copy of `config` (a QuantConfig or its to_dict form) as this class: the per-layer record written
        after loading must not leak into the user's object, which may load other models."""
        if not isinstance(config, QuantConfig):
            return cls.from_dict(config)
        stored = cls.from_dict(config.to_dict())
        stored.autoquant_plan = config.autoquant_plan  # what measured an autoquant config's `modules`, if any
        return stored

    def to_dict(self) -> dict[str, Any]:
        data = {"quant_method": self.quant_method.value, **super().to_dict()}
        # after loading: every layer by name; before: the overrides, in the same compact form
        data["modules"] = self.layers if self.layers is not None else {
            name: self.entry(value) for name, value in self.modules.items()}
        data["quantrt_version"] = __version__
        return data

    def entry(self, override: QuantConfig | None) -> dict[str, Any] | None:
        """A per-module override as `modules` stores it: its scheme, and its backend where that is its own (an
        override's other fields never apply)."""
        if override is None:
            return None
        own = QuantConfig.to_dict(override)
        entry: dict[str, Any] = {"scheme": own["scheme"], "group_size": own["group_size"]}
        if override.backend not in ("auto", self.backend):
            entry["backend"] = override.backend
        return entry

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


class QuantizerTraits:
    """What quantrt's quantizer tells both libraries about a model it loaded: not trainable (the weights are
    codes; train a LoRA beside them), compileable (transformers' generate compiles the forward only then)."""

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


class PageReleaser:
    """Hands back the memory a weight's full-precision source held once the weight is quantized: freed heap
    pages (malloc_trim), and the pages of the checkpoint's memory map that reading the weight brought in. Both
    libraries read safetensors through a memory map, whose pages stay resident (and count in the process's RSS)
    until unmapped: without this, loading FLUX with 284M parameters (542 MiB in bf16) as int8wo peaked at
    +1.2 GiB RSS, with it at +0.32 to 0.36 GiB (272 MiB quantized). Only file mappings are advised, as
    /proc/self/maps lists them at each call (about 7 ms), never anonymous memory."""

    def __init__(self) -> None:
        self.files: set[str] = set()

    def watch(self, files: Iterable[str | os.PathLike]) -> None:
        """Advise these checkpoint files' whole mappings after every weight: for a loader that hands the
        quantizer copies of the tensors, whose place in the map is unknown (transformers)."""
        self.files.update(os.path.realpath(f) for f in files if isinstance(f, (str, os.PathLike)))

    def release(self, *sources: torch.Tensor) -> None:
        """Called after each weight: trim the heap, then advise the watched files' mappings and the file-mapped
        pages under `sources` (the weight as read, where it is a view of the map: diffusers)."""
        release_freed_memory()
        madvise = libc_madvise()
        spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in sources
                 if t.device.type == "cpu" and t.numel()]
        if madvise is None or not (spans or self.files):
            return
        page = mmap.PAGESIZE
        for start, end, path in file_mappings():
            if path in self.files:
                madvise(start, end - start, MADV_PAGEOUT)
                continue
            for low, high in spans:
                low, high = max(low, start) // page * page, -(-min(high, end) // page) * page
                if low < high:
                    madvise(low, high - low, MADV_PAGEOUT)


@functools.cache
def libc_madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise(address, length, advice) on Linux, else None. Not kept on a quantizer: the loaded model
    holds its quantizer, and a ctypes function cannot be deep-copied."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's file-backed memory mappings (/proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    mappings = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[4] == "0" or not fields[5].startswith("/"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        mappings.append((start, end, fields[5].rstrip("\n")))
    return mappings


def skipped_by(name: str, skips: Iterable[str]) -> str | None:
    """The entry of a library's own skip list (transformers' output embedding and tied weights, a model class's
    `_keep_in_fp32_modules`) that keeps layer `name` in full precision: its full name, a module above it, or one
    of its path components (diffusers matches keep-in-fp32 names that way)."""
    parts = name.split(".")
    for entry in skips:
        if name == entry or name.startswith(entry + ".") or entry in parts:
            return entry
    return None


class QuantizeOnLoad:
    """One from_pretrained call's quantization: which Linear layers become QuantizedLinear (`install`), the
    weights quantized as they arrive (`fill`), and the checks and backends once all are loaded (`finish`)."""

    def __init__(self, config: StoredQuantConfig):
        self.config = config
        self.layers: dict[str, QuantizedLinear] = {}  # installed, by name
        self.errors: dict[str, Exception] = {}  # what a library caught and logged instead of raising
        self.releaser = PageReleaser()

    def plan(self, model: nn.Module, pre_quantized: bool, skips: Iterable[str] = ()) -> dict[str, Scheme]:
        """{layer name: scheme} of the Linear layers to quantize. A saved model (pre_quantized) quantizes exactly
        the layers its config names with a scheme; nothing is re-planned."""
        skips = list(skips)
        linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
        plan = {}
        if pre_quantized:
            for name, entry in self.config.modules.items():
                if entry is None or name.startswith("re:"):
                    continue
                if name not in linears:
                    raise ValueError(f"quantrt: the checkpoint's quantization_config quantizes layer {name!r}, which "
                                     f"is not a Linear layer of {type(model).__name__}: the config does not belong "
                                     f"to this model (or the checkpoint was edited)")
                plan[name] = entry.scheme
            return plan
        if self.config.is_autoquant and self.config.autoquant_plan is None:
            raise ValueError("QuantConfig('autoquant') chooses each layer's scheme by measuring it on example "
                             "inputs, which a loader does not have: pass a scheme (QuantConfig('int8wo')), or load "
                             "in full precision and run quantrt.autoquant(model, example_inputs)")
        for name, linear in linears.items():
            if skipped_by(name, skips) is not None:
                continue
            scheme = self.config.plan(name).scheme
            if scheme is None or scheme.unsupported_reason(linear.out_features, linear.in_features):
                continue  # kept in full precision, as quantize_ keeps it
            plan[name] = scheme
        return plan

    def install(self, model: nn.Module, plan: dict[str, Scheme], dtype: torch.dtype | None,
                placeholder: bool) -> None:
        """Swap the planned Linear layers for empty QuantizedLinear on meta, in `dtype` (their scales and bias;
        default each Linear's own); `placeholder`: give each a meta `weight` [N, K] for a full-precision
        checkpoint's weight to be loaded into."""
        for name, scheme in plan.items():
            linear = model.get_submodule(name)
            layer_dtype = dtype if dtype is not None else linear.weight.dtype
            layer = install_skeleton(model, name, scheme, layer_dtype)
            if placeholder:
                layer.register_buffer(PLACEHOLDER, torch.empty(linear.out_features, linear.in_features,
                                                               dtype=layer_dtype, device="meta"))
            self.layers[name] = layer

    def waiting(self, model: nn.Module, key: str) -> QuantizedLinear | None:
        """The layer whose placeholder the checkpoint tensor `key` ("<layer>.weight") fills, if any."""
        module_name, _, attribute = key.rpartition(".")
        layer = self.layers.get(module_name)
        if attribute != PLACEHOLDER or layer is None or PLACEHOLDER not in layer._buffers:
            return None
        return layer

    def fill(self, layer: QuantizedLinear, value: torch.Tensor, device: torch.device | str,
             sources: Iterable[torch.Tensor] = ()) -> None:
        """Quantize the full-precision weight `value` into `layer` on `device`, drop the placeholder, and hand
        back the memory of `value` and of `sources` (the tensors it was read from)."""
        try:
            weight = value.to(device=device, dtype=layer._buffers[PLACEHOLDER].dtype)
            layer.set_weight(weight)
            del weight
            del layer._buffers[PLACEHOLDER]
            init_act_scale(layer, self.config.activation_scale, device)
        except Exception as e:
            self.errors.setdefault(layer.name, e)
            raise
        self.releaser.release(value, *sources)

    def finish(self, model: nn.Module) -> None:
        """Check that every installed layer was filled, choose and prepare each layer's backend for the device
        its tensors are on, and record the scheme of every Linear layer in the config (`StoredQuantConfig`)."""
        if self.errors:
            name, error = next(iter(self.errors.items()))
            raise ValueError(f"quantrt could not quantize layer {name!r} while loading: {error}") from error
        for name, layer in self.layers.items():
            if PLACEHOLDER in layer._buffers:
                raise ValueError(f"quantrt: the checkpoint has no weight for layer {name!r} ({name}.weight), so it "
                                 f"cannot be quantized; check that the checkpoint belongs to this model")
            empty = [key for key, tensor in layer.named_buffers(recurse=False) if tensor.device.type == "meta"]
            if empty:
                raise ValueError(f"quantrt: layer {name!r} was not filled from the checkpoint: {empty} missing")
        # the model keeps its quantizer (save_pretrained asks it): nothing of the load stays referenced
        self.layers, self.releaser = {}, PageReleaser()
        release_freed_memory()
        layers: dict[str, dict[str, Any] | None] = {}
        for name, module in model.named_modules():
            if type(module) is nn.Linear:
                layers[name] = None
            elif isinstance(module, QuantizedLinear):
                layers[name] = self.prepare(name, module)
        self.config.layers = layers

    def prepare(self, name: str, layer: QuantizedLinear) -> dict[str, Any]:
        """Choose and prepare `layer`'s backend (as quantize_ does); its entry in the stored config."""
        backend, how = select_backend(layer.scheme, layer.qweight.device, self.config.backend_for(name), name,
                                      shape=(layer.out_features, layer.in_features), dtype=layer.scale.dtype)
        layer.backend, layer.backend_reason = backend, how
        if layer.scheme.activation == "fp8_static":
            layer.calibrated = bool(torch.isfinite(layer.act_scale).all())
        layer.backend.prepare(layer)
        entry: dict[str, Any] = {"scheme": layer.scheme.name, "group_size": layer.scheme.group_size}
        if self.config.backend_for(name) != self.config.backend:  # a per-module override asked for its own
            entry["backend"] = self.config.backend_for(name)
        return entry


def checkpoint_keys(files: Iterable[str | os.PathLike]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{tensor name: (shape, dtype)} of the safetensors files among `files`, from their headers only."""
    keys = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            continue
        reader = SafetensorsReader(file, label=Path(file).name)
        for name in reader.keys():
            keys[name] = (reader.shape(name), reader.dtype(name))
    return keys


def check_stored_layers(layers: Mapping[str, QuantizedLinear], stored: Mapping[str, tuple[tuple[int, ...],
                        torch.dtype]], prefix: str = "") -> None:
    """Every tensor of every layer is in the checkpoint (`stored`, from `checkpoint_keys`; keys may carry the
    model's `prefix`), with the shape the layer expects and, for codes (not floating scales, which a loader casts),
    its dtype. Else a ValueError naming the layer: a loader would otherwise leave that tensor uninitialized."""
    for name, layer in layers.items():
        for key, expected in layer.named_buffers(recurse=False):
            full = f"{name}.{key}"
            found = stored.get(full) or stored.get(f"{prefix}.{full}" if prefix else full)
            if found is None and prefix and full.startswith(prefix + "."):
                found = stored.get(full.removeprefix(prefix + "."))
            if found is None:
                raise ValueError(f"quantrt: the checkpoint has no {full!r}, which layer {name!r} "
                                 f"({layer.scheme.name}) stores: the checkpoint is incomplete or does not belong "
                                 f"to its config")
            shape, dtype = found
            codes = not expected.is_floating_point() or expected.element_size() == 1
            if tuple(shape) != tuple(expected.shape) or (codes and dtype != expected.dtype):
                raise ValueError(f"quantrt: {full!r} is {dtype} {list(shape)} in the checkpoint, layer {name!r} "
                                 f"({layer.scheme.name}) expects {expected.dtype} {list(expected.shape)}")
