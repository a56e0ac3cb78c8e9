"""Shared by the backend tests: quantizing the same weights with different backends, a tiny Flux
transformer with random weights, and per-scheme tolerances against the reference backend."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import quantrt
from quantrt import QuantConfig

# (scheme, group_size) the weight-only tests run; group sizes divide the tiny Flux's K values (16 .. 320)
WEIGHT_ONLY = [("int8wo", None), ("int8wo", 64), ("int4wo", 32), ("uint4wo", 16), ("uint1wo", 32),
               ("uint2wo", 32), ("uint3wo", 64), ("uint5wo", 32), ("uint6wo", 16), ("uint7wo", 32),
               ("float8wo_e4m3", None), ("float8wo_e5m2", None)]
DYNAMIC = [("int8dq", None), ("int4dq", 32)]


def case_id(case: tuple[str, int | None]) -> str:
    scheme, group_size = case
    return scheme if group_size is None else f"{scheme}-g{group_size}"


def tolerance(scheme: str, dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances of a backend's output against the reference backend's on the same weights.
    Weight-only backends compute with the same weight: accumulation order only (bf16: 1-2 ulps of an
    output of magnitude ~2). Dynamic-activation backends quantize activations on their own grid (torchao:
    absmax / 127.5 symmetric for int8dq, asymmetric per token for int4dq): about one activation step."""
    if scheme in ("int8dq", "int4dq"):
        return {"atol": 5e-2, "rtol": 2e-2}
    if dtype == torch.float32:
        return {"atol": 1e-4, "rtol": 1e-4}
    return {"atol": 2e-2, "rtol": 1.6e-2}


def quantized_copies(model: nn.Module, scheme: str, group_size: int | None, backends: list[str],
                     **config) -> dict[str, quantrt.QuantizedTransformer]:
    """backend -> a QuantizedTransformer of a deep copy of `model`, quantized with `backend` (and QuantConfig's
    other arguments `config`)."""
    return {backend: quantrt.QuantizedTransformer.from_model(
        copy.deepcopy(model), QuantConfig(scheme, group_size=group_size, backend=backend, **config), progress=False)
        for backend in backends}


def linear_model(dtype: torch.dtype, k: int = 256, n: int = 96) -> nn.Module:
    """Two Linear layers, N = 96 and 40 (not multiples of 64); the second one's K = 96 is kept in full
    precision where the group size (64) does not divide it."""
    return nn.Sequential(nn.Linear(k, n, dtype=dtype), nn.GELU(), nn.Linear(n, 40, dtype=dtype, bias=False))


def tiny_flux(dtype: torch.dtype = torch.float32) -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def flux_inputs(dtype: torch.dtype = torch.float32, tokens: int = 16, text_tokens: int = 8) -> dict:
    return dict(hidden_states=torch.randn(1, tokens, 16, dtype=dtype),
                encoder_hidden_states=torch.randn(1, text_tokens, 64, dtype=dtype),
                pooled_projections=torch.randn(1, 32, dtype=dtype), timestep=torch.tensor([0.5], dtype=dtype),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text_tokens, 3), return_dict=False)


def backends_of(qt: quantrt.QuantizedTransformer) -> set[str]:
    return {report.backend for report in qt.summary() if report.quantized}
