"""One rank of the 2-process gloo group that tests/runtime/integrations/test_distributed.py spawns: it runs every
distributed case once (torch's parallelize_module on quantized layers, eager and compiled; transformers' tp_plan;
diffusers' ring and Ulysses context parallelism) and writes what it saw for the test to compare with its own
single-process references: `outputs-<rank>.safetensors` (tensors) and `results-<rank>.json` (bytes, backends, error
messages, and per case the traceback of a failure).

    RANK=0 LOCAL_RANK=0 WORLD_SIZE=2 python distributed_worker.py OUT_DIR     # and RANK=1 LOCAL_RANK=1 beside it

The ranks meet through a file in OUT_DIR (no port to choose); gloo connects them on ports the OS picks.

The models, schemes and plans are defined here and imported by the test, so that both build the same thing.
"""

import datetime
import json
import os
import sys
import traceback
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import quantrt
from quantrt import QuantConfig, QuantizedLinear

# {case id: (QuantConfig arguments, dtype)} of the parallelize_module cases
TP_SCHEMES = {
    "int8wo": (dict(scheme="int8wo"), torch.float32),
    "int8wo-bf16": (dict(scheme="int8wo"), torch.bfloat16),
    "int8wo-g64": (dict(scheme="int8wo", group_size=64), torch.float32),
    "int4wo-g64": (dict(scheme="int4wo", group_size=64), torch.float32),
    "uint2wo-g32": (dict(scheme="uint2wo", group_size=32), torch.float32),
    "float8wo_e4m3": (dict(scheme="float8wo_e4m3"), torch.float32),
}
COMPILED = ("int8wo", "int4wo-g64")  # also run under torch.compile(fullgraph=True) (Inductor)
KEPT = "keep"  # a layer left as nn.Linear: torch's own ColwiseParallel shards it
LLM_CONFIG = dict(scheme="int4wo", group_size=32)  # transformers' tp_plan case
PROMPT = [[1, 17, 300, 42, 7, 99, 511, 3]]
NEW_TOKENS = 6
CP_SCHEMES = {"ulysses": "int4wo", "ring": "int8wo"}  # diffusers' context parallelism: degree 2 each


class Stack(nn.Module):
    """up (colwise) -> down (rowwise) -> head (colwise, output gathered) -> keep (nn.Linear, colwise, gathered):
    a split of N into two equal halves, one of K, and one of N = 80 into 40 + 40 (torch's CPU int4 packing takes
    80 rows, not 40: auto chooses another backend for that shard)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 256)
        self.down = nn.Linear(256, 128)
        self.head = nn.Linear(128, 80)
        self.keep = nn.Linear(80, 80)

    def forward(self, x):
        return self.keep(self.head(F.relu(self.down(F.relu(self.up(x))))))


def build_stack(case: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The quantized Stack of a TP_SCHEMES case with the weights of `seed`, and its input (the same for every seed)."""
    arguments, dtype = TP_SCHEMES[case]
    torch.manual_seed(seed)
    model = Stack().to(dtype)
    quantrt.quantize_(model, QuantConfig(**arguments, modules_to_not_convert=[KEPT]), progress=False)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    return model, x


def stack_plan() -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"up": ColwiseParallel(), "down": RowwiseParallel(), "head": ColwiseParallel(output_layouts=Replicate()),
            KEPT: ColwiseParallel(output_layouts=Replicate())}


def layer_bytes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per QuantizedLinear: the bytes of its buffers and what it keeps in memory (storage_bytes)."""
    return {name: {"buffers": sum(b.numel() * b.element_size() for b in layer.buffers()),
                   "storage": layer.storage_bytes()}
            for name, layer in model.named_modules() if isinstance(layer, QuantizedLinear)}


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with every DTensor gathered into its full tensor (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return {key: (value.full_tensor() if isinstance(value, DTensor) else value).contiguous()
            for key, value in model.state_dict().items()}


def tensor_parallel_case(case: str, mesh, outputs: dict, result: dict) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    # each rank draws other weights: torch's styles take them from rank 0 (src_data_rank=0, their default), for the
    # quantized layers as for the nn.Linear, so every rank must compute rank 0's model
    model, x = build_stack(case, seed=dist.get_rank())
    parallelize_module(model, mesh, stack_plan())
    with torch.no_grad():
        outputs[f"tp/{case}"] = model(x)
    result["bytes"] = layer_bytes(model)
    result["backends"] = {name: [layer.backend.name, layer.backend_reason] for name, layer in model.named_modules()
                          if isinstance(layer, QuantizedLinear)}
    result["shards"] = {name: [layer.tensor_parallel.start, layer.tensor_parallel.end] for name, layer in
                        model.named_modules() if isinstance(layer, QuantizedLinear)}
    for key, value in full_state(model).items():
        outputs[f"tp-state/{case}/{key}"] = value
    if case in COMPILED:
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            outputs[f"tp-compiled/{case}"] = compiled(x)


def tensor_parallel_errors(mesh, result: dict) -> None:
    """parallelize_module on layers that cannot be sharded as asked: the message of each error."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    class OwnPartition(RowwiseParallel):  # a style with its own weight partitioning, as diffusers' packed ones
        def _partition_linear_fn(self, name, module, device_mesh):
            raise AssertionError("never reached: quantrt refuses the style first")

    cases = {
        # K = 128 split 64 + 64 across int4wo's groups of 128
        "group-cut": (nn.Linear(128, 32), QuantConfig("int4wo"), RowwiseParallel()),
        # N = 48 split 24 + 24: torch's CPU int4 packing needs N % 16 == 0, and aten was asked for by name
        "explicit-backend": (nn.Linear(64, 48), QuantConfig("int4wo", group_size=32, backend="aten"),
                             ColwiseParallel()),
        "own-partition": (nn.Linear(64, 32), QuantConfig("int8wo"), OwnPartition()),
    }
    for name, (linear, config, style) in cases.items():
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("proj", linear)
        quantrt.quantize_(model, config, progress=False)
        try:
            parallelize_module(model, mesh, {"proj": style})
            result[name] = None
        except Exception as e:
            result[name] = f"{type(e).__name__}: {e}"


