"""Backend selection: backend= argument, then QUANTRT_BACKEND, then the first of triton, aten, torchao, quanto,
reference that can serve and keeps no copy beyond COPY_LIMIT; explicit-but-unable errors; per-layer fallback
recorded in summary().

The triton backend is replaced by a stand-in where a test needs a known answer from it: on CPU quantrt's
kernels run only under the Triton interpreter (tests/conftest.py turns it on), which auto never picks."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import optimum.quanto
import pytest
import torch
import torch.nn as nn
import torchao

import quantrt
import quantrt.backends as backends
from quantrt import QuantConfig
from quantrt.backends import Backend, BackendUnavailable, select_backend, usable_backends
from quantrt.schemes import resolve_scheme
from quantrt.version import distribution_version

from .cases import DYNAMIC, WEIGHT_ONLY, backends_of, linear_model, quantized_copies, tolerance

CPU = torch.device("cpu")
real_get_backend = backends.get_backend


def test_torchao_and_quanto_are_installed_and_serve_on_cpu():
    # both are dependencies: the tests here count on them, and auto falls back silently where one is missing
    assert distribution_version("torchao") == torchao.__version__ and distribution_version("optimum-quanto") == optimum.quanto.__version__
    assert {"aten", "torchao", "quanto", "reference"} <= set(usable_backends(resolve_scheme("int8wo"), CPU))


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
    assert backends_of(automatic) == {"aten"}
    assert all(r.why.startswith("auto (triton: needs a CUDA GPU)") for r in automatic.summary() if r.quantized)


@pytest.mark.parametrize("name, chosen, passed_over", [
    ("int8wo", "aten", ["triton: needs a CUDA GPU"]),
    ("float8wo_e4m3", "torchao", ["triton: needs a CUDA GPU", "aten: torch has CPU weight-only kernels for int8"]),
    ("uint3wo", "reference", ["triton: needs a CUDA GPU", "aten:", "torchao: keeps a copy beside the buffers: +",
                              "of what the scheme stores; used only when asked for by name", "quanto: quanto has no",
                              "on CPU its speed is the reference's dequantize path"]),
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


@pytest.mark.parametrize("name, chosen", [("int8wo", "aten"), ("int4wo", "aten"), ("uint3wo", "reference"),
                                          ("int8dq", "torchao"), ("float8dq_e4m3_tensor", "reference")])
def test_real_auto_order_on_cpu(name, chosen):
    # quantrt's kernels run on CPU only through the Triton interpreter, which auto never picks; after it, the first
    # backend that can serve and keeps no copy (torchao can serve uint3wo, from a copy of unpacked codes)
    usable = usable_backends(resolve_scheme(name), CPU)
    assert usable[-1] == "reference" and chosen in usable
    qt = quantize(QuantConfig(name, group_size=32 if name == "int4wo" else None),
                  model=nn.Sequential(nn.Linear(256, 96), nn.ReLU(), nn.Linear(96, 64)))
    assert backends_of(qt) == {chosen}, name
    assert "triton:" in qt.summary()[0].why
    if name == "uint3wo":
        assert "torchao" in usable and "quanto" not in usable


def test_a_layer_a_backend_cannot_take_falls_back_alone(monkeypatch):
    use_triton(monkeypatch, NoKernel())
    use_backend(monkeypatch, "aten", ShapeLimitedStandIn("aten"))
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32))
    reference = quantize(QuantConfig("int8wo", backend="reference"), model=copy.deepcopy(model))
    qt = quantize(QuantConfig("int8wo"), model=model)
    by_layer = {r.name: r for r in qt.summary()}
    assert by_layer["0"].backend == "aten"
    assert by_layer["2"].backend == "torchao" and "aten: K=64 is not a multiple of 128" in by_layer["2"].why
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
    assert backends_of(qt) == {"aten"}
    assert "triton: its module does not import: No module named 'triton'" in qt.summary()[0].why


def test_reference_backend_compiles_fullgraph_on_cpu():
    dtype = torch.bfloat16
    qt = quantized_copies(linear_model(dtype), "uint4wo", 32, ["reference"])["reference"]
    x = torch.randn(7, 256, dtype=dtype)
    eager = qt(x)
    torch._dynamo.reset()
    compiled = torch.compile(qt, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, **tolerance("uint4wo", dtype))


def test_config_takes_every_backend_by_name():
    assert quantrt.config.BACKENDS == ("auto", *backends.ORDER)


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


DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend, scheme", [("reference", "int8dq"), ("torchao", "int8dq"), ("reference", "int4dq"),
                                             ("torchao", "int4dq")], ids=lambda v: v)
def test_a_nan_or_inf_activation_row_gives_non_finite_outputs_in_that_row_only(backend, scheme, bad, dtype):
    # before: the reference's per-token int8 quantizer turned a NaN row into a finite, wrong row
    qt = quantize(QuantConfig(scheme, backend=backend), model=linear_model(dtype))
    assert backends_of(qt) == {backend}
    x = torch.randn(4, 256, dtype=dtype)
    clean = qt(x)
    dirty = x.clone()
    dirty[1, 17] = bad
    y = qt(dirty)
    assert not y[1].isfinite().any(), y[1]
    if bad != bad:
        assert y[1].isnan().all(), y[1]
    assert torch.equal(y[[0, 2, 3]], clean[[0, 2, 3]])
    assert clean.isfinite().all()


# float32: what auto picks for layer "0" (96x256) and "2" (40x96: N % 16 != 0, which torch's int4 packing refuses)
FLOAT32_CHOICE = {"int8wo": ("aten", "aten"), "uint4wo": ("aten", "reference"), "float8wo_e4m3": ("torchao", "torchao"),
                  "int8dq": ("torchao", "torchao"), "int4dq": ("reference", "reference")}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("scheme, group_size", [("int8wo", None), ("uint4wo", 32), ("float8wo_e4m3", None),
                                                ("int8dq", None), ("int4dq", 32)],
                         ids=["int8wo", "uint4wo", "float8wo_e4m3", "int8dq", "int4dq"])
def test_auto_passes_over_backends_that_cannot_take_the_layer_dtype_and_says_why(scheme, group_size, dtype):
    # before: auto chose torchao for float64 layers, which then failed ("Unsupported input dtype: torch.float64")
    model = linear_model(dtype)
    reference = quantize(QuantConfig(scheme, group_size=group_size, backend="reference"), model=copy.deepcopy(model))
    qt = quantize(QuantConfig(scheme, group_size=group_size), model=model)
    reports = [r for r in qt.summary() if r.quantized]
    assert len(reports) == 2
    for report, chosen in zip(reports, FLOAT32_CHOICE[scheme]):
        if dtype == torch.float64:
            assert report.backend in ("quanto", "reference"), report
            assert "torchao: torchao quantizes bfloat16, float16 and float32 layers, not torch.float64" in report.why
            if scheme in ("int8wo", "uint4wo"):
                assert "aten: torch's CPU weight-only kernels compute in bfloat16, float16 or float32" in report.why
        else:
            assert report.backend == chosen, report
        assert "triton:" in report.why
    x = torch.randn(5, 256, dtype=dtype)
    y = qt(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, reference(x), **tolerance(scheme, torch.float32))


@pytest.mark.parametrize("backend, scheme", [("torchao", "int8wo"), ("torchao", "uint4wo"), ("torchao", "int8dq"),
                                             ("triton", "uint4wo")], ids=lambda v: v)
def test_an_explicit_backend_that_cannot_take_the_layer_dtype_names_layer_dtype_and_usable_backends(backend, scheme):
    config = QuantConfig(scheme, group_size=32 if scheme == "uint4wo" else None, backend=backend)
    with pytest.raises(BackendUnavailable) as error:
        quantize(config, model=linear_model(torch.float64))
    message = str(error.value)
    for words in ["layer '0'", f"backend {backend!r}", scheme, "not torch.float64", "Use backend='auto' to fall back"]:
        assert words in message, message
    usable = message.rsplit("one of: ", 1)[1].split(", ")
    assert "reference" in usable and "torchao" not in usable and "triton" not in usable, message


def test_a_torchao_layer_moved_to_float64_raises_naming_the_layer_and_the_fix():
    # before: a bare AssertionError from inside torchao
    qt = quantize(QuantConfig("uint4wo", group_size=32, backend="torchao"))
    with pytest.raises(BackendUnavailable, match=r"layer '0' \(uint4wo\) is served by torchao.*not torch\.float64.*"
                                                 r"backend='auto'"):
        qt.to(torch.float64)


@pytest.mark.parametrize("backend", ["reference", "torchao", "quanto"])
@pytest.mark.parametrize("make_input", [lambda: torch.randn(2, 256).tolist(), lambda: tuple(torch.randn(256).tolist()),
                                        lambda: torch.randn(2, 256).numpy(), lambda: 1.0],
                         ids=["a-list", "a-tuple", "a-numpy-array", "a-float"])
def test_an_input_that_is_not_a_tensor_is_a_type_error_naming_the_layer_and_the_fix(backend, make_input):
    # before: "'list' object has no attribute 'dtype'" from inside the input check
    qt = quantize(QuantConfig("int8wo", backend=backend))
    bad = make_input()
    for call in (qt, qt.quantized_layers()["0"]):
        with pytest.raises(TypeError, match=rf"layer '0' takes a torch\.Tensor of shape \[\.\.\., 256\], got a "
                                            rf"{type(bad).__name__}; convert it first: "
                                            rf"torch\.as_tensor\(x, dtype=torch\.float32\)"):
            call(bad)


@pytest.mark.parametrize("backend, scheme, group_size", [("torchao", "uint4wo", 32), ("quanto", "int4wo", 32),
                                                         ("torchao", "uint3wo", 32), ("quanto", "uint2wo", 32)],
                         ids=lambda v: str(v))
def test_a_backend_that_keeps_a_copy_serves_only_when_asked_for_by_name_and_says_what_it_costs(backend, scheme,
                                                                                                 group_size):
    # before: auto chose torchao for every 4-bit and sub-byte scheme on CPU, whose unpacked codes are 2-8x the
    # stored bytes
    model = nn.Sequential(nn.Linear(256, 96), nn.ReLU(), nn.Linear(96, 64))
    reference = quantize(QuantConfig(scheme, group_size=group_size, backend="reference"), model=copy.deepcopy(model))
    automatic = quantize(QuantConfig(scheme, group_size=group_size), model=copy.deepcopy(model))
    if scheme in ("uint4wo", "int4wo"):  # torch's CPU kernel, from its packing in place of quantrt's
        assert backends_of(automatic) == {"aten"}
    else:
        assert backends_of(automatic) == {"reference"}
        for report in automatic.summary():
            assert f"{backend}: keeps a copy beside the buffers: +" in report.why, report.why
            assert "used only when asked for by name" in report.why
    named = quantize(QuantConfig(scheme, group_size=group_size, backend=backend), model=model)
    assert backends_of(named) == {backend}
    for report, layer in zip(named.summary(), named.quantized_layers().values()):
        shape = (layer.out_features, layer.in_features)
        stored = backends.scheme_bytes(layer.scheme, shape, torch.float32)
        extra = layer.backend.extra_bytes(layer)
        assert extra > backends.COPY_LIMIT * stored
        cost = f"keeps a copy beside the buffers: +{extra / stored:.0%} of what the scheme stores"
        assert report.why == f"asked for (backend=); {cost}"
        assert report.bytes == layer.storage_bytes() == stored + extra + 4 * layer.out_features  # + the bias
    x = torch.randn(5, 256)
    torch.testing.assert_close(named(x), reference(x), **tolerance(scheme, torch.float32))
    torch.testing.assert_close(automatic(x), reference(x), **tolerance(scheme, torch.float32))


@pytest.mark.parametrize("backend", ["aten", "torchao", "quanto", "reference"])
def test_the_copy_auto_predicts_is_the_copy_the_layer_keeps(backend):
    # auto decides from Backend.copy_bytes before a layer is built; extra_bytes counts what the built layer keeps
    checked = 0
    for scheme, group_size in WEIGHT_ONLY + DYNAMIC:
        for dtype in (torch.float32, torch.bfloat16):
            model = nn.Sequential(nn.Linear(256, 96, dtype=dtype), nn.ReLU(), nn.Linear(96, 64, dtype=dtype))
            try:
                qt = quantize(QuantConfig(scheme, group_size=group_size, backend=backend), model=model)
            except BackendUnavailable:
                continue
            for layer in qt.quantized_layers().values():
                shape = (layer.out_features, layer.in_features)
                predicted = layer.backend.copy_bytes(layer.scheme, CPU, shape, dtype)
                assert predicted == layer.backend.extra_bytes(layer), (scheme, group_size, dtype, shape)
                checked += 1
    assert checked >= 8


# compiled in a fresh process, twice with one Inductor cache folder: the second must load every graph from it
COMPILE_TWICE = textwrap.dedent("""
    import json, sys, warnings, torch, torch.nn as nn
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    from quantrt import QuantConfig, QuantizedTransformer
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 64)).to(torch.bfloat16)
    qt = QuantizedTransformer.from_model(model, QuantConfig(sys.argv[1]), progress=False)
    tensors = [t for layer in qt.quantized_layers().values()
               for t in [*layer.buffers(), *layer.backend.derived_tensors(layer)]]
    with torch.no_grad():
        torch.compile(qt, fullgraph=True)(torch.randn(3, 128, dtype=torch.bfloat16))
    print(json.dumps({"backends": sorted({r.backend for r in qt.summary()}),
                      "plain": not any(is_traceable_wrapper_subclass(t) for t in tensors),
                      "counters": dict(torch._dynamo.utils.counters["inductor"])}))
