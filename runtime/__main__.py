"""The program `quantrt` (the console script, and `python -m quantrt`): the core commands of quantrt.cli plus
`quantrt bench`, which quantrt.bench adds. quantrt.bench may import quantrt.cli, never the reverse: this module,
above both, joins them.

The benchmark modules are loaded only when the command is `bench` (quantrt.bench.add_bench_command), so that
`quantrt --help` and the other commands start without them.
"""

from __future__ import annotations

import functools
import sys
from typing import Sequence

from .bench import add_bench_command
from .cli import command_name, main as run_command_line


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `quantrt` command line `argv` (default: the process's arguments); its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    bench = functools.partial(add_bench_command, load_benchmarks=command_name(argv) == "bench")
    return run_command_line(argv, extra_commands=[bench])


if __name__ == "__main__":
    sys.exit(main())
