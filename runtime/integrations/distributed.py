"""quantrt's layers inside torch.distributed: tensor parallelism of QuantizedLinear through torch's own DTensor styles
and transformers' tp_plan, and a check that replicated weights (diffusers' context parallelism) agree across ranks.
quantrt builds no parallel engine: the libraries' plans, meshes and collectives do the distributing.

torch: `parallelize_module(model, mesh, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})` reaches each style's
`_apply`, which shards nn.Linear and nn.Embedding only (an `isinstance` check). `register` (run when
quantrt.integrations sees `torch.distributed.tensor.parallel.style` imported) wraps the `_apply` of ColwiseParallel and
RowwiseParallel so that a QuantizedLinear is sharded by `parallelize_quantized_linear` and everything else goes to
torch's own code; QuantizedLinear stays what it is for every other library.

A sharded QuantizedLinear is a smaller QuantizedLinear: its buffers hold this rank's slice of the stored tensors
(plain tensors, so every backend serves it unchanged), `in_features` / `out_features` are the slice's, and
`layer.tensor_parallel` (a `TensorParallelShard`) records the mesh, the layout and the full shape:

| layout | each rank holds | forward |
|---|---|---|
| colwise | rows [start, end) of N: codes, scales, zero points, bias | x replicated -> its columns of y (Shard(-1)) |
| rowwise | columns [start, end) of K: codes, the groups' scales and zero points; per-channel scales and the bias whole | x's slice of K -> partial sums, reduced by the style's redistribute; the bias added once after |

Ranks split a dimension as DTensor's Shard does (torch.chunk: ceil(size / world) each), so that a rowwise shard's
columns are exactly the slice of K that a Shard(-1) input holds. A rowwise split must fall on group and packed-byte
boundaries (and is refused for bit-plane formats and for activations quantized with scales over K); `split_problem`
says why not, and the error names the layer and the fix. `state_dict()` of a sharded layer gives DTensors of the full
stored tensors' shapes (Shard on the split dimension, Replicate for what every rank holds whole), so distributed
checkpoints and transformers' TP save gather quantrt's own layout.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Placement

from ..backends import Backend, BackendUnavailable, backend_and_reason, select_backend
from ..kernels.packing import plane_widths
from ..modules import QuantizedLinear

COLWISE, ROWWISE = "colwise", "rowwise"
LAYOUTS = (COLWISE, ROWWISE)
# activation treatments whose scales are computed from x along K at run time: a rank holding a slice of K would
# compute other scales than the whole layer (fp8_static's calibrated scale is the same on every rank)
DYNAMIC_ACTIVATIONS = ("int8_token", "fp8_tensor", "fp8_row")
# the style methods that decide how torch shards an nn.Linear and converts its inputs and outputs: a subclass that
# overrides one (a packed or pre-partitioned layout) means something quantrt's plain split would get wrong
STYLE_HOOKS = ("_partition_linear_fn", "_prepare_input_fn", "_prepare_output_fn")
# torch's style class -> the layout it shards a QuantizedLinear in (filled by `register`)
STYLE_LAYOUTS: dict[type, str] = {}


@dataclass(frozen=True)
class TensorParallelShard:
    """What one rank of a tensor-parallel QuantizedLinear holds: rows [start, end) of the full layer's N (colwise) or
    columns [start, end) of its K (rowwise); `placements`: each stored tensor's placement and full shape, as
    state_dict gives it."""

    mesh: DeviceMesh
    layout: str
    in_features: int
    out_features: int
    start: int
    end: int
    placements: dict[str, tuple[Placement, tuple[int, ...]]]


def shard_ranges(size: int, world: int) -> list[tuple[int, int]]:
    """[start, end) of each rank's part of a dimension of `size`, as DTensor's Shard splits it (torch.chunk: the
    first ranks ceil(size / world) each, the last ones shorter or empty)."""
    ranges = []
    for rank in range(world):
        length, offset = Shard.local_shard_size_and_offset(size, world, rank)
        ranges.append((offset, offset + length))
    return ranges


def split_problem(layer: QuantizedLinear, layout: str, world: int) -> tuple[str, str] | None:
    """(why `layer` cannot be split `layout` across `world` ranks, the fix), or None where it can."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    scheme, storage = layer.scheme, layer.scheme.storage
    size = layer.out_features if layout == COLWISE else layer.in_features
    dimension = "output features (N)" if layout == COLWISE else "input features (K)"
    ranges = shard_ranges(size, world)
    keep = f"keep it in full precision (modules_to_not_convert=[{layer.name!r}])"
    empty = [rank for rank, (start, end) in enumerate(ranges) if end == start]
    if empty:
        return (f"its {size} {dimension} leave rank(s) {empty} without any (ceil({size} / {world}) per rank)",
                f"use fewer ranks for it, or {keep}")
    if layout == COLWISE:
        return None  # groups and packing run along K: any split of N falls between rows
    other = "shard it colwise instead (ColwiseParallel)"
    if scheme.activation in DYNAMIC_ACTIVATIONS:
        return (f"its activations are quantized with scales computed over K at run time ({scheme.activation}), which "
                f"each rank would compute over its own slice of K, giving another result than the whole layer",
                f"{other}, choose a weight-only scheme for it, or {keep}")
    widths = plane_widths(storage.bits) if storage.packed else (storage.bits,)
    if len(widths) > 1:
        return (f"its {storage.bits}-bit codes are stored in {len(widths)} bit planes ({'+'.join(map(str, widths))} "
                f"bits), each a block along K, so a slice of K is not a slice of the stored tensor",
                f"{other}, choose a format of one plane (int8, int4 / uint4, uint2, uint1, fp4, fp8) for it, or {keep}")
    chunk = ranges[0][1]
    for rank, (start, _) in enumerate(ranges[1:], start=1):
        if scheme.group_size and start % scheme.group_size:
            return (f"rank {rank}'s slice would start at input feature {start}, inside a group of "
                    f"{scheme.group_size} (scales and zero points are per group along K): the split would cut a group",
                    f"choose a group size that divides {chunk} (each rank's share of K: ceil({size} / {world})), "
                    f"{other}, or {keep}")
        if start % storage.k_alignment:
            return (f"rank {rank}'s slice would start at input feature {start}, inside a packed byte of "
                    f"{storage.k_alignment} {storage.bits}-bit codes: the split would cut a packed word",
                    f"use a world size for which ceil({size} / {world}) is a multiple of {storage.k_alignment}, "
                    f"{other}, or {keep}")
    # and for every format: each rank's slice of each stored tensor is whole elements along the split dimension
    n, k, dtype = layer.out_features, layer.in_features, layer.scale.dtype
    full = scheme.tensor_specs(n, k, dtype)
    for rank, (start, end) in enumerate(ranges):
        for key, (shape, _) in scheme.tensor_specs(n, end - start, dtype).items():
            for dim, (whole, part) in enumerate(zip(full[key][0], shape)):
                if whole != part and (start * whole % size or (end - start) * whole != part * size):
                    return (f"rank {rank}'s slice [{start}, {end}) of K does not fall on whole elements of its "
                            f"{key} {list(full[key][0])}", f"{other}, or {keep}")
    return None


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of `shape`."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def replicated(tensor: torch.Tensor, mesh: DeviceMesh, src_data_rank: int) -> torch.Tensor:
    """`tensor` as rank `src_data_rank` of `mesh` holds it (torch's distribute_tensor broadcasts it)."""
    return distribute_tensor(tensor, mesh, [Replicate()], src_data_rank=src_data_rank).to_local()


