"""quantrt.integrations (the package): registration with diffusers and transformers when their quantizers are
imported, whichever is imported first, without `import quantrt` importing either; a failed registration warns and
leaves a quantizer that raises the reason."""

import subprocess
import sys
import textwrap
import types

import diffusers
import pytest

import quantrt
import quantrt.integrations as integrations
from quantrt import QuantConfig

CHECK = textwrap.dedent("""
    def registered():
        from diffusers.pipelines.pipeline_loading_utils import ALL_IMPORTABLE_CLASSES, LOADABLE_CLASSES
        from diffusers.quantizers import auto as diffusers_auto
        from transformers.quantizers import auto as transformers_auto
        from quantrt.integrations import diffusers as d, transformers as t
        assert diffusers_auto.AUTO_QUANTIZER_MAPPING["quantrt"] is d.QuantrtDiffusersQuantizer
        assert diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["quantrt"] is quantrt.QuantConfig
        assert transformers_auto.AUTO_QUANTIZER_MAPPING["quantrt"] is t.QuantrtHfQuantizer
        assert transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["quantrt"] is t.TransformersQuantConfig
        assert LOADABLE_CLASSES["quantrt.transformer"] == {"QuantizedTransformer": ["save_pretrained", "from_pretrained"]}
        assert "QuantizedTransformer" in ALL_IMPORTABLE_CLASSES
""")

QUANTRT_FIRST = CHECK + textwrap.dedent("""
    import inspect, sys
    import quantrt
    assert not {"diffusers", "transformers"} & set(sys.modules), "import quantrt imports neither library"
    from diffusers import DiffusionPipeline, FluxTransformer2DModel  # imports diffusers' quantizers, then pipelines
    registered()
    auto = sys.modules["diffusers.quantizers.auto"]
    assert type(auto.__loader__).__name__ == "RegisteringLoader"
    assert "AUTO_QUANTIZER_MAPPING" in inspect.getsource(auto)  # the original loader answers what it is asked
    print("ok")
""")

LIBRARIES_FIRST = CHECK + textwrap.dedent("""
    from diffusers import DiffusionPipeline, FluxTransformer2DModel
    import transformers.quantizers.auto
    import quantrt  # registers at once with what is imported
    registered()
    print("ok")
""")


@pytest.mark.parametrize("script", [QUANTRT_FIRST, LIBRARIES_FIRST], ids=["quantrt-first", "libraries-first"])
def test_registration_follows_the_libraries_imports(script):
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_installing_the_hooks_again_changes_nothing():
    finders = [f for f in sys.meta_path if isinstance(f, integrations.PostImportFinder)]
    integrations.install_import_hooks()
    assert [f for f in sys.meta_path if isinstance(f, integrations.PostImportFinder)] == finders
    assert len(finders) == 1


def test_a_failed_registration_warns_and_its_quantizer_raises_the_reason(monkeypatch):
    def register(module):
        raise AttributeError("no DiffusersQuantizer here")

    fake = types.ModuleType("fake.quantizers.auto")
    fake.AUTO_QUANTIZER_MAPPING, fake.AUTO_QUANTIZATION_CONFIG_MAPPING = {}, {}
    monkeypatch.setitem(integrations.HOOKS, fake.__name__, ("diffusers", register))
    monkeypatch.setattr(integrations, "FAILED", {})
    with pytest.warns(RuntimeWarning, match=f"quantization backend of diffusers {diffusers.__version__}: AttributeError: no "):
        integrations.run_hook(fake.__name__, fake)
    assert integrations.registration_error("diffusers").endswith("no DiffusersQuantizer here")
    assert fake.AUTO_QUANTIZATION_CONFIG_MAPPING["quantrt"] is QuantConfig  # PipelineQuantizationConfig takes it
    with pytest.raises(ImportError, match="no DiffusersQuantizer here"):  # what diffusers' loader builds
        fake.AUTO_QUANTIZER_MAPPING[QuantConfig.quant_method](QuantConfig("int8wo"), pre_quantized=False)


def test_quant_method_is_what_the_libraries_read():
    method = QuantConfig("int8wo").quant_method
    assert method.value == "quantrt" and method == "quantrt" and f"{method}" == "quantrt"
    assert QuantConfig.from_dict({"quant_method": "quantrt", **QuantConfig("int8wo").to_dict()}).scheme.name == "int8wo"
    assert quantrt.QuantConfig("int8wo").to_dict().keys() == {
        "scheme", "group_size", "requested", "modules_to_not_convert", "modules", "backend", "activation_scale"}
