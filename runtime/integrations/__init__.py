"""quantrt inside diffusers and transformers: after `import quantrt`, a QuantConfig is a `quantization_config=` of
diffusers' `ModelMixin.from_pretrained` / `from_single_file` / `PipelineQuantizationConfig` and of transformers'
`PreTrainedModel.from_pretrained` (quantrt.integrations.diffusers and .transformers), a QuantizedTransformer
is a pipeline component that `DiffusionPipeline.save_pretrained` / `from_pretrained` save and reload, and PEFT's
LoRA wraps QuantizedLinear layers (quantrt.integrations.peft: PEFT, and diffusers' LoRA loading), and torch's
tensor-parallel styles shard them (quantrt.integrations.distributed).

Importing those libraries' quantizers takes seconds and `import quantrt` imports neither library, so each
registration runs when the library's own module is imported: `install_import_hooks` (run by `import quantrt`)
registers at once with what is imported already, and puts a finder on sys.meta_path that registers right after
the rest is imported. A registration that fails never breaks the library's import: it warns, and using
QuantConfig with that library raises the reason.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any, Callable, Sequence

from ..config import QuantConfig, QuantMethod
from ..transformer import QuantizedTransformer

# the methods diffusers pipelines save and load a QuantizedTransformer component with (quantrt's own folder)
PIPELINE_METHODS = ["save_pretrained", "from_pretrained"]
# what registration failed, by library, for `registration_error`
FAILED: dict[str, str] = {}


def register_diffusers(module: ModuleType) -> None:
    """Register QuantConfig with diffusers' quantizer mappings (module: diffusers.quantizers.auto)."""
    from . import diffusers as integration  # imports diffusers' quantizers: only once diffusers has

    integration.register()


def register_transformers(module: ModuleType) -> None:
    """Register QuantConfig with transformers' quantizer registry (module: transformers.quantizers.auto)."""
    from . import transformers as integration  # imports transformers' quantizers: only once transformers has

    integration.register()


def register_pipeline_component(module: ModuleType) -> None:
    """Make QuantizedTransformer a class that diffusers pipelines save and load (module:
    diffusers.pipelines.pipeline_loading_utils): without it `pipeline.save_pretrained()` skips a component it
    has no save method for, with a logged warning, and the saved pipeline cannot be reloaded. The library is
    the class's module, as diffusers records a component from outside its known libraries in model_index.json."""
    module.LOADABLE_CLASSES.setdefault(QuantizedTransformer.__module__, {})[QuantizedTransformer.__name__] = (
        PIPELINE_METHODS)
    module.ALL_IMPORTABLE_CLASSES[QuantizedTransformer.__name__] = PIPELINE_METHODS


def register_peft(module: ModuleType) -> None:
    """Have PEFT wrap QuantizedLinear layers with LoRA (module: peft.tuners.lora.model)."""
    from . import peft as integration  # imports peft: only once peft has

    integration.register(module)


def register_lora_pipeline(module: ModuleType) -> None:
    """Let FLUX's pipeline-level load_lora_weights pass quantrt layers (module: diffusers.loaders.lora_pipeline)."""
    from . import peft as integration  # imports peft: only once diffusers' LoRA loading (which needs it) has

    integration.patch_diffusers_lora_pipeline(module)


def register_peft_hotswap(module: ModuleType) -> None:
    """Keep LoRA layers' lora_alpha in step with a hot swap's scaling (module: peft.utils.hotswap)."""
    from . import peft as integration

    integration.patch_peft_hotswap(module)


def register_tensor_parallel(module: ModuleType) -> None:
    """Have torch's ColwiseParallel / RowwiseParallel shard QuantizedLinear layers (module:
    torch.distributed.tensor.parallel.style)."""
    from . import distributed as integration

    integration.register(module)


# module whose import makes a registration possible -> (library, registration)
HOOKS: dict[str, tuple[str, Callable[[ModuleType], None]]] = {
    "diffusers.quantizers.auto": ("diffusers", register_diffusers),
    "diffusers.pipelines.pipeline_loading_utils": ("diffusers", register_pipeline_component),
    "transformers.quantizers.auto": ("transformers", register_transformers),
    # LoRA: a failure here never marks diffusers' quantizer registration as failed
    "peft.tuners.lora.model": ("peft", register_peft),
    "diffusers.loaders.lora_pipeline": ("peft", register_lora_pipeline),
    "peft.utils.hotswap": ("peft", register_peft_hotswap),
    "torch.distributed.tensor.parallel.style": ("torch", register_tensor_parallel),
}


def registration_error(library: str) -> str | None:
    """Why quantrt could not register with `library` ("diffusers" or "transformers"), or None."""
    return FAILED.get(library)


def run_hook(name: str, module: ModuleType) -> None:
    """Run the registration of HOOKS[name] with the imported `module`. A failure warns and leaves a quantizer
    in the library's mapping that raises the reason, so that QuantConfig fails with it, not as unknown."""
    library, register = HOOKS[name]
    try:
        register(module)
    except Exception as e:
        version = getattr(sys.modules.get(library), "__version__", "unknown")
        message = str(e) if f"{library} {version}" in str(e) else (
            f"quantrt could not register as a quantization backend of {library} {version}: "
            f"{type(e).__name__}: {e}")
        FAILED[library] = message
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        quantizers = getattr(module, "AUTO_QUANTIZER_MAPPING", None)
        if isinstance(quantizers, dict):
            quantizers[QuantMethod.QUANTRT.value] = unavailable(message)
        configs = getattr(module, "AUTO_QUANTIZATION_CONFIG_MAPPING", None)
        if library == "diffusers" and isinstance(configs, dict):
            configs[QuantMethod.QUANTRT.value] = QuantConfig  # PipelineQuantizationConfig accepts it, then fails


def unavailable(message: str) -> type:
    """A stand-in quantizer class that raises `message` when the library builds it."""

    class QuantrtUnavailable:
        def __init__(self, *args: Any, **kwargs: Any):
            raise ImportError(message)

    return QuantrtUnavailable


class RegisteringLoader(importlib.abc.Loader):
    """The loader of a module in HOOKS: runs the module's own loader, then the registration. Everything else
    (get_source, get_resource_reader, ...) is the original loader's."""

    def __init__(self, loader: importlib.abc.Loader, target: str):
        self.wrapped = loader
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.wrapped.exec_module(module)
        run_hook(self.target, module)

    def __getattr__(self, name: str) -> Any:
        if name == "wrapped":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)


class PostImportFinder(importlib.abc.MetaPathFinder):
    """A sys.meta_path finder that finds nothing itself: for a module in HOOKS it asks the other finders and
    wraps the loader of the spec they return (RegisteringLoader)."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in HOOKS:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = RegisteringLoader(spec.loader, fullname)
        return spec


def install_import_hooks() -> None:
    """Register with the HOOKS modules imported already, and register with the others right after their
    import (a PostImportFinder first on sys.meta_path). Idempotent."""
    if not any(isinstance(finder, PostImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, PostImportFinder())
    for name in HOOKS:
        module = sys.modules.get(name)
        if module is not None:
            run_hook(name, module)
