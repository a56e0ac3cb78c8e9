"""quantrt as a quantization backend of diffusers: `ModelMixin.from_pretrained(..., quantization_config=
QuantConfig(...))`, `from_single_file`, and `PipelineQuantizationConfig(quant_mapping={"transformer": QuantConfig(...)})`.

diffusers has no public registry of quantizers: `register()` puts quantrt into the two mappings that
`diffusers.quantizers.auto` reads at call time, after checking that the internals it relies on are there (else an
ImportError naming the diffusers version). quantrt.integrations imports this module, and so diffusers' quantizers,
only once diffusers has imported them itself.
"""

from __future__ import annotations

from typing import Any

import diffusers
import torch
import torch.nn as nn
from diffusers.quantizers import auto as diffusers_auto
from diffusers.quantizers.base import DiffusersQuantizer

from ..checkpoints.gguf import (dequantize_gguf_parameter, gguf_layer_plan, gguf_parameter_shape,
                                gguf_parameter_tensors, is_gguf_parameter)
from ..config import QuantConfig, QuantMethod
from .common import PLACEHOLDER, QuantizeOnLoad, QuantizerTraits, StoredQuantConfig

TESTED_VERSION = "0.42.1"  # the diffusers whose loaders the integration's tests run against
# what the quantizer overrides or relies on in diffusers' loaders (modeling_utils, model_loading_utils,
# single_file_model): a diffusers without them loads differently
QUANTIZER_METHODS = ("preprocess_model", "postprocess_model", "update_torch_dtype", "update_missing_keys",
                     "check_if_quantized_param", "create_quantized_param", "check_quantized_param_shape",
                     "_process_model_before_weight_loading", "_process_model_after_weight_loading")


