import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import main
import plot

MODELS = ("lenet5", "mlp", "lenet5_reg")


@pytest.fixture(scope="module")
def trained_run(mnist_dir, tmp_path_factory):
    """A tiny real run of the three models, and a two-seed run of the MLP."""
    out = tmp_path_factory.mktemp("runs")
    common = ["--data-dir", str(mnist_dir), "--out-dir", str(out), "--quiet", "--device", "cpu",
              "--train-limit", "600", "--test-limit", "300", "--epochs", "2"]  # fmt: skip
    assert main.main([*common, "--run-name", "tiny"]) == 0
    assert main.main([*common, "--run-name", "seeds", "--model", "mlp", "--seeds", "0,1"]) == 0
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A copy of the tiny run that a test may damage."""
    return shutil.copytree(trained_run / "tiny", tmp_path / "tiny")


def assert_real_png(path, size=None):
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
        assert size is None or image.size == size
    assert pixels.std() > 10  # not blank


def test_every_figure_and_the_report_are_written(run_copy, capsys):
    assert plot.main([str(run_copy)]) == 0
    plots = run_copy / "plots"
    for name in MODELS:
        assert_real_png(plots / f"{name}_curves.png", (1000, 700))
        assert_real_png(plots / f"{name}_confusion.png", (650, 550))
        assert_real_png(plots / f"{name}_misclassified.png")
    assert_real_png(plots / "comparison.png", (1000, 700))
    printed = capsys.readouterr().out.split()
    assert str(plots / "comparison.png") in printed and str(run_copy / "report.md") in printed


def test_report_numbers_equal_the_stats(run_copy):
    assert plot.main([str(run_copy)]) == 0
    report = (run_copy / "report.md").read_text()
    for name in MODELS:
        stats = json.loads((run_copy / name / "stats.json").read_text())
        final, best = stats["epochs"][-1], max(stats["epochs"], key=lambda e: e["test_acc"])
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{stats['params']:,}"
        assert cells[2] == f"{final['test_acc']:.2%}"
        assert cells[3] == f"{best['test_acc']:.2%} ({best['epoch']})"
        assert cells[4] == f"{final['train_acc']:.2%}"
    assert "0.95% error" in report
    for figure in re.findall(r"\]\((.+?)\)", report):
        assert (run_copy / figure).is_file()


def test_several_seeds_show_mean_and_std(trained_run, tmp_path):
    run = shutil.copytree(trained_run / "seeds", tmp_path / "seeds")
    assert plot.main([str(run)]) == 0
    finals = [json.loads((run / f"mlp/seed{s}/stats.json").read_text())["epochs"][-1]["test_acc"] for s in (0, 1)]
    row = next(line for line in (run / "report.md").read_text().splitlines() if line.startswith("| mlp |"))
    mean, std = np.mean(finals) * 100, np.std(finals, ddof=1) * 100
    assert f"{mean:.2f} ± {std:.2f}%" in row


def test_several_runs_overlay_in_one_comparison(trained_run, tmp_path, monkeypatch):
    a = shutil.copytree(trained_run / "tiny", tmp_path / "a")
    b = shutil.copytree(trained_run / "seeds", tmp_path / "b")
    legends = {}
    real_save = plot.save

    def save_and_record(fig, path):
        legend = fig.axes[0].get_legend()
        legends[path.name] = [t.get_text() for t in legend.get_texts()] if legend else []
        return real_save(fig, path)

    monkeypatch.setattr(plot, "save", save_and_record)
    assert plot.main([str(a), str(b)]) == 0
    assert legends["comparison.png"] == ["a: lenet5", "a: mlp", "a: lenet5_reg", "b: mlp"]
    assert (b / "report.md").is_file()


def test_a_run_without_stats_draws_nothing_and_exits_1(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert plot.main([str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty: no readable stats.json" in err


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_text("{not json"), "not valid JSON"),
        (lambda p: p.write_text(json.dumps({"model": "mlp", "params": 1})), "lacks the field epochs"),
    ],
)
def test_a_broken_stats_file_is_named_and_the_rest_still_drawn(run_copy, capsys, damage, message):
    damage(run_copy / "mlp" / "stats.json")
    assert plot.main([str(run_copy)]) == 0
    err = capsys.readouterr().err
    assert f"{run_copy / 'mlp' / 'stats.json'}: {message}" in err
    assert (run_copy / "plots" / "lenet5_curves.png").exists() and not (run_copy / "plots" / "mlp_curves.png").exists()


def test_a_model_without_best_pt_still_gets_its_curves(run_copy, capsys):
    (run_copy / "lenet5" / "best.pt").unlink()
    assert plot.main([str(run_copy)]) == 0
    assert f"{run_copy / 'lenet5' / 'best.pt'}: missing" in capsys.readouterr().err
    assert (run_copy / "plots" / "lenet5_curves.png").exists()
    assert not (run_copy / "plots" / "lenet5_confusion.png").exists()
    assert (run_copy / "plots" / "mlp_confusion.png").exists()
