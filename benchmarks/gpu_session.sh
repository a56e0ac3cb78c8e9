#!/usr/bin/env bash
# quantrt on a lent GPU machine (H100/H200, torch 2.11, triton 3.6, no internet), as a few device calls of
# at most 10 minutes each. The order of the steps is their order of value; benchmarks/GPU_SESSION.md says which
# call runs which steps, what to read in each output and what to commit.
#
#   bash benchmarks/gpu_session.sh STEP [STEP ...]     run the steps in order, in one call
#   bash benchmarks/gpu_session.sh --help              the steps and their estimated durations
#
# Every step first installs the carried wheels (.whl/, see /work/shared/gpu/README.md) and the project into
# /tmp/site (skipped when this machine already has them). Each step runs under `timeout`: at most
# GPU_SESSION_STEP_LIMIT_S (560 s) and never past the call's deadline, GPU_SESSION_BUDGET_S (575 s) after the
# script started, which leaves the device tool's 600 s limit room to copy the results. A step that no longer
# fits is skipped and says so. Results go to benchmarks/results/ and, where the device tool sets $OUT, are
# copied there too (flat; a tarball when more than 8 files), since only $OUT comes back.
# Without a CUDA GPU (or with GPU_SESSION_DRY_RUN=1) nothing runs: each step prints what it would run, checks
# that the benchmarks accept its arguments, and the script exits 0. For testing the script itself on a CPU
# machine: GPU_SESSION_ASSUME_GPU=1 runs the steps anyway (the benchmarks then fall back to their CPU smoke
# runs or refuse), GPU_SESSION_RESULTS=DIR and GPU_SESSION_SITE=DIR keep results and installs out of the tree.
#
# Durations, estimated from the code (nothing here has run on a GPU yet). Units: a timed point of
# `bench kernels` = 2 warm passes + CUDA-graph capture + do_bench(warmup 25 ms, rep 100 ms, L2 flushed per
# replay) + one fp32 reference matmul, about 0.3 s; a quantrt tuning miss = every pruned candidate through
# do_bench(warmup 10, rep 40), about 24 x 70 ms = 1.7 s for M <= 64 and 8 x 90 ms = 0.7 s from M 128; a Triton
# compile 1-2 s, about 34 per format (splitk: 6 tiles x BLOCK_M {1, 16} x split {1, >1}; gemm: 7 tiles;
# dequant, reduce); a gemlite autotune miss = about 25 configs x do_bench(25, 100) = 4 s, plus 1-2 s per
# config compiled the first time (about 150 for int4 + int8); process start (imports, the 1 GiB copy and
# 8192^3 matmul of the roofline) about 25 s.
#   setup             pip installs (~10 MB of wheels, the project), versions, `quantrt info`        0.5-1 min
#   verify            gpu_verify --quick --skip-timing: parity 6 formats x bf16/fp16 x 2 shapes x
#                     M {1,7,33,1024} x paths = 240 cases (~84 compiles: 1.5-3 min) + 6 torch.compile
#                     (max-autotune) checks with graph breaks, 25-45 s each (2.5-4.5 min)           4-7.5 min
#   kernels-targets   int4wo,int8wo x 8192x28672,16384x16384,8192x8192 x M {1,2,4,8,16,1024,4096}
#                     x bf16/quantrt/torchao/quanto: 147 points (45 s) + 42 tuning misses (60 s)
#                     + ~70 compiles (70-140 s) + start and weight copies (40 s)                     3.5-5 min
#   kernels-flux      the same on the 6 FLUX shapes: 294 points (90 s) + 84 misses (120 s)
#                     + compiles (70-140 s) + start and up to 22 weight copies per provider (50 s)   5.5-7 min
#   kernels-gemlite   gemlite against bf16, int4wo,int8wo x the 3 target shapes x M {1,4,16,1024,
#                     4096}: 45 points (15 s) + 30 autotune misses (120 s) + ~150 compiles (150-300 s) 5-7.5 min
#   verify-formats    gpu_verify parity of the 12 formats --quick leaves out, bf16/fp16, quick
#                     shapes and M: 480 cases + ~170 compiles                                        3.5-6.5 min
#   kernels-all-1..4  the 14 other formats, 4+4+3+3 per call, x 8192x28672,16384x16384 x M {1,16,
#                     1024,4096} x quantrt/torchao/quanto: per format ~34 compiles (35-70 s) + 8 misses
#                     (10 s) + ~25 points (8 s); parts 1 and 2 first build quanto's CUDA extension
#                     (Marlin/AWQ, ninja: 1-2 min)                                        all-1/-2: 5-8.5, all-3/-4: 3-5 min
#   compile           bench compile: FLUX tiny whole + regional (fresh cold and warm processes, 1-1.5 min
#                     each pair) and FLUX full regional (build 12B + quantize + regional compile with
#                     tuning: 2-3.5 min cold, 1 min warm)                                             5-8 min
#   compile-full      bench compile: FLUX full whole-model max-autotune, cold then warm (one graph of
#                     57 blocks: 3-8 min cold, 1-2 min warm); a time-out is itself the finding      5-10 min
#   model             bench model, FLUX full at 1024x1024, regional max-autotune, no autoquant: bf16
#                     (build, 11 eager forwards, bf16 matmul autotuning 2-4 min) + int8wo via quantrt
#                     (quantize, tuning 0.5-1 min, compile 1-1.5 min)                               5-8 min
#   model-int4        the same with int4wo via quantrt                                                5-8 min
#   model-torchao     the same with int8wo and int4wo via torchao (lowest value; may be cut short:
#                     the CSV keeps every finished row)                                               6-9.5 min
# Whole steps that would not fit in 9.5 minutes at their upper estimate were split into the parts above.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RESULTS=${GPU_SESSION_RESULTS:-benchmarks/results}
SITE=${GPU_SESSION_SITE:-/tmp/site}
STEP_LIMIT_S=${GPU_SESSION_STEP_LIMIT_S:-560}
BUDGET_S=${GPU_SESSION_BUDGET_S:-575}
KILL_AFTER_S=10
EXPORT_RESERVE_S=5  # copying the results into $OUT
MIN_STEP_S=60       # a step with less time left than this is skipped
STARTED=$(date +%s)
DEADLINE=$((STARTED + BUDGET_S))
STAMP=$(date -u +%Y-%m-%d-%H%M%S)
MARKER=$(mktemp)    # files in $RESULTS newer than this were written by this call
STEP_MARKER=$(mktemp)  # ... and newer than this, by the current step