def shard_quantized_linear(layer: QuantizedLinear, mesh: DeviceMesh, layout: str,
                           src_data_rank: int | None = None) -> TensorParallelShard:
    """Shard `layer` in place for this rank of the 1-D `mesh`: its buffers become this rank's slice of the stored
    tensors (`layout` colwise: rows of N; rowwise: columns of K), its backend is prepared for the slice's shape (an
    automatically chosen backend that cannot serve it is chosen again; one asked for by name raises), and
    `layer.tensor_parallel` records the shard. `src_data_rank`: take the layer's tensors from that rank first (as
    torch's styles do by default: ranks that built their models apart agree); None: each rank slices what it holds
    (every rank loaded the same checkpoint). Communication is left to the caller's hooks."""
    name = layer.name
    if getattr(layer, "tensor_parallel", None) is not None:
        raise ValueError(f"layer {name!r} is sharded already ({layer.tensor_parallel.layout}); shard a layer once")
    if mesh.ndim != 1:
        raise ValueError(f"layer {name!r}: tensor parallelism shards over a 1-D mesh (the tensor-parallel dimension, "
                         f"e.g. mesh['tp']), got a {mesh.ndim}-D mesh {tuple(mesh.mesh_dim_names or ())}")
    if layer.qweight.is_meta:
        raise ValueError(f"layer {name!r} has no tensors yet (on the meta device): load or quantize it first, then "
                         f"shard it")
    world, rank = mesh.size(), mesh.get_local_rank()
    n, k = layer.out_features, layer.in_features
    problem = split_problem(layer, layout, world)
    if problem is not None:
        why, fix = problem
        raise ValueError(f"layer {name!r} ({layer.scheme.name}, {n}x{k}) cannot be split {layout} across {world} "
                         f"ranks: {why}. Fix: {fix}")
    tensors = {key: tensor.detach() for key, tensor in layer.tensors().items()}  # quantrt's layout
    bias = None if layer.bias is None else layer.bias.detach()
    if src_data_rank is not None:
        tensors = {key: replicated(tensor, mesh, src_data_rank) for key, tensor in tensors.items()}
        bias = None if bias is None else replicated(bias, mesh, src_data_rank)
    size = n if layout == COLWISE else k
    start, end = shard_ranges(size, world)[rank]
    local_n, local_k = (end - start, k) if layout == COLWISE else (n, end - start)
    local_specs = layer.scheme.tensor_specs(local_n, local_k, layer.scale.dtype)
    local, placements = {}, {}
    for key, tensor in tensors.items():
        split = [d for d, (full, part) in enumerate(zip(tensor.shape, local_specs[key][0])) if full != part]
        if not split:  # what every rank holds whole: per-channel or per-tensor scales of a rowwise split, ...
            local[key], placements[key] = tensor.clone(), (Replicate(), tuple(tensor.shape))
            continue
        dim = split[0]
        # the slice of this dimension that holds [start, end) of N or K: exact, split_problem checked the boundaries
        first = start * tensor.shape[dim] // size
        local[key] = tensor.narrow(dim, first, local_specs[key][0][dim]).clone()  # a copy: the full one is freed
        placements[key] = (Shard(dim), tuple(tensor.shape))
    backend = layer.backend
    backend.release(layer)  # its derived tensors dropped, the buffers in quantrt's layout
    for key, tensor in local.items():
        setattr(layer, key, tensor)
    layer.resident_layout = None
    if bias is not None:
        placements["bias"] = (Shard(0) if layout == COLWISE else Replicate(), (n,))
    if layout == COLWISE:
        layer.out_features = local_n
        if bias is not None:
            layer.bias = bias[start:end].clone()
    else:
        layer.in_features = local_k
        # the partial sums of the ranks are added up: the bias is added once, after (tp_bias: not in state_dict under
        # its own name, `sharded_state_dict` gives it as "bias"; moved with the layer)
        layer.bias = None
        if bias is not None:
            layer.register_buffer("tp_bias", bias.clone(), persistent=False)
    shard = TensorParallelShard(mesh, layout, k, n, start, end, placements)
    layer.tensor_parallel = shard
    serve_shard(layer, backend)
    layer.register_state_dict_post_hook(sharded_state_dict)
    layer.register_load_state_dict_pre_hook(refuse_sharded_load)
    return shard


