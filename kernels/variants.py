"""Every kernel variant the tuner can pick, compiled ahead of use: for the code-generation checks of CI
(compiled for sm_90 through a stub driver, no GPU) and for warming Triton's cache on a GPU machine before
a check or a benchmark (`compile_all`).

A variant is one (format, path, activation dtype, config) on a representative problem: N = K = 3072
(N, K and the strides divisible by 16, as in every real model, so that Triton's specialisation and thus
the compiled code are the real calls'), M = 1, 16, 64 for the gemv path and 4608 for gemm and dequant,
uintX in groups of 64, int4 also in 128 (int4wo's default), int8, fpX and fp8 per channel, and every GGUF block type (its
groups are its own). bf16 variants cover every config of `autotune.candidates`; fp16 ones the heuristic's configs (the
code differs only in conversions).

    python -m quantrt.kernels.variants [--target sm90 | --device cuda] [--processes N] [--json FILE] [--gguf-subset]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from . import autotune
from .formats import FLOATX, GGUF, INT8, UINTX, WeightFormat
from .matmul import KernelConfig, fit
from .packing import GGUF_BLOCKS

N = K = 3072
GEMV_MS = (1, 16, 64)
LARGE_M = 4608
# (format, group size): uintX in groups of 64 (uintXwo's default), int4 also in int4wo's 128; 0 is one
# scale per row (int8wo, fpX, fp8)
FORMATS = ([(WeightFormat(INT8, 8), 0)] + [(WeightFormat(UINTX, b), 64) for b in range(1, 8)]
           + [(WeightFormat(UINTX, 4), 128)]
           + [(WeightFormat(FLOATX, *bits), 0) for bits in ((3, 1, 1), (4, 2, 1), (5, 2, 2), (6, 3, 2), (7, 3, 3),
                                                             (8, 4, 3), (8, 5, 2))]
           + [(WeightFormat(GGUF, blocks.bits, gguf=name), blocks.group) for name, blocks in GGUF_BLOCKS.items()])
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# the GGUF block type whose every variant `variants(gguf_subset=True)` keeps: FLUX's most common GGUF files' type
GGUF_CHECKED = "q4_k"
SM_COUNT = 132  # an H100 SXM's, for the heuristic's grid (the config, not the code, depends on it)


@dataclass(frozen=True)
class Variant:
    fmt: WeightFormat
    group_size: int  # 0: one scale per row
    dtype: str
    m: int
    config: KernelConfig

    @property
    def format_name(self) -> str:
        if self.fmt.kind == GGUF:  # its groups are the block type's
            return self.fmt.name
        return self.fmt.name + (f"-g{self.group_size}" if self.group_size else "")

    @property
    def name(self) -> str:
        c = self.config
        tile = f"{c.block_m}x{c.block_n}x{c.block_k}" if c.path != "dequant" else f"{c.block_n}x{c.block_k}"
        return f"{self.format_name}/{self.dtype}/{c.path}/M{self.m}/{tile}/w{c.num_warps}s{c.num_stages}"

    def launch(self, device: torch.device | str = "cpu"):
        """(kernel, grid, arguments, constexprs) of this variant on empty tensors of its shapes."""
        from . import matmul

        dtype = DTYPES[self.dtype]
        fmt, k = self.fmt, K
        if fmt.kind == INT8 or (fmt.kind == GGUF and fmt.blocks.signed_codes):
            qweight = torch.empty(N, k, dtype=torch.int8, device=device)
        else:
            qweight = torch.empty(N, k * fmt.bits // 8, dtype=torch.uint8, device=device)
        if fmt.kind == GGUF:  # the block parameters stand where the scale does
            scale = torch.empty(N, k // fmt.blocks.block * fmt.blocks.param_bytes, dtype=torch.uint8, device=device)
        else:
            scale = torch.empty(N, k // self.group_size if self.group_size else 1, dtype=dtype, device=device)
        zero = scale if fmt.has_zero else None
        if self.config.path == "dequant":
            out = torch.empty(N, k, dtype=dtype, device=device)
            grid, args, constexprs = matmul.dequantize_launch(qweight, scale, zero, fmt, out, self.config)
            return matmul._dequantize_kernel, grid, args, self._for_target(constexprs, device)
        x = torch.empty(self.m, k, dtype=dtype, device=device)
        out = torch.empty(self.m, N, dtype=dtype, device=device)
        bias = torch.empty(N, dtype=dtype, device=device)
        grid, args, constexprs = matmul.matmul_launch(x, qweight, scale, zero, bias, fmt, self.config, out)
        return matmul._matmul_kernel, grid, args, self._for_target(constexprs, device)

    def _for_target(self, constexprs: dict, device: torch.device | str) -> dict:
        # CPU tensors stand for sm_90 ones (the stub driver's target), where fp8 decodes in hardware
        if torch.device(device).type == "cpu":
            constexprs = dict(constexprs, NATIVE_FP8=self.fmt.kind == FLOATX and self.fmt.bits == 8)
        return constexprs


def _heuristic_configs(fmt: WeightFormat, m: int, group_size: int) -> list[KernelConfig]:
    cuda = torch.device("cuda")
    return [autotune.heuristic(fmt, m, N, K, group_size, cuda, path, sms=SM_COUNT)
            for path in (["gemv"] if m <= 64 else ["gemm", "dequant"])]


def variants(gguf_subset: bool = False) -> list[Variant]:
    """Every variant the tuner can pick (see the module's docstring), without duplicates. `gguf_subset`: of the
    GGUF block types only GGUF_CHECKED's every variant, and the others' bf16 heuristic configs (their code
    differs from GGUF_CHECKED's in the constexprs of their code planes and block parameters): what the CI check
    compiles, to keep it short."""
    found: dict[str, Variant] = {}
    for fmt, group_size in FORMATS:
        subset = gguf_subset and fmt.kind == GGUF and fmt.gguf != GGUF_CHECKED
        for m in (*GEMV_MS, LARGE_M):
            configs = autotune.candidates(fmt, m, N, K, group_size, shared_memory=227 * 1024)
            if m == LARGE_M:  # the gemv configs of the small M buckets are the gemv path's
                configs = [c for c in configs if c.path != "gemv"]
            elif m > 1:
                configs = [c for c in configs if c.path == "gemv"]
            heuristic = _heuristic_configs(fmt, m, group_size)
            chosen_by_dtype = (("bfloat16", heuristic),) if subset else (("bfloat16", configs), ("float16", heuristic))
            for dtype, chosen in chosen_by_dtype:
                for config in chosen:
                    variant = Variant(fmt, group_size, dtype, m, fit(config, m))
                    found.setdefault(variant.name, variant)
    return list(found.values())


def _compile(variant: Variant, device: str | None) -> dict:
    from . import codegen

    start = time.perf_counter()
    kernel, grid, args, constexprs = variant.launch(device or "cpu")
    try:
        compiled = kernel.warmup(*args, grid=(1,), **constexprs)
        report = codegen.analyze(compiled).to_dict()
        error = None
    except Exception as e:  # reported per variant, never fatal to the others
        report, error = {}, f"{type(e).__name__}: {e}"
    return {"variant": variant.name, "path": variant.config.path, "block_m": variant.config.block_m,
            "seconds": time.perf_counter() - start, "error": error, **report}


def _compile_many(names: list[str], device: str | None) -> list[dict]:
    from . import codegen

    by_name = {v.name: v for v in variants()}  # the subset's names are among these
    with codegen.target_driver() if device is None else contextlib.nullcontext():
        return [_compile(by_name[name], device) for name in names]


def compile_all(device: str | None = None, processes: int | None = None, gguf_subset: bool = False) -> list[dict]:
    """Compile every variant in parallel, one dict per variant: its name, path, seconds, error (None when
    it compiled) and the codegen report. device None: for sm_90 through the stub driver (no GPU needed,
    TRITON_INTERPRET must be unset); "cuda": for the machine's GPU, which also fills Triton's cache."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1): unset it to compile them")
    names = [v.name for v in variants(gguf_subset)]
    processes = max(1, min(processes or os.cpu_count() or 1, len(names)))
    chunks = [names[i::processes] for i in range(processes)]
    if processes == 1:
        return _compile_many(names, device)
    import multiprocessing

    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = pool.map(_compile_many, chunks, [device] * len(chunks))
    return sorted((r for chunk in results for r in chunk), key=lambda r: r["variant"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantrt.kernels.variants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda"], help="compile for this machine's GPU (default: sm_90 "
                        "through a stub driver, no GPU needed)")
    parser.add_argument("--processes", type=int, default=None, help="parallel compilers (default: all cores)")
    parser.add_argument("--json", help="write the reports to this file")
    parser.add_argument("--gguf-subset", action="store_true", help=f"of the GGUF block types, every variant of "
                        f"{GGUF_CHECKED} and the others' bf16 heuristic configs only (the CI check)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    reports = compile_all(args.device, args.processes, args.gguf_subset)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    failed = [r for r in reports if r["error"]]
    print(f"{len(reports)} variants compiled in {time.perf_counter() - start:.1f} s, {len(failed)} failed")
    for r in failed:
        print(f"  {r['variant']}: {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