TARGET_SHAPES=8192x28672,16384x16384,8192x8192
ISSUE_SHAPES=8192x28672,16384x16384
TARGET_MS=1,2,4,8,16,1024,4096
STEPS="setup verify kernels-targets kernels-flux kernels-gemlite verify-formats kernels-all-1 kernels-all-2"
STEPS+=" kernels-all-3 kernels-all-4 compile compile-full model model-int4 model-torchao"
EXPECTED_WHEELS="torchao optimum_quanto diffusers importlib_metadata lazy_importer gemlite"

export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_VERBOSITY=error
# TRITON_CACHE_DIR stays unset: quantrt's compile cache then keeps Triton's files per entry, so that the
# cold runs of `bench compile` are cold.

SUMMARY=()
FAILED_STEPS=0
CUDA=
ENV_READY=
GPU_LABEL=nogpu
QUANTRT=(quantrt)

usage() {
    sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    echo "steps: $STEPS"
}

say() { printf '\n=== %s\n' "$*"; }

seconds_left() { echo $((DEADLINE - $(date +%s))); }

have_cuda() {
    if [[ -z "$CUDA" ]]; then
        CUDA=no
        if [[ "${GPU_SESSION_ASSUME_GPU:-0}" == 1 ]]; then
            CUDA=yes
            GPU_LABEL=assumed_gpu
        elif [[ "${GPU_SESSION_DRY_RUN:-0}" != 1 ]] && command -v nvidia-smi >/dev/null 2>&1 \
            && python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
            CUDA=yes
            GPU_LABEL=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 \
                | sed -E 's/[^A-Za-z0-9.]+/_/g; s/^_+//; s/_+$//')
        fi
    fi
    [[ "$CUDA" == yes ]]
}

