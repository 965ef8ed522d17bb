import json

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

import bench
import main
from dataset import MNIST, batch_loader
from model import MODELS, LeNet5


def test_speedups_change_how_a_step_is_computed_not_what(mnist_dir):
    """main.py's LeNet-5 (channels-last, fused SGD, batches sliced from memory) against the textbook
    way (contiguous, SGD's default kernels, per-item DataLoader): the same batches in the same
    order, the same logits at every step and the same weights after training, up to float32
    rounding."""
    train_set = MNIST(mnist_dir / "train.tar", limit=3200)
    cfg, cpu, criterion = (
        vars(main.parse_args([])),
        torch.device("cpu"),
        torch.nn.CrossEntropyLoss(),
    )
    torch.manual_seed(0)
    fast, fast_sgd, _ = main.build("lenet5", cfg, cpu)
    torch.manual_seed(0)
    slow = LeNet5()
    slow_sgd = torch.optim.SGD(
        slow.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
    )
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    fast_batches = batch_loader(train_set, 32, torch.Generator().manual_seed(0))
    slow_batches = DataLoader(
        train_set,
        batch_size=32,
        sampler=RandomSampler(train_set, generator=torch.Generator().manual_seed(0)),
    )
    for (images, labels), (slow_images, slow_labels) in zip(
        fast_batches, slow_batches, strict=True
    ):
        assert torch.equal(images, slow_images) and torch.equal(labels, slow_labels)
        logits = main.sgd_step(fast, criterion, fast_sgd, images, labels)
        assert torch.allclose(
            logits, main.sgd_step(slow, criterion, slow_sgd, slow_images, slow_labels), atol=1e-4
        )
    for (name, weights), slow_weights in zip(
        fast.named_parameters(), slow.parameters(), strict=True
    ):
        assert torch.allclose(weights, slow_weights, rtol=1e-3, atol=1e-5), name
    assert not torch.allclose(fast.conv1.weight, LeNet5().conv1.weight, atol=1e-2)  # it did train


def bench_result(argv, capsys):
    """``python bench.py ARGV``'s exit code 0, and every number it printed on its last line."""
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out.splitlines()[-1]), out


def test_bench_runs_and_reports_every_number(mnist_dir, capsys):
    models = ["--models", "mlp,lenet5_reg", "--device", "cpu"]
    result, out = bench_result(
        ["--steps", "3", "--repeats", "1", "--data-dir", str(mnist_dir), *models], capsys
    )
    assert set(result["samples_per_s"]) == {"naive", "textbook", "project"}
    assert result["load_s"]["first"] > result["load_s"]["cached"] > 0
    assert set(result["epoch_s"]["mlp"]) == {"textbook", "plain", "main"}
    assert set(result["epoch_s"]["lenet5_reg"]) == {"textbook", "plain", "main", "main_no_augment"}
    assert (
        result["ratios"]["lenet5_reg"]["augmented/not"] > 0
        and "augmented/not" not in result["ratios"]["mlp"]
    )
    assert all(v > 0 for v in result["samples_per_s"].values())
    assert "main/textbook" in out
    assert "lenet5_reg's augmentation and non-digits: " in out


@pytest.mark.parametrize("name", ["lenet5", "lenet5_reg"])
def test_baseline_models_compute_the_same_function_as_ours(name):
    torch.manual_seed(0)
    ours = MODELS[name]().eval()
    baseline = bench.BASELINE_MODELS[name]().eval()
    baseline.load_state_dict(ours.state_dict())
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(ours(x), baseline(x), atol=1e-6)


def test_the_page_bench_times_requests_with_the_maps_against_the_plain_answer(
    one_epoch_run, capsys
):
    result, out = bench_result(["--page", str(one_epoch_run), "--requests", "3"], capsys)
    assert result["requests"] == 3 and set(result["median_ms"]) == {"request_ms", "answer_ms"}
    assert all(v > 0 for v in result["median_ms"].values())
    assert (
        "POST /predict with the maps, 3 requests of a 280x280 drawing" in out
        and "predict.answer in process" in out
    )


def test_the_load_test_answers_every_drawing_and_measures_the_servers_memory(one_epoch_run, capsys):
    argv = ["--page", str(one_epoch_run), "--load", "3", "--clients", "2", "--idle", "3"]
    result, out = bench_result(argv, capsys)
    assert result["drawings"] > 0 and result["answered"] == result["drawings"]
    # the JPEGs decoded reduced, the PNGs refused
    assert result["oversized"] == {"200": 2, "400": 2}
    assert result["idle_connections_opened"] >= 3 and 100 < result["server_peak_mb"] < 10_000
    assert "drawings: " in out


def test_the_rule_bench_times_fitting_each_models_rule(one_epoch_run, capsys):
    rules = sorted(one_epoch_run.glob("*/rule.pt"))
    before = [path.stat().st_mtime_ns for path in rules]
    assert bench.main(["--rule", str(one_epoch_run)]) == 0
    out = capsys.readouterr().out.splitlines()
    result = json.loads(out[-1])
    assert list(result["rule_s"]) == ["lenet5", "mlp", "lenet5_reg"]
    assert all(seconds > 0 for seconds in result["rule_s"].values())
    assert out[-2].startswith("fitting each model's rule: lenet5 ") and out[-2].endswith(
        " s in all"
    )
    assert len(rules) == 3 and [path.stat().st_mtime_ns for path in rules] == before  # untouched
