"""Backend selection: backend= argument, then QUANTRT_BACKEND, then the first of triton, torchao, quanto,
reference that can serve; explicit-but-unable errors; per-layer fallback recorded in summary().

The triton backend is replaced by a stand-in where a test needs a known answer from it: on CPU quantrt's
kernels run only under the Triton interpreter (tests/conftest.py turns it on), which auto never picks."""

import copy

import pytest
import torch
import torch.nn as nn

pytest.importorskip("torchao")
pytest.importorskip("optimum.quanto")

import quantrt  # noqa: E402
import quantrt.backends as backends  # noqa: E402
from quantrt import QuantConfig  # noqa: E402
from quantrt.backends import Backend, BackendUnavailable, usable_backends  # noqa: E402
from quantrt.schemes import resolve_scheme  # noqa: E402

from .backend_cases import backends_of, linear_model, quantized_copies, tolerance  # noqa: E402

CPU = torch.device("cpu")
real_get_backend = backends.get_backend


class ShapeLimitedStandIn(Backend):
    """Plays a backend that serves only layers whose K is a multiple of 128, computing like the reference."""

    def __init__(self, name):
        self.name = name

    def unavailable_reason(self, scheme, device):
        return None

    def layer_unavailable_reason(self, scheme, device, shape, dtype):
        return None if shape[1] % 128 == 0 else f"K={shape[1]} is not a multiple of 128"

    def linear(self, layer, x):
        return real_get_backend("reference").linear(layer, x)


class NoKernel(Backend):
    name = "triton"

    def unavailable_reason(self, scheme, device):
        return "needs a CUDA GPU"


def use_backend(monkeypatch, name, stand_in):
    """Make get_backend(name) return `stand_in` (a Backend, or an exception to raise); other names as before."""
    previous = backends.get_backend

    def get_backend(asked):
        if asked != name:
            return previous(asked)
        if isinstance(stand_in, Exception):
            raise stand_in
        return stand_in
    monkeypatch.setattr(backends, "get_backend", get_backend)


def use_triton(monkeypatch, triton):
    use_backend(monkeypatch, "triton", triton)


@pytest.fixture(autouse=True)
def _no_backend_from_environment(monkeypatch):
    monkeypatch.delenv("QUANTRT_BACKEND", raising=False)


def quantize(config, model=None):
    return quantrt.QuantizedTransformer.from_model(model or linear_model(torch.float32), config, progress=False)


def test_argument_beats_environment_beats_auto(monkeypatch):
    use_triton(monkeypatch, NoKernel())
    monkeypatch.setenv("QUANTRT_BACKEND", "quanto")
    by_argument = quantize(QuantConfig("int8wo", backend="torchao"))
    assert backends_of(by_argument) == {"torchao"}
    assert {r.why for r in by_argument.summary() if r.quantized} == {"asked for (backend=)"}
    by_environment = quantize(QuantConfig("int8wo"))
    assert backends_of(by_environment) == {"quanto"}
    assert {r.why for r in by_environment.summary() if r.quantized} == {"asked for (QUANTRT_BACKEND)"}
    monkeypatch.delenv("QUANTRT_BACKEND")
    automatic = quantize(QuantConfig("int8wo"))
    assert backends_of(automatic) == {"torchao"}
    assert all(r.why.startswith("auto (triton: needs a CUDA GPU)") for r in automatic.summary() if r.quantized)


@pytest.mark.parametrize("name, chosen, passed_over", [
    ("int8wo", "torchao", ["triton: needs a CUDA GPU"]),
    ("uint3wo", "torchao", ["triton: needs a CUDA GPU"]),
    ("float8dq_e4m3_row", "reference", ["triton: needs a CUDA GPU", "torchao:", "8.9", "quanto:", "per token"]),
    ("float8_static_activation_float8_weight", "reference", ["torchao:", "quanto:", "calibrat"]),
])
def test_auto_takes_the_first_that_can_serve_and_records_why(monkeypatch, name, chosen, passed_over):
    use_triton(monkeypatch, NoKernel())
    qt = quantize(QuantConfig(name, activation_scale=0.01 if "static" in name else None))
    reports = [r for r in qt.summary() if r.quantized]
    assert reports and {r.backend for r in reports} == {chosen}
    for report in reports:
        assert all(words in report.why for words in passed_over), report.why
    assert passed_over[0] in str(qt.summary())


def test_real_auto_order_on_cpu():
    # quantrt's kernels run on CPU only through the Triton interpreter, which auto never picks
    for name in ["int8wo", "uint3wo", "int8dq", "float8dq_e4m3_tensor"]:
        usable = usable_backends(resolve_scheme(name), CPU)
        assert usable[-1] == "reference"
        qt = quantize(QuantConfig(name))
        assert backends_of(qt) == {next(b for b in usable if b != "triton")}, name
        assert "triton:" in qt.summary()[0].why
    assert "torchao" in usable_backends(resolve_scheme("uint3wo"), CPU)
    assert "quanto" not in usable_backends(resolve_scheme("uint3wo"), CPU)


