"""Which loader a folder goes to (quantrt.checkpoints.foreign_format): a quanto folder is already quantized, and
a folder another tool quantized is refused naming the tool."""

import json

import optimum.quanto as quanto
import pytest

from quantrt import QuantizedTransformer
from quantrt.serialization import CheckpointError

from .writers import linear_stack, save_quanto, tiny_flux_folder


def test_foreign_folders_are_routed_or_refused_clearly(tmp_path):
    model = linear_stack()
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)
    folder = save_quanto(model, tmp_path / "quanto")
    with pytest.raises(ValueError, match="already quantized.*quanto"):
        QuantizedTransformer.from_pretrained(folder, model=linear_stack, quantization="int4wo")
    _, unquantized = tiny_flux_folder(tmp_path)
    config = json.loads((unquantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (unquantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'bitsandbytes'"):
        QuantizedTransformer.from_pretrained(unquantized)


@pytest.mark.parametrize("library, loader", [("diffusers", "FluxTransformer2DModel"),
                                             ("transformers", "AutoModelForCausalLM")])
def test_a_folder_a_library_saved_with_quantrts_config_points_to_the_librarys_loader(tmp_path, library, loader):
    folder = tmp_path / library
    folder.mkdir()
    config = {"quantization_config": {"quant_method": "quantrt"}}
    config["transformers_version" if library == "transformers" else "_diffusers_version"] = "1"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{library}'s own loader \(e.g. {loader}.from_pretrained"):
        QuantizedTransformer.from_pretrained(folder)
