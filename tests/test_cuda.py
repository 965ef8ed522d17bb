"""The CUDA path: data on the device, and the training step captured as a CUDA graph.

These need a CUDA GPU, which CI does not have; the README says when they last ran on one.
"""

import json

import pytest
import torch
from conftest import run_main

import bench
import main
from dataset import MNIST, batch_loader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def train_two_epochs(name, train_set, test_set, cuda_graph):
    """Two epochs as main.run_job trains them (seeded, cosine schedule); returns (model, stats of each epoch)."""
    cfg = vars(main.parse_args(["--epochs", "2"]))
    torch.manual_seed(0)
    model, optimizer, scheduler = main.build(name, cfg, CUDA)
    criterion = torch.nn.CrossEntropyLoss()
    generator = torch.Generator()
    rows = []
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        generator.manual_seed(epoch)
        loader = batch_loader(train_set.with_augment(main.uses_augmentation(name, cfg)), 32, generator)
        train = main.train(model, loader, CUDA, criterion, optimizer, cuda_graph=cuda_graph)
        rows.append((*train, *main.test(model, batch_loader(test_set, 1000), CUDA, criterion)))
        scheduler.step()
    return model, rows


@pytest.fixture(scope="module")
def splits(mnist_dir):
    # 4,010 images: 125 batches of 32 replay the graph, the last 10 images take the step without it.
    return MNIST(mnist_dir / "train.tar", limit=4010).to(CUDA), MNIST(mnist_dir / "test.tar", limit=2000).to(CUDA)


def test_batches_are_sliced_on_the_device(splits):
    train_set, _ = splits
    loader = batch_loader(train_set, 32, torch.Generator().manual_seed(0))
    assert next(iter(loader.sampler)).device.type == "cuda"  # the order is on the GPU: no copy per batch
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
def test_cuda_graph_trains_exactly_like_launching_each_kernel(splits, name, monkeypatch, deterministic_cudnn):
    captures, capture = [], main.GraphedStep

    def counted_capture(*args):
        captures.append(args)
        return capture(*args)

    monkeypatch.setattr(main, "GraphedStep", counted_capture)
    graphed_model, graphed = train_two_epochs(name, *splits, cuda_graph=True)
    assert len(captures) == 2  # one capture per epoch, so each epoch's learning rate is the one replayed
    eager_model, eager = train_two_epochs(name, *splits, cuda_graph=False)
    assert graphed == eager  # losses and accuracies of both epochs, bit for bit
    assert all(
        torch.equal(a, b) for a, b in zip(graphed_model.state_dict().values(), eager_model.state_dict().values())
    )
    assert graphed[-1][3] > 0.8  # test accuracy: it learned


def test_main_trains_every_model_on_cuda(mnist_dir, tmp_path):
    extra = ["--device", "cuda", "--train-limit", "6000", "--test-limit", "1000", "--epochs", "2"]
    assert run_main(mnist_dir, tmp_path, *extra, name="gpu") == 0
    assert json.loads((tmp_path / "gpu/config.json").read_text())["device"] == "cuda"
    for name in ("lenet5", "mlp", "lenet5_reg"):
        stats = json.loads((tmp_path / "gpu" / name / "stats.json").read_text())
        assert stats["epochs"][-1]["test_acc"] > 0.8
        last = torch.load(tmp_path / "gpu" / name / "last.pt", map_location="cpu", weights_only=True)
        assert last["epoch"] == 2


def test_bench_on_cuda_times_main_with_and_without_graphs(mnist_dir):
    args = ["--steps", "5", "--repeats", "1", "--data-dir", str(mnist_dir), "--models", "lenet5", "--device", "cuda"]
    result = bench.main_cli(args)
    assert result["device"] == "cuda" and result["gpu"]
    assert set(result["epoch_s"]["lenet5"]) == {"textbook", "plain", "main", "main_no_graph"}
