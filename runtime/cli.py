"""The `quantrt` command line: its core commands (info, demo, quantize, warmup, cache) and how a command line runs.

The program `quantrt` (quantrt.__main__, also `python -m quantrt`) is this parser plus the `bench` command
that quantrt.bench adds (`build_parser(extra_commands)`): quantrt.bench sits above this module and may import
it, never the other way. `python -m quantrt.cli` runs the core commands alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .archive import ARCHIVE_SUFFIX, export_entry, import_archive, list_entries, prune
from .backends import ORDER, get_backend
from .config import QuantConfig
from .demo import DEFAULT_SCHEMES, run_demo
from .models import FLUX_TOKENS, build_flux, example_inputs
from .schemes import resolve_scheme
from .cache import cache_root
from .serialization import CONFIG_NAME, check_target, parse_size
from .tables import format_table
from .transformer import QuantizedTransformer, model_bytes
from .version import distribution_version

DESCRIPTION = """\
quantrt: quantized inference for PyTorch transformers. Linear layers run in quantrt's own Triton
weight-only kernels where they can, else torchao, optimum-quanto, or a pure-torch reference.

Run `quantrt COMMAND --help` for a command's options.
"""

# adds a command (or several) to the sub-parsers that ArgumentParser.add_subparsers returned
AddCommands = Callable[[Any], None]

INFO_SCHEMES = ("int8wo", "int4wo", "uint1wo", "uint2wo", "uint3wo", "uint5wo", "uint6wo", "uint7wo",
                "float8wo_e5m2", "float8wo_e4m3", "fp3_e1m1", "fp4_e2m1", "fp6_e3m2", "fp7_e3m3", "int8dq",
                "int4dq", "float8dq_e4m3_tensor", "float8dq_e4m3_row", "float8_static_activation_float8_weight")


def quiet_library_logs() -> None:
    """Silence what torchao and diffusers log at import and model building, which says nothing about the
    user's run or a benchmark (the CLI and the benchmark scripts call it)."""
    for name in ("torchao", "torch.utils._pytree", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def cmd_info(args: argparse.Namespace) -> int:
    """`quantrt info`: versions, the device, and which backend can serve which scheme here."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"python {platform.python_version()} ({platform.machine()})")
    for dist in ("quantrt", "torch", "triton", "torchao", "optimum-quanto", "diffusers", "transformers"):
        print(f"{dist:15s} {distribution_version(dist) or 'not installed'}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        print(f"device          {device}: {torch.cuda.get_device_name(device)} (SM {major}.{minor})")
    else:
        print(f"device          {device}")
    for var in ("TRITON_INTERPRET", "QUANTRT_BACKEND", "QUANTRT_CACHE_DIR"):
        print(f"{var:15s} {os.environ.get(var, '(unset)')}")
    backends = {name: get_backend(name) for name in ORDER}
    rows, reasons = [], {}
    for name in INFO_SCHEMES:
        scheme = resolve_scheme(name)
        cells = []
        for backend_name, backend in backends.items():
            reason = "not part of this build" if backend is None else backend.unavailable_reason(scheme, device)
            if reason is None:
                cells.append("yes")
            else:
                note = reasons.setdefault(reason, len(reasons) + 1)
                cells.append(f"no [{note}]")
        rows.append([name, *cells])
    print(f"\nwhich backend can serve which scheme on {device} (auto picks the first 'yes' from the left; on a CPU it never picks triton, the interpreter):\n")
    print(format_table(["scheme", *ORDER], rows))
    for reason, note in reasons.items():
        print(f"[{note}] {reason}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """`quantrt demo`: the main job on the FLUX-architecture demo model (quantrt.demo)."""
    schemes = [s for s in args.schemes.split(",") if s.strip()]
    run_demo(args.size, schemes, device=args.device, dtype=getattr(torch, args.dtype), repeats=args.repeats,
             backend=args.backend)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """`quantrt quantize SRC DST`: an unquantized model folder into a quantrt folder, streaming; a GGUF file as
    stored (quantrt.checkpoints.gguf: nothing requantized)."""
    # every argument and both folders are checked before the quantization, which can take an hour
    src = Path(args.src)
    if args.scheme is None and src.suffix != ".gguf":
        raise ValueError("--scheme is needed to quantize a model folder, e.g. --scheme int8wo (a .gguf SRC loads as "
                         "stored and needs none)")
    # a GGUF file's layers keep their types: the config only keeps layers in full precision (its scheme is unused)
    config = QuantConfig(args.scheme or "int8wo", group_size=args.group_size,
                         modules_to_not_convert=args.modules_to_not_convert or None)
    max_shard_size = parse_size(args.max_shard_size, option="--max-shard-size")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if src.suffix == ".gguf":
        check_target(args.dst, args.overwrite, overwrite_flag="--overwrite")
        qt = QuantizedTransformer.from_single_file(src, config if args.modules_to_not_convert else None,
                                                   config=args.config, device=device, torch_dtype=dtype, progress=True)
        qt.save_pretrained(args.dst, max_shard_size=max_shard_size, overwrite=args.overwrite)
        schemes = Counter(r.scheme for r in qt.summary() if r.quantized)
        print(f"{sum(schemes.values())}/{len(qt.summary())} Linear layers as stored in {src.name} "
              f"({', '.join(f'{n} {s}' for s, n in schemes.most_common())}); {model_bytes(qt.model):,} bytes written "
              f"to {args.dst}")
        return 0
    if not src.exists():
        raise ValueError(f"SRC {args.src} does not exist: give the folder of an unquantized diffusers or "
                         f"transformers model (config.json and .safetensors files)")
    if not src.is_dir():
        raise ValueError(f"SRC {args.src} is not a folder: give the folder of an unquantized diffusers or "
                         f"transformers model (config.json and .safetensors files)")
    if (src / CONFIG_NAME).is_file():
        raise ValueError(f"SRC {args.src} is a quantrt folder, already quantized: quantize the unquantized model's "
                         f"folder instead")
    check_target(args.dst, args.overwrite, overwrite_flag="--overwrite")
    qt = QuantizedTransformer.from_pretrained(src, device=device, torch_dtype=dtype, quantization=config,
                                              progress=True)
    qt.save_pretrained(args.dst, max_shard_size=max_shard_size, overwrite=args.overwrite)
    layers = qt.summary()
    print(f"{sum(r.quantized for r in layers)}/{len(layers)} Linear layers quantized with {config.scheme.name}; "
          f"{model_bytes(qt.model):,} bytes written to {args.dst}")
    return 0


def _warmup_shapes(args: argparse.Namespace, default: list[str]) -> list[str]:
    shapes = list(args.shape or [])
    if args.shapes_file:
        with open(args.shapes_file) as f:
            text = f.read()
        if text.lstrip().startswith("["):
            shapes += [str(s) for s in json.loads(text)]
        else:
            shapes += [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]
    return shapes or default


def cmd_warmup(args: argparse.Namespace) -> int:
    """`quantrt warmup [MODEL]`: compile for a list of shapes into the cache; --check proves a warm start."""
    start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model:
        # as stored and as serving loads it (from_pretrained's defaults), so that the fingerprint is the same
        dtype = getattr(torch, args.dtype) if args.dtype else None
        qt = QuantizedTransformer.from_pretrained(args.model, device=device, torch_dtype=dtype, backend=args.backend)
        default = [f"{FLUX_TOKENS['tiny'][0]}x{FLUX_TOKENS['tiny'][1]}"]
        if type(qt.model).__name__ != "FluxTransformer2DModel":
            default = ["1x128"]
    else:
        model = build_flux(args.size, dtype=getattr(torch, args.dtype or "bfloat16"), device=device)
        qt = QuantizedTransformer.from_model(model, QuantConfig(args.scheme, backend=args.backend or "auto"),
                                             progress=False)
        default = ["x".join(map(str, FLUX_TOKENS[args.size]))]
    shapes = _warmup_shapes(args, default)
    examples = [example_inputs(qt.model, spec) for spec in shapes]
    started = time.perf_counter()  # a replica's start: from qt.compile() to every warmed shape served once
    qt.compile(mode=args.mode, regional=args.regional, strict=args.strict or args.check, cache_dir=args.cache_dir)
    if qt._compiled.entry is None:
        print("quantrt warmup: the cache folder cannot be used (see the warning above)", file=sys.stderr)
        return 1
    entry = qt._compiled.entry
    if args.check and entry.status != "loaded":
        why = f" ({entry.reason})" if entry.reason else ""
        print(f"quantrt warmup --check: no valid cache entry for this model{why}: {entry.path}; run `quantrt warmup` "
              f"with the same model, scheme and compile options first", file=sys.stderr)
        return 1
    print(f"{'checking' if args.check else 'warming'} {len(examples)} shape(s) of {type(qt.model).__name__} on "
          f"{device}, mode={args.mode}{', regional' if args.regional else ''}; cache entry: {entry.path} "
          f"({'found' if entry.status == 'loaded' else 'new'})")
    report = qt.warmup(examples, progress=True, grad_mode=args.grad_mode, allow_new=not args.check, aot=args.aot)
    from_compile = time.perf_counter() - started
    print(report)
    total = time.perf_counter() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"entry": str(entry.path), "entry_status": entry.status, "seconds_total": total,
                       "seconds_from_compile": from_compile, "shapes": [dataclasses.asdict(r) for r in report]}, f,
                      indent=1)
    packaged = sum(r.served_by == "aot package" for r in report)
    if not args.check:
        print(f"{sum(r.status == 'cold' for r in report)} shape(s) compiled, {sum(r.status == 'warm' for r in report)} "
              f"loaded from the cache" + (f", {packaged} served by AOT packages" if args.aot else "")
              + f"; {total:.1f} s in all")
        return 0
    misses = sum(r.cache_misses for r in report)
    recompiles = sum(r.recompiles for r in report)
    not_warm = [r.shape for r in report if r.status != "warm"]
    if args.aot:  # --check --aot: every shape from its package, nothing traced or compiled
        not_warm += [f"{r.shape} ({r.note or 'not an AOT package'})" for r in report
                     if r.status == "warm" and r.served_by != "aot package"]
    warm_s = sum(r.seconds for r in report)
    cold_s = sum(r.cold_seconds or 0.0 for r in report)
    print(f"cache hits {sum(r.cache_hits for r in report)}, misses {misses}, recompiles {recompiles}; warm compile "
          f"{warm_s:.2f} s against {cold_s:.2f} s cold ({warm_s / cold_s:.0%}); {total:.1f} s in all"
          if cold_s else f"cache misses {misses}, recompiles {recompiles}")
    if misses or recompiles or not_warm:
        print("quantrt warmup --check: FAILED: " + "; ".join(
            ([f"{misses} cache miss(es)"] if misses else []) + ([f"{recompiles} recompile(s)"] if recompiles else [])
            + [f"not warm: {s}" for s in not_warm]), file=sys.stderr)
        return 1
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """`quantrt cache list | export | import | prune`: the cache folder's entries, as archives for replicas."""
    root = Path(args.cache_dir) if args.cache_dir else None
    if args.cache_command == "list":
        infos = list_entries(root)
        rows = [[i.fingerprint[:16], i.model, i.device, i.torch, i.quantrt, i.shapes, i.aot_packages,
                 f"{i.bytes / 2**20:.1f}", time.strftime("%Y-%m-%d %H:%M", time.localtime(i.updated)),
                 i.problem or "usable here"] for i in infos]
        print(format_table(["fingerprint", "model", "device", "torch", "quantrt", "shapes", "aot", "MiB", "updated",
                            "status"], rows) if rows else "no cache entries")
        return 0
    if args.cache_command == "export":
        archive = Path(args.archive)
        if archive.is_dir():
            archive = archive / f"quantrt-cache-{Path(args.entry).name[:16]}{ARCHIVE_SUFFIX}"
        path, digest = export_entry(args.entry, archive, root, overwrite=args.overwrite)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB), sha256 {digest}\n"
              f"on each replica: quantrt cache import {path.name} --sha256 {digest}")
        return 0
    if args.cache_command == "import":
        manifest = import_archive(args.archive, root, expected_sha256=args.sha256, overwrite=args.overwrite)
        aot = sum(1 for shape in manifest.shapes.values() if isinstance(shape.get("aot"), dict))
        print(f"installed cache entry {manifest.fingerprint} ({manifest.extra.get('model_class', '?')}, "
              f"{len(manifest.shapes)} shape(s), {aot} AOT package(s)) into {(root or cache_root()) / 'entries'}")
        return 0
    removed = prune(root, older_than_days=args.older_than, stale=args.stale, dry_run=args.dry_run)
    for item in removed:
        print(f"{'would remove' if args.dry_run else 'removed'} {item.path} ({item.bytes / 2**20:.1f} MiB): "
              f"{item.reason}" if not item.reason.startswith("kept") else f"{item.path}: {item.reason}")
    freed = sum(item.bytes for item in removed)
    print(f"{len(removed)} item(s), {freed / 2**20:.1f} MiB {'would be ' if args.dry_run else ''}freed"
          if removed else "nothing to remove")
    return 0


