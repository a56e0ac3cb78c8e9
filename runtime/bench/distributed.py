"""`quantrt bench distributed` (`python benchmarks/bench_distributed.py`): quantized models across GPUs (issue 20):
throughput and latency of the sharded or context-parallel model against the same quantized model on one GPU.

It starts --world processes itself, one per GPU (as torchrun would: RANK, LOCAL_RANK, WORLD_SIZE; NCCL), which
meet through a file in a temporary folder, and measures, per scheme of --schemes:

- llm: transformers' LlamaForCausalLM loaded with `from_pretrained(..., quantization_config=QuantConfig(scheme))`, on
  one GPU and with `tp_plan="auto"` over the --world GPUs: prefill of --batch x --prompt tokens (ms, tokens/s) and
  decode (`generate` of --new-tokens tokens less the prefill: ms per step, tokens/s);
- flux: diffusers' FluxTransformer2DModel quantized with quantrt.quantize_, one transformer forward at the size's
  tokens (FLUX.1-dev dimensions: 4096 image + 512 text tokens) on one GPU, then with
  `enable_parallelism(config=ContextParallelConfig(ring_degree=world))` and with `ulysses_degree=world`
  (forwards/s);

with each rank's bytes of quantized weights (the largest rank's) and the relative L2 error of the output against
the one-GPU model's (sharding must not change the numbers beyond rounding). A time is the slowest rank's, the median
of --repeats calls after a warmup call, each started after a barrier (CUDA synchronized around it). "speed-up" is
the one-GPU time over this one; the one-GPU model runs on rank 0 while the others wait.

On CUDA (default --world: every visible GPU): bf16; the LLM from random weights of Llama-3-8B's dimensions (or
--llm-folder, a local checkpoint), FLUX at full size with diffusers' `_native_cudnn` attention (it returns the
log-sum-exp that ring attention merges; --attention-backend). Without CUDA (or --cpu-smoke): a reduced run that checks
the benchmark works: tiny models in float32, gloo, 2 processes of one thread, 1 repeat; ring attention is not run
there (on CPU diffusers has no attention backend that returns the log-sum-exp: `native` refuses it, `_native_flash`
and `_native_cudnn` call CUDA kernels), and its row says so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import QuantConfig
from ..metrics import relative_error
from ..models import FLUX_SIZES, LLM_SIZES, build_flux, build_llm, flux_inputs
from ..modules import QuantizedLinear, quantize_
from .common import Outputs, Run, pick_device, script_main, synchronize
from .report import (CsvLog, MarkdownLog, cell, csv_headers, device_title, dtype_name, failed_note, markdown_row,
                     note_cell)

MODELS = ("llm", "flux")
CP_LAYOUTS = ("ring", "ulysses")
TABLE_HEADERS = ["model", "phase", "scheme", "layout", "ranks", "ms", "throughput", "speed-up", "MB per rank",
                 "error vs 1 GPU", "note"]
RING_ON_CPU = ("not run on CPU: ring attention merges partial attentions by their log-sum-exp, and diffusers has no "
               "CPU attention backend that returns it (native refuses it; _native_flash and _native_cudnn are CUDA)")


@dataclass
class Row:
    """One measurement: `layout` single (one GPU), tp, ring or ulysses over `ranks` processes."""

    model: str
    phase: str  # prefill, decode (llm); forward (flux)
    scheme: str
    layout: str
    ranks: int
    ms: float | None = None
    throughput: float | None = None
    unit: str = ""
    speedup: float | None = None  # the one-GPU row's ms over this one's
    bytes_per_rank: int | None = None  # quantized layers' storage_bytes on the largest rank
    error: float | None = None  # relative L2 error of the output against the one-GPU model's
    note: str = ""

    def cells(self) -> list[str]:
        throughput = "-" if self.throughput is None else f"{cell(self.throughput)} {self.unit}"
        speedup = "-" if self.speedup is None else f"{self.speedup:.2f}x"
        mb = "-" if self.bytes_per_rank is None else f"{self.bytes_per_rank / 1e6:.2f}"
        return [self.model, self.phase, self.scheme, self.layout, str(self.ranks), cell(self.ms), throughput, speedup,
                mb, cell(self.error), note_cell(self.note)]


CSV_HEADERS = csv_headers(Row)


@dataclass
class Spec:
    """What every rank measures (written by the launcher as JSON, read by each worker)."""

    models: list[str]
    schemes: list[str]
    backend: str
    dtype: str
    flux_size: str
    llm_size: str
    llm_folder: str | None
    batch: int
    prompt: int
    new_tokens: int
    repeats: int
    attention_backend: str
    timeout_s: float


def quantized_bytes(model: nn.Module) -> int:
    """What the model's QuantizedLinear layers keep in memory on this rank (their storage_bytes)."""
    return sum(layer.storage_bytes() for layer in model.modules() if isinstance(layer, QuantizedLinear))


