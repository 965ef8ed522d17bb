"""exposure.py: the outlier-exposure loss is the cross-entropy to the uniform target, and the
non-digits lenet5_reg trains on are seeded, never a blank page, and recorded with the run."""

import json
import math

import pytest
import torch
from conftest import run_main

import dataset
import exposure
import main
import runs


@pytest.fixture(scope="module")
def digits(mnist_dir):
    return dataset.MNIST(mnist_dir / "test.tar", limit=500)


def test_the_loss_is_cross_entropy_on_digits_and_to_the_uniform_target_on_non_digits():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, -2.0, 0.0]])
    labels = torch.tensor([0, exposure.NON_DIGIT, 2])

    def log_p(row, k):
        return row[k] - math.log(sum(math.exp(v) for v in row))

    rows = logits.tolist()
    by_hand = (
        -log_p(rows[0], 0)
        + exposure.WEIGHT * -sum(log_p(rows[1], k) for k in range(3)) / 3
        - log_p(rows[2], 2)
    ) / 3
    assert exposure.ExposureLoss()(logits, labels).item() == pytest.approx(by_hand, rel=1e-6)
    digits_only = torch.tensor([0, 1, 2])
    assert torch.allclose(
        exposure.ExposureLoss()(logits, digits_only),
        torch.nn.CrossEntropyLoss()(logits, digits_only),
    )


@pytest.mark.parametrize("source", ["scribbles", "patchwork"])
def test_the_made_non_digits_are_seeded_and_never_a_blank_page(digits, source):
    torch.manual_seed(0)
    made = exposure.non_digits(digits, 200, [source])
    torch.manual_seed(0)
    assert torch.equal(exposure.non_digits(digits, 200, [source]), made)
    assert made.shape == (200, 1, 28, 28) and made.min() >= 0 and made.max() <= 1
    ink = (made > 0.5).flatten(1).sum(1)
    assert ink.min() >= 15  # pixels of ink on every page
    torch.manual_seed(1)
    assert not torch.equal(exposure.non_digits(digits, 200, [source]), made)


def test_an_epoch_adds_a_share_of_non_digits_and_its_accuracy_counts_only_the_digits(digits):
    torch.manual_seed(0)
    split = exposure.exposed(digits, ["scribbles", "patchwork"])
    added = round(exposure.SHARE * len(digits))
    assert len(split) == len(digits) + added
    assert (split.labels == exposure.NON_DIGIT).sum().item() == added
    # logits that name every digit right: 100%, whatever they say of the non-digits
    logits = torch.nn.functional.one_hot(split.labels.clamp_min(0), 10).float()
    _, accuracy = main.summarize(exposure.ExposureLoss(), [logits], [split.labels])
    assert accuracy == 1.0


def test_a_run_records_its_non_digits_and_one_that_needs_a_missing_fashion_mnist_is_one_line(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    tiny = ("--train-limit", "300", "--test-limit", "100", "--epochs", "1")
    args = (*tiny, "--model", "lenet5_reg", "--non-digits", "scribbles,patchwork")
    assert run_main(mnist_dir, tmp_path, *args, name="made") == 0
    config = json.loads((tmp_path / "made/config.json").read_text())
    assert config["non_digits"] == ["scribbles", "patchwork"]
    assert config["non_digit_share"] == exposure.SHARE
    args = (*args, "--non-digit-share", "0.5")
    assert run_main(mnist_dir, tmp_path, *args, name="half") == 0
    config = runs.read_config(tmp_path / "half")
    assert config["non_digit_share"] == 0.5
    split = dataset.MNIST(mnist_dir / "train.tar", limit=300)
    served = main.epoch_split("lenet5_reg", config, split)
    assert (served.labels == exposure.NON_DIGIT).sum().item() == 150
    monkeypatch.setattr(exposure, "FASHION_TRAIN", tmp_path / "no-such-file.gz")
    capsys.readouterr()
    assert run_main(mnist_dir, tmp_path, *tiny, "--non-digits", "fashion", name="f") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-file.gz: missing" in err
    assert exposure.sources() == ["scribbles", "patchwork"]  # what a new run here would use
