"""GGUF files (quantrt.checkpoints.gguf), written by the tests with the gguf package's writer and quantizers (the
K-quants, which the gguf package cannot quantize, with quantrt's, in GGUF's layout): every block type decodes to
gguf.quants.dequantize's values bit for bit and is stored within 5% of the file's bytes; a FLUX in BFL's layout and
in diffusers' own loads through from_single_file and diffusers' from_single_file with a QuantConfig, equal to the
gguf package's values exactly and to diffusers' own GGUF path within 1e-3; save/load round trips; bad files are
refused naming the tensor and the fix."""

import struct
import warnings

import gguf
import numpy as np
import pytest
import torch
import torch.nn as nn

import quantrt  # noqa: F401  (registers QuantConfig with diffusers)
from quantrt import QuantConfig, QuantizedLinear, QuantizedTransformer
from quantrt.checkpoints.gguf import GgufFile, gguf_block_bytes, gguf_fields, gguf_weight
from quantrt.kernels.packing import GGUF_BLOCKS
from quantrt.kernels.quantize import dequantize_gguf, dequantize_gguf_fields, quantize_gguf_fields
from quantrt.metrics import relative_error
from quantrt.models import flux_inputs
from quantrt.serialization import CheckpointError

from .writers import GGUF_TYPES, gguf_flux, gguf_reference, write_gguf_file

KINDS = [name.upper() for name in GGUF_BLOCKS]
# the fp16 d (and dmin / m) of each block type: their byte offsets in a GGUF block
SCALE_BYTES = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
# the tensors that stay as they are: a Linear weight in F16 and one in BF16 (1-D tensors are F32)
FLOAT_WEIGHTS = {"x_embedder.weight": "F16", "img_in.weight": "F16", "proj_out.weight": "BF16",
                 "final_layer.linear.weight": "BF16"}


def random_blocks(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random GGUF blocks of `kind` for an [n, k] weight: every byte random, but finite fp16 scales."""
    rng = np.random.default_rng(seed)
    blocks = GGUF_BLOCKS[kind.lower()]
    raw = rng.integers(0, 256, size=(n, k // blocks.block * blocks.file_bytes), dtype=np.uint8)
    view = raw.reshape(-1, blocks.file_bytes)
    for at in SCALE_BYTES[kind]:
        view[:, at:at + 2] = (rng.standard_normal((len(view), 1)) * 1e-3).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("kind", KINDS)
def test_every_block_type_is_gguf_dequantize_bit_for_bit(kind):
    n, k = 6, 512
    raw = random_blocks(kind, n, k)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]))
    scheme, tensors = gguf_weight(torch.from_numpy(raw), kind, (n, k), torch.bfloat16, "w")
    assert scheme.name == kind.lower() and tensors["scale"].shape == (n, 0)
    torch.testing.assert_close(dequantize_gguf(tensors["qweight"], tensors["block_scales"], scheme.name, k),
                               expected, rtol=0, atol=0)
    torch.testing.assert_close(scheme.dequantize(tensors, k), expected, rtol=0, atol=0)
    # resident bytes within 5% of the file's; every byte of the blocks is kept (they are written back exactly)
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert raw.nbytes <= stored <= 1.05 * raw.nbytes, stored / raw.nbytes
    np.testing.assert_array_equal(gguf_block_bytes(gguf_fields(torch.from_numpy(raw), kind), kind).numpy(), raw)


@pytest.mark.parametrize("kind", KINDS)
def test_the_blocks_quantrt_writes_are_what_gguf_reads(kind):
    """quantrt's own quantizer, written in GGUF's layout (as the tests write their K-quant files), reads back in
    the gguf package to the values quantrt computes; for the types gguf can quantize, gguf's blocks round-trip."""
    w = torch.randn(4, 512) * 0.05
    fields = quantize_gguf_fields(w, kind.lower())
    raw = gguf_block_bytes(fields, kind).numpy()
    torch.testing.assert_close(torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])),
                               dequantize_gguf_fields(fields, kind.lower()), rtol=0, atol=0)
    if not kind.endswith("_K"):
        theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[kind])
        np.testing.assert_array_equal(gguf_block_bytes(gguf_fields(torch.from_numpy(theirs), kind), kind).numpy(),
                                      theirs)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A FLUX whose layers take every block type, its config folder, and two GGUF files of it (BFL's layout and
    diffusers' own), with F16 / BF16 Linear weights and F32 1-D tensors beside the quantized ones."""
    folder = tmp_path_factory.mktemp("gguf")
    model = gguf_flux()
    model.save_config(folder / "config")
    files = {}
    for layout in ("bfl", "diffusers"):
        files[layout] = folder / f"flux-{layout}.gguf"
        files[layout + "-types"] = write_gguf_file(model, files[layout], layout, float_weights=FLOAT_WEIGHTS)
    return model, folder, files


def test_bfl_file_loads_as_the_gguf_package_reads_it(flux, tmp_path):
    model, folder, files = flux
    qt = QuantizedTransformer.from_single_file(files["bfl"], config=folder / "config", backend="reference",
                                               progress=False)
    reference = gguf_reference(model, files["bfl"])
    inputs = flux_inputs(model, seed=3)
    with torch.no_grad():  # the same float32 weights and the same ops: equal
        torch.testing.assert_close(qt(**inputs)[0], reference(**inputs)[0], rtol=0, atol=0)
    schemes = {r.name: r.scheme for r in qt.summary()}
    assert set(schemes.values()) == {kind.lower() for kind in GGUF_TYPES} | {"none"}
    assert schemes["transformer_blocks.0.attn.to_q"] == files["bfl-types"]["double_blocks.0.img_attn.qkv.weight"].lower()
    kept = {r.name: r.why for r in qt.summary() if not r.quantized}
    assert kept == {"x_embedder": "stored as F16 in the GGUF file (kept as it is)",
                    "proj_out": "stored as BF16 in the GGUF file (kept as it is)"}
    # resident bytes of the quantized layers within 5% of those tensors' bytes in the file
    file = GgufFile(files["bfl"])
    weights = sum(file.nbytes(key) for key, kind in files["bfl-types"].items() if kind in GGUF_TYPES)
    layers = qt.quantized_layers().values()
    resident = sum(layer.storage_bytes() - layer.bias.numel() * layer.bias.element_size() for layer in layers)
    assert weights <= resident <= 1.05 * weights, resident / weights
    assert all(layer.scale.dtype == torch.float32 and layer.block_scales.dtype == torch.uint8 for layer in layers)
    # as stored: save_pretrained / from_pretrained, bit for bit
    qt.save_pretrained(tmp_path / "saved")
    again = QuantizedTransformer.from_pretrained(tmp_path / "saved", backend="reference")
    for name, layer in again.quantized_layers().items():
        original = qt.quantized_layers()[name]
        assert layer.scheme == original.scheme
        assert all(torch.equal(t, original.tensors()[key]) for key, t in layer.tensors().items())
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs)[0], qt(**inputs)[0], rtol=0, atol=0)


