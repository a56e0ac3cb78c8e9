"""Checkpoints written the way other tools' users write them, for the tests of quantrt.checkpoints: optimum-quanto
folders, diffusers folders of a tiny Flux, and single files in BFL's original Flux layout."""

import json
import warnings
from pathlib import Path

import optimum.quanto as quanto
import torch
import torch.nn as nn
from safetensors.torch import save_file

from quantrt.models import build_flux


def linear_stack() -> nn.Module:
    # quanto groups qint4/qint2 weights by 128 (K=256, K=512), keeps K <= 128 whole (K=64, K=8), and gives a
    # single output row (N=1) one per-tensor scale
    return nn.Sequential(nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 8), nn.Linear(8, 512, bias=False),
                         nn.Linear(512, 1))


def linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "weight") and name and m.weight is not None
            and m.weight.dim() == 2}


def save_quanto(model: nn.Module, folder: Path) -> Path:
    """What optimum-quanto's README ("Serialization") has its users do."""
    folder.mkdir(parents=True)
    save_file(model.state_dict(), folder / "model.safetensors")
    (folder / "quantization_map.json").write_text(json.dumps(quanto.quantization_map(model)))
    return folder


def tiny_flux_folder(tmp_path: Path) -> tuple[nn.Module, Path]:
    model = build_flux("tiny", dtype=torch.float32)
    model.save_pretrained(tmp_path / "unquantized")
    return model, tmp_path / "unquantized"


def diffusers_load(folder: Path, quantization_config) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' deprecation of QuantoConfig and torchao's bf16 advice
        return FluxTransformer2DModel.from_pretrained(folder, quantization_config=quantization_config,
                                                      torch_dtype=torch.float32).eval()


