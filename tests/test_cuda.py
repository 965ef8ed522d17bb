"""The CUDA path: data on the device, and the training step captured as a CUDA graph.

These need a CUDA GPU, which CI does not have; docs/tests.md says when they last ran on one.
"""

import functools
import json

import pytest
import torch
from conftest import epochs_without_time, run_main

import bench
import main
from dataset import MNIST, batch_loader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def test_batches_are_sliced_on_the_device(mnist_dir):
    train_set = MNIST(mnist_dir / "train.tar", limit=4010).to(CUDA)
    loader = batch_loader(train_set, 32, torch.Generator().manual_seed(0))
    # the order is on the GPU: no copy per batch
    assert next(iter(loader.sampler)).device.type == "cuda"
    images, labels = next(iter(loader))
    assert images.device.type == labels.device.type == "cuda" and images.shape == (32, 1, 28, 28)


@pytest.fixture
def deterministic_cudnn():
    # cuDNN may pick convolution algorithms that sum in a varying order (atomics), and early SGD on
    # a small subset amplifies that rounding into visibly different runs, graph or no graph. With
    # deterministic algorithms, any difference left would be the graph's doing.
    previous, torch.backends.cudnn.deterministic = torch.backends.cudnn.deterministic, True
    yield
    torch.backends.cudnn.deterministic = previous


@pytest.mark.parametrize("name", ["lenet5", "mlp", "lenet5_reg"])
def test_cuda_graph_trains_exactly_like_launching_each_kernel(
    mnist_dir, tmp_path, name, monkeypatch, deterministic_cudnn
):
    # 4,010 images: 125 batches of 32 replay the graph, the last 10 images take the step without it.
    argv = [
        "--device",
        "cuda",
        "--model",
        name,
        "--train-limit",
        "4010",
        "--test-limit",
        "2000",
        "--epochs",
        "2",
    ]
    captures, capture = [], main.GraphedStep

    def counted_capture(*args):
        captures.append(args)
        return capture(*args)

    monkeypatch.setattr(main, "GraphedStep", counted_capture)
    assert run_main(mnist_dir, tmp_path, *argv, name="graphed") == 0
    # one capture per epoch, so each epoch's learning rate is the one replayed
    assert len(captures) == 2
    monkeypatch.setattr(main, "train", functools.partial(main.train, cuda_graph=False))
    assert run_main(mnist_dir, tmp_path, *argv, name="eager") == 0
    graphed, eager = (
        epochs_without_time(tmp_path / run / name / "stats.json") for run in ("graphed", "eager")
    )
    assert graphed == eager  # losses and accuracies of both epochs, bit for bit
    graphed_model, eager_model = (
        torch.load(tmp_path / run / name / "last.pt", weights_only=True)["model"]
        for run in ("graphed", "eager")
    )
    assert all(
        torch.equal(a, b) for a, b in zip(graphed_model.values(), eager_model.values(), strict=True)
    )
    assert graphed[-1]["test_acc"] > 0.8  # it learned


def test_main_trains_every_model_on_cuda(mnist_dir, tmp_path):
    extra = ["--device", "cuda", "--train-limit", "6000", "--test-limit", "1000", "--epochs", "2"]
    assert run_main(mnist_dir, tmp_path, *extra, name="gpu") == 0
    assert json.loads((tmp_path / "gpu/config.json").read_text())["device"] == "cuda"
    for name in ("lenet5", "mlp", "lenet5_reg"):
        stats = json.loads((tmp_path / "gpu" / name / "stats.json").read_text())
        assert stats["epochs"][-1]["test_acc"] > 0.8
        last = torch.load(
            tmp_path / "gpu" / name / "last.pt", map_location="cpu", weights_only=True
        )
        assert last["epoch"] == 2


def test_bench_on_cuda_times_main_with_and_without_graphs(mnist_dir, capsys):
    args = [
        "--steps",
        "5",
        "--repeats",
        "1",
        "--data-dir",
        str(mnist_dir),
        "--models",
        "lenet5",
        "--device",
        "cuda",
    ]
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["device"] == "cuda" and result["gpu"]
    assert set(result["epoch_s"]["lenet5"]) == {"textbook", "plain", "main", "main_no_graph"}