def largest(value: float, device: torch.device) -> float:
    """The largest of every rank's `value`."""
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def slowest_rank_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """The median over `repeats` calls of the slowest rank's milliseconds (every rank calls it), after one
    untimed call; each call starts after a barrier."""
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        synchronize(device)
        begin = time.perf_counter()
        fn()
        synchronize(device)
        times.append(largest((time.perf_counter() - begin) * 1e3, device))
    return statistics.median(times)


def alone_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """The median milliseconds of `repeats` calls in this process alone, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        begin = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def on_rank_zero(fn: Callable[[], list[Row]]) -> list[Row]:
    """`fn()` on rank 0 while the other ranks wait; its rows (none on the other ranks)."""
    rows = fn() if dist.get_rank() == 0 else []
    dist.barrier()
    return rows


def release(device: torch.device) -> None:
    """Hand freed GPU memory back between models (each model's own peak stays its own)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def llm_rows(spec: Spec, scheme: str, folder: Path, device: torch.device) -> list[Row]:
    """The LLM's prefill and decode rows, on one GPU and tensor-parallel."""
    from transformers import LlamaForCausalLM

    dtype = getattr(torch, spec.dtype)
    config = QuantConfig(scheme, backend=spec.backend)
    world = dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (spec.batch, spec.prompt), generator=generator).to(device)
    tokens = spec.batch * spec.prompt

    def measure(model: nn.Module, timer: Callable) -> tuple[float, float, torch.Tensor]:
        with torch.no_grad():
            logits = model(ids).logits.float()
            prefill = timer(lambda: model(ids), device, spec.repeats)
            generate = timer(lambda: model.generate(ids, max_new_tokens=spec.new_tokens, min_new_tokens=spec.new_tokens,
                                                    do_sample=False), device, spec.repeats)
        return prefill, max(generate - prefill, 0.0) / spec.new_tokens, logits

    def rows(layout: str, ranks: int, prefill: float, decode: float, nbytes: int, error: float | None) -> list[Row]:
        return [Row("llm", "prefill", scheme, layout, ranks, prefill, tokens / prefill * 1e3, "tokens/s",
                    bytes_per_rank=nbytes, error=error),
                Row("llm", "decode", scheme, layout, ranks, decode, spec.batch / decode * 1e3 if decode else None,
                    "tokens/s", bytes_per_rank=nbytes, error=error)]

    single: dict[str, Any] = {}

    def one_gpu() -> list[Row]:
        model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=config,
                                                 device_map={"": device})
        prefill, decode, single["logits"] = measure(model, alone_ms)
        result = rows("single", 1, prefill, decode, quantized_bytes(model), None)
        del model
        release(device)
        return result

    out = on_rank_zero(one_gpu)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=config, tp_plan="auto")
    prefill, decode, logits = measure(model, slowest_rank_ms)
    nbytes = int(largest(quantized_bytes(model), device))
    error = relative_error(logits, single["logits"]) if dist.get_rank() == 0 else None
    del model
    release(device)
    return out + rows("tp", world, prefill, decode, nbytes, error)