""")


@pytest.mark.parametrize("scheme, chosen, plain", [("int8wo", "aten", True), ("int4wo", "aten", True),
                                                   ("uint3wo", "reference", True), ("float8wo_e4m3", "torchao", False),
                                                   ("int8dq", "torchao", False)], ids=lambda v: str(v))
def test_what_auto_picks_on_cpu_compiles_once_and_a_fresh_process_hits_the_fx_graph_cache(scheme, chosen, plain,
                                                                                         tmp_path):
    # torchao's tensor subclasses warn that they lack _stable_hash_for_caching; torch 2.13 then hashes their
    # inner tensors and metadata, and their graphs hit the cache as well as plain tensors' do
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    env.pop("QUANTRT_BACKEND", None)
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", COMPILE_TWICE, scheme], capture_output=True, text=True, env=env,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["backends"] == [chosen] and runs[0]["plain"] == plain
    assert runs[0]["counters"].get("fxgraph_cache_miss", 0) >= 1
    assert runs[1]["counters"].get("fxgraph_cache_hit", 0) >= 1, runs[1]
    assert runs[1]["counters"].get("fxgraph_cache_miss", 0) == 0, runs[1]


def fake_gpu(monkeypatch, capability: tuple[int, int], name: str) -> None:
    """torch.cuda answers as if a GPU of `capability` were here (selection only: nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.delenv("QUANTRT_BACKEND", raising=False)


@pytest.mark.parametrize("scheme", ["float8dq_e4m3_tensor", "float8dq_e4m3_row"])
def test_float8_dynamic_activations_below_sm89_fall_back_or_raise(monkeypatch, scheme):
    cuda = torch.device("cuda")
    fake_gpu(monkeypatch, (8, 6), "NVIDIA A10")
    assert usable_backends(resolve_scheme(scheme), cuda) == ["reference"]
    backend, why = select_backend(resolve_scheme(scheme), cuda, "auto", "blocks.0.attn")
    assert backend.name == "reference"
    assert "torchao: torchao's float8 dynamic activation quantization needs compute capability >= 8.9" in why
    assert "NVIDIA A10 has 8.6" in why
    with pytest.raises(BackendUnavailable) as error:
        select_backend(resolve_scheme(scheme), cuda, "torchao", "blocks.0.attn")
    for words in ("layer 'blocks.0.attn'", "'torchao'", scheme, ">= 8.9", "8.6", "backend='auto'", "reference"):
        assert words in str(error.value)
    fake_gpu(monkeypatch, (9, 0), "NVIDIA H100")
    assert select_backend(resolve_scheme(scheme), cuda, "auto")[0].name == "torchao"


def test_own_kernels_below_sm80_fall_back_or_raise(monkeypatch):
    cuda = torch.device("cuda")
    fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    backend, why = select_backend(resolve_scheme("int4wo"), cuda, "auto")
    assert backend.name == "torchao" and "triton: the kernels need a GPU of compute capability 8.0" in why
    with pytest.raises(BackendUnavailable, match="compute capability 8.0"):
        select_backend(resolve_scheme("int4wo"), cuda, "triton", "proj_out")
    fake_gpu(monkeypatch, (8, 0), "NVIDIA A100")
    assert select_backend(resolve_scheme("int4wo"), cuda, "auto")[0].name == "triton"
