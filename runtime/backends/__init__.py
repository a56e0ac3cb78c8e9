"""Backends: who computes a QuantizedLinear's matmul, and how one is chosen.

Each backend is one file in this package defining `BACKEND`, an instance of a `Backend` subclass.
Selection (design.md): the `backend=` argument, then the QUANTRT_BACKEND environment variable, then the
first backend in ORDER that can serve the scheme on the layer's device and keeps no copy: its resident bytes
(`Backend.copy_bytes`, predicted before the layer is built; `Backend.extra_bytes` once it is) stay within
COPY_LIMIT of what the scheme stores. A backend that keeps a copy is used only when asked for by name, and its
reason then says what the copy costs. A backend asked for explicitly that cannot serve raises
`BackendUnavailable`; an automatic choice records why the earlier ones could not or were passed over.
Whether a backend can serve is asked per layer: `unavailable_reason(scheme, device)`, then, where the layer's
shape and dtype are known, `layer_unavailable_reason(scheme, device, shape, dtype)`, so one model may mix
backends (a layer whose shape a kernel cannot take falls back alone).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Iterable

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

if TYPE_CHECKING:
    from ..modules import QuantizedLinear
    from ..schemes import Scheme

ORDER = ("triton", "aten", "torchao", "quanto", "reference")
# what a layer that auto leaves to the reference on CPU runs at (summary() prints a reason many layers share once)
REFERENCE_SPEED_ON_CPU = ("on CPU its speed is the reference's dequantize path (the whole weight dequantized on "
                          "every call, slower than the unquantized layer); CPU kernels serve int8wo per channel "
                          "and int4wo/uint4wo (backend aten)")
# auto passes over a backend whose copies beside the buffers exceed this fraction of what the scheme stores
COPY_LIMIT = 0.05


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve a layer."""