def to_bfl_layout(state: dict[str, torch.Tensor], num_layers: int, num_single_layers: int) -> dict[str, torch.Tensor]:
    """diffusers' FluxTransformer2DModel state dict -> BFL's original layout: the inverse of diffusers'
    convert_flux_transformer_checkpoint_to_diffusers, written out so that the test does not trust it."""
    bfl = {}

    def move(diffusers_name: str, bfl_name: str) -> None:
        for leaf in ("weight", "bias"):
            if f"{diffusers_name}.{leaf}" in state:
                bfl[f"{bfl_name}.{leaf}"] = state[f"{diffusers_name}.{leaf}"]

    def fuse(diffusers_names: list[str], bfl_name: str) -> None:
        for leaf in ("weight", "bias"):
            bfl[f"{bfl_name}.{leaf}"] = torch.cat([state[f"{n}.{leaf}"] for n in diffusers_names])

    for diffusers_name, bfl_name in [("time_text_embed.timestep_embedder", "time_in"),
                                     ("time_text_embed.text_embedder", "vector_in"),
                                     ("time_text_embed.guidance_embedder", "guidance_in")]:
        move(f"{diffusers_name}.linear_1", f"{bfl_name}.in_layer")
        move(f"{diffusers_name}.linear_2", f"{bfl_name}.out_layer")
    move("context_embedder", "txt_in")
    move("x_embedder", "img_in")
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        move(f"{d}.norm1.linear", f"{b}.img_mod.lin")
        move(f"{d}.norm1_context.linear", f"{b}.txt_mod.lin")
        fuse([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{b}.img_attn.qkv")
        fuse([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{b}.txt_attn.qkv")
        for norm, bfl_norm in [("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                               ("norm_added_q", "txt_attn.norm.query_norm"),
                               ("norm_added_k", "txt_attn.norm.key_norm")]:
            bfl[f"{b}.{bfl_norm}.scale"] = state[f"{d}.attn.{norm}.weight"]
        move(f"{d}.ff.net.0.proj", f"{b}.img_mlp.0")
        move(f"{d}.ff.net.2", f"{b}.img_mlp.2")
        move(f"{d}.ff_context.net.0.proj", f"{b}.txt_mlp.0")
        move(f"{d}.ff_context.net.2", f"{b}.txt_mlp.2")
        move(f"{d}.attn.to_out.0", f"{b}.img_attn.proj")
        move(f"{d}.attn.to_add_out", f"{b}.txt_attn.proj")
    for i in range(num_single_layers):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        move(f"{d}.norm.linear", f"{b}.modulation.lin")
        fuse([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], f"{b}.linear1")
        bfl[f"{b}.norm.query_norm.scale"] = state[f"{d}.attn.norm_q.weight"]
        bfl[f"{b}.norm.key_norm.scale"] = state[f"{d}.attn.norm_k.weight"]
        move(f"{d}.proj_out", f"{b}.linear2")
    move("proj_out", "final_layer.linear")
    for leaf in ("weight", "bias"):  # diffusers' AdaLayerNormContinuous is (scale, shift), BFL's (shift, scale)
        scale, shift = state[f"norm_out.linear.{leaf}"].chunk(2)
        bfl[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
    assert sum(t.numel() for t in bfl.values()) == sum(t.numel() for t in state.values())
    return bfl


def write_bfl_file(model: nn.Module, file: Path, prefix: str = "") -> Path:
    cfg = model.config
    bfl = to_bfl_layout(model.state_dict(), cfg.num_layers, cfg.num_single_layers)
    save_file({prefix + k: v.contiguous() for k, v in bfl.items()}, file)
    return file


# a FLUX whose Linear layers all take GGUF's K-quants (K a multiple of 256), small enough for CPU tests
GGUF_FLUX = dict(patch_size=1, in_channels=256, num_layers=1, num_single_layers=1, attention_head_dim=128,
                 num_attention_heads=2, joint_attention_dim=256, pooled_projection_dim=256, guidance_embeds=True,
                 axes_dims_rope=(32, 48, 48))
# GGUF's block types, in the order write_gguf_file hands them to a model's Linear weights
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def gguf_flux(seed: int = 0) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**GGUF_FLUX).eval()


def gguf_blocks_of(weight: torch.Tensor, kind: str):
    """weight [N, K] float -> GGUF blocks of `kind`: the gguf package's quantizer where it has one (Q8_0, Q4_0,
    Q4_1, Q5_0, Q5_1), else (the K-quants) quantrt's, written in GGUF's layout by quantrt.checkpoints.gguf's
    gguf_block_bytes (checked against gguf's dequantize in test_gguf.py)."""
    import gguf

    from quantrt.checkpoints.gguf import gguf_block_bytes
    from quantrt.kernels.quantize import quantize_gguf_fields

    if kind.endswith("_K"):
        return gguf_block_bytes(quantize_gguf_fields(weight.float(), kind.lower()), kind).numpy()
    return gguf.quants.quantize(weight.float().numpy(), gguf.GGMLQuantizationType[kind])


def write_gguf_file(model: nn.Module, file: Path, layout: str = "bfl", types: tuple[str, ...] = GGUF_TYPES,
                    float_weights: dict[str, str] | None = None, edit=None) -> dict[str, str]:
    """Write `model` as a GGUF file the way a GGUF converter does (city96's for FLUX): in BFL's layout (or
    diffusers' own, `layout="diffusers"`), 2-D weights quantized with `types` in turn (those whose rows are not
    whole blocks of the type in F16), `float_weights` {key: "F16" / "BF16" / "F32"} kept as they are, 1-D tensors
    in F32. `edit(writer, name, array, type)` may replace what is written for a tensor. Returns {key: type}."""
    import gguf
    import numpy as np

    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    if layout == "bfl":
        cfg = model.config
        state = to_bfl_layout(state, cfg.num_layers, cfg.num_single_layers)
    writer = gguf.GGUFWriter(str(file), "flux")
    written, turn = {}, 0
    for name, tensor in state.items():
        kind = (float_weights or {}).get(name)
        if kind is None and tensor.dim() == 2:
            kind = types[turn % len(types)]
            turn += 1
            if tensor.shape[1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]:
                kind = "F16"
        kind = kind or "F32"
        if kind in ("F32", "F16"):
            array = tensor.numpy().astype(np.float32 if kind == "F32" else np.float16)
        else:
            array = (gguf.quants.quantize(tensor.numpy(), gguf.GGMLQuantizationType.BF16) if kind == "BF16"
                     else gguf_blocks_of(tensor, kind))
        if edit is not None:
            array, kind = edit(name, array, kind)
        if kind in ("F32", "F16"):
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=gguf.GGMLQuantizationType[kind])
        written[name] = kind
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def gguf_reference(model: nn.Module, file: Path, layout: str = "bfl") -> nn.Module:
    """A float32 copy of `model` holding the file's values as gguf.quants.dequantize gives them: what a GGUF file
    holds, computed by the gguf package alone (BFL's layout undone by `to_bfl_layout` run on element ids)."""
    import copy

    import gguf

    reader = gguf.GGUFReader(str(file))
    values = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float().reshape(-1)
              for t in reader.tensors}
    reference = copy.deepcopy(model).float()
    state = reference.state_dict()
    starts, total = {}, 0
    for key, tensor in state.items():
        starts[key], total = total, total + tensor.numel()
    ids = {key: torch.arange(tensor.numel()).reshape(tensor.shape) + starts[key] for key, tensor in state.items()}
    if layout == "bfl":
        cfg = model.config
        ids = to_bfl_layout(ids, cfg.num_layers, cfg.num_single_layers)
    flat = torch.full((total,), float("nan"))
    for name, where in ids.items():
        flat[where.reshape(-1)] = values[name]
    assert not flat.isnan().any()
    reference.load_state_dict({key: flat[starts[key]:starts[key] + t.numel()].reshape(t.shape)
                               for key, t in state.items()})
    return reference
