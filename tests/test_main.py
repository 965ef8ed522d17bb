import json
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, epochs_without_time, interrupt_at, run_main, tiny_idx_dir

import dataset
import exposure
import main
import outliers
from dataset import MNIST, batch_loader
from model import CustomMLP, LeNet5, num_params

STAT_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"}
VAL_KEYS = {"val_loss", "val_acc"}  # a default run holds out a validation split


SMALL = ("--train-limit", "2000", "--test-limit", "500", "--epochs", "2", "--device", "cpu")


def test_small_run_writes_config_stats_and_checkpoints(mnist_dir, tmp_path, capsys):
    assert run_main(mnist_dir, tmp_path, *SMALL) == 0
    run_dir = tmp_path / "run"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["epochs"] == 2 and config["batch_size"] == 32 and config["lr"] == 0.01
    assert config["val_size"] == 200  # a tenth of the 2,000 training images
    assert (
        config["momentum"] == 0.9
        and config["torch"] == torch.__version__
        and config["device"] == "cpu"
    )
    assert (tmp_path / "latest").resolve() == run_dir.resolve()
    for name, params in [
        ("lenet5", 61_706),
        ("mlp", num_params(CustomMLP())),
        ("lenet5_reg", 62_158),
    ]:
        stats = json.loads((run_dir / name / "stats.json").read_text())
        assert stats["model"] == name and stats["params"] == params
        assert [row["epoch"] for row in stats["epochs"]] == [1, 2]
        assert all(set(row) == STAT_KEYS | VAL_KEYS for row in stats["epochs"])
        assert all(0 <= row[k] <= 1 for row in stats["epochs"] for k in ("train_acc", "test_acc"))
        first, second = stats["epochs"]
        assert (
            second["train_loss"] < first["train_loss"] and second["test_loss"] < first["test_loss"]
        )
        last = torch.load(run_dir / name / "last.pt", weights_only=True)
        assert last["epoch"] == 2 and {"model", "optimizer", "scheduler", "rng"} <= set(last)
        assert not (run_dir / name / "best.pt").exists()  # no weights chosen on the test set
        rule = outliers.load_rule(run_dir / name)
        assert rule["digits"] == 200 and rule["fitted_on"] == "validation"
        assert len(rule["bank"]) == 1_800
    lines = [line for line in capsys.readouterr().out.splitlines() if " epoch " in line]
    assert len(lines) == 6 and lines[0].startswith("lenet5     seed 0 epoch 1/2 | train loss ")


def test_two_runs_with_the_same_seed_give_identical_stats(mnist_dir, tmp_path):
    for name in ("a", "b"):
        assert run_main(mnist_dir, tmp_path, *SMALL, "--model", "lenet5_reg", name=name) == 0
    assert epochs_without_time(tmp_path / "a/lenet5_reg/stats.json") == epochs_without_time(
        tmp_path / "b/lenet5_reg/stats.json"
    )


def test_an_interrupted_run_resumes_to_the_same_numbers(mnist_dir, tmp_path, monkeypatch, capsys):
    limits = ("--train-limit", "1000", "--test-limit", "300", "--epochs", "3", "--device", "cpu")
    assert run_main(mnist_dir, tmp_path, *limits, "--model", "lenet5_reg,mlp", name="whole") == 0

    real_train = main.train
    monkeypatch.setattr(main, "train", interrupt_at(3))  # during lenet5_reg's third epoch
    assert run_main(mnist_dir, tmp_path, *limits, "--model", "lenet5_reg,mlp", name="cut") == 130
    assert "--resume" in capsys.readouterr().out
    cut = tmp_path / "cut"
    assert len(json.loads((cut / "lenet5_reg/stats.json").read_text())["epochs"]) == 2
    assert torch.load(cut / "lenet5_reg/last.pt", weights_only=True)["epoch"] == 2
    assert not (cut / "mlp").exists()

    monkeypatch.setattr(main, "train", real_train)
    assert (tmp_path / "latest").resolve() == cut.resolve()
    first = json.loads((cut / "config.json").read_text())
    assert main.main(["--resume", str(tmp_path / "latest"), "--quiet"]) == 0
    for name in ("lenet5_reg", "mlp"):
        assert epochs_without_time(cut / name / "stats.json") == epochs_without_time(
            tmp_path / "whole" / name / "stats.json"
        )
    config = json.loads((cut / "config.json").read_text())
    assert config.pop("resumes")[0]["device"] == "cpu" and config == first  # see the test below


