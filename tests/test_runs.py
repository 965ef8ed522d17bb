"""Runs never harm each other, resume works from anywhere, and no damaged file ends in a
traceback."""

import errno
import json
import math
import os
import shlex
import tarfile

import pytest
import torch
from conftest import epochs_without_time, interrupt_at, run_main
from torch.utils.data import DataLoader

import dataset
import exposure
import main
import runs
from model import CustomMLP, LeNet5

TINY = ("--train-limit", "200", "--test-limit", "100", "--device", "cpu")


def tree(folder):
    """Every path under ``folder`` with its bytes or link target, to show that nothing changed."""
    return {
        p: p.readlink() if p.is_symlink() else p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


# ------------------------------------------------------------ run folders


def test_an_existing_run_name_is_refused_and_nothing_is_written(mnist_dir, tmp_path, capsys):
    assert run_main(mnist_dir, tmp_path, *TINY, "--model", "mlp", "--epochs", "1", name="x") == 0
    assert run_main(mnist_dir, tmp_path, *TINY, "--model", "mlp", "--epochs", "1", name="y") == 0
    before = tree(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_main(mnist_dir, tmp_path, *TINY, "--epochs", "4", "--lr", "0.05", name="x")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--resume {tmp_path / 'x'}" in err and "another name" in err
    assert tree(tmp_path) == before  # config.json, checkpoints and runs/latest (still y) untouched


def test_runs_started_in_the_same_second_get_folders_of_their_own(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20261129-120000")
    args = [
        "--data-dir",
        str(mnist_dir),
        "--out-dir",
        str(tmp_path),
        "--quiet",
        *TINY,
        "--model",
        "mlp",
        "--epochs",
        "1",
    ]
    for seed in (1, 2):
        assert main.main([*args, "--seed", str(seed)]) == 0
    seeds = {
        p.parent.parent.name: json.loads(p.read_text())["seed"]
        for p in tmp_path.glob("2*/mlp/stats.json")
    }
    assert seeds == {"20261129-120000": 1, "20261129-120000-2": 2}


def test_a_run_that_fails_before_training_leaves_no_folder_and_keeps_latest(
    mnist_dir, tmp_path, capsys
):
    assert (
        run_main(
            mnist_dir, tmp_path / "runs", *TINY, "--model", "mlp", "--epochs", "1", name="good"
        )
        == 0
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.tar").write_text("not a tar")
    (broken / "test.tar").write_text("not a tar")
    assert (
        main.main(["--data-dir", str(broken), "--out-dir", str(tmp_path / "runs"), "--quiet"]) == 1
    )
    assert "train.tar: not a tar archive" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["good", "latest"]
    assert runs.find_run(tmp_path / "runs" / "latest").name == "good"


# ------------------------------------------------------------ the course's extracted folders


def extract_first(tar_path, folder, count):
    """Extract the first ``count`` PNGs of a course tar, as a student's unzip tool would."""
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar.getmembers() if m.isfile()][:count]
        tar.extractall(folder, members=members, filter="data")


def test_extracted_train_and_test_folders_are_used_without_preparing_tars(
    mnist_dir, tmp_path, capsys
):
    data = tmp_path / "data"
    extract_first(mnist_dir / "train.tar", data, 300)  # data/train/00000_5.png, ...
    extract_first(mnist_dir / "test.tar", data, 100)
    assert (
        run_main(data, tmp_path / "runs", "--model", "mlp", "--epochs", "1", "--device", "cpu") == 0
    )
    assert "missing" not in capsys.readouterr().err
    assert sorted(p.name for p in data.iterdir()) == ["test", "train"]  # no tar was made
    config = json.loads((tmp_path / "runs/run/config.json").read_text())
    assert config["data_dir"] == str(data)
    assert len(json.loads((tmp_path / "runs/run/mlp/stats.json").read_text())["epochs"]) == 1


def test_code_written_against_the_course_template_runs_unchanged(mnist_dir, tmp_path):
    extract_first(mnist_dir / "train.tar", tmp_path / "data", 3000)
    extract_first(mnist_dir / "test.tar", tmp_path / "data", 1000)
    torch.manual_seed(0)
    trn_loader = DataLoader(
        dataset.MNIST(data_dir=tmp_path / "data/train"), batch_size=32, shuffle=True
    )
    tst_loader = DataLoader(dataset.MNIST(data_dir=tmp_path / "data/test"), batch_size=32)
    device = torch.device("cpu")
    criterion = torch.nn.CrossEntropyLoss()
    for model in (LeNet5(), CustomMLP()):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        history = []
        for _epoch in range(2):
            trn_loss, acc = main.train(model, trn_loader, device, criterion, optimizer)
            tst_loss, tst_acc = main.test(model, tst_loader, device, criterion)
            history.append((trn_loss, tst_loss))
        (first_trn, first_tst), (trn, tst) = history
        assert trn < first_trn < math.log(10) and tst < first_tst and acc > 0.8 and tst_acc > 0.8


# ------------------------------------------------------------ resume


def test_resume_finds_the_data_from_any_folder_and_takes_only_options_that_keep_the_experiment(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # the run is started with relative paths, as people type them
    data = os.path.relpath(mnist_dir)
    common = (
        "--model",
        "mlp",
        "--train-limit",
        "300",
        "--test-limit",
        "100",
        "--device",
        "cpu",
        "--epochs",
        "2",
    )
    assert run_main(data, "runs", *common, name="whole") == 0
    real_train = main.train
    monkeypatch.setattr(main, "train", interrupt_at(2))
    assert run_main(data, "runs", *common, name="cut") == 130
    monkeypatch.setattr(main, "train", real_train)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the run saved its data folder as an absolute path
    cut = tmp_path / "runs" / "cut"
    for refused in (["--epochs", "4"], ["--lr", "0.05"], ["--model", "lenet5"], ["--seeds", "0,1"]):
        with pytest.raises(SystemExit) as exit_:
            main.main(["--resume", str(cut), *refused])
        assert (
            exit_.value.code == 2
            and f"argument {refused[0]}: --resume continues" in capsys.readouterr().err
        )
    assert main.main(["--resume", str(cut), "--device", "cpu", "--quiet"]) == 0
    assert not (elsewhere / "data").exists()
    assert epochs_without_time(cut / "mlp/stats.json") == epochs_without_time(
        tmp_path / "runs/whole/mlp/stats.json"
    )


def test_the_printed_resume_command_can_be_pasted_for_a_path_with_spaces(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "my runs"
    monkeypatch.setattr(main, "train", interrupt_at(2))
    assert (
        run_main(mnist_dir, out, *TINY, "--model", "mlp", "--epochs", "3", name="it's mine") == 130
    )
    line = next(line for line in capsys.readouterr().out.splitlines() if "--resume" in line)
    argv = shlex.split(line.split("continue with: ", 1)[1])
    assert argv == ["python", "main.py", "--resume", str(out / "it's mine")]


def test_every_run_ends_with_its_table_and_the_plot_command_even_with_nothing_left(
    mnist_dir, tmp_path, capsys
):
    assert (
        run_main(
            mnist_dir, tmp_path, *TINY, "--model", "mlp,lenet5", "--seeds", "3,4", "--epochs", "2"
        )
        == 0
    )
    for argv in ([], ["--resume", str(tmp_path / "run")]):
        if argv:
            assert main.main(argv) == 0
        out = capsys.readouterr().out
        table = out[out.index("model ") :].splitlines()
        assert table[0].split() == [
            "model",
            "seed",
            "epochs",
            "test",
            "acc",
            "val",
            "acc",
            "minutes",
        ]
        for line, (name, seed) in zip(
            table[1:5], [("mlp", 3), ("lenet5", 3), ("mlp", 4), ("lenet5", 4)], strict=False
        ):
            rows = json.loads((tmp_path / f"run/{name}/seed{seed}/stats.json").read_text())[
                "epochs"
            ]
            assert line.split()[:4] == [name, str(seed), "2", f"{rows[-1]['test_acc']:.2%}"]
        assert out.rstrip().endswith(f"plot it: python plot.py {tmp_path / 'run'}")
    assert "nothing left to train" in out


# ------------------------------------------------------------ damaged files


def small_run(mnist_dir, tmp_path):
    assert run_main(mnist_dir, tmp_path, *TINY, "--model", "mlp,lenet5", "--epochs", "2") == 0
    return tmp_path / "run"


@pytest.mark.parametrize(
    "file, damage, message",
    [
        (
            "mlp/last.pt",
            lambda p: p.write_bytes(p.read_bytes()[:300]),
            "mlp/last.pt: not a readable checkpoint",
        ),
        (
            "mlp/last.pt",
            lambda p: torch.save({"epoch": 1, "model": {}}, p),
            "mlp/last.pt: not a checkpoint of this job",
        ),
        (
            "mlp/stats.json",
            lambda p: p.write_text(p.read_text()[:40]),
            "mlp/stats.json: not valid JSON",
        ),
        (
            "mlp/stats.json",
            lambda p: p.write_text("[]"),
            "mlp/stats.json: not a stats.json of main.py",
        ),
    ],
)
def test_a_damaged_job_file_is_one_line_and_the_other_jobs_go_on(
    mnist_dir, tmp_path, capsys, file, damage, message
):
    run_dir = small_run(mnist_dir, tmp_path)
    capsys.readouterr()
    (run_dir / "lenet5/last.pt").unlink()  # lenet5 must be trained again: from scratch
    damage(run_dir / file)
    assert main.main(["--resume", str(run_dir), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and f"move {run_dir / 'mlp'} away" in err
    # lenet5 was retrained
    assert len(json.loads((run_dir / "lenet5/stats.json").read_text())["epochs"]) == 2


@pytest.mark.parametrize("config", ["[]", "{", '{"epochs": "ten"}', "null"])
def test_a_config_of_the_wrong_shape_is_one_line(mnist_dir, tmp_path, capsys, config):
    run_dir = small_run(mnist_dir, tmp_path)
    (run_dir / "config.json").write_text(config)
    capsys.readouterr()
    assert main.main(["--resume", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {run_dir / 'config.json'}: not")


def test_a_run_made_before_the_added_ink_resumes_with_the_augmentation_it_began_with(
    mnist_dir, tmp_path
):
    run_dir = small_run(mnist_dir, tmp_path)
    path = run_dir / "config.json"
    assert runs.read_config(run_dir)["augment_without"] == []  # a new run: the whole recipe
    config = json.loads(path.read_text())
    del config["augment_without"]  # as main.py wrote it before the free and hollow strokes
    path.write_text(json.dumps(config))
    assert runs.read_config(run_dir)["augment_without"] == ["hollow", "strokes"]


def test_a_run_made_before_its_share_of_non_digits_was_recorded_resumes_with_one_in_four(
    mnist_dir, tmp_path
):
    run_dir = small_run(mnist_dir, tmp_path)
    path = run_dir / "config.json"
    assert runs.read_config(run_dir)["non_digit_share"] == exposure.SHARE == 1 / 16
    config = json.loads(path.read_text())
    del config["non_digit_share"]  # as main.py wrote it when every run had one per four digits
    path.write_text(json.dumps(config))
    assert runs.read_config(run_dir)["non_digit_share"] == 0.25


def test_a_full_disk_while_a_checkpoint_is_written_loses_nothing(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    # An uninterrupted run, and the same run whose disk fills up while epoch 2's last.pt is
    # written, after its stats.json row: resume must drop that row and train epoch 2 again.
    common = (
        "--model",
        "lenet5_reg",
        "--train-limit",
        "300",
        "--test-limit",
        "100",
        "--epochs",
        "3",
        "--device",
        "cpu",
    )
    assert run_main(mnist_dir, tmp_path, *common, name="whole") == 0
    real_save = torch.save

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        if obj.get("epoch") == 2 and "optimizer" in obj:  # last.pt of epoch 2
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    assert run_main(mnist_dir, tmp_path, *common, name="full") == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    job = tmp_path / "full/lenet5_reg"
    assert (
        err.startswith(f"error: {job / 'last.pt'}: No space left on device;")
        and err.count("\n") == 1
    )
    assert f"--resume {tmp_path / 'full'}" in err
    # the complete file from before
    assert torch.load(job / "last.pt", weights_only=True)["epoch"] == 1
    # the row written before the failure
    assert len(json.loads((job / "stats.json").read_text())["epochs"]) == 2
    assert not list(job.glob(".*tmp"))
    assert main.main(["--resume", str(tmp_path / "full"), "--quiet"]) == 0
    assert epochs_without_time(job / "stats.json") == epochs_without_time(
        tmp_path / "whole/lenet5_reg/stats.json"
    )


# ------------------------------------------------------------ what the suite must catch


def recorded_first_batches(monkeypatch):
    """The labels of each epoch's first training batch, in the order main.train sees them."""
    firsts, real_train = [], main.train

    def train(model, loader, *args, **kwargs):
        def recording():
            for i, (images, labels) in enumerate(loader):
                if i == 0:
                    firsts.append(labels.tolist())
                yield images, labels

        return real_train(model, recording(), *args, **kwargs)

    monkeypatch.setattr(main, "train", train)
    return firsts


def test_each_epoch_shuffles_in_its_own_order_and_the_learning_rate_follows_the_schedule(
    mnist_dir, tmp_path, monkeypatch
):
    firsts = recorded_first_batches(monkeypatch)
    assert run_main(mnist_dir, tmp_path, *TINY, "--model", "mlp", "--epochs", "4") == 0
    assert len({tuple(batch) for batch in firsts}) == 4
    rows = json.loads((tmp_path / "run/mlp/stats.json").read_text())["epochs"]
    cosine = [0.01 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    assert [row["lr"] for row in rows] == pytest.approx(cosine)
    last = torch.load(tmp_path / "run/mlp/last.pt", weights_only=True)
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_validation_split_that_leaves_too_little_to_train_on_is_one_line_and_no_run(
    mnist_dir, tmp_path, capsys
):
    assert run_main(mnist_dir, tmp_path, *TINY, "--val-size", "199") == 1
    err = capsys.readouterr().err
    assert (
        err == "error: --val-size 199 leaves fewer than 2 of the 200 training images to train on\n"
    )
    assert not (tmp_path / "run").exists() and not (tmp_path / "latest").exists()


def test_val_size_holds_out_the_last_training_images_and_reports_them_each_epoch(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    trained_on, real_loader = [], main.batch_loader

    def recording_loader(split, batch_size, generator=None):
        trained_on.append((len(split), split.labels.clone()))
        return real_loader(split, batch_size, generator)

    monkeypatch.setattr(main, "batch_loader", recording_loader)
    assert (
        run_main(mnist_dir, tmp_path, *TINY, "--model", "mlp", "--epochs", "2", "--val-size", "100")
        == 0
    )
    train_limit = int(TINY[TINY.index("--train-limit") + 1])
    everything = dataset.MNIST(mnist_dir / "train.tar", limit=train_limit).labels
    _, (val, val_labels), (train, train_labels), again = (
        trained_on  # test, validation, then each epoch's training
    )
    assert again[0] == train
    assert (train, val) == (train_limit - 100, 100)
    assert torch.equal(train_labels, everything[:-100]) and torch.equal(
        val_labels, everything[-100:]
    )
    rows = json.loads((tmp_path / "run/mlp/stats.json").read_text())["epochs"]
    assert all(0 <= row["val_acc"] <= 1 and row["val_loss"] > 0 for row in rows)
    out = capsys.readouterr().out
    assert f"| val loss {rows[0]['val_loss']:.4f} acc {rows[0]['val_acc']:7.2%} |" in out
    table = out[out.index("model ") :].splitlines()
    assert table[0].split() == ["model", "seed", "epochs", "test", "acc", "val", "acc", "minutes"]
    assert table[1].split()[3:5] == [f"{rows[-1]['test_acc']:.2%}", f"{rows[-1]['val_acc']:.2%}"]
