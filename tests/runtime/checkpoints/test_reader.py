"""The streaming safetensors reader (quantrt.checkpoints.reader)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantrt.checkpoints.reader import SafetensorsReader
from quantrt.serialization import CheckpointError


def damaged_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[8:12] = b"{{{{"
    file.write_bytes(bytes(data))


def test_safetensors_reader_reads_rows_and_refuses_damaged_files(tmp_path):
    tensors = {"w": torch.randn(7, 5), "b": torch.randn(3).to(torch.bfloat16), "s": torch.tensor(2.5),
               "f8": torch.randn(4, 4).to(torch.float8_e4m3fn)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"k": "v"})
    reader = SafetensorsReader(tmp_path / "t.safetensors")
    assert reader.metadata == {"k": "v"}
    for name, tensor in tensors.items():
        read = reader.read(name)
        assert read.dtype == tensor.dtype and read.shape == tensor.shape
        assert torch.equal(read.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    torch.testing.assert_close(reader.read("w", (2, 6)), tensors["w"][2:6], rtol=0, atol=0)
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match="cut.safetensors.*damaged or truncated"):
        SafetensorsReader(tmp_path / "cut.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(data)
    damaged_header(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="bad.safetensors has a damaged safetensors header"):
        SafetensorsReader(tmp_path / "bad.safetensors")