def serve_shard(layer: QuantizedLinear, backend: Backend) -> None:
    """Prepare `backend` for the shard `layer` now is, or the backend auto picks for its shape where `backend` cannot
    serve it and was chosen automatically; a backend asked for by name that cannot serve it raises, naming the layer."""
    shard = layer.tensor_parallel
    shape, device, dtype = (layer.out_features, layer.in_features), layer.qweight.device, layer.scale.dtype
    _, reason = backend_and_reason(backend.name, layer.scheme, device, shape, dtype)
    if reason is None:
        layer.backend = backend
        backend.prepare(layer)
        return
    if layer.backend_reason.startswith("asked for"):
        raise BackendUnavailable(
            f"layer {layer.name!r}: backend {backend.name!r} was asked for and cannot serve this rank's {shard.layout} "
            f"shard ({shape[0]}x{shape[1]} of the {shard.out_features}x{shard.in_features} layer): {reason}. Quantize "
            f"it with backend='auto' (which falls back), shard it the other way, or keep it in full precision "
            f"(modules_to_not_convert=[{layer.name!r}])")
    chosen, how = select_backend(layer.scheme, device, "auto", layer.name, shape=shape, dtype=dtype)
    layer.backend = chosen
    layer.backend_reason = (f"{how}; {backend.name} cannot serve its {shard.layout} shard {shape[0]}x{shape[1]}: "
                            f"{reason}")
    chosen.prepare(layer)