@contextlib.contextmanager
def accelerator_count_of_one(device: torch.device):
    """On CPU only: torch.accelerator.device_count() is 1 while the block runs. diffusers 0.42.1's
    enable_parallelism takes the rank's device as rank % device_count(), which divides by zero without an
    accelerator; on CUDA nothing changes."""
    if device.type != "cpu":
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def flux_rows(spec: Spec, scheme: str, device: torch.device) -> list[Row]:
    """FLUX's forward rows: on one GPU, with ring and with Ulysses attention across the ranks."""
    from diffusers import ContextParallelConfig

    dtype = getattr(torch, spec.dtype)
    config = QuantConfig(scheme, backend=spec.backend)
    world = dist.get_world_size()

    def quantized_flux() -> tuple[nn.Module, dict[str, Any]]:
        model = build_flux(spec.flux_size, dtype=dtype, device=device, seed=0)  # the same weights on every rank
        quantize_(model, config, progress=False)
        model.set_attention_backend(spec.attention_backend)
        return model, flux_inputs(model)

    def forward(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs)[0]

    single: dict[str, Any] = {}

    def one_gpu() -> list[Row]:
        model, inputs = quantized_flux()
        single["output"] = forward(model, inputs).float()
        ms = alone_ms(lambda: forward(model, inputs), device, spec.repeats)
        row = Row("flux", "forward", scheme, "single", 1, ms, 1e3 / ms, "forwards/s",
                  bytes_per_rank=quantized_bytes(model))
        del model
        release(device)
        return [row]

    out = on_rank_zero(one_gpu)
    for layout in CP_LAYOUTS:
        if layout == "ring" and device.type == "cpu":
            out.append(Row("flux", "forward", scheme, layout, world, note=RING_ON_CPU))
            continue
        model, inputs = quantized_flux()
        degree = {"ring_degree": world} if layout == "ring" else {"ulysses_degree": world}
        with accelerator_count_of_one(device):
            model.enable_parallelism(config=ContextParallelConfig(**degree))
        output = forward(model, inputs).float()
        ms = slowest_rank_ms(lambda: forward(model, inputs), device, spec.repeats)
        error = relative_error(output, single["output"]) if dist.get_rank() == 0 else None
        out.append(Row("flux", "forward", scheme, layout, world, ms, 1e3 / ms, "forwards/s",
                       bytes_per_rank=int(largest(quantized_bytes(model), device)), error=error))
        del model
        release(device)
    return out


def worker(folder: Path) -> None:
    """One rank: measure what `folder/spec.json` asks for; rank 0 writes `folder/rows.json`."""
    spec = Spec(**json.loads((folder / "spec.json").read_text()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # the smoke run's ranks share a small machine
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{folder / 'rendezvous'}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=spec.timeout_s))
    llm_folder = Path(spec.llm_folder) if spec.llm_folder else folder / "llm"
    if "llm" in spec.models and not spec.llm_folder:
        if rank == 0:  # random weights of the size's dimensions, written once for every rank to load
            build_llm(spec.llm_size, dtype=getattr(torch, spec.dtype)).save_pretrained(llm_folder)
        dist.barrier()
    rows: list[Row] = []
    for scheme in spec.schemes:
        for model in spec.models:
            try:
                rows += (llm_rows(spec, scheme, llm_folder, device) if model == "llm"
                         else flux_rows(spec, scheme, device))
            except Exception as e:  # the ranks fail together (a scheme or layer they cannot serve): the next goes on
                rows.append(Row(model, "-", scheme, "-", world, note=failed_note(e)))
    if rank == 0:
        (folder / "rows.json").write_text(json.dumps([asdict(row) for row in rows]))
    dist.destroy_process_group()


