"""Single-file checkpoints in a model's original (non-diffusers) layout, quantized while they load
(`quantize_single_file`, behind QuantizedTransformer.from_single_file): BFL's Flux
(double_blocks.N.img_attn.qkv.weight, ...), converted with diffusers' own single-file conversion
(diffusers.loaders.single_file_model.SINGLE_FILE_LOADABLE_CLASSES) and quantized while it streams; see
`single_file_plan` for how the conversion, which works on a whole state dict, is made to stream.

    QuantizedTransformer.from_single_file("flux1-dev.safetensors", quantization="int8wo")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..config import QuantConfig
from ..models import FLUX_SIZES
from ..modules import init_act_scale
from ..serialization import CheckpointError, build_skeleton, inside, read_json
from .common import check_complete
from .on_load import plan_layers, upcast_weight
from .reader import SafetensorsReader, release_freed_memory


class _RowIds(torch.Tensor):
    """1-D int64 ids (source tensor << 32 | row) that a diffusers single-file conversion moves around as it
    would the weights (pop, rename, chunk, split, cat along dim 0): what it returns per diffusers key says
    which rows of which original tensors make that tensor.

    diffusers' Flux conversion splits the single blocks' fused linear1 with FLUX.1's widths hard-coded,
    torch.split(w, (3072, 3072, 3072, 12288)), so it converts FLUX.1-sized checkpoints only. For a narrower
    Flux the sizes are scaled to the tensor (the same 1:1:1:4 split of q, k, v and the MLP), which is the
    conversion with its inner_dim set to the model's; sizes that do not scale to whole rows stay an error."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.split, torch.Tensor.split) and len(args) > 1 and isinstance(args[1], (list, tuple)):
            tensor, sizes = args[0], list(args[1])
            total, wanted = tensor.shape[0], sum(sizes)
            if wanted and wanted != total and all(s * total % wanted == 0 for s in sizes):
                args = (tensor, [s * total // wanted for s in sizes], *args[2:])
        return super().__torch_function__(func, types, args, kwargs)


def single_file_plan(convert: Callable[[dict], dict], shapes: dict[str, tuple[int, ...]]
                     ) -> dict[str, list[tuple[str, int, int]]]:
    """{diffusers key: [(original key, first row, end row), ...]} for the original checkpoint whose tensor
    shapes are `shapes`, computed by running diffusers' conversion `convert` on row ids instead of weights.

    Why this way: diffusers' conversion functions take the whole state dict and return the whole converted
    one, so calling them on the weights holds the model in full precision twice. Run on row ids (8 bytes per
    row, about 50 MB for FLUX.1-dev), the same code yields the plan; the loader then reads each diffusers
    tensor's rows from the file when its turn comes and quantizes it at once, so only one full-precision
    tensor is in memory at a time, and the renames, q/k/v splits and scale/shift swaps are diffusers' own.
    A conversion that does anything but move whole rows (a transpose, a reshape, arithmetic) is refused."""
    names = list(shapes)
    ids = {}
    for index, name in enumerate(names):
        rows = shapes[name][0] if shapes[name] else 1
        ids[name] = (torch.arange(rows, dtype=torch.int64) + (index << 32)).as_subclass(_RowIds)
    try:
        converted = convert(ids)
    except Exception as e:
        raise CheckpointError(f"diffusers' {getattr(convert, '__name__', convert)} failed on this checkpoint's "
                              f"layout ({type(e).__name__}: {e}): the file is not a checkpoint of this model type, "
                              f"or its sizes are not ones the conversion knows") from e
    rows_of = torch.tensor([shapes[name][0] if shapes[name] else 1 for name in names])
    plan = {}
    for key, value in converted.items():
        moved = isinstance(value, torch.Tensor) and value.dtype == torch.int64 and value.dim() == 1 and len(value)
        if moved:
            value = value.as_subclass(torch.Tensor)
            source, row = value >> 32, value & 0xFFFFFFFF
            moved = 0 <= int(source.min()) and int(source.max()) < len(names) and bool((row < rows_of[source]).all())
        if not moved:
            raise CheckpointError(f"diffusers' conversion computes {key!r} by more than moving whole rows; quantrt's "
                                  f"streaming loader cannot follow it")
        breaks = ((source[1:] != source[:-1]) | (row[1:] != row[:-1] + 1)).nonzero().flatten() + 1
        starts = [0, *breaks.tolist()]
        ends = [*breaks.tolist(), len(value)]
        plan[key] = [(names[int(source[a])], int(row[a]), int(row[b - 1]) + 1) for a, b in zip(starts, ends)]
    return plan


def planned_shape(plan: list[tuple[str, int, int]], shapes: dict[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    tails = {shapes[source][1:] for source, _, _ in plan}
    if len(tails) != 1:
        raise CheckpointError(f"diffusers' conversion builds {key!r} from tensors of different shapes {sorted(tails)}")
    first = shapes[plan[0][0]]
    if len(plan) == 1 and not first:
        return ()
    return (sum(stop - start for _, start, stop in plan), *tails.pop())


# diffusers single-file model types (infer_diffusers_model_type) -> the diffusers class that loads them
_SINGLE_FILE_CLASSES = {"flux-dev": "FluxTransformer2DModel", "flux-schnell": "FluxTransformer2DModel",
                        "flux-fill": "FluxTransformer2DModel", "flux-depth": "FluxTransformer2DModel"}


def _infer_model_type(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]) -> str | None:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    meta = {name: torch.empty(shape, dtype=dtypes[name], device="meta") for name, shape in shapes.items()}
    try:
        return infer_diffusers_model_type(meta)
    except Exception:  # a layout diffusers' detector trips on: no type
        return None


def _single_file_config(file: Path, config: dict | str | os.PathLike | None, model_type: str | None,
                        plan_for: Callable[[str], dict[str, tuple[int, ...]]]) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, diffusers config) for a single file: the caller's config (a dict, or a
    folder holding config.json, or that file), else the quantrt.models.FLUX_SIZES entry whose model has
    exactly the converted file's tensor shapes. `plan_for(class name)` gives {diffusers key: shape}."""
    from accelerate import init_empty_weights

    guessed = _SINGLE_FILE_CLASSES.get(model_type or "")
    if config is not None:
        if not isinstance(config, dict):
            path = Path(config)
            config = read_json(inside(path, "config.json") if path.is_dir() else path)
            if not isinstance(config, dict):
                raise CheckpointError(f"{path} holds no diffusers config (a JSON object)")
        config = {k: v for k, v in config.items() if k != "quantization_config"}
        class_name = config.get("_class_name") or guessed
        if class_name is None:
            raise CheckpointError(f"cannot tell which diffusers model {file} is (diffusers detects "
                                  f"{model_type or 'no known type'}): give config with its '_class_name'")
        return class_name, config
    hint = (f"{file} is a {model_type} checkpoint by diffusers' detection" if model_type
            else f"diffusers does not recognise the layout of {file}")
    if guessed != "FluxTransformer2DModel":
        raise CheckpointError(f"{hint}; without config= quantrt infers only Flux configs (from "
                              f"quantrt.models.FLUX_SIZES) and the model hub is not reachable: pass config= (a dict, "
                              f"or the model's diffusers config folder)")
    from diffusers import FluxTransformer2DModel

    shapes = plan_for(guessed)
    for sizes_config in FLUX_SIZES.values():
        with init_empty_weights():
            candidate = FluxTransformer2DModel(**sizes_config)
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
            return guessed, {"_class_name": guessed, **dict(candidate.config)}
    raise CheckpointError(f"{hint}, but its tensor shapes match none of quantrt.models.FLUX_SIZES "
                          f"({', '.join(FLUX_SIZES)}), and the model hub, where diffusers would fetch the config, is "
                          f"not reachable: pass config= (a dict, or the folder of the model's diffusers config.json, "
                          f"e.g. FLUX.1-schnell/transformer)")


def single_file_layout(file: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype],
                       config: dict | str | os.PathLike | None) -> tuple[nn.Module, dict[str, list[tuple[str, int, int]]]]:
    """(the meta-device diffusers model of a single file whose tensors have `shapes` and `dtypes`, and the plan
    {model key: [(file key, first row, end row), ...]} that fills it): the config as `_single_file_config` finds
    it, the plan by diffusers' own conversion (`single_file_plan`), or the identity where the file already holds
    exactly the model's keys (diffusers' layout, which diffusers' from_single_file loads unconverted too)."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    model_type = _infer_model_type(shapes, dtypes)
    plans: dict[str, dict[str, list[tuple[str, int, int]]]] = {}

    def plan_for(class_name: str) -> dict[str, list[tuple[str, int, int]]]:
        if class_name not in SINGLE_FILE_LOADABLE_CLASSES:
            raise CheckpointError(f"diffusers has no single-file conversion for {class_name} (it has one for "
                                  f"{', '.join(SINGLE_FILE_LOADABLE_CLASSES)})")
        if class_name not in plans:
            plans[class_name] = single_file_plan(SINGLE_FILE_LOADABLE_CLASSES[class_name]["checkpoint_mapping_fn"],
                                                 shapes)
        return plans[class_name]

    class_name, model_config = _single_file_config(
        file, config, model_type,
        lambda name: {key: planned_shape(p, shapes, key) for key, p in plan_for(name).items()})
    skeleton = build_skeleton({"library": "diffusers", "class": class_name, "config": model_config}, None)
    expected = skeleton.state_dict(keep_vars=True)
    if set(shapes) == set(expected):
        return skeleton, {key: [(key, 0, shapes[key][0] if shapes[key] else 1)] for key in shapes}
    return skeleton, plan_for(class_name)


def quantize_single_file(file: str | os.PathLike, quant_config: QuantConfig,
                         config: dict | str | os.PathLike | None, device: torch.device,
                         torch_dtype: torch.dtype | None, progress: bool | None = None
                         ) -> tuple[nn.Module, dict[str, str]]:
    """Build the diffusers model of a single-file checkpoint in its original layout on the meta device and
    fill it tensor by tensor in diffusers' layout (`single_file_plan`), quantizing each planned Linear weight
    as it is read, so the full-precision model is never whole in memory. Returns (model, {kept: why})."""
    from accelerate.utils import set_module_tensor_to_device
    from tqdm.auto import tqdm

    file = Path(file)
    if not file.exists():
        raise CheckpointError(f"{file} does not exist: from_single_file loads a local .safetensors file; quantrt never "
                              f"downloads")
    if not file.is_file() or file.suffix != ".safetensors":
        raise CheckpointError(f"{file} is not a .safetensors file; quantrt never loads .ckpt/.pt/.bin pickles")
    reader = SafetensorsReader(file)
    shapes = {name: reader.shape(name) for name in reader.keys()}
    skeleton, plan = single_file_layout(file, shapes, {name: reader.dtype(name) for name in shapes}, config)
    class_name = type(skeleton).__name__
    expected = {key: tuple(t.shape) for key, t in skeleton.state_dict(keep_vars=True).items()}
    planned, kept = plan_layers(skeleton, quant_config, torch_dtype)
    linear_weights = set(planned) | {f"{name}.weight" for name in kept}
    unknown = sorted(set(plan) - set(expected))
    if unknown:
        raise CheckpointError(f"the conversion of {file} gives tensors that {class_name} with this config does not "
                              f"have, e.g. {unknown[:3]}: the config does not match the file")
    bar = tqdm(plan.items(), desc="quantizing while loading", unit="tensor",
               disable=(not progress) if progress is not None else None)
    for key, segments in bar:
        shape = planned_shape(segments, shapes, key)
        if shape != expected[key]:
            raise CheckpointError(f"{key!r} converted from {file.name} has shape {list(shape)}, {class_name} with this "
                                  f"config expects {list(expected[key])}: the config does not match the file")
        parts = [reader.read(source) if (start, stop) == (0, shapes[source][0] if shapes[source] else 1)
                 else reader.read(source, (start, stop)) for source, start, stop in segments]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        del parts
        tensor = upcast_weight(key, tensor, file.name, torch_dtype, key in linear_weights)
        if key in planned:
            layer = planned.pop(key)
            layer.set_weight(tensor.to(device))
            init_act_scale(layer, quant_config.activation_scale, device)
        else:
            set_module_tensor_to_device(skeleton, key, device, value=tensor, dtype=tensor.dtype)
        del tensor
        release_freed_memory()
    check_complete(skeleton, str(file))
    return skeleton.to(device), kept