def test_a_layer_a_backend_cannot_take_falls_back_alone(monkeypatch):
    use_triton(monkeypatch, NoKernel())
    use_backend(monkeypatch, "torchao", ShapeLimitedStandIn("torchao"))
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32))
    reference = quantize(QuantConfig("int8wo", backend="reference"), model=copy.deepcopy(model))
    qt = quantize(QuantConfig("int8wo"), model=model)
    by_layer = {r.name: r for r in qt.summary()}
    assert by_layer["0"].backend == "torchao"
    assert by_layer["2"].backend == "quanto" and "torchao: K=64 is not a multiple of 128" in by_layer["2"].why
    x = torch.randn(5, 256)
    torch.testing.assert_close(qt(x), reference(x))


def test_one_model_mixes_backends_through_overrides():
    model = linear_model(torch.float32)
    reference = quantize(QuantConfig("int8wo", backend="reference"), model=copy.deepcopy(model))
    qt = quantize(QuantConfig("int8wo", backend="torchao", modules={"2": QuantConfig("int8wo", backend="quanto")}),
                  model=model)
    assert {r.name: r.backend for r in qt.summary()} == {"0": "torchao", "2": "quanto"}
    x = torch.randn(5, 256)
    torch.testing.assert_close(qt(x), reference(x))


def test_explicit_argument_that_cannot_serve_raises():
    with pytest.raises(BackendUnavailable) as error:
        quantize(QuantConfig("uint3wo", group_size=32, backend="quanto"))
    message = str(error.value)
    for words in ["layer '0'", "'quanto'", "backend=", "uint3wo", "cpu", "no uint3 weights", "torchao", "reference"]:
        assert words in message, message


def test_explicit_environment_that_cannot_serve_raises(monkeypatch):
    monkeypatch.setenv("QUANTRT_BACKEND", "torchao")
    with pytest.raises(BackendUnavailable) as error:
        quantize(QuantConfig("fp6_e3m2"))
    message = str(error.value)
    for words in ["layer '0'", "QUANTRT_BACKEND", "fp6_e3m2", "cpu", "FPXWeightOnlyConfig"]:
        assert words in message, message


def test_unknown_backend_in_the_environment_is_an_error(monkeypatch):
    monkeypatch.setenv("QUANTRT_BACKEND", "cublas")
    with pytest.raises(ValueError, match="QUANTRT_BACKEND='cublas'"):
        quantize(QuantConfig("int8wo"))


def test_a_backend_whose_module_does_not_import_is_passed_over(monkeypatch):
    use_triton(monkeypatch, ModuleNotFoundError("No module named 'triton'", name="triton"))
    qt = quantize(QuantConfig("int8wo"))
    assert backends_of(qt) == {"torchao"}
    assert "triton: its module does not import: No module named 'triton'" in qt.summary()[0].why


def test_reference_backend_compiles_fullgraph_on_cpu():
    dtype = torch.bfloat16
    qt = quantized_copies(linear_model(dtype), "uint4wo", 32, ["reference"])["reference"]
    x = torch.randn(7, 256, dtype=dtype)
    eager = qt(x)
    torch._dynamo.reset()
    compiled = torch.compile(qt, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, **tolerance("uint4wo", dtype))


def test_resident_bytes_counts_each_storage_once():
    base = torch.zeros(10, 8, dtype=torch.int8)
    assert backends.resident_bytes([base, base.view(torch.uint8), base.reshape(80), base.t()]) == 80
    assert backends.resident_bytes([base[:4], base[2:6]]) == 6 * 8  # overlapping rows count once
    assert backends.resident_bytes([base[:2], base[8:]]) == 4 * 8  # rows 2..7 are reached by neither
    assert backends.resident_bytes([base[:, 0]]) == 9 * 8 + 1  # a strided column reaches 73 bytes
    assert backends.resident_bytes([torch.zeros(3), torch.zeros(3)]) == 2 * 12
    assert backends.resident_bytes([torch.empty(3, 4, device="meta")]) == 48


def test_backend_without_derived_tensors_costs_nothing_beyond_the_buffers():
    qt = quantrt.QuantizedTransformer.from_model(linear_model(torch.float32), QuantConfig("int4wo", group_size=32,
                                                 backend="reference"), progress=False)
    layer = qt.quantized_layers()["0"]
    assert layer.backend.derived_tensors(layer) == [] and layer.backend.extra_bytes(layer) == 0
    assert layer.storage_bytes() == sum(b.numel() * b.element_size() for b in layer.buffers())
