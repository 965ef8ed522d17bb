import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

import bench
import main
from dataset import MNIST, batch_loader
from model import MODELS, LeNet5


def accuracy_after_training(train_set, test_set, optimized):
    """Two epochs of LeNet-5 with main.py's speed-ups (channels-last, fused SGD, batch slicing) or without."""
    torch.manual_seed(0)
    model = LeNet5()
    if optimized:
        model = model.to(memory_format=LeNet5.memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=optimized)
    generator = torch.Generator().manual_seed(0)
    if optimized:
        loader = batch_loader(train_set, 32, generator)
    else:  # per-item __getitem__ and default collation, in the same shuffled order
        loader = DataLoader(train_set, batch_size=32, sampler=RandomSampler(train_set, generator=generator))
    criterion = torch.nn.CrossEntropyLoss()
    for epoch in range(2):
        generator.manual_seed(epoch)  # as main.py does: each epoch's order depends only on its seed
        main.train(model, loader, torch.device("cpu"), criterion, optimizer)
    return main.test(model, batch_loader(test_set, 1000), torch.device("cpu"), criterion)[1]


@pytest.fixture
def one_thread():
    # With two threads, floating-point reductions are split differently in the two memory
    # formats, and early SGD amplifies that rounding into differences of a point or so on
    # a subset this small: one thread isolates what the speed-ups change.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_speedups_do_not_change_results(mnist_dir, one_thread):
    train_set = MNIST(mnist_dir / "train.tar", limit=4000)
    test_set = MNIST(mnist_dir / "test.tar", limit=2000)
    fast = accuracy_after_training(train_set, test_set, optimized=True)
    slow = accuracy_after_training(train_set, test_set, optimized=False)
    assert fast > 0.9 and abs(fast - slow) <= 0.001


def test_bench_runs_and_reports_every_number(mnist_dir, capsys):
    result = bench.main_cli(
        ["--steps", "3", "--repeats", "1", "--data-dir", str(mnist_dir), "--models", "mlp", "--device", "cpu"]
    )
    assert set(result["samples_per_s"]) == {"naive", "textbook", "project"}
    assert result["load_s"]["first"] > result["load_s"]["cached"] > 0
    assert set(result["epoch_s"]["mlp"]) == {"textbook", "plain", "main"}
    assert all(v > 0 for v in result["samples_per_s"].values())
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith('{"torch"') and "main/textbook" in out


@pytest.mark.parametrize("name", ["lenet5", "lenet5_reg"])
def test_baseline_models_compute_the_same_function_as_ours(name):
    torch.manual_seed(0)
    ours = MODELS[name]().eval()
    baseline = bench.BASELINE_MODELS[name]().eval()
    baseline.load_state_dict(ours.state_dict())
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(ours(x), baseline(x), atol=1e-6)
