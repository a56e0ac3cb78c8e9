"""quantrt.integrations.distributed: quantized layers inside torch.distributed, on CPU with gloo in 2 processes that
the test spawns once (distributed_worker.py runs every case and writes what it saw): torch's parallelize_module with
ColwiseParallel / RowwiseParallel, eager and compiled; transformers' tp_plan (load, generate, save); diffusers' ring
and Ulysses context parallelism. Each is compared here with the single-process model. What each rank holds, the
errors, the split rules and the registration are checked too (the pure ones in this process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.distributed.tensor.parallel import style as torch_styles
from transformers import LlamaForCausalLM

import quantrt
from quantrt import QuantConfig, QuantizedLinear
from quantrt.integrations import distributed
from quantrt.models import build_flux, build_llm, flux_inputs

from .distributed_worker import (COMPILED, CP_SCHEMES, KEPT, LLM_CONFIG, NEW_TOKENS, PROMPT, TP_SCHEMES, build_stack,
                                 layer_bytes)
from .helpers import same_state

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD = 2
GROUP_TIMEOUT_S = 420  # the whole group (about a minute on an idle 2-core machine); a hang fails, never blocks CI
# the sharded model against the single-process one: the same codes and scales, sums of partial products in another
# order (rowwise: each rank's partial sum rounded to the dtype before the all-reduce)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
COMPILED_TOLERANCE = dict(rtol=1e-4, atol=1e-4)  # Inductor fuses and reorders fp32 reductions
SHARE = 0.55  # each rank's bytes of a layer at most: half, plus what it holds whole (bias, per-channel scales)


class Group:
    """What the spawned ranks wrote: per rank, the tensors and the results of every case."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.outputs = [load_file(folder / f"outputs-{rank}.safetensors") for rank in range(WORLD)]
        self.results = [json.loads((folder / f"results-{rank}.json").read_text()) for rank in range(WORLD)]

    def case(self, name: str) -> list[dict]:
        """Every rank's result of case `name`; fails with the rank's traceback where it failed."""
        for rank, results in enumerate(self.results):
            if "failure" in results[name]:
                pytest.fail(f"rank {rank}, case {name}:\n{results[name]['failure']}")
        return [results[name] for results in self.results]


@pytest.fixture(scope="module")
def group(tmp_path_factory) -> Group:
    folder = tmp_path_factory.mktemp("distributed")
    build_llm("tiny", dtype=torch.float32).save_pretrained(folder / "llm")
    logs = [open(folder / f"log-{rank}.txt", "w") for rank in range(WORLD)]
    # gloo on the loopback interface: a CI container's host name need not resolve to an address it can listen on
    env = {"GLOO_SOCKET_IFNAME": "lo", **os.environ, "WORLD_SIZE": str(WORLD)}
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(folder)], stdout=logs[rank], stderr=subprocess.STDOUT,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in range(WORLD)]
    try:
        for process in ranks:
            process.wait(timeout=GROUP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for process in ranks:
            process.kill()
        pytest.fail(f"the {WORLD} ranks did not finish within {GROUP_TIMEOUT_S} s (logs in {folder})")
    finally:
        for log in logs:
            log.close()
    for rank, process in enumerate(ranks):
        assert process.returncode == 0, (folder / f"log-{rank}.txt").read_text()[-5000:]
    return Group(folder)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: layer for name, layer in model.named_modules() if isinstance(layer, QuantizedLinear)}


def local_bytes(layer: QuantizedLinear, layout: str, start: int, end: int) -> int:
    """The bytes of buffers a rank holds for the slice [start, end) of `layer` (the single-process one), from the
    scheme's tensor specs: the slice's tensors, and the bias, split (colwise) or whole (rowwise)."""
    n, k = (end - start, layer.in_features) if layout == "colwise" else (layer.out_features, end - start)
    specs = layer.scheme.tensor_specs(n, k, layer.scale.dtype)
    stored = sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in specs.values())
    bias = 0 if layer.bias is None else layer.bias.element_size() * (n if layout == "colwise" else layer.out_features)
    return stored + bias


STACK_LAYOUTS = {"up": "colwise", "down": "rowwise", "head": "colwise"}


@pytest.mark.parametrize("case", list(TP_SCHEMES))
def test_parallelize_module_matches_the_single_process_model(group, case):
    group.case(f"tp/{case}")
    model, x = build_stack(case)  # rank 0's weights: rank 1 drew others, and the styles take rank 0's
    with torch.no_grad():
        expected = model(x)
    for rank in range(WORLD):
        torch.testing.assert_close(group.outputs[rank][f"tp/{case}"], expected, **TOLERANCE[x.dtype])
    # the gathered state_dict (DTensors of the full shapes) is the single-process model's, bit for bit
    for rank in range(WORLD):
        for key, value in model.state_dict().items():
            assert torch.equal(group.outputs[rank][f"tp-state/{case}/{key}"], value), (rank, key)


