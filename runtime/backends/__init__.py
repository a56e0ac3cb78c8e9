"""Backends: who computes a QuantizedLinear's matmul, and how one is chosen.

Each backend is one file in this package defining `BACKEND`, an instance of a `Backend` subclass.
Selection (design.md): the `backend=` argument, then the QUANTRT_BACKEND environment variable, then the
first backend in ORDER that can serve the scheme on the layer's device. A backend asked for explicitly
that cannot serve raises `BackendUnavailable`; an automatic choice records why the earlier ones could not.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..modules import QuantizedLinear
    from ..schemes import Scheme

ORDER = ("triton", "torchao", "quanto", "reference")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve a layer."""


class Backend:
    """Computes y = x @ W^T + b for a QuantizedLinear whose weight is stored in quantrt's format."""

    name = ""

    def unavailable_reason(self, scheme: Scheme, device: torch.device) -> str | None:
        """Why this backend cannot serve `scheme` on `device` (None if it can)."""
        raise NotImplementedError

    def prepare(self, layer: QuantizedLinear) -> None:
        """Build whatever the backend needs from the layer's stored tensors (called once)."""

    def linear(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


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


def select_backend(scheme: Scheme, device: torch.device, argument: str = "auto",
                   layer_name: str = "") -> tuple[Backend, str]:
    """(backend, why) for one layer. `why` says how it was chosen and why earlier ones were passed over."""
    requested = requested_backend(argument)
    where = f"layer {layer_name!r}: " if layer_name else ""
    if requested != "auto":
        backend = get_backend(requested)
        reason = "not part of this build" if backend is None else backend.unavailable_reason(scheme, device)
        if reason:
            source = "backend=" if argument not in ("", "auto") else "QUANTRT_BACKEND"
            raise BackendUnavailable(
                f"{where}backend {requested!r} (asked for through {source}) cannot serve scheme "
                f"{scheme.name} on device {device}: {reason}. Use backend='auto' to fall back, or one of: "
                f"{', '.join(usable_backends(scheme, device)) or 'none'}"
            )
        return backend, f"asked for ({'backend=' if argument not in ('', 'auto') else 'QUANTRT_BACKEND'})"
    passed = []
    for name in ORDER:
        backend = get_backend(name)
        reason = "not part of this build" if backend is None else backend.unavailable_reason(scheme, device)
        if reason is None and name == "triton" and device.type != "cuda":
            # the interpreter proves kernel code but is orders of magnitude slower than any other backend
            reason = "on CPU the Triton interpreter runs only when asked for (backend='triton')"
        if reason is None:
            return backend, "auto" + (f" ({'; '.join(passed)})" if passed else "")
        passed.append(f"{name}: {reason}")
    raise BackendUnavailable(f"{where}no backend can serve {scheme.name} on {device}: {'; '.join(passed)}")


def usable_backends(scheme: Scheme, device: torch.device) -> list[str]:
    """Names of the backends that can serve `scheme` on `device`, in selection order."""
    usable = []
    for name in ORDER:
        backend = get_backend(name)
        if backend is not None and backend.unavailable_reason(scheme, device) is None:
            usable.append(name)
    return usable