gpu_state() {
    nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu,temperature.gpu,clocks.sm,clocks.max.sm,power.draw,driver_version \
        --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /' || true
}

check_wheels() {
    # one wheel per expected distribution: two versions of one stop the whole install
    local missing=0 name count
    if [[ ! -d .whl ]]; then
        echo "no .whl/ here: run ../shared/gpu/fetch-wheels.sh in the project root on the build machine and name"
        echo ".whl in the run tool's carry"
        return 1
    fi
    for name in $EXPECTED_WHEELS; do
        count=$(find .whl -maxdepth 1 -name "${name}-*.whl" | wc -l)
        if [[ "$count" != 1 ]]; then
            echo ".whl/ has $count wheels of $name (want exactly 1)"
            missing=1
        fi
    done
    ls -1 .whl
    return $missing
}

install_project() {
    # a plain (not editable) install: quantrt maps runtime/ and kernels/ onto one package, which a bare
    # PYTHONPATH cannot express; if the image's setuptools cannot build it, the same layout is copied by hand
    if python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
        --target "$SITE" . ; then
        return 0
    fi
    echo "pip could not build the project; copying runtime/ and kernels/ into $SITE/quantrt instead"
    rm -rf "$SITE/quantrt"
    mkdir -p "$SITE/quantrt"
    cp -r runtime/. "$SITE/quantrt/"
    rm -rf "$SITE/quantrt/kernels"
    cp -r kernels "$SITE/quantrt/kernels"
}

ensure_env() {
    local ready="$SITE/.gpu_session_ready" begin
    [[ -n "$ENV_READY" ]] && return 0
    ENV_READY=1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
    if ! have_cuda; then
        echo "would install: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl"
        echo "would install: python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target $SITE ."
        echo "  (fallback: runtime/ and kernels/ copied to $SITE/quantrt)"
        check_wheels || echo "WARNING: the wheels above are not what the GPU machine needs"
        return 0
    fi
    if [[ -f "$ready" ]]; then
        echo "environment: $SITE already installed on this machine"
    else
        begin=$(date +%s)
        # without the wheels quantrt's own kernels still run: the peers' rows then say "not installed"
        check_wheels || echo "WARNING: peers (torchao, quanto, gemlite) and diffusers (FLUX) will be missing"
        if compgen -G ".whl/*.whl" >/dev/null; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" .whl/*.whl
        fi
        install_project
        touch "$ready"
        echo "environment: installed into $SITE in $(($(date +%s) - begin)) s"
    fi
    command -v quantrt >/dev/null 2>&1 || QUANTRT=(python3 -m quantrt.cli)
    if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then  # quanto builds its CUDA extension for this GPU only
        TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 || true)
        if [[ -n "$TORCH_CUDA_ARCH_LIST" ]]; then export TORCH_CUDA_ARCH_LIST; else unset TORCH_CUDA_ARCH_LIST; fi
    fi
}

report_versions() {
    python3 - <<'EOF'
import importlib, importlib.metadata as md, platform
import torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}), triton {triton.__version__}")
for dist in ("quantrt", "torchao", "optimum-quanto", "diffusers", "gemlite", "transformers", "accelerate",
             "safetensors", "numpy", "matplotlib", "setuptools"):
    try:
        print(f"  {dist:15s} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist:15s} NOT INSTALLED")
