"""What the benchmarks share (quantrt.bench.common): byte counting of any library's quantized tensors, where a
run's files go, the CPU timers, the thread and tuning-table guards, and a benchmark script's `main`."""

import argparse
import datetime
import os
import types

import torch
import torch.nn.functional as F

from quantrt.backends import get_backend
from quantrt.bench import common
from quantrt.bench.report import TargetResult
from quantrt.modules import QuantizedLinear
from quantrt.schemes import resolve_scheme


def test_stored_bytes_counts_tensor_subclasses_by_their_inner_tensors():
    # torchao is a dependency: its absence fails here rather than skipping
    linear = torch.nn.Linear(256, 64, bias=False)
    layer = QuantizedLinear.from_linear(linear, resolve_scheme("int8wo"), get_backend("torchao"))
    weight = layer.backend_weight
    inner = [getattr(weight, name, None) for name in ("qdata", "scale", "zero_point")]
    assert common.stored_bytes(weight) == sum(t.numel() * t.element_size() for t in inner if t is not None)
    assert common.stored_bytes(weight) < 64 * 256 * 4 / 3  # int8 codes, not the float32 weight
    assert common.stored_bytes(linear) == 64 * 256 * 4
    x = torch.randn(3, 256)
    torch.testing.assert_close(F.linear(x, weight), x @ layer.dequantize().T, rtol=1e-4, atol=1e-4)


def test_stored_bytes_counts_a_shared_tensor_once():
    shared = torch.zeros(10, dtype=torch.float16)
    module = torch.nn.Module()
    module.register_buffer("a", shared)
    module.b = shared  # a tensor attribute, the same tensor
    assert common.stored_bytes(module) == 20


def test_smoke_run_files_go_to_a_fresh_temporary_folder(tmp_path):
    smoke = common.Run.create("kernels", torch.device("cpu"), "quantrt", ["bench", "kernels", "--ms", "1 16"], None)
    assert smoke.smoke and smoke.out_dir.is_dir() and "quantrt-bench-kernels-" in smoke.out_dir.name
    assert smoke.command == "quantrt bench kernels --ms '1 16'"
    given = common.Run.create("model", torch.device("cpu"), "quantrt", [], tmp_path)
    given.started = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    assert given.stem == tmp_path / "2026-01-02-030405-cpu-model-cpu-smoke"
    head = given.header_lines("Title")
    assert head[0] == "# Title" and "- date: 2026-01-02 03:04 UTC" in head and "- command: `quantrt`" in head


def test_cpu_timers_return_a_median_per_call():
    calls = []
    ms, how = common.time_rotated([lambda: calls.append(1), lambda: calls.append(2)], torch.device("cpu"))
    assert how == "cpu" and ms >= 0
    assert len(calls) == 2 * (1 + common.CPU_REPEATS)  # one warmup round, then the timed ones
    assert common.median_ms(lambda: None, torch.device("cpu"), warmup=0, repeats=3) >= 0


def test_geometric_mean_leaves_out_what_has_no_logarithm():
    assert common.geometric_mean([2.0, 8.0, 0.0, float("inf"), -1.0]) == 4.0
    assert common.geometric_mean([]) != common.geometric_mean([])  # NaN


def test_smoke_threads_and_tuning_table_are_restored():
    before = torch.get_num_threads()
    with common.smoke_threads(True):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    previous = os.environ.get("QUANTRT_TUNING_FILE")
    with common.private_tuning_table(torch.device("cpu"), None) as path:
        assert path is None and os.environ.get("QUANTRT_TUNING_FILE") == previous  # off CUDA nothing is tuned


def test_script_main_exits_1_on_failed_points(capsys):
    class Row:
        def __init__(self, note):
            self.note = note

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--fail", action="store_true")

    def run(args, prog, argv):
        rows = [Row("FAILED: boom")] if args.fail else [Row(""), Row("skipped: not here")]
        return common.Outputs(None, None, None, rows, [TargetResult("t", "met", "")])

    benchmark = types.SimpleNamespace(__doc__="A benchmark.\n\nMore.", add_arguments=add_arguments, run=run)
    assert common.script_main(benchmark, [], "prog") == 0
    assert common.script_main(benchmark, ["--fail"], "prog") == 1