def sharded_state_dict(layer: QuantizedLinear, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """A sharded layer's state_dict: each stored tensor as a DTensor of the full layer's shape (this rank's slice
    its local tensor), the bias of a rowwise layer included; runs after the layer's own hook has put the tensors in
    quantrt's layout."""
    shard = layer.tensor_parallel
    for key, (placement, shape) in shard.placements.items():
        local = getattr(layer, "tp_bias", None) if key == "bias" and shard.layout == ROWWISE else state_dict.get(
            prefix + key)
        if local is None:
            continue
        state_dict[prefix + key] = DTensor.from_local(local, shard.mesh, [placement], run_check=False, shape=shape,
                                                      stride=contiguous_strides(shape))


def refuse_sharded_load(layer: QuantizedLinear, state_dict: dict, prefix: str, *args: Any) -> None:
    raise ValueError(f"layer {layer.name!r} is sharded for tensor parallelism ({layer.tensor_parallel.layout}): load "
                     f"its state into the model before parallelizing it")


def local_input(input_layouts: tuple[Placement, ...], desired: tuple[Placement, ...], mesh: DeviceMesh,
                layer: QuantizedLinear, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the input as the style declares it, redistributed to what the shard computes on (colwise:
    replicated; rowwise: sharded along K), as this rank's plain tensor."""
    x = inputs[0]
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, input_layouts, run_check=False)
    if x.placements != desired:
        x = x.redistribute(placements=desired)
    return (x.to_local(), *inputs[1:])


def distributed_output(shard: TensorParallelShard, output_layouts: tuple[Placement, ...], use_local_output: bool,
                       layer: QuantizedLinear, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook: this rank's output as a DTensor (colwise: its columns of y; rowwise: partial sums, with the bias
    added once after the style's redistribution reduced them), in the style's output layout."""
    if shard.layout == COLWISE:
        shape = (*output.shape[:-1], shard.out_features)
        y = DTensor.from_local(output, shard.mesh, [Shard(output.dim() - 1)], run_check=False, shape=shape,
                               stride=contiguous_strides(shape))
    else:
        y = DTensor.from_local(output, shard.mesh, [Partial()], run_check=False)
    if y.placements != output_layouts:
        y = y.redistribute(placements=output_layouts)
    bias = getattr(layer, "tp_bias", None)
    if shard.layout == ROWWISE and bias is not None:
        y = y + DTensor.from_local(bias, shard.mesh, [Replicate()], run_check=False)
    return y.to_local() if use_local_output else y


def parallelize_quantized_linear(style: Any, base: type, layout: str, layer: QuantizedLinear,
                                 mesh: DeviceMesh) -> QuantizedLinear:
    """What torch's ColwiseParallel / RowwiseParallel (`base`, sharding `layout`) do for a QuantizedLinear: shard it
    (from the style's src_data_rank), then convert its input and output around the local matmul as the style says
    (input_layouts, output_layouts, use_local_output), with DTensor's redistribute doing the communication."""
    custom = [hook for hook in STYLE_HOOKS if getattr(type(style), hook, None) is not getattr(base, hook, None)]
    if custom:
        raise NotImplementedError(
            f"layer {layer.name!r}: {type(style).__name__} overrides {', '.join(custom)} of torch's {base.__name__} (a "
            f"packed or pre-partitioned layout), which quantrt's plain {layout} split of a QuantizedLinear would get "
            f"wrong; use torch's {base.__name__} itself for it, or keep it in full precision "
            f"(modules_to_not_convert=[{layer.name!r}])")
    shard = shard_quantized_linear(layer, mesh, layout, src_data_rank=style.src_data_rank)
    desired = (Replicate(),) if layout == COLWISE else (Shard(-1),)
    layer.register_forward_pre_hook(functools.partial(local_input, tuple(style.input_layouts), desired, mesh))
    layer.register_forward_hook(functools.partial(distributed_output, shard, tuple(style.output_layouts),
                                                  style.use_local_output))
    return layer


def sharding_apply(original: Callable, base: type, layout: str) -> Callable:
    """`base._apply` that shards a QuantizedLinear itself and leaves every other module to torch's `original`."""

    @functools.wraps(original)
    def apply(style: Any, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if isinstance(module, QuantizedLinear):
            return parallelize_quantized_linear(style, base, layout, module, device_mesh)
        return original(style, module, device_mesh)

    apply.quantrt_wraps = original
    return apply


def register(style_module: ModuleType) -> None:
    """Have torch's ColwiseParallel and RowwiseParallel (module: torch.distributed.tensor.parallel.style) shard
    QuantizedLinear layers. Idempotent; an ImportError naming torch's version where the styles differ from what
    quantrt wraps."""
    for class_name, layout in (("ColwiseParallel", COLWISE), ("RowwiseParallel", ROWWISE)):
        base = getattr(style_module, class_name, None)
        original = None if base is None else base.__dict__.get("_apply")
        missing = [hook for hook in STYLE_HOOKS if base is not None and not hasattr(base, hook)]
        if original is None or missing:
            absent = "_apply" if original is None else ", ".join(missing)
            raise ImportError(f"quantrt cannot let torch {torch.__version__}'s tensor parallelism shard its layers: "
                              f"torch.distributed.tensor.parallel.{class_name} has no {absent}")
        STYLE_LAYOUTS[base] = layout
        if getattr(original, "quantrt_wraps", None) is None:
            base._apply = sharding_apply(original, base, layout)


def add_bias_after_reduction(layer: QuantizedLinear, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a rowwise shard whose library reduces the partial sums inside the layer's forward
    (transformers' tp_plan): the bias, once, after."""
    return output + layer.tp_bias


def shard_for_local_forward(model: nn.Module, mesh: DeviceMesh, layouts: Mapping[str, str]) -> None:
    """Shard the QuantizedLinear layers `layouts` names ({name: "colwise" | "rowwise"}) for a library whose own hooks
    give each layer this rank's plain input and reduce its output (transformers' tp_plan forward): each layer keeps its
    slice, and a rowwise layer with a bias adds it after that reduction (`add_bias_after_reduction`)."""
    for name, layout in layouts.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, QuantizedLinear):
            raise TypeError(f"{name!r} is a {type(layer).__name__}, not a QuantizedLinear")
        shard_quantized_linear(layer, mesh, layout)
        if layout == ROWWISE and getattr(layer, "tp_bias", None) is not None:
            layer.register_forward_hook(add_bias_after_reduction)


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode() + data.numpy().tobytes()).hexdigest()


def replication_mismatches(model: nn.Module, group: dist.ProcessGroup | None = None) -> list[str]:
    """The state_dict entries of `model` (quantrt's stored tensors, in quantrt's layout, and every other parameter and
    buffer) whose values differ between the ranks of `group` (default: the world): empty where the model is
    replicated, as diffusers' context parallelism expects of every rank. Every rank of `group` must call it."""
    digests = {key: tensor_digest(tensor) for key, tensor in model.state_dict().items() if tensor is not None}
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, digests, group=group)
    return sorted(key for key in set().union(*gathered) if len({other.get(key) for other in gathered}) > 1)
