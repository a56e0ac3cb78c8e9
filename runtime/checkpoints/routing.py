"""Which loader a folder goes to: a quanto or torchao checkpoint (converted without requantizing), or none of
them (a quantrt folder, or an unquantized model folder to quantize while it loads)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..config import QuantConfig, QuantMethod
from ..serialization import CONFIG_NAME, CheckpointError, OutsideFolderError, inside
from .common import (folder_quantization_config, folder_skeleton, loaded_quant_config, read_folder_json,
                     unquantized_weights)
from .quanto import QUANTO_MAP_FILES, load_quanto_layers
from .reader import SafetensorsReader, ShardedReader
from .torchao import load_torchao_layers

__all__ = ["foreign_format", "load_foreign", "model_weight_files"]


def model_weight_files(folder: Path) -> dict[str, Path]:
    """The safetensors files of a model folder, {name: real path}: diffusers' / transformers' names (and
    their index), else the folder's only .safetensors file (what `save_file(state_dict, "anything.safetensors")`
    leaves). Each is `inside` the folder."""
    files = unquantized_weights(folder, required=False)[0]
    if files:
        return files
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return {found[0].name: inside(folder, found[0].name)}
    if found:
        names = ", ".join(f.name for f in found[:4])
        raise CheckpointError(f"{folder} holds {len(found)} .safetensors files ({names}) and no index saying which "
                              f"form the model; keep only the model's file, or name it model.safetensors")
    return unquantized_weights(folder)[0]  # the error that says what a model folder holds


def foreign_format(path: str | os.PathLike) -> str | None:
    """"quanto" or "torchao" for a folder those tools wrote, None for anything else (a quantrt folder, an
    unquantized model folder, a path that is not a folder). A folder quantized by another tool is an error
    that names the tool."""
    folder = Path(path)
    if not folder.is_dir() or (folder / CONFIG_NAME).is_file():
        return None
    if any((folder / name).is_file() for name in QUANTO_MAP_FILES):
        return "quanto"
    quantization = folder_quantization_config(folder)
    method = quantization.get("quant_method") if quantization else None
    if method in ("quanto", "torchao"):
        return method
    if method == QuantMethod.QUANTRT.value:
        by_transformers = "transformers_version" in (read_folder_json(folder, "config.json") or {})
        library, example = (("transformers", "AutoModelForCausalLM") if by_transformers
                            else ("diffusers", "FluxTransformer2DModel"))
        raise CheckpointError(f"{folder} is a {library} folder that {library}'s save_pretrained wrote with "
                              f"quantization_config=quantrt.QuantConfig(...): load it with {library}'s own loader "
                              f"(e.g. {example}.from_pretrained(folder)) after `import quantrt`; it loads quantized, "
                              f"as saved")
    if method is not None:
        raise CheckpointError(f"{folder} was quantized with {method!r} (config.json quantization_config), which "
                              f"quantrt cannot load; quantrt reads quanto and torchao checkpoints, or quantizes the "
                              f"unquantized model: from_pretrained(unquantized_folder, quantization=...)")
    try:
        files = model_weight_files(folder)
    except OutsideFolderError:
        raise  # a symlink out of the folder: refused here, not passed over to another loader
    except CheckpointError:
        return None
    name, path = next(iter(files.items()))
    return "torchao" if "tensor_names" in SafetensorsReader(path, label=folder / name).metadata else None


def load_foreign(kind: str, path: str | os.PathLike, device: torch.device, torch_dtype: torch.dtype | None,
                 backend: str | None, model: nn.Module | Callable[[], nn.Module] | None
                 ) -> tuple[nn.Module, QuantConfig, dict[str, str]]:
    """Load a quanto or torchao folder (`foreign_format`): (model with QuantizedLinear layers on `device`,
    the QuantConfig that describes them, {Linear layer kept in full precision: why})."""
    loader = {"quanto": load_quanto_layers, "torchao": load_torchao_layers}[kind]
    folder = Path(path)
    shards = ShardedReader(model_weight_files(folder), folder)
    skeleton = folder_skeleton(folder, model)
    schemes = loader(folder, shards, skeleton, device, torch_dtype)
    if not schemes:
        raise CheckpointError(f"{folder} is a {kind} checkpoint with no quantized Linear layer")
    kept = {name: f"not quantized in the {kind} checkpoint" for name, module in skeleton.named_modules()
            if type(module) is nn.Linear}
    return skeleton.to(device), loaded_quant_config(schemes, kept, backend), kept
