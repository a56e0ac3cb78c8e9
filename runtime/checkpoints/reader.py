"""Streaming safetensors reads: `SafetensorsReader` reads one file tensor by tensor (or row range by row
range) with plain file reads, not through safe_open's memory map, so that the pages a streaming loader has
read do not stay resident; `ShardedReader` reads a sharded checkpoint by tensor name; `release_freed_memory`
hands the pages of freed buffers back to the OS between tensors. Here too: the errors every loader raises
(`CheckpointError`, `OutsideFolderError`), safetensors' dtype names, and the JSON hook that refuses duplicate
keys, so that the lowest layer of file reading owns them (quantrt.serialization re-exports them)."""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch


# safetensors' dtype names (as its headers write them) -> torch's; more than quantrt stores, for the
# checkpoints of other tools
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "U16": torch.uint16,
    "U32": torch.uint32, "U64": torch.uint64}



class CheckpointError(ValueError):
    """A saved folder is missing, malformed, or does not match what its JSON says."""


class OutsideFolderError(CheckpointError):
    """A path in a folder (a name in one of its JSON files, or a symlink) leads out of the folder."""


def refuse_duplicate_keys(file: str | os.PathLike) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """An object_pairs_hook for json.loads that refuses an object naming a key twice, naming `file`."""

    def pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise CheckpointError(f"{file} names {key!r} twice in one object, and JSON readers disagree on "
                                      f"which one counts; the file is damaged or was edited: keep one")
            result[key] = value
        return result

    return pairs_to_dict


# the largest header this reader parses (about 100 bytes of JSON per tensor; a corrupt length must not allocate GBs)
_MAX_HEADER = 100 * 2**20


