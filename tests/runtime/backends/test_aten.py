"""The aten backend: torch core's CPU weight-only kernels (int8 per channel, 4-bit codes) reading quantrt's codes with
no copy beside the buffers; quantrt's layout in every state dict and saved folder."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quantrt
from quantrt.backends import COPY_LIMIT, BackendUnavailable, get_backend, scheme_bytes
from quantrt.backends import aten
from quantrt.kernels.packing import pack_uintx, unpack_uintx
from quantrt.schemes import resolve_scheme

from .cases import backends_of, case_id, flux_inputs, quantized_copies, tiny_flux, tolerance

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SERVED = [("int8wo", None), ("int4wo", 32), ("int4wo", 128), ("uint4wo", 64), ("uint4wo", 256)]
# rows on either side of the int8 path's switch from the kernel to dequantized blocks and torch.mm
ROWS = [1, 7, aten.INT8_KERNEL_MAX_ROWS, aten.INT8_KERNEL_MAX_ROWS + 1, 70]


def mlp(dtype: torch.dtype) -> nn.Module:
    """N = 96 and 48 (multiples of 16, not of torch's 64-row blocks), K = 256 and 96... then 512: K a multiple of
    every group size here."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 96, dtype=dtype), nn.GELU(), nn.Linear(96, 512, dtype=dtype, bias=False),
                         nn.GELU(), nn.Linear(512, 48, dtype=dtype))


def served(model: nn.Module, scheme: str, group_size: int | None,
           backends: tuple[str, ...] = ("reference", "aten")) -> dict[str, quantrt.QuantizedTransformer]:
    """backend -> `model` quantized with it, checking that each layer got the backend asked for."""
    qts = quantized_copies(model, scheme, group_size, list(backends))
    for name, qt in qts.items():
        assert backends_of(qt) == {name}
    return qts


def float64_output(qt: quantrt.QuantizedTransformer, x: torch.Tensor) -> torch.Tensor:
    """The model's output computed in float64 from each layer's quantrt weight (`dequantize`, float32, exact) and
    the weights of the layers kept in full precision."""
    y = x.double()
    for module in qt.model:
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.double()
        if isinstance(module, quantrt.QuantizedLinear):
            y = F.linear(y, module.dequantize().double(), bias)
        elif isinstance(module, nn.Linear):  # kept in full precision (K not a multiple of the group)
            y = F.linear(y, module.weight.double(), bias)
        else:
            y = module(y)
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", SERVED, ids=case_id)
def test_matches_a_float64_reference_on_both_paths(case, dtype):
    scheme, group_size = case
    qts = served(mlp(dtype), scheme, group_size)
    for rows in ROWS:
        x = torch.randn(rows, 256, dtype=dtype)
        y = qts["aten"](x)
        assert y.dtype == dtype and y.shape == (rows, 48)
        # the weights as quantized, from the copy that the reference backend serves (quantrt's own layout)
        torch.testing.assert_close(y.double(), float64_output(qts["reference"], x), **tolerance(scheme, dtype))


@pytest.mark.parametrize("case", [("int8wo", None), ("int4wo", 32)], ids=case_id)
def test_an_input_that_needs_a_gradient_gets_the_references_gradient(case):
    # the kernels have no derivative: such inputs go through the dequantized weight
    scheme, group_size = case
    qts = served(mlp(torch.float32), scheme, group_size)
    x = torch.randn(3, 256, requires_grad=True)
    grads = {}
    for name, qt in qts.items():
        x.grad = None
        qt(x).square().sum().backward()
        grads[name] = x.grad.clone()
    torch.testing.assert_close(grads["aten"], grads["reference"], **tolerance(scheme, torch.float32))