class Backend:
    """Computes y = x @ W^T + b for a QuantizedLinear whose weight is stored in quantrt's format."""

    name = ""
    # attributes that `prepare` sets on a layer from its buffers: rebuilt, never copied, by copy.deepcopy
    derived_attributes: tuple[str, ...] = ()

    def unavailable_reason(self, scheme: Scheme, device: torch.device) -> str | None:
        """Why this backend cannot serve `scheme` on `device` (None if it can)."""
        raise NotImplementedError

    def layer_unavailable_reason(self, scheme: Scheme, device: torch.device, shape: tuple[int, int],
                                 dtype: torch.dtype) -> str | None:
        """Why this backend cannot serve one layer whose weight is `shape` (out_features, in_features) in
        `dtype`, given that `unavailable_reason(scheme, device)` is None. Default: no such limits."""
        return None

    def copy_bytes(self, scheme: Scheme, device: torch.device, shape: tuple[int, int],
                   dtype: torch.dtype) -> int | None:
        """The bytes `extra_bytes` will count for a layer whose weight is `shape` (out_features, in_features) in
        `dtype` on `device`, predicted before it is built, so that auto can pass over a backend that keeps a copy;
        None where the backend cannot tell (auto then treats it as a copy). Default: no derived tensors, nothing."""
        return 0 if not self.derived_attributes else None

    def prepare(self, layer: QuantizedLinear) -> None:
        """Build whatever the backend needs from the layer's stored tensors. Called when the layer is
        built, and again after the layer moves or changes dtype (`module.to(...)`) or loads a state dict,
        so it must rebuild from the stored tensors (and do nothing for tensors on the meta device). Where
        the backend's format is the stored one, it should build views of the buffers, not copies."""

    def derived_tensors(self, layer: QuantizedLinear) -> list[torch.Tensor]:
        """The tensors `prepare` keeps on `layer` (its `derived_attributes` that hold a tensor)."""
        found = (getattr(layer, name, None) for name in self.derived_attributes)
        return [tensor for tensor in found if isinstance(tensor, torch.Tensor)]

    def extra_bytes(self, layer: QuantizedLinear) -> int:
        """Bytes the backend keeps for `layer` beyond what the layer stores (its buffers' own sizes, which
        save_pretrained writes): the storage its derived tensors and its buffers reach together, each storage
        once, less those sizes. A view of a buffer costs nothing, a repacked copy costs its size, and so does
        storage a buffer reaches beyond its own elements (a buffer that is a strided view into a backend's
        tensor)."""
        buffers = list(layer.buffers())
        return resident_bytes(buffers + self.derived_tensors(layer)) - sum(
            t.numel() * t.element_size() for t in buffers)

    def stored_tensors(self, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
        """The layer's stored tensors by name, in quantrt's layout (what state_dict and save_pretrained write). A
        backend that repacks a buffer in place (`layer.resident_layout`) converts it back here."""
        return {key: getattr(layer, key) for key in layer.scheme.tensor_specs(1, layer.in_features, torch.float32)}

    def release(self, layer: QuantizedLinear) -> None:
        """Hand the layer back in quantrt's layout, before another backend takes it or a state dict is loaded
        into it: buffers this backend repacked go back to quantrt's layout, its derived tensors are dropped."""
        for name in self.derived_attributes:
            setattr(layer, name, None)

    def linear(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `tensor`'s data: `tensor` itself, or for a tensor subclass (quanto's and
    torchao's weights) the inner tensors its `__tensor_flatten__` names, opened recursively."""
    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    inner = (getattr(tensor, name) for name in names)
    return [leaf for t in inner if t is not None for leaf in plain_tensors(t)]


def resident_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of memory that `tensors` occupy together. Tensor subclasses count their inner tensors
    (`plain_tensors`); tensors that share a storage (views, aliases, a backend's view of a buffer) count the
    union of the byte ranges they reach in it once. Tensors on the meta device count their nominal size."""
    nominal: dict[int, int] = {}
    ranges: dict[tuple[torch.device, int], list[tuple[int, int]]] = {}
    for tensor in tensors:
        for t in plain_tensors(tensor):
            if t.is_meta:
                nominal[id(t)] = t.numel() * t.element_size()
                continue
            if t.numel() == 0:
                continue
            size = t.element_size()
            start = t.storage_offset() * size
            span = (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * size
            ranges.setdefault((t.device, t.untyped_storage().data_ptr()), []).append((start, start + span))
    total = sum(nominal.values())
    for spans in ranges.values():
        covered = 0  # bytes [0, covered) of this storage are counted already
        for start, end in sorted(spans):
            total += max(0, end - max(start, covered))
            covered = max(covered, end)
    return total


def get_backend(name: str) -> Backend | None:
    """The backend `name`, or None if this build of quantrt does not have it."""
    if name not in ORDER:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(ORDER)}")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            return None
        raise
    return module.BACKEND


def requested_backend(argument: str = "auto") -> str:
    """The backend= argument if set, else QUANTRT_BACKEND, else 'auto'."""
    if argument and argument != "auto":
        return argument
    env = os.environ.get("QUANTRT_BACKEND", "").strip().lower()
    if env and env != "auto" and env not in ORDER:
        raise ValueError(f"QUANTRT_BACKEND={env!r} is not a backend; use auto or one of {', '.join(ORDER)}")
    return env or "auto"


def backend_and_reason(name: str, scheme: Scheme, device: torch.device, shape: tuple[int, int] | None,
            dtype: torch.dtype | None) -> tuple[Backend | None, str | None]:
    """(backend, why it cannot serve: None if it can) for the backend `name`."""
    try:
        backend = get_backend(name)
    except ImportError as e:  # e.g. the triton backend on a machine without triton
        return None, f"its module does not import: {e}"
    if backend is None:
        return None, "not part of this build"
    reason = backend.unavailable_reason(scheme, device)
    if reason is None and shape is not None:
        reason = backend.layer_unavailable_reason(scheme, device, tuple(shape), dtype)
    return backend, reason


def scheme_bytes(scheme: Scheme, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes the scheme stores for a weight of `shape` (out_features, in_features) whose group parameters are in
    `dtype`: its codes, scales and zero points, as save_pretrained writes them."""
    specs = scheme.tensor_specs(shape[0], shape[1], dtype)
    return sum(torch.Size(size).numel() * tensor_dtype.itemsize for size, tensor_dtype in specs.values())


def copy_cost(backend: Backend, scheme: Scheme, device: torch.device, shape: tuple[int, int],
              dtype: torch.dtype | None) -> str | None:
    """What `backend` keeps beside the scheme's tensors for this layer, in words, or None where that is nothing
    (within COPY_LIMIT of what the scheme stores)."""
    dtype = dtype or torch.bfloat16
    stored = scheme_bytes(scheme, shape, dtype)
    copy = backend.copy_bytes(scheme, device, shape, dtype)
    if copy is None:
        return "keeps tensors of its own beside the scheme's, of a size quantrt cannot predict"
    if copy <= COPY_LIMIT * stored:
        return None
    # a share, not bytes (the summary's bytes column has those), so that layers of one format share the reason
    return f"keeps a copy beside the buffers: +{copy / stored:.0%} of what the scheme stores"


def select_backend(scheme: Scheme, device: torch.device, argument: str = "auto", layer_name: str = "",
                   shape: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> tuple[Backend, str]:
    """(backend, why) for one layer: `why` says how it was chosen and why earlier ones were passed over.
    `shape` (out_features, in_features) and `dtype` of the layer's weight, where given, let a backend
    refuse single layers (`Backend.layer_unavailable_reason`) and let auto pass over a backend that would keep
    a copy of the layer's weight (`copy_cost`); a backend asked for by name is used all the same, and `why`
    says what its copy costs."""
    device = torch.device(device)
    requested = requested_backend(argument)
    source = "backend=" if argument not in ("", "auto") else "QUANTRT_BACKEND"
    where = f"layer {layer_name!r}: " if layer_name else ""
    if requested != "auto":
        backend, reason = backend_and_reason(requested, scheme, device, shape, dtype)
        if reason:
            usable = [name for name in ORDER if backend_and_reason(name, scheme, device, shape, dtype)[1] is None]
            raise BackendUnavailable(
                f"{where}backend {requested!r} (asked for through {source}) cannot serve scheme "
                f"{scheme.name} on device {device}: {reason}. Use backend='auto' to fall back, or one of: "
                f"{', '.join(usable) or 'none'}"
            )
        cost = copy_cost(backend, scheme, device, shape, dtype) if shape is not None else None
        return backend, f"asked for ({source})" + (f"; {cost}" if cost else "")
    passed = []
    for name in ORDER:
        backend, reason = backend_and_reason(name, scheme, device, shape, dtype)
        if reason is None and name == "triton" and device.type != "cuda":
            # the interpreter proves kernel code but is orders of magnitude slower than any other backend
            reason = "on CPU the Triton interpreter runs only when asked for (backend='triton')"
        if reason is None and shape is not None:
            cost = copy_cost(backend, scheme, device, shape, dtype)
            if cost:
                reason = f"{cost}; used only when asked for by name"
        if reason is None:
            why = "auto" + (f" ({'; '.join(passed)})" if passed else "")
            if name == "reference" and device.type == "cpu":
                why += f"; {REFERENCE_SPEED_ON_CPU}"
            return backend, why
        passed.append(f"{name}: {reason}")
    raise BackendUnavailable(f"{where}no backend can serve {scheme.name} on {device}: {'; '.join(passed)}")


def usable_backends(scheme: Scheme, device: torch.device) -> list[str]:
    """Names of the backends that can serve `scheme` on `device`, in selection order (whether or not they would
    keep a copy, which depends on the layer)."""
    return [name for name in ORDER if backend_and_reason(name, scheme, torch.device(device), None, None)[1] is None]
