"""quantrt.quantize_pipeline: a diffusers pipeline's components quantized in place, from a {component: config}
dict or a PipelineQuantizationConfig."""

import copy
from types import SimpleNamespace

import diffusers
import pytest
import torch
import torchao.quantization as ao

import quantrt
from quantrt import QuantConfig

from .backends.cases import flux_inputs, tiny_flux

# the deprecation notices of diffusers' QuantoConfig are theirs, not ours
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Config Deprecation:UserWarning")


class TinyPipeline(diffusers.DiffusionPipeline):
    def __init__(self, transformer, projection):
        super().__init__()
        self.register_modules(transformer=transformer, projection=projection)


def tiny_pipeline():
    return TinyPipeline(tiny_flux(), torch.nn.Sequential(torch.nn.Linear(64, 32)))


@pytest.mark.parametrize("mapping", [
    lambda: {"transformer": diffusers.TorchAoConfig(ao.Int8WeightOnlyConfig(), modules_to_not_convert=["proj_out"])},
    lambda: diffusers.PipelineQuantizationConfig(quant_mapping={
        "transformer": diffusers.TorchAoConfig(ao.Int8WeightOnlyConfig(), modules_to_not_convert=["proj_out"])}),
    # quant_backend + quant_kwargs + components_to_quantize (diffusers refuses to build this form without
    # transformers installed, so the test passes an object of the same shape)
    lambda: SimpleNamespace(quant_backend="torchao", quant_mapping=None, components_to_quantize=["transformer"],
                            quant_kwargs={"quant_type": ao.Int8WeightOnlyConfig(),
                                          "modules_to_not_convert": ["proj_out"]}),
], ids=["dict", "PipelineQuantizationConfig", "quant_backend"])
def test_quantize_pipeline_replaces_components_in_place(mapping):
    pipeline = tiny_pipeline()
    expected = quantrt.QuantizedTransformer.from_model(
        copy.deepcopy(pipeline.transformer), QuantConfig("int8wo", modules_to_not_convert=["proj_out"]), progress=False)
    returned = quantrt.quantize_pipeline(pipeline, mapping(), progress=False)
    assert returned is pipeline
    assert isinstance(pipeline.transformer, quantrt.QuantizedTransformer)
    assert pipeline.components["transformer"] is pipeline.transformer
    assert tuple(pipeline.config.transformer) == ("quantrt.transformer", "QuantizedTransformer")
    assert type(pipeline.projection) is torch.nn.Sequential  # not named: left alone
    assert [(r.name, r.scheme) for r in pipeline.transformer.summary()] == [
        (r.name, r.scheme) for r in expected.summary()]
    inputs = flux_inputs()
    with torch.no_grad():
        torch.testing.assert_close(pipeline.transformer(**inputs)[0], expected(**inputs)[0])


def test_quantize_pipeline_without_components_to_quantize_takes_every_model():
    pipeline = tiny_pipeline()
    everything = SimpleNamespace(quant_backend="quanto", quant_mapping=None, components_to_quantize=None,
                                 quant_kwargs={"weights_dtype": "int8"})
    quantrt.quantize_pipeline(pipeline, everything, progress=False)
    assert isinstance(pipeline.transformer, quantrt.QuantizedTransformer)
    assert isinstance(pipeline.projection, quantrt.QuantizedTransformer)
    assert pipeline.projection.summary()[0].scheme == "int8wo"


def test_quantize_pipeline_names_the_missing_component():
    pipeline = tiny_pipeline()
    with pytest.raises(ValueError, match="no component 'text_encoder'.*transformer, projection"):
        quantrt.quantize_pipeline(pipeline, {"transformer": "int8wo", "text_encoder": "int8wo"})
    assert not isinstance(pipeline.transformer, quantrt.QuantizedTransformer)  # checked before changing anything