class SafetensorsReader:
    """One .safetensors file, read tensor by tensor (or row range by row range) with plain reads.

    safetensors' safe_open maps the file and hands out tensors that live in that mapping: every page a
    loader touches stays resident, and counted in the process's RSS, until the mapping goes, which is when
    the handle and every tensor from it are gone. A loader that streams a 10 GB shard through safe_open to
    quantize it therefore holds the whole shard by the end (measured: +257 MB RSS for a 256 MB file). Here
    each read fills a fresh tensor (anonymous memory) that is freed when the caller drops it; the file's
    bytes stay in the page cache, which the kernel reclaims at will and which RSS does not count.

    The header (JSON) is checked before any read: shapes of non-negative ints and data offsets inside the
    file that match each shape, so that a damaged file is a CheckpointError naming it (a dtype torch cannot
    hold is an error when that tensor is read)."""

    def __init__(self, path: str | os.PathLike, label: str | os.PathLike | None = None):
        self.path = Path(path)
        self.label = str(label) if label is not None else str(self.path)  # what errors call the file
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                # neither the length nor the size is echoed: of a file that is not safetensors, that says what
                # it holds
                if size < 8 or not 2 <= length <= min(size - 8, _MAX_HEADER):
                    raise CheckpointError(f"{self.label} is not a safetensors file, or is truncated: its first 8 bytes "
                                          f"are not the length of a header that fits in the file")
                header = json.loads(f.read(length), object_pairs_hook=refuse_duplicate_keys(self.label))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{self.label} has a damaged safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.label} has a damaged safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = metadata if isinstance(metadata, dict) else {}
        self._data_start = 8 + length
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._check_entry(name, entry, size - self._data_start)
        self._check_layout(size - self._data_start)

    def _check_entry(self, name: str, entry: Any, data_bytes: int) -> tuple[str, tuple[int, ...], int, int]:
        ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
        shape, offsets = entry.get("shape") if ok else None, entry.get("data_offsets") if ok else None
        ok = ok and isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                    for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        if not ok:
            raise CheckpointError(f"{self.label}: tensor {name!r} has a damaged header entry {entry!r:.200}")
        begin, end = offsets
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])  # unknown: an error only if the tensor is read
        # Python integers: a shape like [2**32, 2**32] must be refused here, not overflow torch's size arithmetic
        nbytes = math.prod(shape) * dtype.itemsize if dtype is not None else end - begin
        if not 0 <= begin <= end <= data_bytes or end - begin != nbytes:
            raise CheckpointError(f"{self.label}: tensor {name!r} ({entry['dtype']} {shape}) has data offsets "
                                  f"{offsets} that do not fit its size or the file: the file is damaged or truncated")
        return entry["dtype"], tuple(shape), begin, end

    def _check_layout(self, data_bytes: int) -> None:
        """As safetensors itself requires: the tensors' bytes follow one another without overlap or gap and
        fill the data section. Two tensors sharing bytes would otherwise both read, silently, as each other."""
        position, previous = 0, None
        for name, (_, _, begin, end) in sorted(self._entries.items(), key=lambda item: item[1][2:]):
            if begin < position:
                raise CheckpointError(f"{self.label}: the bytes of tensor {name!r} overlap those of {previous!r} "
                                      f"(data offsets from {begin}, the other ends at {position}): the file is damaged "
                                      f"or was crafted; safetensors refuses it too")
            if begin > position:
                raise CheckpointError(f"{self.label}: {begin - position} bytes before tensor {name!r} belong to no "
                                      f"tensor: the file is damaged; safetensors refuses it too")
            position, previous = end, name
        if position != data_bytes:
            raise CheckpointError(f"{self.label}: its last {data_bytes - position} bytes belong to no tensor: the file "
                                  f"is damaged or has something appended; safetensors refuses it too")

    def __enter__(self) -> SafetensorsReader:  # no handle is kept open; `with` reads like safe_open's
        return self

    def __exit__(self, *exc_info) -> None:
        return None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        dtype_name = self._entries[name][0]
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.label}: tensor {name!r} has dtype {dtype_name}, which quantrt cannot read")
        return SAFETENSORS_DTYPES[dtype_name]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name`, or only its rows [start, stop) along dim 0, as a fresh CPU tensor."""
        dtype = self.dtype(name)
        _, shape, begin, end = self._entries[name]
        if rows is not None:
            start, stop = rows
            if not shape or not 0 <= start <= stop <= shape[0]:
                raise CheckpointError(f"{self.label}: rows {start}:{stop} of tensor {name!r} {list(shape)} do not exist")
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, shape = begin + start * row_bytes, (stop - start, *shape[1:])
        tensor = torch.empty(shape, dtype=dtype)
        buffer = tensor.reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            got = f.readinto(memoryview(buffer))
        if got != buffer.nbytes:
            raise CheckpointError(f"{self.label} is truncated: tensor {name!r} needs {buffer.nbytes} bytes, {got} "
                                  f"are there")
        return tensor


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; other C libraries have none
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the pages of freed buffers back to the OS (glibc's malloc_trim; a no-op elsewhere).

    A streaming quantizer frees a large float tensor and its temporaries after every layer, between small
    long-lived results (codes, scales). glibc serves such buffers from its heap once one of their size has
    been freed (its mmap threshold adapts upwards) and returns heap pages only from the top, so without this
    the freed pages stay resident: measured, a 289 MiB fp32 Flux quantized to int8 while streaming grew the
    RSS by 168 to 353 MiB (run to run), 67 MiB after one malloc_trim(0). Called once per tensor: it walks
    glibc's free lists, microseconds to milliseconds, nothing next to quantizing the tensor."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class ShardedReader:
    """The tensors of several safetensors files (a sharded checkpoint) by name, each read with its file's
    SafetensorsReader; a tensor in two of them is an error naming it and both files."""

    def __init__(self, files: dict[str, Path], folder: Path):
        self.readers = [SafetensorsReader(path, label=folder / name) for name, path in files.items()]
        self.where: dict[str, SafetensorsReader] = {}
        for reader in self.readers:
            for name in reader.keys():
                if name in self.where:
                    raise CheckpointError(f"tensor {name!r} is in both {Path(self.where[name].label).name} and "
                                          f"{Path(reader.label).name}: which one the model should get is unclear; the "
                                          f"folder is damaged or mixes two saves")
                self.where[name] = reader

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"tensor {name!r} is missing from "
                                  f"{', '.join(Path(r.label).name for r in self.readers)}")
        return self.where[name].read(name)

    @property
    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for reader in self.readers:
            merged.update(reader.metadata)
        return merged
