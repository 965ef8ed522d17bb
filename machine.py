"""The machine a run trains on: which device --device names, why a GPU cannot be used, the CPU,
and on CUDA the graph that replays a whole training step at once.

main.py picks its device and captures its CUDA graphs here; bench.py picks its device and names
the CPU beside its timings.
"""

import argparse
import os
import platform
import re
import shutil
import sys

import torch


def device_arg(text):
    """--device: auto, cpu, cuda, cuda:N or mps."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def pick_device(name, local_rank=None):
    """The torch.device for --device; raises ValueError when the asked-for one is absent.

    With ``local_rank`` (under torchrun), ``auto`` and ``cuda`` mean GPU ``local_rank %
    device_count``, so the ranks of a machine share its GPUs evenly."""
    if name == "auto":
        problem = cuda_gpu_problem()
        if problem is None and torch.cuda.is_available():
            return pick_device("cuda", local_rank)
        if problem is not None:
            print(
                f"note: {problem}; training on the CPU. docs/platforms.md says what to install.",
                file=sys.stderr,
            )
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            problem = cuda_gpu_problem()
            raise ValueError(
                f"--device {name}: no CUDA device is available"
                + (f" ({problem})" if problem else "")
            )
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s),"
                " from cuda:0"
            )
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: no Apple MPS device is available")
    return device


def cuda_gpu_problem():
    """Why this torch cannot use the machine's NVIDIA GPU; None when all is well or none is in."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        built = torch.cuda.get_arch_list()  # e.g. ['sm_75', ..., 'sm_120', 'compute_120']
        # same major, older minor
        binary = any(arch == f"sm_{major}{m}" for arch in built for m in range(minor + 1))
        ptx = any(
            arch.startswith("compute_") and int(arch[8:]) <= major * 10 + minor for arch in built
        )
        if binary or ptx:
            return None
        name = torch.cuda.get_device_name()
        return (
            f"the GPU {name} (sm_{major}{minor}) is older than any this torch was built for"
            f" ({', '.join(built)})"
        )
    if shutil.which("nvidia-smi") is None:  # every NVIDIA driver installs it, on Linux and Windows
        return None
    if torch.version.cuda is None:
        return "an NVIDIA GPU is installed, but this torch is a CPU-only build"
    return (
        f"an NVIDIA GPU is installed, but this torch (for CUDA {torch.version.cuda}) cannot use it"
        " (an older driver?)"
    )


def cpu_cores():
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name():
    """The processor's model name, for the record."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


class GraphedStep:
    """``step(images, labels)`` captured once as a CUDA graph, then replayed for each batch of the
    same shape.

    At batch 32 a step's kernels run for microseconds each, less than it takes Python to launch
    them one by one; a replay launches the whole step (forward, backward, SGD update) at once.
    Capturing needs a few warm-up steps first (they settle the optimizer's state and pick the
    kernels); their effect on the model, the optimizer and the CUDA RNG is undone, so training
    goes on exactly as if they had never run.
    """

    WARMUP_STEPS = 3

    def __init__(self, step, model, optimizer, images, labels):
        device = images.device
        # the graph reads its input from these
        self.images, self.labels = images.clone(), labels.clone()
        for group in optimizer.param_groups:
            for p in group["params"] if group["momentum"] else ():
                # Zero buffers give the same first update as none (buf = momentum * 0 + grad), but
                # exist before the warm-up, so the graph captures the update with momentum.
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        state = [
            *model.state_dict().values(),
            *(s["momentum_buffer"] for s in optimizer.state.values()),
        ]
        saved, saved_rng = [t.clone() for t in state], torch.cuda.get_rng_state(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_STEPS):
                step(self.images, self.labels)
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.no_grad():
            for t, value in zip(state, saved, strict=True):
                t.copy_(value)
        torch.cuda.set_rng_state(saved_rng, device)
        # the graph's backward then allocates the gradients in the graph's memory
        optimizer.zero_grad()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.images, self.labels)

    def fits(self, images):
        return images.shape == self.images.shape

    def __call__(self, images, labels):
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites self.logits