def transformers_case(folder: Path, out: Path, outputs: dict, result: dict) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=QuantConfig(**LLM_CONFIG),
                                             tp_plan="auto")
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        outputs["llm/logits"] = model(ids).logits
    outputs["llm/generated"] = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    result["bytes"] = layer_bytes(model)
    result["layouts"] = {name: layer.tensor_parallel.layout for name, layer in model.named_modules()
                         if isinstance(layer, QuantizedLinear) and getattr(layer, "tensor_parallel", None)}
    model.save_pretrained(out / "llm-tp-saved")  # every rank: transformers gathers the DTensors, rank 0 writes
    dist.barrier()
    # a quantrt folder loaded with tp_plan: its tensors copied as stored, then sharded
    reloaded = LlamaForCausalLM.from_pretrained(out / "llm-tp-saved", dtype=torch.float32, tp_plan="auto")
    with torch.no_grad():
        outputs["llm/reloaded-logits"] = reloaded(ids).logits
    try:  # int4wo's default group of 128 cannot be split along o_proj's K = 128 by 2 ranks
        LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=QuantConfig("int4wo"),
                                         tp_plan="auto")
        result["group-cut"] = None
    except ValueError as e:
        result["group-cut"] = str(e)


def cpu_flash_attention(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    """aten::_scaled_dot_product_flash_attention on CPU (torch has it for CUDA only), through torch's CPU flash
    kernel: the output and log-sum-exp that diffusers' ring attention merges; the CUDA-only fields empty."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                        scale=scale)
    empty = torch.empty(0, dtype=torch.int64)
    return out, lse, empty, empty, query.shape[2], key.shape[2], empty, empty, torch.empty(0, dtype=query.dtype)


def diffusers_case(kind: str, outputs: dict, result: dict, keep: list) -> None:
    from diffusers import ContextParallelConfig

    from quantrt.integrations.distributed import replication_mismatches
    from quantrt.models import build_flux, flux_inputs

    model = build_flux("tiny", dtype=torch.float32)
    quantrt.quantize_(model, CP_SCHEMES[kind], progress=False)
    inputs = flux_inputs(model)
    if kind == "ring":
        # ring attention merges partial attentions by their log-sum-exp; diffusers' CPU-capable backend ("native")
        # returns none, its _native_flash backend calls torch's CUDA-only flash op: given a CPU kernel here
        library = torch.library.Library("aten", "IMPL")
        library.impl("_scaled_dot_product_flash_attention", cpu_flash_attention, "CPU")
        keep.append(library)
        model.set_attention_backend("_native_flash")
        config = ContextParallelConfig(ring_degree=dist.get_world_size())
    else:
        config = ContextParallelConfig(ulysses_degree=dist.get_world_size())
    # diffusers 0.42.1 picks the rank's device as rank % torch.accelerator.device_count(): 0 without an accelerator
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        model.enable_parallelism(config=config)
    with torch.no_grad():
        outputs[f"cp/{kind}"] = model(**inputs)[0]
    result["mismatches"] = replication_mismatches(model)
    result["bytes"] = sum(layer["storage"] for layer in layer_bytes(model).values())
    if kind == "ring":  # the check names a layer that one rank changed
        layer = next(layer for layer in model.modules() if isinstance(layer, QuantizedLinear))
        if dist.get_rank() == 1:
            layer.scale.mul_(2)
        result["mismatches-after-change"] = replication_mismatches(model)


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    # a rank left waiting in a collective (its peer failed) fails after a minute instead of hanging the test
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank,
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    outputs: dict[str, torch.Tensor] = {}
    results: dict[str, dict] = {}
    keep: list = []
    cases = {f"tp/{case}": (lambda case=case: tensor_parallel_case(case, mesh, outputs, results[f"tp/{case}"]))
             for case in TP_SCHEMES}
    cases["tp-errors"] = lambda: tensor_parallel_errors(mesh, results["tp-errors"])
    cases["llm"] = lambda: transformers_case(out / "llm", out, outputs, results["llm"])
    for kind in CP_SCHEMES:
        cases[f"cp/{kind}"] = lambda kind=kind: diffusers_case(kind, outputs, results[f"cp/{kind}"], keep)
    for name, run in cases.items():
        results[name] = {}
        try:
            run()
        except Exception:
            results[name]["failure"] = traceback.format_exc()
    from safetensors.torch import save_file

    # clone: a redistributed output may be an AsyncCollectiveTensor, which waits for its collective when used
    save_file({key: value.detach().clone().contiguous() for key, value in outputs.items()},
              out / f"outputs-{rank}.safetensors")
    (out / f"results-{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
