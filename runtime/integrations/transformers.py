"""quantrt as a quantization backend of transformers: `PreTrainedModel.from_pretrained(...,
quantization_config=QuantConfig(...))`, through transformers' own registry (`register_quantization_config`,
`register_quantizer`). quantrt.integrations imports this module only once transformers has imported its
quantizers itself.

Per key, transformers asks the quantizer whether a checkpoint tensor needs quantizing (`param_needs_quantization`)
and, for those, runs the op of `get_quantize_ops()` on it; with such a quantizer it loads one tensor at a time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import transformers
from torch.distributed.tensor import Shard
from transformers.core_model_loading import ConversionOps
from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard
from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, ColwiseParallel, RowwiseParallel
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..config import QuantConfig, QuantMethod
from ..modules import QuantizedLinear
from .common import (PLACEHOLDER, QuantizeOnLoad, QuantizerTraits, StoredQuantConfig, check_stored_layers,
                     checkpoint_keys)
from .distributed import COLWISE, ROWWISE, shard_for_local_forward

TESTED_VERSION = "5.24.0"  # the transformers whose loaders the integration's tests run against


class TransformersQuantConfig(StoredQuantConfig, QuantizationConfigMixin):
    """The config class transformers' registry holds for "quantrt" (it must subclass QuantizationConfigMixin):
    what a saved model's config.json is read into, and what the loaded model's config keeps."""


# transformers refuses to merge a config passed to from_pretrained with the one a saved model's config.json holds
# when their class names differ (merge_quantization_configs): the user's object is a quantrt.QuantConfig
TransformersQuantConfig.__name__ = TransformersQuantConfig.__qualname__ = "QuantConfig"


STAND_IN = "weight"


def stand_in(layer: QuantizedLinear) -> None:
    """Give `layer` a meta `weight` attribute (not a buffer: in no state_dict) marked as initialized until
    loading ends: after loading, transformers runs the models' `_init_weights` on every module, and many read their
    Linear children's weights (T5's attention: `init.normal_(module.q.weight)`), which a QuantizedLinear has not;
    transformers' init functions pass over a tensor marked `_is_hf_initialized`."""
    weight = torch.empty(layer.out_features, layer.in_features, dtype=layer.scale.dtype, device="meta")
    weight._is_hf_initialized = True
    layer.weight = weight


