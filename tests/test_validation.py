"""validation.py: the five validation families are seeded, change the digits more at each strength,
and are made by no part of training or of the sweep; a run is scored on its own validation split."""

import ast
import json
from pathlib import Path

import pytest
import torch
from conftest import run_main

import dataset
import validation

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits(mnist_dir):
    """The first 200 test digits in [0, 1]."""
    return dataset.to_unit(dataset.MNIST(mnist_dir / "test.tar", limit=200).images)


@pytest.mark.parametrize("family", validation.FAMILIES)
def test_each_validation_family_is_seeded_and_changes_the_digits_more_at_each_strength(
    digits, family
):
    changes = [validation.changed(digits, family, i) for i in range(5)]
    assert torch.equal(validation.changed(digits, family, 2), changes[2])
    assert all(c.min() >= 0 and c.max() <= 1 for c in changes)
    moved = [(c - digits).abs().mean().item() for c in changes]
    assert moved[0] > 0 and all(a < b for a, b in zip(moved, moved[1:], strict=False)), moved


def imported(path):
    """The names of the modules a file imports."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module


def test_no_script_of_the_project_uses_the_validation_families():
    # neither training (distortions.py, main.py) nor the sweep (robustness.py) nor anything else
    users = [p.name for p in ROOT.glob("*.py") if "validation" in set(imported(p))]
    assert users == [] and "torch" in set(imported(ROOT / "main.py"))


def test_a_run_is_scored_on_its_validation_split_and_a_run_without_one_is_one_line(
    mnist_dir, tmp_path, capsys
):
    tiny = ("--train-limit", "1200", "--test-limit", "100", "--epochs", "2", "--model", "mlp")
    assert run_main(mnist_dir, tmp_path, *tiny, "--val-size", "200", name="held") == 0
    capsys.readouterr()
    assert validation.main([str(tmp_path / "held")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("mlp seed 0: clean ") and "validation families" in out[0]
    (scores,) = json.loads(out[-1])
    assert set(scores) == {
        "model",
        "seed",
        "clean",
        "trained_on",
        "validation",
        *validation.FAMILIES,
    }
    assert 0.5 < scores["clean"] <= 1 and scores["validation"] < scores["clean"]
    assert run_main(mnist_dir, tmp_path, *tiny, "--val-size", "0", name="all") == 0
    capsys.readouterr()
    assert validation.main([str(tmp_path / "all")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds out no validation split (--val-size 0)" in err