def test_a_resume_keeps_the_runs_first_record_and_adds_its_own(mnist_dir, tmp_path):
    limits = (
        "--train-limit",
        "200",
        "--test-limit",
        "100",
        "--epochs",
        "1",
        "--model",
        "mlp",
        "--device",
        "cpu",
    )
    assert run_main(mnist_dir, tmp_path, *limits) == 0
    first = json.loads((tmp_path / "run/config.json").read_text())
    for threads in ("1", "2"):
        assert main.main(["--resume", str(tmp_path / "run"), "--quiet", "--threads", threads]) == 0
    config = json.loads((tmp_path / "run/config.json").read_text())
    resumes = config.pop("resumes")
    assert (
        config == first and "resumes" not in first and first["threads"] == torch.get_num_threads()
    )
    assert [(r["threads"], r["world_size"], r["device"]) for r in resumes] == [
        (1, 1, "cpu"),
        (2, 1, "cpu"),
    ]
    assert first["when"] <= resumes[0]["when"] <= resumes[1]["when"] and "ranks" not in resumes[0]


def test_sigterm_keeps_completed_epochs(mnist_dir, tmp_path):
    folders = ["--data-dir", str(mnist_dir), "--out-dir", str(tmp_path)]
    settings = "--run-name r --model mlp --train-limit 3000 --test-limit 100 --epochs 1000".split()
    cmd = [sys.executable, str(ROOT / "main.py"), *folders, *settings]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    for line in proc.stdout:
        if " epoch    2/1000 " in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    stats = json.loads((tmp_path / "r/mlp/stats.json").read_text())
    epoch = torch.load(tmp_path / "r/mlp/last.pt", weights_only=True)["epoch"]
    assert len(stats["epochs"]) == epoch >= 2
    assert not [p for p in (tmp_path / "r/mlp").iterdir() if p.name.endswith(".tmp")]


def test_a_final_batch_of_one_sample_trains_every_model(mnist_dir, tmp_path):
    assert (
        run_main(mnist_dir, tmp_path, "--train-limit", "33", "--test-limit", "10", "--epochs", "1")
        == 0
    )


def test_several_seeds_go_to_seed_folders(mnist_dir, tmp_path):
    limits = ("--train-limit", "200", "--test-limit", "50", "--epochs", "1")
    assert run_main(mnist_dir, tmp_path, "--model", "mlp", "--seeds", "3,4", *limits) == 0
    for seed in (3, 4):
        assert json.loads((tmp_path / f"run/mlp/seed{seed}/stats.json").read_text())["seed"] == seed


def test_missing_tars_are_prepared_from_idx_dir(tmp_path):
    idx, _ = tiny_idx_dir(tmp_path / "idx", n_train=100, n_test=40)
    data = tmp_path / "data"
    assert (
        run_main(data, tmp_path / "runs", "--idx-dir", str(idx), "--model", "mlp", "--epochs", "1")
        == 0
    )
    assert len(MNIST(data / "train.tar")) == 100 and len(MNIST(data / "test.tar")) == 40


def test_loss_is_the_mean_over_samples_not_over_batches(mnist_dir):
    torch.manual_seed(0)
    model = LeNet5().eval()
    test_set = MNIST(mnist_dir / "test.tar", limit=1500)  # batches of 1000 and 500
    loss, acc = main.test(
        model, batch_loader(test_set, 1000), torch.device("cpu"), torch.nn.CrossEntropyLoss()
    )
    images, labels = test_set[list(range(1500))]
    with torch.no_grad():
        logits = model(images)
    assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert acc == (logits.argmax(1) == labels).sum().item() / 1500