def test_takes_any_leading_dimensions_and_strided_rows():
    qt = served(mlp(torch.bfloat16), "int4wo", 128)
    x = torch.randn(2, 5, 512, dtype=torch.bfloat16)[..., ::2]  # rows with a stride of 2
    layer = {name: q.quantized_layers()["0"] for name, q in qt.items()}
    torch.testing.assert_close(layer["aten"](x), layer["reference"](x), **tolerance("int4wo", torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_int4_kernel_weight_is_quantrts_within_the_offset_rounding(dtype):
    # the kernel computes (q - 8) * s + o with o = (8 - z) * s rounded to the layer's dtype: one-hot rows read back
    # its weight, which must be quantrt's (q - z) * s within |8 - z| * s * eps / 2 (plus the output's rounding)
    torch.manual_seed(0)
    qt = served(nn.Sequential(nn.Linear(256, 96, bias=False, dtype=dtype)), "int4wo", 128, ("aten",))["aten"]
    layer = qt.quantized_layers()["0"]
    eye = torch.eye(256, dtype=dtype)
    read = layer(eye).t().double()  # [N, K]
    exact = layer.dequantize().double()
    eps = torch.finfo(dtype).eps
    tensors = layer.tensors()
    scale = tensors["scale"].double().repeat_interleave(128, dim=1)
    zero = tensors["zero"].double().repeat_interleave(128, dim=1)
    # the offset's rounding, the output's rounding, and float32 arithmetic inside the kernel
    bound = (8 - zero).abs() * scale * eps / 2 + exact.abs() * eps + 16 * scale * 2**-22
    assert ((read - exact).abs() <= bound).all(), float(((read - exact).abs() / bound).max())


@pytest.mark.parametrize("n", [16, 48, 96, 112, 3072])
def test_int4_packing_is_torchs_and_unpacks_exactly(n, monkeypatch):
    k = 256
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    layout = aten.int4_layout(n)
    assert not isinstance(layout, str), layout
    packed = aten.pack_int4(codes, layout)
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
    assert torch.equal(aten.unpack_int4(packed, layout), codes)
    # a layer's repacking goes from and to quantrt's layout directly, whole blocks at a time
    stored = pack_uintx(codes, 4)
    for chunk in (aten.REPACK_CODES, 64 * k):
        monkeypatch.setattr(aten, "REPACK_CODES", chunk)
        assert torch.equal(aten.to_torch_packing(stored, layout), packed)
        assert torch.equal(aten.to_quantrt_packing(packed, layout), stored)
    assert torch.equal(unpack_uintx(stored, 4, k), codes)


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", SERVED, ids=case_id)
def test_resident_bytes_stay_within_the_copy_limit_and_match_the_prediction(case, dtype):
    scheme, group_size = case
    qts = served(mlp(dtype), scheme, group_size)
    copies = 0
    for name, layer in qts["aten"].quantized_layers().items():
        shape = (layer.out_features, layer.in_features)
        extra = layer.backend.extra_bytes(layer)
        assert extra == layer.backend.copy_bytes(layer.scheme, CPU, shape, dtype)
        assert extra <= COPY_LIMIT * scheme_bytes(layer.scheme, shape, dtype)
        # the codes are the layer's only codes: int8 as stored, 4-bit repacked in place (same shape and bytes)
        assert layer.qweight.shape == qts["reference"].quantized_layers()[name].qweight.shape
        if scheme == "int8wo":
            assert extra == 0 and layer.int4_scales_and_offsets is None
        elif layer.int4_scales_and_offsets is not None:  # offsets kept: the scale buffer views the same tensor
            assert storage_of(layer.scale) == storage_of(layer.int4_scales_and_offsets) and extra > 0
        copies += extra
    assert qts["aten"].memory_footprint() == qts["reference"].memory_footprint() + copies
    assert sum(r.bytes for r in qts["aten"].summary()) == sum(r.bytes for r in qts["reference"].summary()) + copies


def test_offsets_are_kept_only_within_the_copy_limit():
    for dtype, kept in [(torch.bfloat16, {32: False, 64: False, 128: True, 256: True}),
                        (torch.float32, {32: False, 64: False, 128: False, 256: True})]:
        for group_size, keeps in kept.items():
            assert aten.keeps_offsets(resolve_scheme("int4wo", group_size), (3072, 3072), dtype) == keeps


@pytest.mark.parametrize("case", [("int4wo", 128), ("uint4wo", 64), ("int8wo", None)], ids=case_id)
def test_state_dict_and_saved_folder_are_quantrts_layout(case, tmp_path):
    scheme, group_size = case
    dtype = torch.bfloat16
    qts = served(mlp(dtype), scheme, group_size)
    stored, written = qts["reference"].state_dict(), qts["aten"].state_dict()
    assert stored.keys() == written.keys()
    for key in stored:
        assert torch.equal(written[key], stored[key]), key
    if scheme != "int8wo":  # the resident codes are torch's packing, not quantrt's
        assert not torch.equal(qts["aten"].model[0].qweight, qts["reference"].model[0].qweight)
    qts["aten"].save_pretrained(tmp_path / "q")
    x = torch.randn(3, 256, dtype=dtype)
    for backend in ("reference", None):  # None: as saved (aten)
        loaded = quantrt.QuantizedTransformer.from_pretrained(tmp_path / "q", backend=backend,
                                                              model=lambda: mlp(dtype))
        assert backends_of(loaded) == {backend or "aten"}
        for key, tensor in loaded.state_dict().items():
            assert torch.equal(tensor, stored[key]), key
        torch.testing.assert_close(loaded(x), qts[backend or "aten"](x), rtol=0, atol=0)


def test_deepcopy_to_and_load_state_dict_rebuild_the_packing():
    dtype = torch.bfloat16
    qts = served(mlp(dtype), "int4wo", 128)
    x = torch.randn(5, 256, dtype=torch.float32)
    twin = copy.deepcopy(qts["aten"])
    assert storage_of(twin.model[0].qweight) != storage_of(qts["aten"].model[0].qweight)
    for qt in (qts["aten"], twin, qts["reference"]):
        qt.to(torch.float32)
    for qt in (qts["aten"], twin):
        assert qt.model[0].resident_layout == aten.INT4_PACKED
        assert qt.model[0].int4_scales_and_offsets is None  # fp32 at group 128: computed per call
        torch.testing.assert_close(qt(x), qts["reference"](x), **tolerance("int4wo", torch.float32))
    target = served(mlp(torch.float32), "int4wo", 128, ("aten",))["aten"]
    target.load_state_dict(qts["reference"].state_dict())
    torch.testing.assert_close(target(x), qts["reference"](x), **tolerance("int4wo", torch.float32))
    for key, tensor in target.state_dict().items():
        assert torch.equal(tensor, qts["reference"].state_dict()[key]), key


def test_another_backend_gets_the_layer_back_in_quantrts_layout():
    qts = served(mlp(torch.bfloat16), "uint4wo", 64)
    layer = qts["aten"].model[0]
    layer.backend = get_backend("quanto")
    assert layer.resident_layout is None and layer.int4_layout is None
    assert torch.equal(layer.qweight, qts["reference"].model[0].qweight)
    layer.backend.prepare(layer)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), qts["reference"].model[0](x), **tolerance("uint4wo", torch.bfloat16))