class QuantrtDiffusersQuantizer(QuantizerTraits, DiffusersQuantizer):
    """diffusers' quantizer for QuantConfig: swaps the planned Linear layers of the meta model for QuantizedLinear
    and quantizes each weight as diffusers loads it (quantrt.integrations.common); a saved quantrt model's tensors
    are copied as stored."""

    requires_calibration = False
    use_keep_in_fp32_modules = True  # diffusers then passes the class's _keep_in_fp32_modules: kept unquantized

    def __init__(self, quantization_config: QuantConfig | dict, **kwargs: Any):
        # from_pretrained says whether the checkpoint is quantized; from_single_file builds the quantizer without
        # pre_quantized (True by default) whatever the file holds: its keys tell (maybe_update_state_dict)
        self.single_file = "pre_quantized" not in kwargs
        super().__init__(quantization_config, **kwargs)
        self.quantization_config = StoredQuantConfig.of(quantization_config)
        self.load = QuantizeOnLoad(self.quantization_config)
        self.torch_dtype: torch.dtype | None = None
        # a GGUF file (diffusers' GGUFParameter tensors): its layers load as stored (quantrt.checkpoints.gguf)
        self.gguf = False

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
        # as without quantization: None loads in the model's own dtype (float32); the layers follow it
        self.torch_dtype = torch_dtype
        return torch_dtype

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self.single_file:
            # called before diffusers converts the file's keys, which fails on keys it does not know
            if any(key.endswith(".qweight") for key in state_dict):
                raise ValueError("from_single_file with a QuantConfig reads a full-precision checkpoint and "
                                 "quantizes it; this file holds quantrt's quantized tensors already: load the folder "
                                 "that save_pretrained wrote with from_pretrained(folder), without a config")
            self.gguf = any(is_gguf_parameter(value) for value in state_dict.values())
            # GGUF: diffusers then hands its raw blocks (another shape than the weight's) to the quantizer
            self.pre_quantized = self.gguf
        return state_dict

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        self.load.releaser.watch(checkpoint_files or [])
        return loaded_keys

    def _process_model_before_weight_loading(self, model: nn.Module, device_map: Any = None,
                                             keep_in_fp32_modules: list[str] | None = None,
                                             state_dict: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
        skips = list(keep_in_fp32_modules or [])
        self.modules_to_not_convert = skips + list(self.quantization_config.modules_to_not_convert)
        if self.gguf:
            plan = gguf_layer_plan(model, state_dict or {}, self.quantization_config, skips)
        else:
            plan = self.load.plan(model, self.pre_quantized, skips)
        self.load.install(model, plan, self.torch_dtype, placeholder=not self.pre_quantized or self.gguf)
        return model

    def update_missing_keys(self, model: nn.Module, missing_keys: list[str], prefix: str) -> list[str]:
        made = {f"{name}.{key}": name for name, layer in self.load.layers.items()
                for key in layer._buffers if key not in (PLACEHOLDER, "bias")}
        if self.pre_quantized and not self.gguf:
            lost = [key for key in missing_keys if key in made]
            if lost:
                raise ValueError(f"quantrt: the checkpoint has no {lost[0]!r} ({len(lost)} tensors of quantized "
                                 f"layers missing), which layer {made[lost[0]]!r} stores: the checkpoint is incomplete "
                                 f"or does not belong to its config")
            return missing_keys
        # quantrt's tensors of a layer quantized while loading are made here, not read from the checkpoint
        return [key for key in missing_keys if key not in made]

    def check_if_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                                 state_dict: dict[str, Any], **kwargs: Any) -> bool:
        if self.gguf:  # every GGUF tensor: a layer's weight, or one to dequantize
            return is_gguf_parameter(state_dict.get(param_name, param_value) if state_dict else param_value)
        module_name, _, key = param_name.rpartition(".")
        layer = self.load.layers.get(module_name)
        if layer is None:
            return False
        if not self.pre_quantized:
            return self.load.waiting(model, param_name) is not None
        return key in layer._buffers and key != "bias"

    def create_quantized_param(self, model: nn.Module, param: torch.Tensor, param_name: str,
                               target_device: Any, state_dict: dict[str, Any] | None = None,
                               unexpected_keys: list[str] | None = None, **kwargs: Any) -> None:
        # the tensor as stored: diffusers has cast floating ones to torch_dtype already, which would round an
        # fp8 static layer's float32 act_scale and turn float8_e5m2 codes into their values
        source = state_dict.get(param_name) if state_dict is not None else None
        layer = self.load.waiting(model, param_name)
        if self.gguf:
            self.create_gguf_param(model, source if source is not None else param, param_name, layer, target_device,
                                   kwargs.get("dtype"))
            return
        if layer is not None:
            self.load.fill(layer, param, target_device, sources=[source] if source is not None else [])
            return
        module_name, _, key = param_name.rpartition(".")
        layer = self.load.layers[module_name]
        stored = source if source is not None else param
        setattr(layer, key, stored.to(device=target_device, dtype=layer._buffers[key].dtype))

    def create_gguf_param(self, model: nn.Module, value: torch.Tensor, param_name: str, layer: Any,
                          target_device: Any, dtype: torch.dtype | None) -> None:
        """A GGUF tensor into the model: a planned layer's stored tensors from its raw blocks, as stored; any other
        (a layer kept in full precision, a BF16 tensor) dequantized as gguf does, in the model's dtype."""
        from accelerate.utils import set_module_tensor_to_device

        if layer is not None:
            for key, tensor in gguf_parameter_tensors(value, (layer.out_features, layer.in_features),
                                                      layer._buffers[PLACEHOLDER].dtype, param_name).items():
                setattr(layer, key, tensor.to(target_device))
            del layer._buffers[PLACEHOLDER]
            self.load.releaser.release(value)
            return
        current = model.get_parameter(param_name) if param_name in dict(model.named_parameters()) else \
            model.get_buffer(param_name)
        tensor = dequantize_gguf_parameter(value, param_name).to(dtype or current.dtype)
        set_module_tensor_to_device(model, param_name, target_device, value=tensor)

    def check_quantized_param_shape(self, param_name: str, current_param: torch.Tensor,
                                    loaded_param: torch.Tensor) -> bool:
        if self.gguf and is_gguf_parameter(loaded_param):
            loaded_shape = gguf_parameter_shape(loaded_param)
            if tuple(current_param.shape) != loaded_shape:
                raise ValueError(f"quantrt: {param_name} holds a {list(loaded_shape)} weight in the GGUF file, the "
                                 f"model expects {list(current_param.shape)}: the file does not belong to its config")
            return True
        if tuple(current_param.shape) != tuple(loaded_param.shape):
            raise ValueError(f"quantrt: {param_name} is {list(loaded_param.shape)} in the checkpoint, the model "
                             f"expects {list(current_param.shape)}: the checkpoint does not belong to its config")
        return True

    @property
    def supports_parallel_loading(self) -> bool:
        return False  # one shard at a time: parallel shards would hold several in full precision at once

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        self.load.finish(model)
        # what save_pretrained writes: the scheme of every layer (from_single_file registers no config itself)
        model.register_to_config(quantization_config=self.quantization_config)
        return model

    @property
    def is_serializable(self) -> bool:
        return True



def check_internals() -> None:
    """An ImportError naming the diffusers version where the internals the integration relies on are missing."""
    missing = [name for name in ("AUTO_QUANTIZER_MAPPING", "AUTO_QUANTIZATION_CONFIG_MAPPING")
               if not isinstance(getattr(diffusers_auto, name, None), dict)]
    missing += [f"DiffusersQuantizer.{name}" for name in QUANTIZER_METHODS if not hasattr(DiffusersQuantizer, name)]
    if missing:
        raise ImportError(f"quantrt cannot register as a quantization backend of diffusers {diffusers.__version__}: "
                          f"its quantizer internals differ from those quantrt was written for (diffusers "
                          f"{TESTED_VERSION}); missing: {', '.join(missing)}. Install diffusers=={TESTED_VERSION}, or "
                          f"load the model without quantization_config= and quantize it with quantrt.quantize_")


def register() -> None:
    """Make QuantConfig a quantization_config of diffusers' loaders and of PipelineQuantizationConfig (whose
    quant_mapping accepts the config classes in diffusers' mapping)."""
    check_internals()
    diffusers_auto.AUTO_QUANTIZER_MAPPING[QuantMethod.QUANTRT.value] = QuantrtDiffusersQuantizer
    diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QuantMethod.QUANTRT.value] = QuantConfig

