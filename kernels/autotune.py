"""Choosing a kernel config per call: the candidates worth benchmarking on a CUDA GPU, the heuristic used
without tuning, the benchmark itself, the selection, and `matmul`, the entry point the family files
(int8.py, uintx.py, floatx.py) call once they have checked their tensors.

Tuning never disturbs the caller: synthetic tensors come from a private torch.Generator (the caller's
random streams do not move), nothing is benchmarked inside a CUDA-graph capture or a torch.compile trace
(there the table's pick or the heuristic serves; tune in warmup or on an eager call), and the winner is
checked once against the dequantize path on the same synthetic tensors before it is persisted. Picks live
in the tuning table (tuning.py) per (GPU, torch, triton, SOURCE_HASH, format and x dtype, N, K, group size,
M bucket), so that serving never benchmarks.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import triton

from . import tuning
from .formats import WeightFormat
from .matmul import (CPU_CONFIGS, DEQUANT_CONFIG, GEMM_TILES, GEMV_MAX_M, GEMV_TILES, PATHS, SKINNY_STAGES,
                     SKINNY_TILES, KernelConfig, fit, group_size_of, prune, run)

# every file whose text decides what a config computes or how fast: a change retires the table's picks
SOURCE_FILES = ("formats.py", "matmul.py", "autotune.py", "packing.py")
SOURCE_HASH = hashlib.sha256(b"".join((Path(__file__).parent / name).read_bytes()
                                      for name in SOURCE_FILES)).hexdigest()[:16]
DEQUANT_M = 1024  # heuristic without tuning on CUDA: from this many rows on, dequantize then cuBLAS
# the winner's output against the dequantize path's, relative L2 (both round to the activation dtype)
VALIDATION_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def candidates(fmt: WeightFormat, m: int, n: int, k: int, group_size: int, shared_memory: int) -> list[KernelConfig]:
    """The pruned configs worth benchmarking for M rows on a CUDA GPU with `shared_memory` bytes per block,
    by M bucket: gemv up to 64 rows, gemm from 32, dequant + cuBLAS from 128."""
    bucket = tuning.m_bucket(m)
    configs = []
    if bucket == 1:
        configs += [KernelConfig("gemv", block_m=1, block_n=bn, block_k=bk, num_warps=w, num_stages=1)
                    for bn, bk, w in GEMV_TILES]
    elif bucket <= GEMV_MAX_M:
        configs += [KernelConfig("gemv", block_m=max(16, bucket), block_n=bn, block_k=bk, num_warps=w,
                                 num_stages=SKINNY_STAGES) for bn, bk, w in SKINNY_TILES]
    if bucket >= 32:
        configs += [KernelConfig("gemm", block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
                    for bm, bn, bk, w, st in GEMM_TILES]
    if bucket >= 128:
        configs.append(DEQUANT_CONFIG)
    return prune(configs, bucket, n, k, group_size, shared_memory)


def _gemv_block_n(n: int, sms: int, choices: tuple[int, ...]) -> int:
    # the widest tile that still gives every SM at least two programs (a grid of several waves)
    for block_n in sorted(choices, reverse=True):
        if triton.cdiv(n, block_n) >= 2 * sms:
            return block_n
    return min(choices)


def heuristic(fmt: WeightFormat, m: int, n: int, k: int, group_size: int, device: torch.device,
              path: str | None = None, sms: int | None = None) -> KernelConfig:
    """The config used without tuning. Off CUDA: CPU_CONFIGS (gemv up to 16 rows, then gemm). On CUDA:
    gemv up to 64 rows with N tiles narrow enough for two programs per SM, gemm above, dequant + cuBLAS
    from DEQUANT_M rows. `path` forces one path; `sms` gives the GPU's SM count (default: the device's)."""
    if path is None:
        path = "gemv" if m <= (16 if device.type != "cuda" else GEMV_MAX_M) else "gemm"
        if device.type == "cuda" and m >= DEQUANT_M:
            path = "dequant"
    if device.type != "cuda":
        return fit(CPU_CONFIGS[path], m)
    if path == "dequant":
        return DEQUANT_CONFIG
    if path == "gemm":
        return KernelConfig("gemm", block_m=128 if m > 64 else 64, block_n=128, block_k=64, num_warps=8,
                            num_stages=3)
    sms = sms or torch.cuda.get_device_properties(device).multi_processor_count
    if m <= 1:
        return KernelConfig("gemv", block_m=1, block_n=_gemv_block_n(n, sms, (8, 16)), block_k=512,
                            num_warps=4, num_stages=1)
    block_m = fit(KernelConfig("gemv"), m).block_m
    choices = tuple(c for c in (16, 32, 64) if block_m * c <= 1024)  # what `prune` lets the tuner pick
    return KernelConfig("gemv", block_m=block_m, block_n=_gemv_block_n(n, sms, choices), block_k=128, num_warps=4,
                        num_stages=SKINNY_STAGES)


def _synthetic(args: tuple, fmt: WeightFormat, generator: torch.Generator) -> tuple:
    # real random tensors of the call's shapes and dtypes, drawn from a private generator, so that a
    # benchmark never depends on, nor touches, the caller's data or random streams
    def like(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if t.dtype in (torch.int8, torch.uint8):
            lo, hi = (-127, 128) if t.dtype == torch.int8 else (0, 256)
            return torch.randint(lo, hi, tuple(t.shape), dtype=t.dtype, device=t.device, generator=generator)
        return torch.rand(tuple(t.shape), dtype=t.dtype, device=t.device, generator=generator) * 0.01 + 0.001
    real = [like(t) for t in args]
    if fmt.blocks is not None:  # GGUF block parameters: random bytes, but finite fp16 d (and dmin) in front
        rows = real[2].view(real[2].shape[0], -1, fmt.blocks.param_bytes)
        count = fmt.blocks.header_bytes // 2
        d = torch.rand((*rows.shape[:2], count), device=rows.device, generator=generator) * 0.01 + 0.001
        rows[..., :2 * count] = d.to(torch.float16).view(torch.uint8)
    return tuple(real)


def benchmark(args: tuple, fmt: WeightFormat, configs: list[KernelConfig]) -> dict[KernelConfig, float]:
    """Median milliseconds of each config (triton.testing.do_bench) on synthetic tensors shaped like
    args = (x, qweight, scale, zero, bias); configs that fail to compile or run are left out."""
    generator = torch.Generator(device=args[0].device).manual_seed(0)
    real = _synthetic(args, fmt, generator)
    times = {}
    for config in configs:
        config = fit(config, real[0].shape[0])
        try:
            times[config] = triton.testing.do_bench(lambda: run(*real, fmt, config), warmup=10, rep=40,
                                                    return_mode="median")
        except Exception as e:  # e.g. out of shared memory on a smaller GPU: not a candidate
            warnings.warn(f"quantrt tuning: {fmt.name} {config} failed: {type(e).__name__}: {e}")
    return times


def validate(args: tuple, fmt: WeightFormat, config: KernelConfig) -> float:
    """The relative L2 error of `config` against the dequantize path on synthetic tensors like args."""
    generator = torch.Generator(device=args[0].device).manual_seed(1)
    real = _synthetic(args, fmt, generator)
    y = run(*real, fmt, config).double()
    ref = run(*real, fmt, DEQUANT_CONFIG).double()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def tuning_allowed(x: torch.Tensor) -> bool:
    """Whether a call may benchmark: not while torch.compile traces (fake tensors) and not while a CUDA
    graph is being captured."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(x) or torch.compiler.is_compiling():
        return False
    return not torch.cuda.is_current_stream_capturing()