def test_diffusers_layout_equals_diffusers_gguf_path_and_loads_through_diffusers(flux, tmp_path):
    """The same file through diffusers' own GGUF path (GGUFQuantizationConfig, float32), through diffusers'
    from_single_file with a QuantConfig, and through QuantizedTransformer.from_single_file. diffusers' path
    dequantizes in float16 (its own dequantize functions), hence the tolerance; quantrt's values are gguf's."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    model, folder, files = flux
    inputs = flux_inputs(model, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = FluxTransformer2DModel.from_single_file(
            str(files["diffusers"]), config=str(folder / "config"), torch_dtype=torch.float32,
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
        ours = FluxTransformer2DModel.from_single_file(
            str(files["diffusers"]), config=str(folder / "config"),
            quantization_config=QuantConfig("int8wo", modules_to_not_convert=["norm_out"], backend="reference"))
    qt = QuantizedTransformer.from_single_file(files["diffusers"], QuantConfig("int8wo", modules_to_not_convert=[
        "norm_out"]), config=folder / "config", backend="reference", progress=False)
    reference = gguf_reference(model, files["diffusers"], layout="diffusers")
    with torch.no_grad():
        expected, diffusers_out = reference(**inputs)[0], theirs(**inputs)[0]
        torch.testing.assert_close(qt(**inputs)[0], expected, rtol=0, atol=0)
        torch.testing.assert_close(ours(**inputs)[0], expected, rtol=0, atol=0)
    assert relative_error(qt(**inputs)[0], diffusers_out) < 1e-3
    layer = ours.transformer_blocks[0].attn.to_q
    assert isinstance(layer, QuantizedLinear) and layer.scheme.name == files["diffusers-types"][
        "transformer_blocks.0.attn.to_q.weight"].lower()
    # kept in full precision: norm_out by the config (dequantized), x_embedder and proj_out as stored (F16, BF16)
    assert all(type(m) is nn.Linear for m in (ours.norm_out.linear, ours.x_embedder, ours.proj_out))
    assert ours.x_embedder.weight.dtype == torch.float32
    # diffusers' save_pretrained / from_pretrained of the quantized model: as stored, with no config passed
    ours.save_pretrained(tmp_path / "diffusers-saved")
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "diffusers-saved")
    assert again.transformer_blocks[0].attn.to_q.scheme == layer.scheme
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs)[0], expected, rtol=0, atol=0)


def test_modules_to_not_convert_dequantize_and_overrides_cannot_requantize(flux):
    model, folder, files = flux
    qt = QuantizedTransformer.from_single_file(files["bfl"], QuantConfig(
        "int8wo", modules_to_not_convert=["transformer_blocks.0.ff"], modules={"context_embedder": None}),
        config=folder / "config", progress=False)
    reference = gguf_reference(model, files["bfl"])
    for name in ("transformer_blocks.0.ff.net.2", "context_embedder"):
        layer = qt.model.get_submodule(name)
        assert type(layer) is nn.Linear
        torch.testing.assert_close(layer.weight, reference.get_submodule(name).weight, rtol=0, atol=0)
    why = {r.name: r.why for r in qt.summary()}
    kind = files["bfl-types"]["txt_in.weight"]
    assert why["context_embedder"] == f"override: keep full precision (dequantized from {kind})"
    assert qt.quant_config.modules["context_embedder"] is None
    with pytest.raises(CheckpointError, match=r"modules\['context_embedder'\] asks for int4wo, but the layer is "
                                              r"stored as .* never requantizes"):
        QuantizedTransformer.from_single_file(files["bfl"], QuantConfig("int8wo", modules={"context_embedder": "int4wo"}),
                                              config=folder / "config", progress=False)


def _patched(source, target, at: int, fmt: str, value) -> object:
    data = bytearray(source.read_bytes())
    struct.pack_into(fmt, data, at, value)
    target.write_bytes(bytes(data))
    return target


def _tensor_info_offset(path, name: str) -> int:
    """Where the data offset of tensor `name` is in the file's header."""
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return int(tensor.field.offset) + 8 + len(name.encode()) + 4 + 8 * len(tensor.shape) + 4