for module in ("quantrt", "torchao", "optimum.quanto", "diffusers", "gemlite"):
    try:
        importlib.import_module(module)
        print(f"  import {module}: ok")
    except Exception as e:  # a broken peer turns its benchmark rows into skips: say why up front
        print(f"  import {module}: FAILED {type(e).__name__}: {e}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, capability "
          f"{p.major}.{p.minor}, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
EOF
}

check_args() {
    # what the benchmarks would reject, caught here without a GPU: argparse, then each benchmark's own checks
    python3 - "$@" <<'EOF'
import sys

kind, argv = sys.argv[1], sys.argv[2:]
if kind == "verify":
    sys.path.insert(0, "benchmarks")
    import gpu_verify

    args = gpu_verify.parse_args(argv)
    print(f"  arguments ok: gpu_verify quick={args.quick} skip_compile={args.skip_compile} "
          f"skip_timing={args.skip_timing}")
    sys.exit(0)
from quantrt.cli import build_parser

args = build_parser(bench_arguments=True).parse_args(argv)
if args.benchmark == "kernels":
    from quantrt.bench_kernels import make_plan

    plan = make_plan(args, smoke=False)
    points = len(plan.shapes) * len(plan.ms) * (1 + len(plan.formats) * len(plan.providers))
    print(f"  arguments ok: {len(plan.formats)} formats x {len(plan.shapes)} shapes x {len(plan.ms)} M x "
          f"{len(plan.providers)} providers + bf16 = {points} rows")
elif args.benchmark == "model":
    from quantrt.bench_model import MODELS, PROVIDERS, _names
    from quantrt.schemes import resolve_scheme

    models, providers = _names(args.models, MODELS, "models"), _names(args.providers, PROVIDERS, "providers")
    schemes = [resolve_scheme(s).name for s in args.schemes.split(",")]
    print(f"  arguments ok: models {models}, schemes {schemes}, providers {providers}, regional={args.regional}, "
          f"autoquant={args.autoquant}")
elif args.benchmark == "compile":
    from quantrt.models import FLUX_TOKENS

    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in FLUX_TOKENS]
    if unknown:
        sys.exit(f"--sizes: {unknown} not in {list(FLUX_TOKENS)}")
    print(f"  arguments ok: sizes {sizes}, regional={args.regional}, scheme {args.scheme}, mode {args.mode}")
else:
    sys.exit(f"check_args: no check for {argv}")
EOF
}