def test_training_loss_and_accuracy_are_over_samples_not_batches(mnist_dir):
    torch.manual_seed(0)
    model = LeNet5()
    train_set = MNIST(mnist_dir / "train.tar", limit=1500)  # batches of 1000 and 500
    # the weights every batch sees are the same
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, acc = main.train(
        model,
        batch_loader(train_set, 1000),
        torch.device("cpu"),
        torch.nn.CrossEntropyLoss(),
        frozen,
    )
    images, labels = train_set[list(range(1500))]
    with torch.no_grad():
        logits = model(images)
    assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert acc == (logits.argmax(1) == labels).sum().item() / 1500


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet"], "unknown model resnet"),
        (["--epochs", "0"], "--epochs: must be greater than 0"),
        (["--batch-size", "-1"], "--batch-size: must be greater than 0"),
        (["--lr", "0"], "--lr: must be greater than 0"),
        (["--device", "cuda"], "no CUDA device"),
        (["--device", "mps"], "no Apple MPS device"),
        (["--resume", "."], "is not a run directory"),
        (["--train-limit", "1"], "--train-limit: must be at least 2"),
        (["--batch-size", "1"], "--batch-size: must be at least 2"),
        (
            ["--batch-size", "abc"],
            "--batch-size: expected a whole number greater than 0, got 'abc'",
        ),
        (["--seed", "1.5"], "--seed: expected a whole number, got '1.5'"),
        (["--lr", "fast"], "--lr: expected a number greater than 0, got 'fast'"),
        (["--device", "tpu"], "--device: expected auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        (["--device", "cuda:1"], "--device cuda:1: no CUDA device"),
        (["--run-name", "a/b"], "--run-name: expected a folder name"),
        (["--val-size", "-1"], "--val-size: must be 0 or more, got -1"),
        (["--momentum", "-1"], "--momentum: must be in [0, 1), got -1.0"),
        (["--momentum", "1"], "--momentum: must be in [0, 1), got 1.0"),
        (["--weight-decay", "-0.1"], "--weight-decay: must be 0 or more, got -0.1"),
        (["--weight-decay", "nan"], "--weight-decay: expected a finite number, got 'nan'"),
        (["--lr", "inf"], "--lr: expected a finite number, got 'inf'"),
        (["--model", "mlp,lenet5,mlp"], "--model: model mlp given more than once"),
        (["--seeds", "0,1,0"], "--seeds: seed 0 given more than once"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        main.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith("main.py: error:")


def test_a_bad_setting_writes_nothing(tmp_path, capsys):
    for argv in (["--momentum", "-1"], ["--lr", "inf"], ["--model", "lenet5_reg,lenet5_reg"]):
        with pytest.raises(SystemExit):
            run_main(tmp_path / "data", tmp_path / "runs", *argv)
        assert capsys.readouterr().err.count("error:") == 1
    assert list(tmp_path.iterdir()) == []  # no run folder, no runs/latest


def test_help_shows_a_default_only_where_there_is_one(capsys):
    with pytest.raises(SystemExit):
        main.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: False)" not in text
    assert (
        "initial SGD learning rate (default: 0.01)" in text
        and "training epochs per model (default: 10)" in text
    )


def test_missing_data_without_network_exits_1(tmp_path, capsys, monkeypatch):
    # refused at once, on this machine
    monkeypatch.setattr(dataset, "MIRRORS", ["http://127.0.0.1:9/"])
    assert run_main(tmp_path / "data", tmp_path / "runs", "--epochs", "1") == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: Could not download") and "--idx-dir" in err
    # the patched mirror, not the public ones
    assert "http://127.0.0.1:9/train-images-idx3-ubyte.gz" in err
    assert list(tmp_path.iterdir()) == []  # no data/ (nor data/raw/) made for nothing, no run


# ------------------------------------------------------------ real accuracy, 1 epoch


# one epoch on the 55,000 digits a default run trains on; lenet5_reg, on distorted digits, reached
# 98.1% with torch 2.14 and 97.3% with torch 2.2 (2026-12-07)
@pytest.mark.parametrize("name, floor", [("lenet5", 0.975), ("lenet5_reg", 0.97), ("mlp", 0.95)])
def test_one_epoch_on_the_training_set_reaches_real_accuracy(one_epoch_run, name, floor):
    stats = json.loads((one_epoch_run / name / "stats.json").read_text())
    assert stats["epochs"][0]["test_acc"] >= floor


def test_only_the_regularized_models_training_split_is_augmented(mnist_dir, tmp_path, monkeypatch):
    loaders = []
    real_batch_loader = main.batch_loader

    def recording_batch_loader(dataset, batch_size, generator=None):
        loaders.append((dataset.path.name, len(dataset), dataset.augmented))
        return real_batch_loader(dataset, batch_size, generator)

    monkeypatch.setattr(main, "batch_loader", recording_batch_loader)
    assert (
        run_main(mnist_dir, tmp_path, "--train-limit", "64", "--test-limit", "32", "--epochs", "1")
        == 0
    )
    # each job: the test set, the validation split (6 images, a tenth), then the training split,
    # lenet5_reg's with its non-digits added (exposure.py)
    test, val = ("test.tar", 32, False), ("train.tar", 6, False)
    assert loaders == [test, val, ("train.tar", 58, False)] * 2 + [
        test,
        val,
        ("train.tar", 58 + round(exposure.SHARE * 58), True),
    ]


def test_an_unwritable_output_folder_is_one_line_not_a_traceback(mnist_dir, tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")
    assert run_main(mnist_dir, blocker, "--epochs", "1", "--train-limit", "64") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {blocker}") and "Traceback" not in err
