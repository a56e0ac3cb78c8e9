"""Error measures shared by autoquant, the demo and the benchmarks (one definition, so that their numbers agree)."""

from __future__ import annotations

import torch


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """The relative L2 error ||output - reference||_2 / ||reference||_2, computed in float64 (0 when both are
    zero; a zero reference with a nonzero output gives a huge but finite number)."""
    output, reference = output.detach().double(), reference.detach().double()
    return float((output - reference).norm() / reference.norm().clamp_min(1e-30))
