"""sm_90 code generation of every kernel variant the tuner can pick, checked on a machine without a GPU
(kernels/codegen.py, kernels/variants.py): no spills; on the small-M path at most 128 registers and,
for GEMV and dequantize tiles, weight loads as wide as a thread's share of the tile (16 bytes wherever
the tile holds that many: every int8, int4 and fp8 tile); on the tl.dot paths pipelined copies
(cp.async) of x and of the weights; on the large-M path wgmma with waits that are not all pendings=0.

The variants compile once, in a subprocess without TRITON_INTERPRET (the interpreter replaces the
kernels), on every core; each test reads its variant's report, so a failure names the variant. Of the GGUF
block types, Q4_K's every variant and the others' bf16 heuristic configs (`variants(gguf_subset=True)`), to keep
the run short; `python -m quantrt.kernels.variants` compiles them all."""

import json
import os
import subprocess
import sys

import pytest

from quantrt.kernels.packing import plane_widths
from quantrt.kernels.variants import GGUF_CHECKED, Variant, variants

VARIANTS = variants(gguf_subset=True)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("codegen") / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "quantrt.kernels.variants", "--processes", str(os.cpu_count() or 1),
                           "--json", str(out), "--gguf-subset"], env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), done.stdout + done.stderr
    return {r["variant"]: r for r in json.loads(out.read_text())}


def widest_plane_bytes_per_thread(v: Variant) -> int:
    """Bytes of the widest bit plane of the weight tile that one thread holds: what one thread can load
    in one instruction, at most 16."""
    c = v.config
    widest = 8 if v.fmt.bits == 8 else max(plane_widths(v.fmt.bits))
    return min(16, c.block_n * c.block_k * widest // 8 // (32 * c.num_warps))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_sm90_code(reports, variant):
    r = reports[variant.name]
    assert r["error"] is None, r["error"]
    assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, f"spills: {r}"
    path, block_m = variant.config.path, variant.config.block_m
    if path == "gemv":
        assert r["registers"] <= 128, f"{r['registers']} registers"
    if (path == "gemv" and block_m == 1) or path == "dequant":
        # weights read straight into registers, evict-first, as wide as the tile lets a thread read
        assert r["weight_load_bytes"] and max(r["weight_load_bytes"]) == widest_plane_bytes_per_thread(variant)
    else:
        # tl.dot paths: x (and the weights, where the tile holds 4 bytes a thread) copied into shared
        # memory by the software pipeline (cp.async); Triton copies int8/fp8 tiles 8 bytes at a time
        assert r["async_copies"] > 0, "no pipelined copies"
        weight_bytes = r["weight_copy_bytes"] + r["weight_load_bytes"]
        assert weight_bytes and max(weight_bytes) >= min(8, widest_plane_bytes_per_thread(variant))
        if widest_plane_bytes_per_thread(variant) >= 4:
            assert r["weight_copy_bytes"], "weights not pipelined"
    if path == "gemm":
        assert r["wgmma"] > 0, "no wgmma"
        assert any(p > 0 for p in r["wgmma_wait_pendings"]), f"every wgmma wait is pendings=0: {r['wgmma_wait_pendings']}"


def test_every_format_path_and_dtype_is_covered():
    covered = {(v.format_name, v.config.path, v.dtype) for v in VARIANTS}
    formats = {v.format_name for v in VARIANTS}
    gguf = {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}
    assert len(formats) == 26 and "uint4-g128" in formats and gguf <= formats
    dtypes = {f: ("bfloat16",) if f in gguf - {GGUF_CHECKED} else ("bfloat16", "float16") for f in formats}
    assert covered == {(f, p, d) for f in formats for p in ("gemv", "gemm", "dequant") for d in dtypes[f]}
    # the subset leaves out only GGUF variants, and none of GGUF_CHECKED's
    every = {v.name: v for v in variants()}
    left_out = set(every) - {v.name for v in VARIANTS}
    assert left_out and all(every[name].fmt.gguf not in ("", GGUF_CHECKED) for name in left_out)
