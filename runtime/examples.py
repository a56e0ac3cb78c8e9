"""Example inputs, as calibration, autoquant and warmup take them: a dict of keyword arguments, a tuple or list
of positional arguments, or a single tensor."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn


def as_call(example: Any) -> tuple[tuple, dict]:
    """An example input as (args, kwargs): a dict is keyword arguments, a tuple or list positional ones, a
    tensor the only argument."""
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    if isinstance(example, torch.Tensor):
        return (example,), {}
    raise TypeError(f"an example input must be a dict of keyword arguments, a tuple of positional arguments or a "
                    f"tensor, not {type(example).__name__}")


def call_with(model: nn.Module, example: Any) -> Any:
    """Call `model` with one example input (see `as_call`)."""
    args, kwargs = as_call(example)
    return model(*args, **kwargs)


def run_examples(model: nn.Module, example_inputs: Iterable[Any], who: str) -> int:
    """Call `model` on every example input (see call_with); how many there were. None is an error naming `who`."""
    count = 0
    for example in example_inputs:
        call_with(model, example)
        count += 1
    if count == 0:
        raise ValueError(f"{who} needs at least one example input (a dict of keyword arguments, a tuple of "
                         f"positional ones, or a tensor)")
    return count


__all__ = ["as_call", "call_with", "run_examples"]
