"""quantrt.integrations.common: the config form diffusers and transformers write to config.json, the pages of
a checkpoint's memory map handed back per weight (never anything else), the libraries' skip lists, and the check
of a quantized checkpoint's tensors before a loader reads them."""

import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from quantrt import QuantConfig
from quantrt.integrations.common import (PageReleaser, QuantizeOnLoad, StoredQuantConfig, check_stored_layers,
                                         checkpoint_keys, skipped_by)


def test_the_stored_config_names_every_layer_and_reads_back_as_a_quantconfig():
    config = QuantConfig("int4wo", group_size=64, modules_to_not_convert=["head"], modules={"re:.*up": "int8wo"},
                         backend="reference")
    stored = StoredQuantConfig.of(config)
    stored.layers = {"up": {"scheme": "int8wo", "group_size": None}, "down": {"scheme": "int4wo", "group_size": 64},
                     "head": None}
    data = stored.to_dict()
    assert data["quant_method"] == "quantrt" and data["modules"] == stored.layers
    assert {k: data[k] for k in ("scheme", "group_size", "modules_to_not_convert", "backend")} == {
        "scheme": "int4wo", "group_size": 64, "modules_to_not_convert": ["head"], "backend": "reference"}
    assert set(config.to_dict()) == set(data) - {"quant_method", "quantrt_version"}  # QuantConfig's own is as was
    again = QuantConfig.from_dict(data)
    assert again.plan("up").scheme.name == "int8wo" and again.plan("down").scheme.group_size == 64
    assert again.plan("head").scheme is None and again.backend_for("up") == "reference"
    assert StoredQuantConfig.of(data).to_dict() == data


def test_a_reload_quantizes_exactly_the_layers_its_config_names():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8))
    config = StoredQuantConfig.of({"scheme": "int8wo", "modules": {"0": {"scheme": "int4wo", "group_size": 32},
                                                                   "1": None, "re:2": {"scheme": "int8wo"}}})
    plan = QuantizeOnLoad(config).plan(model, pre_quantized=True)
    assert {name: scheme.name for name, scheme in plan.items()} == {"0": "int4wo"}  # no regex read from a file
    config.modules["7"] = QuantConfig("int8wo")
    with pytest.raises(ValueError, match="quantizes layer '7', which is not a Linear layer of Sequential"):
        QuantizeOnLoad(config).plan(model, pre_quantized=True)


def test_skip_lists_match_names_modules_above_and_path_components():
    skips = ["lm_head", "model.embed", "wo"]
    assert skipped_by("lm_head", skips) == "lm_head"
    assert skipped_by("model.embed.proj", skips) == "model.embed"
    assert skipped_by("encoder.block.0.layer.1.DenseReluDense.wo", skips) == "wo"
    assert skipped_by("encoder.block.0.layer.1.DenseReluDense.wi", skips) is None


def test_a_quantized_checkpoint_is_checked_before_loading(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32))
    QuantizeOnLoad(StoredQuantConfig.of(QuantConfig("int8wo"))).install(
        model, {"0": QuantConfig("int8wo").scheme}, torch.float32, placeholder=False)
    layers = {"0": model[0]}
    tensors = {"0.qweight": torch.zeros(32, 64, dtype=torch.int8), "0.scale": torch.ones(32, 1),
               "0.bias": torch.zeros(32)}
    save_file(tensors, tmp_path / "model.safetensors")
    check_stored_layers(layers, checkpoint_keys([tmp_path / "model.safetensors"]))
    check_stored_layers(layers, {f"model.{k}": v for k, v in checkpoint_keys([tmp_path / "model.safetensors"]).items()},
                        prefix="model")
    save_file({**tensors, "0.qweight": torch.zeros(32, 64, dtype=torch.uint8)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="'0.qweight' is torch.uint8 \\[32, 64\\] in the checkpoint, layer '0'"):
        check_stored_layers(layers, checkpoint_keys([tmp_path / "model.safetensors"]))
    save_file({k: v for k, v in tensors.items() if k != "0.bias"}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no '0.bias'"):
        check_stored_layers(layers, checkpoint_keys([tmp_path / "model.safetensors"]))


def rss_file() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/maps are Linux's")
def test_released_pages_leave_the_rss_and_nothing_is_lost(tmp_path):
    state = {"a": torch.randn(2048, 2048), "b": torch.randn(2048, 2048)}  # 16 MiB each
    save_file(state, tmp_path / "w.safetensors")
    mapped = load_file(tmp_path / "w.safetensors")  # views of a memory map
    before = rss_file()
    assert torch.equal(mapped["a"], state["a"]) and torch.equal(mapped["b"], state["b"])  # read: resident
    assert rss_file() - before > 24 * 2**20
    anonymous = state["a"].clone()
    releaser = PageReleaser()
    releaser.release(mapped["a"], anonymous)  # the map's pages under `a`; the anonymous copy is left alone
    assert rss_file() - before < 20 * 2**20
    releaser.watch([tmp_path / "w.safetensors"])
    releaser.release()  # the whole mapping of a watched file
    assert rss_file() - before < 4 * 2**20
    assert torch.equal(mapped["a"], state["a"]) and torch.equal(mapped["b"], state["b"])  # read again from the file
    assert torch.equal(anonymous, state["a"])