def small_file(path, kinds: dict[str, str] | None = None, edit=None):
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64, bias=False))
    writer = gguf.GGUFWriter(str(path), "test")
    writer.add_array("test.flags", [True, False])
    for name, tensor in model.state_dict().items():
        kind = (kinds or {}).get(name, "Q8_0" if tensor.dim() == 2 else "F32")
        array = tensor.numpy() if kind == "F32" else gguf.quants.quantize(tensor.numpy(), gguf.GGMLQuantizationType[kind])
        if edit:
            array = edit(name, array)
        writer.add_tensor(name, array, raw_dtype=None if kind == "F32" else gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("damage, message", [
    ("magic", "does not start with 'GGUF'"),
    ("kv_count", "states 4611686018427387904 metadata entries, more than the rest of the file can hold"),
    ("tensor_count", "states 1099511627776 tensors, more than the rest of the file can hold"),
    ("array_count", "states 1099511627776 array elements, more than the rest of the file can hold"),
    ("truncated", "do not lie \\(aligned\\) in the file's data section"),
    ("overlap", "overlap those of"),
    ("offset", "do not lie \\(aligned\\) in the file's data section"),
    ("big_endian", "version"),
])
def test_damaged_or_crafted_files_are_refused_before_a_tensor_is_read(tmp_path, damage, message):
    good = small_file(tmp_path / "good.gguf")
    GgufFile(good)  # the undamaged file reads
    bad = tmp_path / "bad.gguf"
    data = good.read_bytes()
    if damage == "magic":
        bad.write_bytes(b"GGML" + data[4:])
    elif damage == "kv_count":
        _patched(good, bad, 16, "<Q", 2**62)
    elif damage == "tensor_count":
        _patched(good, bad, 8, "<Q", 2**40)
    elif damage == "array_count":  # gguf's own reader loops over such a count of 1-byte values (for days)
        _patched(good, bad, data.find(b"test.flags") + len(b"test.flags") + 8, "<Q", 2**40)
    elif damage == "truncated":
        bad.write_bytes(data[:-100])
    elif damage == "overlap":  # the second weight's data offset onto the first's
        first = _tensor_info_offset(good, "0.weight")
        _patched(good, bad, _tensor_info_offset(good, "1.weight"), "<Q",
                 struct.unpack_from("<Q", data, first)[0])
    elif damage == "offset":
        _patched(good, bad, _tensor_info_offset(good, "0.bias"), "<Q", 2**40)
    else:
        _patched(good, bad, 4, ">I", 3)
    with pytest.raises(CheckpointError, match=message):
        GgufFile(bad)


def test_an_unmapped_type_is_refused_naming_the_tensor_or_dequantized_when_kept(flux, tmp_path):
    """IQ4_NL has no quantrt format: its Linear weight is refused with the fix, and loads dequantized (gguf's
    values) where the layer is kept in full precision."""
    model, folder, _ = flux

    def iq4(name, array, kind):
        if name != "txt_in.weight":
            return array, kind
        blocks = np.random.default_rng(0).integers(0, 256, size=(256, 256 // 32 * 18), dtype=np.uint8)
        blocks.reshape(-1, 18)[:, :2] = np.full((1,), 1e-3, dtype=np.float16).view(np.uint8)
        return blocks, "IQ4_NL"

    file = tmp_path / "iq4.gguf"
    write_gguf_file(model, file, edit=iq4)
    with pytest.raises(CheckpointError, match=r"tensor 'txt_in.weight' of iq4.gguf \(layer 'context_embedder'\) "
                                              r"is a Linear weight of GGUF type IQ4_NL.*modules_to_not_convert"):
        QuantizedTransformer.from_single_file(file, config=folder / "config", progress=False)
    qt = QuantizedTransformer.from_single_file(file, QuantConfig("int8wo", modules_to_not_convert=["context_embedder"]),
                                               config=folder / "config", progress=False)
    torch.testing.assert_close(qt.model.context_embedder.weight, gguf_reference(model, file).context_embedder.weight,
                               rtol=0, atol=0)


def test_nan_block_scales_and_a_foreign_config_are_refused(flux, tmp_path):
    model, folder, _ = flux

    def nan_scale(name, array, kind):
        if name == "double_blocks.0.img_mlp.0.weight":
            array = array.copy()
            array.reshape(-1, GGUF_BLOCKS[kind.lower()].file_bytes)[3, SCALE_BYTES[kind][0]:][:2] = \
                np.array([np.nan], dtype=np.float16).view(np.uint8)
        return array, kind

    file = tmp_path / "nan.gguf"
    write_gguf_file(model, file, edit=nan_scale)
    with pytest.raises(CheckpointError, match=r"tensor 'double_blocks.0.img_mlp.0.weight' of nan.gguf: 1 of its "
                                              r"Q\w+ block scales \(d\) are NaN/Inf.*re-download"):
        QuantizedTransformer.from_single_file(file, config=folder / "config", progress=False)
    with pytest.raises(CheckpointError, match="config does not match the file"):
        QuantizedTransformer.from_single_file(file, config={**dict(model.config), "joint_attention_dim": 128},
                                              progress=False)


def test_quantrt_quantize_writes_a_gguf_file_as_stored(flux, tmp_path, capsys):
    from quantrt.cli import main

    model, folder, files = flux
    assert main(["quantize", str(files["bfl"]), str(tmp_path / "q"), "--config", str(folder / "config")]) == 0
    assert "28/30 Linear layers as stored in flux-bfl.gguf" in capsys.readouterr().out
    qt = QuantizedTransformer.from_pretrained(tmp_path / "q", backend="reference")
    inputs = flux_inputs(model, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(qt(**inputs)[0], gguf_reference(model, files["bfl"])(**inputs)[0], rtol=0, atol=0)
    assert main(["quantize", str(folder), str(tmp_path / "r")]) == 1
    assert "--scheme is needed to quantize a model folder" in capsys.readouterr().err


def test_the_config_is_inferred_from_quantrt_flux_sizes_without_config(tmp_path):
    """As for safetensors single files: a GGUF file whose shapes are a quantrt.models.FLUX_SIZES entry needs no
    config (the model hub is never asked)."""
    from quantrt.models import build_flux

    model = build_flux("tiny", dtype=torch.float32)
    file = tmp_path / "flux1-tiny-Q8_0.gguf"
    write_gguf_file(model, file, types=("Q8_0",))
    qt = QuantizedTransformer.from_single_file(file, backend="reference", progress=False)
    assert qt.config.num_layers == 1 and {r.scheme for r in qt.summary()} == {"q8_0"}
    inputs = flux_inputs(model, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(qt(**inputs)[0], gguf_reference(model, file)(**inputs)[0], rtol=0, atol=0)