export_results() {
    # only $OUT comes back: at most 8 files, 16 MiB each, named in [A-Za-z0-9._-]
    local files=() file names=() count
    mapfile -t files < <(find "$RESULTS" -maxdepth 1 -type f -newer "$MARKER" | sort)
    if [[ -z "${OUT:-}" || ! -d "${OUT:-}" ]]; then
        return 0
    fi
    count=${#files[@]}
    if ((count == 0)); then
        return 0
    fi
    find "$OUT" -maxdepth 1 -type f -delete  # this call's earlier copies: $OUT holds only what this script put there
    if ((count <= 8)); then
        for file in "${files[@]}"; do
            if (($(stat -c %s "$file") > 15 * 1024 * 1024)); then
                gzip -c "$file" >"$OUT/$(basename "$file").gz"
            else
                cp "$file" "$OUT/"
            fi
        done
    else
        for file in "${files[@]}"; do names+=("$(basename "$file")"); done
        tar -czf "$OUT/$STAMP-$GPU_LABEL-results.tar.gz" -C "$RESULTS" "${names[@]}"
        count=1
        for file in "${files[@]}"; do  # the markdown reports beside the tarball, readable at once
            if [[ "$file" == *.md ]] && ((count < 8)); then
                cp "$file" "$OUT/"
                count=$((count + 1))
            fi
        done
    fi
}

show_report() {
    # the parts of a markdown report worth reading in the call's output (the whole file comes back)
    local file=$1
    echo "--- $file"
    awk '
        /^## / { keep = ($0 ~ /Speed targets|^## Targets|^## Results|Speed-up over bf16|Parity with|torch.compile|Timing/) }
        /^### Failures/ { keep = 1 }
        /^Total:/ { print; next }
        keep { print; next }
        /^\|/ && FILENAME ~ /-compile(-cpu-smoke)?\.md$/ { print }
    ' "$file" | head -n 80
}

summarize_partial() {
    # a run cut short leaves its CSV (one row per finished point) but no markdown: the targets from the CSV
    local kind=$1 csv=$2
    echo "--- $csv (the run was cut short: targets from the rows it finished)"
    python3 - "$kind" "$csv" <<'EOF' || true
import csv, dataclasses, sys

kind, path = sys.argv[1], sys.argv[2]
if kind == "kernels":
    from quantrt import bench_kernels as bench
else:
    from quantrt import bench_model as bench
from quantrt.transformer import format_table

types = {f.name: str(f.type) for f in dataclasses.fields(bench.Row)}


def value(text: str, annotation: str):
    if annotation == "str":
        return text
    if annotation == "int":
        return int(text) if text else 0
    return float(text) if text else None


with open(path, newline="") as f:
    rows = [bench.Row(**{k: value(v, types[k]) for k, v in r.items()}) for r in csv.DictReader(f)]
targets = bench.check_targets(rows)
print(f"{len(rows)} rows")
print(format_table(["target", "status", "detail"], [[t.target, t.status, t.detail] for t in targets]))
if kind == "kernels":
    print(format_table(*bench.speedup_pivot(rows, sorted({r.m for r in rows}))))
else:
    print(format_table(bench.TABLE_HEADERS, [bench._table_row(r) for r in rows]))
EOF
}

run_cmd() {
    # run_cmd STEP KIND CMD...: KIND (verify, kernels, model, compile, other) says how to check the
    # arguments without a GPU and how to summarize a run cut short; RUN_CAP_S=N caps this command lower
    local step=$1 kind=$2 left limit rc=0 begin log csv arg check=() cap=${RUN_CAP_S:-$STEP_LIMIT_S}
    shift 2
    if ! have_cuda; then
        echo "would run: timeout $cap $*"
        for arg in "$@"; do  # gpu_verify's options (from the first --), or `bench NAME ...` of quantrt's CLI
            if ((${#check[@]})) || [[ $kind == verify && $arg == --* ]] || [[ $kind != verify && $arg == bench ]]; then
                check+=("$arg")
            fi
        done
        case "$kind" in
            verify | kernels | model | compile) check_args "$kind" "${check[@]}" ;;
        esac
        return 0
    fi
    left=$(($(seconds_left) - KILL_AFTER_S - EXPORT_RESERVE_S))
    limit=$((left < cap ? left : cap))
    if ((limit < MIN_STEP_S)); then
        echo "SKIPPED: $(seconds_left) s left before this call's deadline; run '$step' in a call of its own"
        SUMMARY+=("$step: SKIPPED, too little time left in this call")
        return 0
    fi
    log="$RESULTS/$STAMP-$GPU_LABEL-session-$step.log"
    gpu_state | tee -a "$log"
    echo "+ timeout $limit $*" | tee -a "$log"
    begin=$(date +%s)
    timeout --kill-after=$KILL_AFTER_S "$limit" "$@" 2>&1 | tee -a "$log" || rc=$?
    local seconds=$(($(date +%s) - begin)) status
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMED OUT after $seconds s (limit $limit s)" ;;
        1) status="finished with failures (rc 1)" ;;
        *) status="FAILED (rc $rc)" ;;
    esac
    echo "$step: $status, $seconds s; log $log" | tee -a "$log"
    SUMMARY+=("$step: $status, $seconds s")
    [[ $rc == 0 ]] || FAILED_STEPS=$((FAILED_STEPS + 1))
    if [[ $rc == 124 || $rc == 137 ]] && [[ $kind == kernels || $kind == model ]]; then
        while read -r csv; do
            [[ -f "${csv%.csv}.md" ]] || summarize_partial "$kind" "$csv"
        done < <(find "$RESULTS" -maxdepth 1 -name "*-$kind*.csv" -newer "$STEP_MARKER" | sort)
    fi
    export_results
}

prebuild_quanto() {
    # quanto compiles its CUDA extension (AWQ, Marlin) with ninja on first use; built here it is timed and
    # logged on its own instead of inside the first quanto point
    RUN_CAP_S=300 run_cmd "$1-quanto-build" other python3 -c "
import time
start = time.perf_counter()
from optimum.quanto.library.extensions import get_extension
get_extension('quanto_cuda').lib
print(f'quanto_cuda extension ready in {time.perf_counter() - start:.0f} s')"
}

bench_kernels() {
    local step=$1
    shift
    run_cmd "$step" kernels "${QUANTRT[@]}" bench kernels --out-dir "$RESULTS" "$@"
}

bench_model() {
    local step=$1
    shift
    run_cmd "$step" model "${QUANTRT[@]}" bench model --models flux --flux-size full --regional --no-autoquant \
        --out-dir "$RESULTS" "$@"
}

# gpu_verify's parity over the formats its --quick list leaves out (its own code, another format list)
VERIFY_FORMATS_PY='
import sys
sys.path.insert(0, "benchmarks")
import gpu_verify
quick = set(gpu_verify.QUICK_SCHEMES)
gpu_verify.QUICK_SCHEMES = [s for s in gpu_verify.FULL_SCHEMES if s not in quick]
print("formats:", ", ".join(gpu_verify._label(*s) for s in gpu_verify.QUICK_SCHEMES), flush=True)
sys.argv = ["benchmarks/gpu_verify.py", *sys.argv[1:]]
sys.exit(gpu_verify.main(sys.argv[1:]))
'

step() {
    local name=$1 rc=0
    say "$name ($(($(date +%s) - STARTED)) s into this call, $(seconds_left) s before its deadline)"
    touch "$STEP_MARKER"
    ensure_env
    case "$name" in
        setup)
            if ! have_cuda; then
                echo "no CUDA GPU here: setup would install the above, print versions and run 'quantrt info'"
                return 0
            fi
            local log="$RESULTS/$STAMP-$GPU_LABEL-session-setup.log"
            { gpu_state; report_versions; "${QUANTRT[@]}" info; } 2>&1 | tee "$log" || rc=$?
            SUMMARY+=("setup: $([[ $rc == 0 ]] && echo ok || echo "FAILED (rc $rc), see $log")")
            [[ $rc == 0 ]] || FAILED_STEPS=$((FAILED_STEPS + 1))
            export_results
            ;;
        verify)
            run_cmd "$name" verify python3 benchmarks/gpu_verify.py --quick --skip-timing \
                --out "$RESULTS/$STAMP-$GPU_LABEL-gpu_verify-quick.md"
            ;;
        verify-formats)
            run_cmd "$name" verify python3 -c "$VERIFY_FORMATS_PY" --quick --skip-compile --skip-timing \
                --out "$RESULTS/$STAMP-$GPU_LABEL-gpu_verify-formats.md"
            ;;
        kernels-targets)
            bench_kernels "$name" --formats int4wo,int8wo --shapes "$TARGET_SHAPES" --ms "$TARGET_MS" \
                --providers quantrt,torchao,quanto
            ;;
        kernels-flux)
            bench_kernels "$name" --formats int4wo,int8wo --shapes flux --ms "$TARGET_MS" \
                --providers quantrt,torchao,quanto
            ;;
        kernels-gemlite)
            bench_kernels "$name" --formats int4wo,int8wo --shapes "$TARGET_SHAPES" --ms 1,4,16,1024,4096 \
                --providers gemlite
            ;;
        kernels-all-1)
            prebuild_quanto "$name"
            bench_kernels "$name" --formats uint4wo,uint2wo,uint3wo,uint1wo --shapes "$ISSUE_SHAPES" \
                --ms 1,16,1024,4096 --providers quantrt,torchao,quanto
            ;;
        kernels-all-2)
            prebuild_quanto "$name"
            bench_kernels "$name" --formats float8wo_e4m3,float8wo_e5m2,fp6_e3m2,fp4_e2m1 --shapes "$ISSUE_SHAPES" \
                --ms 1,16,1024,4096 --providers quantrt,torchao,quanto
            ;;
        kernels-all-3)
            bench_kernels "$name" --formats uint5wo,uint6wo,uint7wo --shapes "$ISSUE_SHAPES" \
                --ms 1,16,1024,4096 --providers quantrt,torchao,quanto
            ;;
        kernels-all-4)
            bench_kernels "$name" --formats fp3_e1m1,fp5_e2m2,fp7_e3m3 --shapes "$ISSUE_SHAPES" \
                --ms 1,16,1024,4096 --providers quantrt,torchao,quanto
            ;;
        compile)
            run_cmd "$name-tiny" compile "${QUANTRT[@]}" bench compile --sizes tiny --regional both --out-dir "$RESULTS"
            run_cmd "$name-full-regional" compile "${QUANTRT[@]}" bench compile --sizes full --regional yes \
                --out-dir "$RESULTS"
            ;;
        compile-full)
            run_cmd "$name" compile "${QUANTRT[@]}" bench compile --sizes full --regional no --out-dir "$RESULTS"
            ;;
        model)
            bench_model "$name" --schemes int8wo --providers quantrt
            ;;
        model-int4)
            bench_model "$name" --schemes int4wo --providers quantrt
            ;;
        model-torchao)
            bench_model "$name" --schemes int8wo,int4wo --providers torchao
            ;;
    esac
    if have_cuda; then
        while read -r md; do show_report "$md"; done < <(find "$RESULTS" -maxdepth 1 -name '*.md' -newer "$STEP_MARKER" | sort)
    fi
}