@pytest.mark.parametrize("case", COMPILED)
def test_compiled_fullgraph_matches_the_single_process_model(group, case):
    group.case(f"tp/{case}")
    model, x = build_stack(case)
    with torch.no_grad():
        expected = model(x)
    for rank in range(WORLD):
        torch.testing.assert_close(group.outputs[rank][f"tp-compiled/{case}"], expected, **COMPILED_TOLERANCE)


@pytest.mark.parametrize("case", list(TP_SCHEMES))
def test_each_rank_holds_its_slice_of_each_layer(group, case):
    results = group.case(f"tp/{case}")
    model, _ = build_stack(case)
    layers = quantized_layers(model)
    assert set(layers) == set(STACK_LAYOUTS) and KEPT not in layers
    full = layer_bytes(model)
    for rank, result in enumerate(results):
        for name, layout in STACK_LAYOUTS.items():
            start, end = result["shards"][name]
            size = layers[name].out_features if layout == "colwise" else layers[name].in_features
            assert (start, end) == (rank * size // WORLD, (rank + 1) * size // WORLD)
            held = result["bytes"][name]
            assert held["buffers"] == local_bytes(layers[name], layout, start, end), (rank, name)
            assert held["buffers"] <= SHARE * full[name]["buffers"], (rank, name, held, full[name])
            assert held["storage"] <= SHARE * full[name]["storage"], (rank, name, held, full[name])


def test_auto_chooses_again_for_a_shard_its_backend_cannot_serve(group):
    results = group.case("tp/int4wo-g64")
    for result in results:
        assert result["backends"]["up"][0] == result["backends"]["down"][0] == "aten"
        # head: N = 80 split 40 + 40, and torch's CPU int4 packing takes N % 16 == 0 only
        backend, reason = result["backends"]["head"]
        assert backend == "reference" and "aten cannot serve its colwise shard 40x128" in reason, reason


def test_a_split_that_cannot_be_served_is_an_error_naming_the_layer_and_the_fix(group):
    for result in group.case("tp-errors"):
        assert result["group-cut"].startswith("ValueError: layer 'proj' (int4wo, 32x128) cannot be split rowwise")
        assert "inside a group of 128" in result["group-cut"]
        assert "modules_to_not_convert=['proj']" in result["group-cut"]
        assert result["explicit-backend"].startswith("BackendUnavailable: layer 'proj': backend 'aten' was asked for")
        assert "N % 16 == 0, N is 24" in result["explicit-backend"]
        assert result["own-partition"].startswith("NotImplementedError: layer 'proj': OwnPartition overrides "
                                                  "_partition_linear_fn")


def single_process_llm(folder: Path) -> nn.Module:
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=QuantConfig(**LLM_CONFIG))


def test_tp_plan_loads_sharded_and_quantized_and_generates_the_single_process_tokens(group):
    results = group.case("llm")
    model = single_process_llm(group.folder / "llm")
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    layers = quantized_layers(model)
    full = layer_bytes(model)
    for rank, result in enumerate(results):
        torch.testing.assert_close(group.outputs[rank]["llm/logits"], logits, **TOLERANCE[torch.float32])
        assert torch.equal(group.outputs[rank]["llm/generated"], tokens)
        # the model's base_model_tp_plan: attention and MLP projections; lm_head stays in full precision
        assert set(result["layouts"]) == set(layers) and "lm_head" not in layers
        assert {name.rsplit(".", 1)[-1] for name, layout in result["layouts"].items() if layout == "rowwise"} == {
            "o_proj", "down_proj"}
        for name in layers:
            assert result["bytes"][name]["buffers"] <= SHARE * full[name]["buffers"], (rank, name)


def test_save_pretrained_of_the_sharded_model_gathers_the_single_process_checkpoint(group):
    group.case("llm")
    saved = LlamaForCausalLM.from_pretrained(group.folder / "llm-tp-saved", dtype=torch.float32)
    single = single_process_llm(group.folder / "llm")
    same_state(saved, single)
    # and that folder, loaded with tp_plan as stored (no quantization_config), shards again
    with torch.no_grad():
        logits = single(torch.tensor(PROMPT)).logits
    for rank in range(WORLD):
        torch.testing.assert_close(group.outputs[rank]["llm/reloaded-logits"], logits, **TOLERANCE[torch.float32])


