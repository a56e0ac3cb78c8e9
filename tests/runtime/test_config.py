import pytest

from quantrt import QuantConfig
from quantrt.schemes import resolve_scheme


def test_shorthand_and_group_size():
    config = QuantConfig("int4wo", group_size=64)
    assert config.scheme == resolve_scheme("int4wo", group_size=64)
    assert config.plan("blocks.0.ff").scheme.group_size == 64


def test_quanto_style():
    assert QuantConfig(weights_dtype="int4").scheme == resolve_scheme("qint4")
    with pytest.raises(ValueError, match="not both"):
        QuantConfig("int8wo", weights_dtype="int8")
    with pytest.raises(ValueError, match="needs a scheme"):
        QuantConfig()


@pytest.mark.parametrize("name,skipped", [
    ("proj_out", True),  # full name equals the entry
    ("proj_out.inner", True),  # starts with entry + "."
    ("proj_outer", False),  # a prefix that is not a module boundary
    ("blocks.3.proj_out", True),  # child name equals the entry (quanto)
    ("blocks.3.proj_out_2", False),
])
def test_modules_to_not_convert_both_semantics(name, skipped):
    config = QuantConfig("int8wo", modules_to_not_convert=["proj_out"])
    assert (config.plan(name).scheme is None) == skipped
    if skipped:
        assert "proj_out" in config.plan(name).reason


def test_full_name_prefix_entry():
    config = QuantConfig("int8wo", modules_to_not_convert=["transformer_blocks.0"])
    assert config.plan("transformer_blocks.0.attn.to_q").scheme is None
    assert config.plan("transformer_blocks.01.attn.to_q").scheme is not None


def test_per_module_overrides_exact_then_regex():
    config = QuantConfig("int8wo", modules={
        "blocks.0.ff.net.2": "uint3wo",
        r"re:blocks\.\d+\.ff\..*": QuantConfig("int4wo", group_size=32),
        "norm_out.linear": None,
    })
    assert config.plan("blocks.0.ff.net.2").scheme.name == "uint3wo"
    assert config.plan("blocks.1.ff.net.2").scheme == resolve_scheme("int4wo", group_size=32)
    assert config.plan("norm_out.linear").scheme is None
    assert config.plan("blocks.1.attn.to_q").scheme.name == "int8wo"
    # modules_to_not_convert wins over an override
    config = QuantConfig("int8wo", modules_to_not_convert=["to_q"], modules={"re:.*": "int4wo"})
    assert config.plan("attn.to_q").scheme is None


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        QuantConfig("int8wo", backend="cuda")
    with pytest.raises(ValueError, match="not a valid regex"):
        QuantConfig("int8wo", modules={"re:([": "int4wo"})
    with pytest.raises(TypeError, match="unexpected keyword"):
        QuantConfig("int8wo", groupsize=64)
    with pytest.raises(TypeError, match="only apply to the long names"):
        QuantConfig("int8wo", ebits=3)
    with pytest.raises(TypeError, match="cannot use int"):
        QuantConfig.coerce(8)


def test_coerce_and_dict_round_trip():
    config = QuantConfig.coerce({"scheme": "uint5wo", "group_size": 32, "modules_to_not_convert": ["a"],
                                 "modules": {"re:b.*": "int8wo", "c": None}})
    again = QuantConfig.from_dict(config.to_dict())
    for name in ("a", "b1", "c", "d"):
        assert again.plan(name) == config.plan(name)
    assert QuantConfig.coerce("int8wo").scheme.name == "int8wo"
