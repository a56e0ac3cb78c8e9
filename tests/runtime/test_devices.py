import platform

import torch

from quantrt.devices import cpu_model, device_name


def test_a_cpu_is_named_by_model_architecture_and_vector_isa():
    name = device_name("cpu")
    assert name == f"cpu: {cpu_model()} ({platform.machine()} {torch.backends.cpu.get_cpu_capability()})"
    assert device_name(torch.device("cpu")) == name


def test_a_gpu_is_named_with_its_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert device_name("cuda:0") == "NVIDIA H100 80GB HBM3 (SM 9.0)"


def test_other_devices_are_named_by_type():
    assert device_name("meta") == "meta"