def test_a_layer_moved_to_float64_is_refused_naming_the_layer_and_keeps_quantrts_layout():
    qts = served(mlp(torch.float32), "int4wo", 32)
    with pytest.raises(BackendUnavailable, match=r"layer '0' \(int4wo\) is served by aten.*not torch\.float64"):
        qts["aten"].to(torch.float64)
    layer = qts["aten"].model[0]
    assert layer.resident_layout is None
    assert torch.equal(layer.qweight, qts["reference"].model[0].qweight)


@pytest.mark.parametrize("name, words", [
    ("int8wo-g64", ["one scale per output channel"]),
    ("uint3wo", ["int8 (per channel) and 4-bit"]),
    ("int4wo-g16", ["groups of 32, 64, 128, 256"]),
    ("int8dq", ["weight-only"]),
])
def test_says_what_it_cannot_serve(name, words):
    scheme, _, group = name.partition("-g")
    reason = get_backend("aten").unavailable_reason(resolve_scheme(scheme, int(group) if group else None), CPU)
    assert reason is not None and all(word in reason for word in words), reason


def test_refuses_other_devices_and_layers_torchs_packing_cannot_take():
    backend = get_backend("aten")
    assert "CPU kernels" in backend.unavailable_reason(resolve_scheme("int8wo"), torch.device("cuda"))
    int4 = resolve_scheme("int4wo", 32)
    assert "N % 16 == 0" in backend.layer_unavailable_reason(int4, CPU, (40, 96), torch.bfloat16)
    assert "not torch.float64" in backend.layer_unavailable_reason(int4, CPU, (48, 96), torch.float64)