finish() {
    local rc=$?
    export_results || true
    say "summary ($(($(date +%s) - STARTED)) s in all)"
    local line
    for line in "${SUMMARY[@]}"; do echo "  $line"; done
    if have_cuda; then
        echo "results written: $(find "$RESULTS" -maxdepth 1 -type f -newer "$MARKER" | sort | tr '\n' ' ')"
        if [[ -n "${OUT:-}" ]]; then
            echo "copied to \$OUT: $(find "$OUT" -maxdepth 1 -type f -printf '%f ' 2>/dev/null)"
        fi
    else
        echo "no CUDA GPU here: nothing ran (dry run); the commands above are what the GPU machine would run"
    fi
    rm -f "$MARKER" "$STEP_MARKER"
    if ((rc == 0 && FAILED_STEPS > 0)); then
        echo "$FAILED_STEPS step(s) failed, timed out or had failing points: exit 1"
        rc=1
    fi
    exit "$rc"
}

main() {
    if (($# == 0)); then
        usage
        exit 2
    fi
    local name known step_name
    for name in "$@"; do
        case "$name" in
            -h | --help | help) usage; exit 0 ;;
        esac
        known=
        for step_name in $STEPS; do [[ "$name" == "$step_name" ]] && known=1; done
        if [[ -z "$known" ]]; then
            echo "unknown step '$name'; steps: $STEPS" >&2
            exit 2
        fi
    done
    mkdir -p "$RESULTS"
    trap finish EXIT
    if ! have_cuda; then
        echo "no CUDA GPU here (nvidia-smi or torch.cuda missing, or GPU_SESSION_DRY_RUN=1): dry run, nothing is installed or run"
    fi
    for name in "$@"; do
        step "$name"
    done
}

main "$@"
