"""machine.py: --device's values, the device each names (GPUs simulated where the test needs
them), why a GPU cannot be used, and the CPU."""

import argparse
import os

import pytest
import torch

import machine


def test_device_takes_auto_cpu_cuda_cuda_n_and_mps_and_nothing_else():
    for text in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert machine.device_arg(text) == text
    for text in ("gpu", "cuda:x", "cpu0", "CUDA"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected auto, cpu, cuda, cuda:N"):
            machine.device_arg(text)


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees two CUDA devices (only their names: nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_each_rank_of_a_machine_gets_its_own_gpu_and_a_missing_one_is_named(two_gpus):
    assert machine.pick_device("cuda") == torch.device("cuda")
    assert [machine.pick_device("cuda", rank) for rank in range(3)] == [
        torch.device("cuda", k) for k in (0, 1, 0)
    ]
    assert machine.pick_device("cuda:1", 0) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="--device cuda:2: this machine has 2 CUDA device"):
        machine.pick_device("cuda:2")


def test_an_absent_device_is_a_value_error_naming_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine, "cuda_gpu_problem", lambda: None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert machine.pick_device("cpu") == torch.device("cpu")
    assert machine.pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="^--device cuda: no CUDA device is available$"):
        machine.pick_device("cuda")
    with pytest.raises(ValueError, match="^--device mps: no Apple MPS device is available$"):
        machine.pick_device("mps")


def test_why_a_gpu_cannot_be_used(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine.shutil, "which", lambda name: None)
    assert machine.cuda_gpu_problem() is None  # no NVIDIA driver: no GPU to miss
    monkeypatch.setattr(machine.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert machine.cuda_gpu_problem() == (
        "an NVIDIA GPU is installed, but this torch is a CPU-only build"
    )
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert "this torch (for CUDA 13.0) cannot use it" in machine.cuda_gpu_problem()


def test_a_gpu_older_than_the_build_is_named_and_one_it_was_built_for_is_not(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Tesla P100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (6, 0))
    assert machine.cuda_gpu_problem() == (
        "the GPU Tesla P100 (sm_60) is older than any this torch was built for"
        " (sm_75, sm_80, sm_90)"
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 6))  # runs sm_80 code
    assert machine.cuda_gpu_problem() is None


def test_the_cores_this_process_may_use_and_the_cpus_name(monkeypatch):
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3})
        assert machine.cpu_cores() == 2
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        named = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    assert machine.cpu_name() == named[0]