def command_name(argv: Sequence[str]) -> str | None:
    """The sub-command of a command line (the top-level parser has no options that take a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(extra_commands: Sequence[AddCommands] = ()) -> argparse.ArgumentParser:
    """The `quantrt` parser: the core commands, then those each of `extra_commands` adds (the program adds
    `bench` this way, quantrt.bench.add_bench_command)."""
    parser = argparse.ArgumentParser(prog="quantrt", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="command", title="commands")

    info = sub.add_parser("info", help="versions, the device, and which backend can serve which scheme here")
    info.add_argument("--device", help="device to report on (default: cuda if available, else cpu)")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser(
        "demo", help="quantize a FLUX-architecture transformer (random weights, no download) with several schemes, "
                     "run it, and print bytes, time per forward and error per scheme",
        description="Builds diffusers' FluxTransformer2DModel from a config with random weights (nothing is "
                    "downloaded), quantizes a copy with each scheme, runs one forward per repeat and prints a "
                    "table: stored and resident bytes, resident bytes / bf16, milliseconds per forward (median, eager) and the "
                    "output's relative L2 error against the unquantized model.")
    demo.add_argument("--size", choices=("tiny", "small", "full"), default="small",
                      help="tiny: one block of each kind, seconds on a CPU; small: a few layers, a minute or two "
                           "on 2 CPU cores (default); full: FLUX.1-dev dimensions (12B parameters, 4096 image + 512 "
                           "text tokens), for a GPU")
    demo.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES),
                      help="comma-separated scheme names (see `quantrt info`); default: %(default)s")
    demo.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                      help="compute dtype of the model (default: %(default)s)")
    demo.add_argument("--backend", choices=("auto", "triton", "aten", "torchao", "quanto", "reference"), default="auto",
                      help="force one backend for every layer (default: auto fallback)")
    demo.add_argument("--repeats", type=int, default=3, help="timed forwards per scheme (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)

    quantize = sub.add_parser(
        "quantize", help="quantize an unquantized diffusers/transformers model folder (safetensors) into a quantrt "
                         "folder, streaming one tensor at a time",
        description="Reads an unquantized diffusers or transformers model folder (config.json + safetensors, e.g. "
                    "what save_pretrained of diffusers wrote), quantizes each Linear weight as it is read (the "
                    "full-precision model is never whole in memory) and writes a quantrt folder that "
                    "QuantizedTransformer.from_pretrained(DST) loads.")
    quantize.add_argument("src", help="the unquantized model folder, or a .gguf file")
    quantize.add_argument("dst", help="the quantrt folder to write (must be empty unless --overwrite)")
    quantize.add_argument("--scheme", help="scheme name, e.g. int8wo, int4wo, uint3wo, fp6_e3m2 (a .gguf SRC needs "
                                           "none: its tensors keep their GGUF types)")
    quantize.add_argument("--config", help="a .gguf SRC: the folder of the model's diffusers config (default: from "
                                           "quantrt.models.FLUX_SIZES where the shapes match)")
    quantize.add_argument("--group-size", type=int, help="group size for grouped schemes")
    quantize.add_argument("--modules-to-not-convert", nargs="*", metavar="NAME",
                          help="layers to keep in full precision (full name, prefix, or child name)")
    quantize.add_argument("--device", default="cpu", help="where to quantize (default: %(default)s)")
    quantize.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                          help="cast floating tensors to this dtype first (default: as stored)")
    quantize.add_argument("--max-shard-size", default="5GB",
                          help="largest safetensors shard: bytes, or with a unit, e.g. 200MB, 2GiB (default: %(default)s)")
    quantize.add_argument("--overwrite", action="store_true",
                          help="replace the quantrt files in DST if it is a quantrt folder (its other files stay; other "
                               "folders are never written)")
    quantize.set_defaults(func=cmd_quantize)

    warmup = sub.add_parser(
        "warmup", help="compile a quantized model for a list of input shapes ahead of serving and save the graphs "
                       "and kernels in the compile cache; --check proves a fresh process starts hot",
        description="Compiles a quantized model (a quantrt folder, or the demo FLUX model with random weights) "
                    "with torch.compile(fullgraph=True, mode=max-autotune), one static graph per input shape, "
                    "and saves the graphs, compiled kernels and kernel tuning picks in the cache entry of the "
                    "model's fingerprint (QUANTRT_CACHE_DIR, default ~/.cache/quantrt). Prints, per shape: "
                    "seconds, cold compile seconds, Inductor cache hits/misses, recompiles and kernel picks. "
                    "--check, run in a fresh process with the same options, loads the entry, runs every shape "
                    "and fails (exit 1) on a cache miss, a recompile or a shape that was not warmed.",
        epilog="shapes: FLUX: [BATCHx]IMAGE_TOKENSxTEXT_TOKENS (1x4096x512 is a 1024x1024 image); a transformers "
               "LLM: [BATCHx]SEQUENCE_LENGTH. A shapes file has one shape per line (# comments) or a JSON list.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    warmup.add_argument("model", nargs="?", help="a quantrt folder (save_pretrained); default: the demo FLUX model")
    warmup.add_argument("--size", choices=("tiny", "small", "full"), default="tiny",
                        help="demo model size when no MODEL is given (default: %(default)s)")
    warmup.add_argument("--scheme", default="int8wo", help="demo model scheme (default: %(default)s)")
    warmup.add_argument("--shape", action="append", metavar="SHAPE", help="an input shape; repeat for more")
    warmup.add_argument("--shapes-file", metavar="FILE", help="a file of shapes")
    warmup.add_argument("--mode", default="max-autotune", help="torch.compile mode (default: %(default)s)")
    warmup.add_argument("--regional", action="store_true",
                        help="compile only the repeated blocks (much faster to compile)")
    warmup.add_argument("--strict", action="store_true", help="raise on a shape that was not warmed")
    warmup.add_argument("--check", action="store_true",
                        help="verify a warm start: every shape must load from the cache, no recompiles")
    warmup.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    warmup.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="compute dtype (default: as stored for MODEL, bfloat16 for the demo model); use what "
                             "serving uses: a different dtype is a different cache entry")
    warmup.add_argument("--backend", help="backend for every layer (default: MODEL's saved choices, auto for the "
                                          "demo model)")
    warmup.add_argument("--grad-mode", choices=("no_grad", "inference_mode", "grad"), default="no_grad",
                        help="the autograd mode serving runs in; each is its own graph (default: %(default)s, as "
                             "diffusers pipelines and transformers' generate run)")
    warmup.add_argument("--aot", action="store_true",
                        help="also export each shape and compile it ahead of time with AOTInductor into the entry "
                             "(weights left out); a process warming with --aot serves those shapes without tracing. "
                             "With --check: every shape must be served by its package")
    warmup.add_argument("--cache-dir", help="cache folder (default: QUANTRT_CACHE_DIR, else ~/.cache/quantrt)")
    warmup.add_argument("--json", metavar="FILE", help="also write the per-shape report as JSON")
    warmup.set_defaults(func=cmd_warmup)

    cache = sub.add_parser(
        "cache", help="list, export, import and prune compile-cache entries (ship a warmed entry to every replica)",
        description="The compile cache (QUANTRT_CACHE_DIR, default ~/.cache/quantrt) holds one entry per model "
                    "fingerprint: compiled graphs and kernels, AOT packages (warmup --aot), kernel tuning picks and "
                    "a manifest with a sha256 of every file. A deploy pipeline warms once, exports the entry as one "
                    "archive, and imports it on each replica, which then starts hot.",
        epilog="example: quantrt warmup flux-int4 --shape 1x4096x512 --aot && quantrt cache list && "
               "quantrt cache export FINGERPRINT flux.tar.gz; on a replica: quantrt cache import flux.tar.gz "
               "--sha256 HEX && quantrt warmup flux-int4 --shape 1x4096x512 --aot --check")
    folder = argparse.ArgumentParser(add_help=False)
    folder.add_argument("--cache-dir", help="cache folder (default: QUANTRT_CACHE_DIR, else ~/.cache/quantrt)")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="action", title="actions", required=True)
    cache_sub.add_parser("list", parents=[folder], help="the entries: model, device, versions, shapes, AOT packages, "
                                                        "size, and whether this installation can use each")
    export = cache_sub.add_parser("export", parents=[folder], help="write one entry (verified first) as an archive")
    export.add_argument("entry", help="the entry: its fingerprint, a unique prefix of it (see list), or its folder")
    export.add_argument("archive", help=f"the archive to write (a folder: <folder>/quantrt-cache-<fp>{ARCHIVE_SUFFIX})")
    export.add_argument("--overwrite", action="store_true", help="replace the archive if it exists")
    imported = cache_sub.add_parser("import", parents=[folder], help="verify an archive and install its entry")
    imported.add_argument("archive", help="an archive written by `quantrt cache export`")
    imported.add_argument("--sha256", help="refuse the archive unless it has this sha256 (export prints it)")
    imported.add_argument("--overwrite", action="store_true", help="replace the entry if it is installed already")
    pruned = cache_sub.add_parser("prune", parents=[folder], help="remove unreadable entries, leftovers of killed "
                                                                  "warmups, and (asked) stale or old entries")
    pruned.add_argument("--stale", action="store_true",
                        help="also entries made by another quantrt, torch, triton, Python or for a device not here")
    pruned.add_argument("--older-than", type=float, metavar="DAYS", help="also entries not written for DAYS days")
    pruned.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    cache.set_defaults(func=cmd_cache)
    for add_commands in extra_commands:
        add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None, extra_commands: Sequence[AddCommands] = ()) -> int:
    """Parse `argv` (default: the process's arguments) with build_parser(extra_commands) and run the command;
    its exit code. A user error (a bad scheme, a backend that cannot serve) is one line on stderr, exit 1."""
    quiet_library_logs()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(extra_commands)
    args = parser.parse_args(argv)
    args.argv = argv  # the exact command, for the benchmarks' reports
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, FileExistsError) as e:
        # user errors (bad scheme, backend that cannot serve) get one clear line, not a traceback
        if os.environ.get("QUANTRT_DEBUG"):
            raise
        print(f"quantrt {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
