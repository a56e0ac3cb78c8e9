"""`QuantizedTransformer`: a model whose Linear layers are quantized, usable wherever the model was."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .config import QuantConfig
from .modules import LayerReport, QuantizedLinear, quantize_


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table: readable in a terminal, a CI log and a results file alike."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


class ModelSummary(list):
    """A list of LayerReport that prints as a table."""

    def __str__(self) -> str:
        rows = [[r.name, f"{r.out_features}x{r.in_features}", r.scheme, r.backend, r.why or "-",
                 r.bytes, f"{r.bytes / r.full_precision_bytes:.3f}"] for r in self]
        quantized = sum(r.quantized for r in self)
        total, full = sum(r.bytes for r in self), sum(r.full_precision_bytes for r in self)
        table = format_table(["layer", "NxK", "scheme", "backend", "why", "bytes", "ratio"], rows)
        return f"{table}\n{quantized}/{len(self)} Linear layers quantized; {total} bytes (was {full})"


class QuantizedTransformer(nn.Module):
    """Wraps a model (diffusers transformer, transformers LLM, any nn.Module with Linear layers) whose
    Linear layers were swapped for QuantizedLinear. Calls, `.config` and other attributes pass through to
    the wrapped model, so `pipeline.transformer = qt` works as a drop-in."""

    def __init__(self, model: nn.Module, quant_config: QuantConfig, reports: list[LayerReport]):
        super().__init__()
        self.model = model
        self.quant_config = quant_config
        self._reports = ModelSummary(reports)

    @classmethod
    def from_model(cls, model: nn.Module, config: str | QuantConfig | dict = "int8wo", *,
                   progress: bool | None = None) -> QuantizedTransformer:
        """Quantize `model` in place (its Linear layers are replaced) and wrap it."""
        if isinstance(model, QuantizedTransformer):
            raise TypeError("this model is already a QuantizedTransformer; quantize the original model")
        config = QuantConfig.coerce(config)
        reports = quantize_(model, config, progress=progress)
        if not reports:
            raise ValueError(f"{type(model).__name__} has no nn.Linear layers: there is nothing to quantize")
        return cls(model, config, reports)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def config(self):
        """The wrapped model's own config (diffusers/transformers), or None."""
        return getattr(self.model, "config", None)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or "model" not in self._modules:
                raise
            return getattr(self._modules["model"], name)

    def quantized_layers(self) -> dict[str, QuantizedLinear]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, QuantizedLinear)}

    def summary(self) -> ModelSummary:
        """Per Linear layer: name, shape, scheme, backend and why, bytes. `print(qt.summary())`."""
        return self._reports

    def memory_footprint(self) -> int:
        """Bytes of all parameters and buffers of the wrapped model."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    def extra_repr(self) -> str:
        return f"quant_config={self.quant_config!r}"


def model_bytes(model: nn.Module, as_dtype: torch.dtype | None = None) -> int:
    """Bytes of a model's parameters and buffers; with `as_dtype`, as if its floating tensors were stored
    in that dtype (e.g. the bf16 size of an fp32 model)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        size = torch.empty((), dtype=as_dtype).element_size() if as_dtype and t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total
