"""Ahead-of-time packages of a model's warmed shapes: `torch.export`, then AOTInductor, one package per shape,
served without Dynamo.

`build_package` exports the model for one call's inputs and compiles it with AOTInductor into a `.pt2` file with
the weights left out (`aot_inductor.package_constants_in_so=False`; no weight prepacking or constant folding,
which would make copies of them): every parameter and buffer the graph reads is
a constant of the package, named by its attribute path on the model, and `AotRunner` binds those names to the
live module's own tensors (`load_constants(user_managed=True)`: the package reads them in place, nothing is
copied), so many shapes share one copy of the weights. A constant that is not an attribute of the model (torchao's
tensor subclasses are lowered to unnamed `_tensor_constantN` constants) cannot be bound without a copy: the
package is refused (`AotUnavailable`) and that shape stays on the torch.compile path.

The package reads the tensors' memory, so a runner checks before each call that every bound tensor is still the
model's and still holds the same memory (a `.to()`, a LoRA fuse or a `load_state_dict(assign=True)` replaces
them), and binds the new ones when it is not.

On a GPU the package holds the generated Triton kernels and quantrt's own (registered with `triton_op`, which
AOTInductor compiles like Inductor's); on CPU, C++ kernels.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .modules import QuantizedLinear

PACKAGE_SUFFIX = ".pt2"
CONSTANTS_SUFFIX = ".constants.json"
# autograd modes a package serves: an exported inference graph has no backward
INFERENCE_MODES = ("no_grad", "inference_mode")


class AotUnavailable(RuntimeError):
    """A shape could not be exported or packaged; its message says why (the shape stays on torch.compile)."""


def package_stem(key: str) -> str:
    """The file name (without suffix) of the package of signature `key`."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def inductor_configs(mode: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """AOTInductor's settings for a model compiled with torch.compile `mode` or Inductor `options`: the same
    optimisations (max-autotune's autotuning, say), without CUDA graphs (a package has its own launcher), and the
    weights kept out of the package."""
    import torch._inductor

    chosen = dict(options) if options else dict(torch._inductor.list_mode_options(mode or "default"))
    chosen.pop("triton.cudagraphs", None)
    # every constant the package reads must be one of the model's tensors: no weights prepacked into a layout of
    # Inductor's own (max-autotune's C++ GEMM templates on CPU) and no constants folded from them, either of
    # which would be a copy of the weights in each package
    chosen.update({"aot_inductor.package_constants_in_so": False, "cpp.weight_prepack": False, "freezing": False})
    # AOTInductor writes the device's description into this dict in place: a fresh one, or it would write into
    # the process's Inductor settings, which every later compilation's cache key (and quantrt's fingerprint) reads
    chosen["aot_inductor.metadata"] = {}
    return chosen


def tensor_at(model: nn.Module, path: str) -> tuple[Any, str, torch.Tensor]:
    """(owner, attribute, tensor) of the tensor at attribute `path` of `model`; AotUnavailable where there is none."""
    owner: Any = model
    *parents, name = path.split(".")
    try:
        for part in parents:
            owner = getattr(owner, part)
        tensor = getattr(owner, name)
    except AttributeError:
        tensor = None
    if not isinstance(tensor, torch.Tensor):
        raise AotUnavailable(f"the package needs a constant {path!r} that is not a tensor of the model (torchao's "
                             f"tensor subclasses are lowered to unnamed constants), so it cannot read the model's "
                             f"weights in place")
    return owner, name, tensor


def unpackageable_reason(model: nn.Module) -> str | None:
    """Why `model` cannot be packaged without copying weights into the package, before anything is exported: a
    layer whose backend computes from tensor subclasses (torchao's and quanto's quantized tensors), which
    AOTInductor lowers to unnamed constants of its own. None when every layer computes from plain tensors."""
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear) and any(is_traceable_wrapper_subclass(t)
                                                      for t in layer.backend.derived_tensors(layer)):
            return (f"layer {name!r} is served by the {layer.backend.name} backend through tensor subclasses, which "
                    f"AOTInductor turns into unnamed constants, copies of the weights in every package (backends "
                    f"aten, triton and reference compute from the layer's own tensors)")
    return None


def describe_tensor(tensor: torch.Tensor) -> list[Any]:
    return [list(tensor.shape), str(tensor.dtype).removeprefix("torch."), tensor.device.type]


def build_package(model: nn.Module, args: tuple, kwargs: dict, folder: Path, key: str,
                  configs: dict[str, Any]) -> dict[str, Any]:
    """Export `model` for the call (args, kwargs) (already in the autograd mode it serves) and compile it with
    AOTInductor into `folder/<package_stem(key)>.pt2`, with `<stem>.constants.json` beside it (each constant's
    attribute path, shape and dtype). Returns the record the cache manifest keeps for the shape:
    {"package", "constants", "export_s", "compile_s"}. AotUnavailable says why a shape cannot be packaged."""
    import torch._inductor

    folder.mkdir(parents=True, exist_ok=True)
    stem = package_stem(key)
    start = time.perf_counter()
    try:
        exported = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:  # noqa: BLE001 (export raises many kinds: data-dependent control flow, unsupported ops)
        raise AotUnavailable(f"torch.export failed: {type(e).__name__}: {first_line(e)}") from e
    exported_s = time.perf_counter() - start
    package = folder / f"{stem}{PACKAGE_SUFFIX}"
    try:
        with warnings.catch_warnings():
            # torch's own packaging code uses a pytree API it has deprecated; nothing the user can act on
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(package), inductor_configs=configs)
    except Exception as e:  # noqa: BLE001 (AOTInductor's lowering and C++/CUDA build raise many kinds)
        package.unlink(missing_ok=True)
        raise AotUnavailable(f"AOTInductor failed: {type(e).__name__}: {first_line(e)}") from e
    compiled_s = time.perf_counter() - start - exported_s
    try:
        names = torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, -1).get_constant_fqns()
        constants = {name: describe_tensor(tensor_at(model, name)[2]) for name in sorted(names)}
    except AotUnavailable:
        package.unlink(missing_ok=True)
        raise
    (folder / f"{stem}{CONSTANTS_SUFFIX}").write_text(json.dumps(constants, indent=1))
    return {"package": package.name, "constants": len(constants), "export_s": exported_s, "compile_s": compiled_s}


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


@dataclass
class Binding:
    """One constant of a package bound to the model: where it lives and what the package read."""

    name: str
    owner: Any
    attribute: str
    tensor: torch.Tensor
    data_ptr: int

    def __post_init__(self):
        # the mapping the owner keeps the attribute in (an nn.Module's parameters or buffers, else its __dict__):
        # read on every call of the package, where nn.Module.__getattr__ would cost ~1.5 us a tensor
        holders = [vars(self.owner).get(key) for key in ("_parameters", "_buffers")] + [vars(self.owner)]
        # (None: an attribute computed by a property, read with getattr)
        self.holder = next((h for h in holders if isinstance(h, dict) and self.attribute in h), None)

    def current(self) -> bool:
        """Whether the model still holds this tensor, in the same memory. A tensor moved to another of the owner's
        mappings reads as not current, and the package binds again (by attribute)."""
        held = (self.holder.get(self.attribute) if self.holder is not None else
                getattr(self.owner, self.attribute, None))
        return held is self.tensor and self.tensor.data_ptr() == self.data_ptr


def load_package(model: nn.Module, folder: Path, key: str) -> AotRunner:
    """The package of signature `key` in `folder` (build_package's), loaded and bound to `model`'s tensors;
    AotUnavailable says why it cannot serve."""
    stem = package_stem(key)
    try:
        constants = json.loads((folder / f"{stem}{CONSTANTS_SUFFIX}").read_text())
    except (OSError, ValueError) as e:
        raise AotUnavailable(f"its constants file cannot be read ({e})") from e
    if not (isinstance(constants, dict) and all(isinstance(v, list) for v in constants.values())):
        raise AotUnavailable("its constants file is not a JSON object of tensor descriptions")
    return AotRunner(model, folder / f"{stem}{PACKAGE_SUFFIX}", constants)


class AotRunner:
    """A loaded package whose constants are the model's live tensors; call it as the model is called.

    It drives torch's package loader (`torch._C._aoti.AOTIModelPackageLoader`) itself: torch's Python wrapper
    first probes the CPU's vector ISA by compiling test programs (about 1.5 s), to warn when the package was built
    for other hardware, which the cache entry's fingerprint (runtime/devices.py) rules out already."""

    def __init__(self, model: nn.Module, package: Path, constants: dict[str, list[Any]]):
        self.model = model
        self.package = package
        self.constants = constants
        try:
            self.loader = torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, -1)
            in_spec, self.out_spec = (pytree.treespec_loads(spec) for spec in self.loader.get_call_spec())
            wanted = set(self.loader.get_constant_fqns())
        except Exception as e:  # noqa: BLE001 (a package of another build, or a damaged one)
            raise AotUnavailable(f"the package {package.name} could not be loaded: {first_line(e)}") from e
        if wanted != set(constants):
            raise AotUnavailable(f"the package {package.name} needs constants {sorted(wanted ^ set(constants))[:3]} "
                                 f"that its constants file does not list")
        # the package takes (args, kwargs) flattened, its keyword arguments in the order they were exported in
        kwargs_spec = in_spec.child(1) if hasattr(in_spec, "child") else in_spec.children_specs[1]  # torch < 2.10
        self.keywords = list(kwargs_spec.context)
        self.bindings: list[Binding] = []
        self.bind()

    def bind(self) -> None:
        """Hand the package the model's current tensors (no copy); AotUnavailable where one no longer has the
        shape, dtype or device the package was compiled for."""
        bindings = []
        for name, expected in self.constants.items():
            owner, attribute, tensor = tensor_at(self.model, name)
            if describe_tensor(tensor) != expected:
                raise AotUnavailable(f"the model's {name} is {describe_tensor(tensor)}, the package was compiled for "
                                     f"{expected}")
            bindings.append(Binding(name, owner, attribute, tensor, tensor.data_ptr()))
        constants = {b.name: b.tensor for b in bindings}
        try:  # (constants, use_inactive, check_full_update, user_managed[, allow_h2d_copy]): the last is newer
            self.loader.load_constants(constants, False, True, True, False)
        except TypeError:
            self.loader.load_constants(constants, False, True, True)
        self.bindings = bindings  # kept alive: the package reads their memory

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not all(binding.current() for binding in self.bindings):
            self.bind()
        ordered = {name: kwargs[name] for name in self.keywords}
        inputs = [leaf for leaf in pytree.tree_leaves((args, ordered)) if isinstance(leaf, torch.Tensor)]
        return pytree.tree_unflatten(self.loader.boxed_run(inputs), self.out_spec)


__all__ = ["CONSTANTS_SUFFIX", "PACKAGE_SUFFIX", "AotRunner", "AotUnavailable", "INFERENCE_MODES", "build_package",
           "inductor_configs", "load_package", "package_stem", "unpackageable_reason"]
