"""The persistent tuning table: the winning kernel config per (GPU name, torch version, triton version,
kernel source hash, format, N, K, group size, M bucket), so that serving never benchmarks.

The table is one JSON file, by default `$QUANTRT_CACHE_DIR/tuning.json` (`~/.cache/quantrt` when the
variable is unset; QUANTRT_TUNING_FILE names another file):

    {"version": 1, "entries": {"<key>": {<config fields>}, ...}}

Writes merge with what other processes wrote meanwhile, under a file lock, into a temporary file that
replaces the table atomically. A table that cannot be read or parsed is ignored with a warning and
rebuilt; a table that cannot be written leaves the picks in memory for this process, with a warning.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from pathlib import Path

import filelock
import torch
import triton

VERSION = 1


def m_bucket(m: int) -> int:
    """M's bucket: the next power of two up to 4096 (1, 2, 4, ..., 4096), then the next multiple of 1024."""
    if m <= 1:
        return 1
    if m <= 4096:
        return triton.next_power_of_2(m)
    return -(-m // 1024) * 1024


def make_key(device_name: str, source_hash: str, fmt: str, n: int, k: int, group_size: int, m: int) -> str:
    """The table key of one problem; `fmt` names the format and the activation dtype (int8/bfloat16),
    `group_size` 0 means one group per row, `m` is bucketed here."""
    return "|".join([device_name, f"torch {torch.__version__}", f"triton {triton.__version__}", source_hash,
                     fmt, f"N={n}", f"K={k}", f"group={group_size}", f"M={m_bucket(m)}"])


def default_path() -> Path:
    explicit = os.environ.get("QUANTRT_TUNING_FILE")
    if explicit:
        return Path(explicit).expanduser()
    root = os.environ.get("QUANTRT_CACHE_DIR") or "~/.cache/quantrt"
    return Path(root).expanduser() / "tuning.json"


class TuningTable:
    """The picks of one table file, loaded on first use."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries: dict[str, dict] | None = None
        self._mutex = threading.Lock()

    def _read(self, warn: bool = True) -> dict[str, dict]:
        """The entries on disk; {} (with a warning) if the file is unreadable or not a table."""
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            if warn:
                warnings.warn(f"quantrt tuning table {self.path} cannot be read ({e}); ignoring it")
            return {}
        try:
            data = json.loads(text)
            entries = data.get("entries") if isinstance(data, dict) and data.get("version") == VERSION else None
            if not isinstance(entries, dict):
                raise ValueError(f"not a version {VERSION} tuning table")
            if not all(isinstance(v, dict) for v in entries.values()):
                raise ValueError("an entry is not a config")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if warn:
                warnings.warn(f"quantrt tuning table {self.path} is corrupt ({e}); ignoring it, it will be rebuilt")
            return {}
        return entries

    def _loaded(self) -> dict[str, dict]:
        # the entries, read on first use; call with self._mutex held
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def entries(self) -> dict[str, dict]:
        """A copy of all picks."""
        with self._mutex:
            return dict(self._loaded())

    def get(self, key: str) -> dict | None:
        with self._mutex:
            return self._loaded().get(key)

    def put(self, key: str, config: dict) -> None:
        """Record a pick and persist the table (merged with the file's current entries)."""
        self.update({key: config})

    def update(self, picks: dict[str, dict]) -> None:
        """Record several picks (a compile-cache entry's, say) and persist the table in one write."""
        with self._mutex:
            self._loaded().update(picks)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with filelock.FileLock(str(self.path) + ".lock", timeout=30):
                    merged = {**self._read(warn=False), **self._entries}  # what others wrote meanwhile
                    fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
                    try:
                        with os.fdopen(fd, "w") as f:
                            json.dump({"version": VERSION, "entries": merged}, f, indent=1, sort_keys=True)
                            f.flush()
                            os.fsync(f.fileno())
                        os.replace(tmp, self.path)
                    except BaseException:
                        Path(tmp).unlink(missing_ok=True)
                        raise
                    self._entries = merged
            except (OSError, filelock.Timeout) as e:
                warnings.warn(f"quantrt tuning table {self.path} cannot be written ({e}); the pick is kept "
                              f"for this process only")


_tables: dict[Path, TuningTable] = {}
_tables_mutex = threading.Lock()


def default_table() -> TuningTable:
    """The table at `default_path()`, one instance per path (the path is read at every call)."""
    path = default_path()
    with _tables_mutex:
        if path not in _tables:
            _tables[path] = TuningTable(path)
        return _tables[path]