def launch(spec: Spec, world: int, work: Path, echo: Callable[[str], None]) -> list[Row]:
    """Start `world` ranks of this module on `spec` and return rank 0's rows; each rank's output goes to
    `work/rank-<r>.log`, and the run fails (naming the logs) when a rank fails or the ranks outlive --timeout-s."""
    (work / "spec.json").write_text(json.dumps(asdict(spec)))
    logs = [open(work / f"rank-{rank}.log", "w") for rank in range(world)]
    env = {**os.environ, "WORLD_SIZE": str(world)}
    if not torch.cuda.is_available():  # gloo on the loopback interface: all ranks are on this machine
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ranks = [subprocess.Popen([sys.executable, "-m", __name__, "--worker", str(work)], stdout=logs[rank],
                              stderr=subprocess.STDOUT, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in range(world)]
    try:
        deadline = time.monotonic() + spec.timeout_s
        for process in ranks:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for process in ranks:
            process.kill()
        raise RuntimeError(f"the {world} ranks did not finish within {spec.timeout_s:.0f} s; logs: {work}/rank-*.log")
    finally:
        for log in logs:
            log.close()
    failed = [rank for rank, process in enumerate(ranks) if process.returncode != 0]
    if failed:
        tail = (work / f"rank-{failed[0]}.log").read_text()[-2000:]
        raise RuntimeError(f"rank(s) {failed} failed; logs: {work}/rank-*.log; rank {failed[0]}'s end:\n{tail}")
    echo(f"{world} ranks finished")
    return [Row(**row) for row in json.loads((work / "rows.json").read_text())]


def with_speedups(rows: list[Row]) -> list[Row]:
    """Each row's speed-up: the one-GPU row's ms (same model, phase and scheme) over its own."""
    single = {(r.model, r.phase, r.scheme): r.ms for r in rows if r.layout == "single" and r.ms}
    for row in rows:
        base = single.get((row.model, row.phase, row.scheme))
        if row.layout != "single" and base and row.ms:
            row.speedup = base / row.ms
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="llm,flux", help="comma-separated: llm, flux (default: %(default)s)")
    parser.add_argument("--schemes", default="int8wo", help="comma-separated schemes (default: %(default)s)")
    parser.add_argument("--world", type=int, help="processes, one per GPU (default: every visible GPU; CPU smoke: 2)")
    parser.add_argument("--backend", default="auto", help="quantrt backend of every layer (default: %(default)s)")
    parser.add_argument("--flux-size", choices=tuple(FLUX_SIZES), help="FLUX size (default: full; CPU smoke: tiny)")
    parser.add_argument("--llm-size", choices=tuple(LLM_SIZES), help="Llama size built from random weights (default: "
                                                                     "8b; CPU smoke: tiny)")
    parser.add_argument("--llm-folder", help="a local transformers Llama checkpoint to load instead of random weights")
    parser.add_argument("--batch", type=int, default=1, help="LLM batch (default: %(default)s)")
    parser.add_argument("--prompt", type=int, help="LLM prompt tokens (default: 1024; CPU smoke: 16)")
    parser.add_argument("--new-tokens", type=int, help="LLM decode steps timed (default: 32; CPU smoke: 4)")
    parser.add_argument("--repeats", type=int, help="timed calls per point, median (default: 10; CPU smoke: 1)")
    parser.add_argument("--attention-backend", help="diffusers attention backend of every FLUX run (default: "
                                                    "_native_cudnn on CUDA, native on CPU)")
    parser.add_argument("--timeout-s", type=float, default=3600, help="the whole group's time limit (default: "
                                                                      "%(default)s)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="reduced CPU run that checks the benchmark works (automatic without CUDA)")
    parser.add_argument("--out-dir", type=Path, help="results folder (default: benchmarks/results; a temporary "
                                                     "folder for a CPU smoke run)")


def parse_list(text: str, option: str, allowed: Sequence[str] | None = None) -> list[str]:
    """A comma-separated option as a list; a ValueError naming the option when it is empty or not in `allowed`."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    wrong = [item for item in items if allowed is not None and item not in allowed]
    if not items or wrong:
        raise ValueError(f"{option}: {text!r}; give comma-separated values" +
                         (f" of {', '.join(allowed)}" if allowed else ""))
    return items


def run(args: argparse.Namespace, prog: str, argv: Sequence[str], echo: Callable[[str], None] = print) -> Outputs[Row]:
    """Launch the ranks, then write the markdown table and the CSV of what they measured."""
    models = parse_list(args.models, "--models", MODELS)  # bad arguments fail before anything is written
    schemes = parse_list(args.schemes, "--schemes")
    for scheme in schemes:
        QuantConfig(scheme)  # an unknown scheme is one clear line, before any process starts
    device = pick_device(args.cpu_smoke, echo)
    smoke = device.type != "cuda"
    world = args.world or (2 if smoke else torch.cuda.device_count())
    if world < 2:
        raise ValueError(f"--world {world}: the benchmark compares one GPU with several; it needs at least 2 "
                         f"processes (one per GPU)")
    if not smoke and world > torch.cuda.device_count():
        raise ValueError(f"--world {world}: only {torch.cuda.device_count()} GPU(s) are visible")
    run_info = Run.create("distributed", device, prog, argv, args.out_dir)
    spec = Spec(models=models, schemes=schemes, backend=args.backend,
                dtype=dtype_name(torch.float32 if smoke else torch.bfloat16),
                flux_size=args.flux_size or ("tiny" if smoke else "full"),
                llm_size=args.llm_size or ("tiny" if smoke else "8b"), llm_folder=args.llm_folder, batch=args.batch,
                prompt=args.prompt or (16 if smoke else 1024), new_tokens=args.new_tokens or (4 if smoke else 32),
                repeats=args.repeats or (1 if smoke else 10),
                attention_backend=args.attention_backend or ("native" if smoke else "_native_cudnn"),
                timeout_s=args.timeout_s)
    setup = (f"{', '.join(models)}; {', '.join(schemes)} (backend {spec.backend}); {spec.dtype}; {world} ranks "
             f"({'NCCL, one GPU each' if not smoke else 'gloo on CPU, one thread each'}); FLUX {spec.flux_size} "
             f"({spec.attention_backend} attention); Llama {spec.llm_folder or spec.llm_size} batch {spec.batch} x "
             f"{spec.prompt} prompt tokens, {spec.new_tokens} decode steps")
    echo(setup)
    work = Path(tempfile.mkdtemp(prefix="quantrt-bench-distributed-"))  # kept, with the ranks' logs, when one fails
    try:
        rows = with_speedups(launch(spec, world, work, echo))
        shutil.rmtree(work, ignore_errors=True)
    except RuntimeError as e:
        rows = [Row(model, "-", ",".join(schemes), "-", world, note=failed_note(e)) for model in models]
    stem = run_info.stem
    with MarkdownLog(stem.with_suffix(".md")) as markdown, CsvLog(stem.with_suffix(".csv"), CSV_HEADERS) as csv_log:
        markdown.write(*run_info.header_lines(f"Quantized models across {world} ranks on {device_title(device)}"), "",
                       f"- {setup}",
                       f"- times: the slowest rank's, median of {spec.repeats} call(s) after a warmup call; speed-up: "
                       "the one-GPU time over this one; MB per rank: the quantized layers' bytes on the largest rank; "
                       "error: relative L2 of the output (LLM: prefill logits) against the one-GPU model's")
        markdown.table(TABLE_HEADERS)
        echo(markdown_row(TABLE_HEADERS))
        for row in rows:
            markdown.row(row.cells())
            csv_log.write(row)
            echo(markdown_row(row.cells()))
    echo(f"wrote {markdown.path}, {csv_log.path}")
    return Outputs(markdown.path, csv_log.path, None, rows, [])


def main(argv: Sequence[str] | None = None, prog: str = "python benchmarks/bench_distributed.py") -> int:
    """`python benchmarks/bench_distributed.py`: the same as `quantrt bench distributed`."""
    return script_main(sys.modules[__name__], argv, prog)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # a rank that `launch` started
        worker(Path(sys.argv[2]))
    else:
        sys.exit(main())