def table_key(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, fmt: WeightFormat) -> str:
    """The tuning-table key of a call."""
    m, k = int(x.shape[0]), int(x.shape[1])
    return tuning.make_key(torch.cuda.get_device_name(x.device), SOURCE_HASH,
                           f"{fmt.name}/{str(x.dtype).removeprefix('torch.')}", qweight.shape[0], k,
                           group_size_of(fmt, k, scale), m)


def select_config(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  bias: torch.Tensor | None, fmt: WeightFormat) -> KernelConfig:
    """The config of a call: the tuning table's pick; on a miss on CUDA (eager, not capturing) the fastest
    of `candidates` that validates, persisted; `heuristic` off CUDA, with QUANTRT_AUTOTUNE=0, and on a
    miss while tracing or capturing (then nothing is benchmarked). A symbolic M (torch.compile with dynamic
    shapes) is specialized: the config depends on it."""
    m, k = int(x.shape[0]), int(x.shape[1])
    n = qweight.shape[0]
    group_size = group_size_of(fmt, k, scale)
    if x.device.type != "cuda" or os.environ.get("QUANTRT_AUTOTUNE", "1") == "0":
        return heuristic(fmt, m, n, k, group_size, x.device)
    key = table_key(x, qweight, scale, fmt)
    table = tuning.default_table()
    picked = table.get(key)
    if picked is not None:
        try:
            return fit(KernelConfig.from_dict(picked), m)
        except (TypeError, ValueError):
            warnings.warn(f"quantrt tuning: ignoring the malformed entry {key!r} of {table.path}")
    if not tuning_allowed(x):
        return heuristic(fmt, m, n, k, group_size, x.device)
    args = (x, qweight, scale, zero, bias)
    smem = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
    try:
        times = benchmark(args, fmt, candidates(fmt, m, n, k, group_size, smem))
    except Exception as e:  # tuning must never break a forward
        warnings.warn(f"quantrt tuning: benchmarking failed ({type(e).__name__}: {e})")
        times = {}
    for config in sorted(times, key=times.get):
        error = validate(args, fmt, config) if config.path != "dequant" else 0.0
        if error <= VALIDATION_TOLERANCE[x.dtype]:
            table.put(key, config.to_dict())
            return config
        warnings.warn(f"quantrt tuning: {fmt.name} {config} is off by {error:.2e} (relative) against the "
                      f"dequantize path on M={m}, N={n}, K={k}; not used")
    warnings.warn(f"quantrt tuning: no {fmt.name} config ran for M={m}, N={n}, K={k}; using the heuristic")
    return heuristic(fmt, m, n, k, group_size, x.device)


def matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None, fmt: WeightFormat, path: str | None = None,
           config: KernelConfig | None = None) -> torch.Tensor:
    """x [M, K] -> x @ dequant(W)^T + bias, [M, N] in x.dtype. `path` forces "gemv", "gemm" or "dequant"
    with its heuristic config, `config` one config; neither: `select_config`."""
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {', '.join(PATHS)}")
    if x.shape[1] > 1 and x.stride(1) != 1:  # the kernels read x contiguous along K
        x = x.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if config is None:
        if path is None:
            config = select_config(x, qweight, scale, zero, bias, fmt)
        else:
            m, k = int(x.shape[0]), int(x.shape[1])
            config = heuristic(fmt, m, qweight.shape[0], k, group_size_of(fmt, k, scale), x.device, path)
    return run(x, qweight, scale, zero, bias, fmt, fit(config, int(x.shape[0])))