def test_tp_plan_error_names_the_layer_that_cannot_be_split(group):
    for result in group.case("llm"):
        assert result["group-cut"].startswith("layer 'model.layers.0.self_attn.o_proj' (int4wo, 128x128) cannot be "
                                              "split rowwise across 2 ranks")
        assert "choose a group size that divides 64" in result["group-cut"]


@pytest.mark.parametrize("kind", list(CP_SCHEMES))
def test_context_parallelism_matches_the_single_process_model_with_replicated_weights(group, kind):
    results = group.case(f"cp/{kind}")
    model = build_flux("tiny", dtype=torch.float32)
    quantrt.quantize_(model, CP_SCHEMES[kind], progress=False)
    with torch.no_grad():
        expected = model(**flux_inputs(model))[0]
    stored = sum(layer["storage"] for layer in layer_bytes(model).values())
    for rank, result in enumerate(results):
        torch.testing.assert_close(group.outputs[rank][f"cp/{kind}"], expected, **TOLERANCE[torch.float32])
        assert result["mismatches"] == []
        assert result["bytes"] == stored  # every rank holds the whole quantized model


def test_the_replication_check_names_a_tensor_that_one_rank_changed(group):
    for result in group.case("cp/ring"):
        assert result["mismatches-after-change"] == ["time_text_embed.timestep_embedder.linear_1.scale"]


def test_ranks_split_a_dimension_as_dtensor_does():
    for size, world in [(256, 2), (80, 2), (10, 3), (5, 4), (7, 8)]:
        chunks = torch.arange(size).chunk(world)  # torch.chunk: ceil(size / world) each; ranks beyond them get none
        expected = [(int(c[0]), int(c[-1]) + 1) for c in chunks] + [(size, size)] * (world - len(chunks))
        assert distributed.shard_ranges(size, world) == expected


def quantized_layer(scheme: str, out_features: int, in_features: int, **options) -> QuantizedLinear:
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(in_features, out_features))
    quantrt.quantize_(model, QuantConfig(scheme, **options), progress=False)
    assert isinstance(model.proj, QuantizedLinear)
    return model.proj


@pytest.mark.parametrize("scheme, options, shape, layout, world, expected", [
    ("int4wo", dict(group_size=64), (64, 256), "rowwise", 2, None),
    ("int8wo", {}, (64, 96), "rowwise", 2, None),
    ("uint3wo", dict(group_size=32), (64, 96), "colwise", 2, None),
    ("int4wo", {}, (32, 384), "rowwise", 2, "inside a group of 128"),
    ("fp4_e2m1", {}, (16, 6), "rowwise", 2, "inside a packed byte of 2 4-bit codes"),
    ("uint3wo", dict(group_size=32), (64, 128), "rowwise", 2, "3-bit codes are stored in 2 bit planes (2+1 bits)"),
    ("fp6_e3m2", {}, (64, 128), "rowwise", 2, "stored in 2 bit planes (4+2 bits)"),
    ("int8dq", {}, (64, 128), "rowwise", 2, "scales computed over K at run time (int8_token)"),
    ("int8wo", {}, (1, 64), "colwise", 2, "its 1 output features (N) leave rank(s) [1] without any"),
    ("int8wo", {}, (64, 5), "rowwise", 4, "its 5 input features (K) leave rank(s) [3] without any"),
], ids=["int4-g64-rowwise", "int8-per-channel-rowwise", "uint3-colwise", "group-cut", "packed-byte-cut",
        "uint3-planes", "fp6-planes", "dynamic-activations", "colwise-empty-rank", "rowwise-empty-rank"])
def test_split_problem_says_why_a_split_cannot_be_served(scheme, options, shape, layout, world, expected):
    problem = distributed.split_problem(quantized_layer(scheme, *shape, **options), layout, world)
    if expected is None:
        assert problem is None
    else:
        why, fix = problem
        assert expected in why and "modules_to_not_convert=['proj']" in fix


def test_torch_styles_shard_quantized_layers_and_leave_the_rest_to_torch():
    for base, layout in ((ColwiseParallel, "colwise"), (RowwiseParallel, "rowwise")):
        original = base._apply.quantrt_wraps  # wrapped once `import quantrt` saw the module imported
        assert distributed.STYLE_LAYOUTS[base] == layout
        distributed.register(torch_styles)  # idempotent: never wrapped twice
        assert base._apply.quantrt_wraps is original and getattr(original, "quantrt_wraps", None) is None
        with pytest.raises(NotImplementedError, match="only support nn.Linear and nn.Embedding"):
            base()._apply(nn.Conv1d(2, 2, 1), None)  # anything but a QuantizedLinear: torch's own code
