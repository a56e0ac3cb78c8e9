"""Pipelines: quantize the model components of a diffusers pipeline in place.

    quantize_pipeline(pipe, {"transformer": Float8WeightOnlyConfig()})   # pipe.transformer is quantized
    quantize_pipeline(pipe, PipelineQuantizationConfig(quant_backend="quanto",
                      quant_kwargs={"weights_dtype": "int8"}, components_to_quantize=["transformer"]))

Which component gets which config is `quantrt.interop.pipeline_quant_mapping`'s answer.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .interop import pipeline_components, pipeline_quant_mapping
from .transformer import QuantizedTransformer


def quantize_pipeline(pipeline: Any, quant_mapping: Any, *, backend: str = "auto",
                      progress: bool | None = None) -> Any:
    """Quantize the components of a diffusers pipeline in place: each component named in `quant_mapping`
    ({"transformer": "int8wo", "text_encoder_2": Int8WeightOnlyConfig(), ...}, or a diffusers
    PipelineQuantizationConfig) is replaced by a QuantizedTransformer wrapping it (`pipeline.transformer =
    qt`, which diffusers registers in the pipeline's config). Returns the pipeline."""
    mapping = pipeline_quant_mapping(pipeline, quant_mapping, backend=backend)
    components = pipeline_components(pipeline)
    for name in mapping:
        component = getattr(pipeline, name, None)
        if component is None:
            available = ", ".join(k for k, v in components.items() if isinstance(v, nn.Module)) or "none"
            raise ValueError(f"{type(pipeline).__name__} has no component {name!r} to quantize; its model "
                             f"components: {available}")
        if isinstance(component, QuantizedTransformer):
            raise ValueError(f"{type(pipeline).__name__}.{name} is already quantized by quantrt")
        if not isinstance(component, nn.Module):
            raise TypeError(f"{type(pipeline).__name__}.{name} is a {type(component).__name__}, not a model: "
                            f"only nn.Module components can be quantized")
    for name, config in mapping.items():
        quantized = QuantizedTransformer.from_model(getattr(pipeline, name), config, progress=progress)
        setattr(pipeline, name, quantized)
    return pipeline