class QuantrtQuantize(ConversionOps):
    """transformers' op for one checkpoint weight that needs quantizing: quantizes it into its QuantizedLinear
    and returns nothing for transformers to set."""

    def __init__(self, hf_quantizer: QuantrtHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None, full_layer_name: str | None = None,
                missing_keys: set[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        load = self.hf_quantizer.load
        layer = load.waiting(model, full_layer_name)
        if layer is None:
            raise ValueError(f"quantrt: {full_layer_name!r} was not waiting to be quantized")
        value = next(iter(input_dict.values()))
        value = value[0] if isinstance(value, list) else value
        load.fill(layer, value, value.device)
        stand_in(layer)
        if missing_keys is not None:
            for key in (PLACEHOLDER, *layer._buffers):
                if key != "bias":
                    missing_keys.discard(f"{layer.name}.{key}")
        return {}


class QuantrtHfQuantizer(QuantizerTraits, HfQuantizer):
    """transformers' quantizer for QuantConfig: swaps the planned Linear layers of the meta model for
    QuantizedLinear and quantizes each weight as transformers loads it (quantrt.integrations.common); a saved
    quantrt model's tensors are loaded as stored, after checking that the checkpoint has every one of them."""

    requires_calibration = False

    def __init__(self, quantization_config: QuantConfig | dict, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.quantization_config = TransformersQuantConfig.of(quantization_config)
        self.load = QuantizeOnLoad(self.quantization_config)

    def _process_model_before_weight_loading(self, model: nn.Module, dtype: torch.dtype | None = None,
                                             checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        # as transformers' quanto and torchao integrations: the output embedding (lm_head) and tied weights stay
        # in full precision unless modules_to_not_convert names what to keep
        skips = self.get_modules_to_not_convert(model, self.quantization_config.modules_to_not_convert or None,
                                                getattr(model, "_keep_in_fp32_modules", None) or [])
        plan = self.load.plan(model, self.pre_quantized, skips)
        self.load.install(model, plan, dtype, placeholder=not self.pre_quantized)
        if self.pre_quantized:
            for layer in self.load.layers.values():
                stand_in(layer)
        files = [f for f in checkpoint_files or [] if isinstance(f, str)]
        if self.pre_quantized and files:
            # transformers fills a tensor the checkpoint lacks (or has in another shape) with torch.empty and
            # only warns: a quantized layer would compute with garbage. Checked here, from the headers
            check_stored_layers(self.load.layers, checkpoint_keys(files), getattr(model, "base_model_prefix", ""))
        else:
            self.load.releaser.watch(files)
        return model

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return not self.pre_quantized and self.load.waiting(model, param_name) is not None

    def get_quantize_ops(self) -> QuantrtQuantize:
        return QuantrtQuantize(self)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for layer in self.load.layers.values():
            if STAND_IN in vars(layer):
                del layer.weight
        self.load.finish(model)  # transformers has put self.quantization_config into model.config already
        layouts = tensor_parallel_layouts(model)
        if layouts:
            # tp_plan: transformers' hooks hand each layer this rank's plain input and reduce its outputs, so each
            # layer keeps its slice. Every rank read the whole checkpoint: sliced after quantizing, the codes are the
            # single-process model's
            shard_for_local_forward(model, model._device_mesh["tp"], layouts)
        return model

    def is_serializable(self, **kwargs: Any) -> bool:  # a method in transformers, a property in diffusers
        return True



def tensor_parallel_layouts(model: nn.Module) -> dict[str, str]:
    """{layer: "colwise" | "rowwise"} of the QuantizedLinear layers that the tp_plan of a model loaded with
    tp_size > 1 shards, each marked for transformers' local forward (`_hf_quantized_needs_local_tp`: plain tensors in
    and out, as its torchao integration marks its layers); a ValueError naming the layer for a style they cannot
    take."""
    distributed = getattr(model.config, "distributed_config", None)
    if distributed is None or (distributed.tp_size or 1) <= 1:
        return {}
    layouts = {}
    for name, module in model.named_modules():
        style_name = model.tp_plan.get(replace_layer_number_by_wildcard(name))
        if not isinstance(module, QuantizedLinear) or style_name is None:
            continue
        style = ALL_PARALLEL_STYLES[style_name]
        if type(style) is ColwiseParallel and style.output_layouts == Shard(-1):
            layouts[name] = COLWISE
        elif type(style) is RowwiseParallel:
            layouts[name] = ROWWISE
        else:
            raise ValueError(f"quantrt: layer {name!r} is quantized, and the tp_plan shards it with {style_name!r} "
                             f"({type(style).__name__}), which a QuantizedLinear cannot serve (it takes 'colwise' with "
                             f"a sharded output and the 'rowwise' styles); keep it in full precision with "
                             f"modules_to_not_convert (transformers' default keeps lm_head), or give it another style "
                             f"with DistributedConfig(tp_plan={{...}})")
        module._hf_quantized_needs_local_tp = True
    return layouts


def check_internals() -> None:
    """An ImportError naming the transformers version where the loading hooks the integration uses are missing."""
    missing = [f"HfQuantizer.{name}" for name in ("param_needs_quantization", "get_quantize_ops", "preprocess_model",
                                                  "postprocess_model", "get_modules_to_not_convert")
               if not hasattr(HfQuantizer, name)]
    if missing:
        raise ImportError(f"quantrt cannot register as a quantization backend of transformers "
                          f"{transformers.__version__}: its quantizer internals differ from those quantrt was written "
                          f"for (transformers {TESTED_VERSION}); missing: {', '.join(missing)}. Install "
                          f"transformers=={TESTED_VERSION}, or load the model without quantization_config= and quantize "
                          f"it with quantrt.quantize_")


def register() -> None:
    """Make QuantConfig a quantization_config of transformers' from_pretrained."""
    check_internals()
    method = QuantMethod.QUANTRT.value
    if AUTO_QUANTIZER_MAPPING.get(method) is QuantrtHfQuantizer:
        return
    # replaced, not refused ("already registered"): an earlier import of this module (importlib.reload) or the
    # placeholder quantrt.integrations puts there when registering failed
    AUTO_QUANTIZATION_CONFIG_MAPPING.pop(method, None)
    AUTO_QUANTIZER_MAPPING.pop(method, None)
    register_quantization_config(method)(TransformersQuantConfig)
    register_quantizer(method)(QuantrtHfQuantizer)