def test_asked_for_through_the_environment(monkeypatch):
    monkeypatch.setenv("QUANTRT_BACKEND", "aten")
    qt = quantized_copies(mlp(torch.bfloat16), "int4wo", 32, ["auto"])["auto"]
    assert backends_of(qt) == {"aten"}
    assert {r.why for r in qt.summary()} == {"asked for (QUANTRT_BACKEND)"}


@pytest.mark.parametrize("case, rows, op", [(("int8wo", None), 3, "_weight_int8pack_mm"), (("int8wo", None), 40, "mm"),
                                            (("int4wo", 128), 3, "_weight_int4pack_mm_for_cpu")],
                         ids=["int8wo-kernel", "int8wo-blocks", "int4wo-kernel"])
def test_compiles_fullgraph_on_cpu_with_the_kernel_in_the_graph(case, rows, op):
    from torch._inductor.utils import run_and_get_code

    scheme, group_size = case
    dtype = torch.bfloat16
    qt = served(mlp(dtype), scheme, group_size, ("aten",))["aten"]
    x = torch.randn(rows, 256, dtype=dtype)
    torch._dynamo.reset()
    with torch.no_grad():  # as qt.warmup compiles (a gradient-needing input takes the dequantized path)
        eager = qt(x)
        compiled, code = run_and_get_code(torch.compile(qt, fullgraph=True), x)
    assert any(op in source for source in code), code
    torch.testing.assert_close(compiled, eager, **tolerance(scheme, dtype))


def test_tiny_flux_matches_reference():
    dtype = torch.bfloat16
    qts = quantized_copies(tiny_flux(dtype), "int4wo", 32, ["reference", "auto"])
    assert "aten" in backends_of(qts["auto"])
    inputs = flux_inputs(dtype)
    with torch.no_grad():
        expected, actual = qts["reference"](**inputs)[0], qts["auto"](**inputs)[0]
    torch.testing.assert_close(actual, expected, **tolerance("int4wo", dtype))


@pytest.mark.parametrize("scheme, group_size", [("int8wo", None), ("int4wo", 32)], ids=["int8", "int4"])
def test_buffers_at_a_memory_maps_8_byte_alignment_are_copied_before_the_kernels_read_them(scheme, group_size):
    # diffusers' and transformers' loaders leave views into a safetensors memory map, aligned to 8 bytes only;
    # torch's CPU weight-only kernels crash on those
    linear = nn.Linear(128, 64, dtype=torch.bfloat16)
    expected = quantrt.QuantizedTransformer.from_model(nn.Sequential(copy.deepcopy(linear)), quantrt.QuantConfig(
        scheme, group_size=group_size, backend="reference"), progress=False).model[0]
    layer = copy.deepcopy(expected)
    for name, tensor in layer.tensors().items():
        raw = torch.empty(tensor.numel() * tensor.element_size() + 8, dtype=torch.uint8)
        shifted = raw[8:].view(tensor.dtype).view(tensor.shape)  # 8 bytes past a 64-byte-aligned start
        shifted.copy_(tensor)
        assert shifted.data_ptr() % 64 == 8
        setattr(layer, name, shifted)
    layer.backend = get_backend("aten")
    layer.backend.prepare(layer)
    assert all(t.data_ptr() % 64 == 0 for t in layer.buffers())
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), expected(x), **tolerance(scheme, torch.bfloat16))
