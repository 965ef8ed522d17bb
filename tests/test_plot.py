import json
import re
import shutil

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

import learned
import main
import plot
import runs
from dataset import MNIST
from model import CustomMLP

MODELS = ("lenet5", "mlp", "lenet5_reg")


@pytest.fixture(scope="module")
def trained_run(mnist_dir, tmp_path_factory):
    """A tiny real run of the three models, and a two-seed run of the MLP."""
    out = tmp_path_factory.mktemp("runs")
    common = [
        "--data-dir",
        str(mnist_dir),
        "--out-dir",
        str(out),
        "--quiet",
        "--device",
        "cpu",
        "--train-limit",
        "600",
        "--test-limit",
        "300",
        "--epochs",
        "2",
    ]
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
    for name in ("filters", "mlp_weights", "activations", "lenet5_reg_activations"):
        assert_real_png(plots / f"{name}.png")
    printed = capsys.readouterr().out.split()
    assert str(plots / "comparison.png") in printed and str(run_copy / "report.md") in printed


def crowding(fig):
    """What overlaps in a drawn figure: texts over a panel (an axes with an image or colour bar),
    over each other, or past the figure's edge; as readable strings, none when the layout is
    clean."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    undrawn = set()  # tick labels past an axis's ends (a colour bar's) exist, but are not drawn
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            undrawn |= {
                id(t)
                for tick in axis.get_major_ticks()
                if not low <= tick.get_loc() <= high
                for t in (tick.label1, tick.label2)
            }
    texts = [
        t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()
    ]
    texts = [t for t in texts if id(t) not in undrawn]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    panels = [ax.get_window_extent(renderer) for ax in fig.axes if ax.images or ax.collections]

    def overlap(a, b):
        return (
            max(0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0, min(a.y1, b.y1) - max(a.y0, b.y0))
            > 1
        )

    problems = [
        f"{text!r} on a panel" for text, box in boxes for panel in panels if overlap(box, panel)
    ]
    pairs = [(a, box, b, other) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1 :]]
    problems += [f"{a!r} on {b!r}" for a, box, b, other in pairs if overlap(box, other)]
    problems += [
        f"{text!r} outside"
        for text, box in boxes
        if not fig.bbox.contains(box.x0, box.y0) or not fig.bbox.contains(box.x1, box.y1)
    ]
    return problems


def test_the_figures_of_what_the_models_learned_are_readable_at_their_size(run_copy, monkeypatch):
    crowded, real_save = {}, plot.save

    def save_and_check(fig, path):
        saved = real_save(fig, path)
        crowded[path.name] = crowding(fig)
        return saved

    monkeypatch.setattr(plot, "save", save_and_check)
    assert plot.main([str(run_copy)]) == 0
    for name in ("filters.png", "mlp_weights.png", "activations.png", "lenet5_reg_activations.png"):
        assert crowded[name] == [], name
        with Image.open(run_copy / "plots" / name) as image:
            assert image.width <= 1000  # README width: the page shows it unscaled or nearly so


def test_the_inside_figures_show_the_first_seeds_final_weights(trained_run, tmp_path, monkeypatch):
    run = shutil.copytree(trained_run / "seeds", tmp_path / "seeds")

    def first_image(fig):
        return fig.axes[0].images and fig.axes[0].images[0].get_array().filled(np.nan)

    images = recorded_saves(monkeypatch, first_image)
    assert plot.main([str(run)]) == 0
    weights = [
        runs.load_model(run / f"mlp/seed{s}")[0].fc1.weight.detach().view(-1, 28, 28)
        for s in (0, 1)
    ]
    shown = images["mlp_weights.png"]
    assert np.allclose(shown, learned.tiles(weights[0], 15, pad=2), equal_nan=True)
    assert not np.allclose(shown, learned.tiles(weights[1], 15, pad=2), equal_nan=True)
    assert "filters.png" not in images  # no LeNet-5 in this run


def test_the_template_rule_counts_units_that_hold_a_class_mean_image(trained_run, mnist_dir):
    test_set = MNIST(mnist_dir / "test.tar", limit=2000)
    images = test_set.images.float().flatten(1) / 255
    mlp = CustomMLP()
    with torch.no_grad():
        # four units hold a digit's mean image minus the mean digit; one holds its negative
        for c in range(4):
            mlp.fc1.weight[c] = images[test_set.labels == c].mean(0) - images.mean(0)
        mlp.fc1.weight[4] = -mlp.fc1.weight[0]
        mlp.fc1.weight[5:] = torch.randn(70, 784)  # the rest: noise, no template
    count, median = learned.templates(mlp, test_set)
    assert count == 5 and median < 0.2
    lenet5 = runs.load_model(trained_run / "tiny/lenet5")[0]
    agreement = learned.shift_agreement({"lenet5": lenet5, "mlp": mlp}, test_set)
    # a convolution moves with the digit
    assert agreement["lenet5"][0] == "conv1" and agreement["lenet5"][1] > 0.95
    assert agreement["mlp"][0] == "fc1" and agreement["mlp"][1] < agreement["lenet5"][1]


def test_report_numbers_equal_the_stats(run_copy):
    assert plot.main([str(run_copy)]) == 0
    report = (run_copy / "report.md").read_text()
    for name in MODELS:
        stats = json.loads((run_copy / name / "stats.json").read_text())
        final = stats["epochs"][-1]
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{stats['params']:,}"
        assert cells[2] == f"{final['test_acc']:.2%}"
        assert cells[3] == f"{final['val_acc']:.2%}"  # a default run holds a validation split out
        assert cells[4] == f"{final['train_acc']:.2%}"
    assert "0.95% error" in report
    for figure in re.findall(r"\]\((.+?)\)", report):
        assert (run_copy / figure).is_file()


def test_several_seeds_show_mean_and_std(trained_run, tmp_path):
    run = shutil.copytree(trained_run / "seeds", tmp_path / "seeds")
    assert plot.main([str(run)]) == 0
    finals = [
        json.loads((run / f"mlp/seed{s}/stats.json").read_text())["epochs"][-1]["test_acc"]
        for s in (0, 1)
    ]
    row = next(
        line for line in (run / "report.md").read_text().splitlines() if line.startswith("| mlp |")
    )
    mean, std = np.mean(finals) * 100, np.std(finals, ddof=1) * 100
    assert f"{mean:.2f} ± {std:.2f}%" in row


def recorded_saves(monkeypatch, record):
    """{file name: record(figure)} of every figure plot.py saves."""
    records, real_save = {}, plot.save

    def save_and_record(fig, path):
        records[path.name] = record(fig)
        return real_save(fig, path)

    monkeypatch.setattr(plot, "save", save_and_record)
    return records


def legend_texts(fig):
    legend = fig.axes[0].get_legend()
    return [(t.get_text(), t.get_fontfamily()) for t in legend.get_texts()] if legend else []


def test_several_runs_overlay_in_one_comparison(trained_run, tmp_path, monkeypatch):
    a = shutil.copytree(trained_run / "tiny", tmp_path / "a")
    b = shutil.copytree(trained_run / "seeds", tmp_path / "b")
    legends = recorded_saves(monkeypatch, legend_texts)
    assert plot.main([str(a), str(b)]) == 0
    assert [text for text, _ in legends["comparison.png"]] == [
        "a: lenet5",
        "a: mlp",
        "a: lenet5_reg",
        "b: mlp",
    ]
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
        (
            lambda p: p.write_text(json.dumps({"model": "mlp", "params": 1})),
            "the field 'epochs' is missing",
        ),
        (lambda p: p.write_text("[]"), "not a JSON object"),
        (lambda p: p.write_text("null"), "not a JSON object"),
        (
            lambda p: p.write_text(json.dumps({"model": "mlp", "params": 1, "epochs": 5})),
            "'epochs' is missing or not",
        ),
        (
            lambda p: p.write_text(
                re.sub(r'"test_acc": ([0-9.e-]+)', r'"test_acc": "\1"', p.read_text())
            ),
            "epoch row 1 lacks a field or has one that is not a number",
        ),
    ],
)
def test_a_broken_stats_file_is_named_and_the_rest_still_read(run_copy, capsys, damage, message):
    damage(run_copy / "mlp" / "stats.json")
    assert list(plot.load_run(run_copy)) == ["lenet5", "lenet5_reg"]
    err = capsys.readouterr().err
    assert (
        f"error: {run_copy / 'mlp' / 'stats.json'}: " in err
        and message in err
        and err.count("\n") == 1
    )


def test_a_broken_stats_file_is_one_line_and_the_other_models_are_drawn(run_copy, capsys):
    (run_copy / "mlp" / "stats.json").write_text("{not json")
    assert plot.main([str(run_copy)]) == 0
    err = capsys.readouterr().err
    assert (
        err
        == f"error: {run_copy / 'mlp' / 'stats.json'}: not valid JSON"
        + err.split("not valid JSON", 1)[1]
    )
    assert err.count("\n") == 1
    assert (run_copy / "plots" / "lenet5_curves.png").exists() and not (
        run_copy / "plots" / "mlp_curves.png"
    ).exists()


def test_a_model_without_last_pt_still_gets_its_curves(run_copy, capsys):
    (run_copy / "lenet5" / "last.pt").unlink()
    assert plot.main([str(run_copy)]) == 0
    assert f"{run_copy / 'lenet5' / 'last.pt'}: missing" in capsys.readouterr().err
    assert (run_copy / "plots" / "lenet5_curves.png").exists()
    assert not (run_copy / "plots" / "lenet5_confusion.png").exists()
    assert (run_copy / "plots" / "mlp_confusion.png").exists()


def saved_titles(monkeypatch):
    """{file name: the titles on its axes} of every figure plot.py saves."""
    return recorded_saves(
        monkeypatch, lambda fig: [ax.get_title() for ax in fig.axes if ax.get_title()]
    )


def test_figures_name_the_checkpoint_they_show(run_copy, trained_run, tmp_path, monkeypatch):
    titles = saved_titles(monkeypatch)
    assert plot.main([str(run_copy)]) == 0
    final = json.loads((run_copy / "lenet5/stats.json").read_text())["epochs"][-1]
    note = f"last.pt: epoch 2, test accuracy {final['test_acc']:.2%}"
    assert titles["lenet5_confusion.png"] == [f"lenet5: test confusion matrix\n{note}"]
    wrong = round((1 - final["test_acc"]) * 300)  # the run tests on 300 images
    count = f"all {wrong}" if wrong <= 64 else f"the first 64 of {wrong}"
    assert titles["lenet5_misclassified.png"] == [
        f"lenet5: misclassified test digits (true→predicted), {count}\n{note}"
    ]

    seeds = shutil.copytree(trained_run / "seeds", tmp_path / "seeds")
    assert plot.main([str(seeds)]) == 0
    finals = [
        json.loads((seeds / f"mlp/seed{s}/stats.json").read_text())["epochs"][-1] for s in (0, 1)
    ]
    assert titles["mlp_confusion.png"][0].endswith(
        "last.pt of 2 seeds: epoch 2, test accuracy "
        + plot.mean_std([f["test_acc"] for f in finals])
    )


def test_figures_show_the_final_epoch_even_when_an_earlier_one_tested_better(
    mnist_dir, tmp_path, monkeypatch
):
    real_test, accuracies = main.test, iter([0.5, 0.9, 0.7])

    def test_with_these_accuracies(*args):
        loss, _ = real_test(*args)
        return loss, next(accuracies)

    monkeypatch.setattr(main, "test", test_with_these_accuracies)
    # no validation split: main.test then sees the test set alone
    common = ["--train-limit", "200", "--test-limit", "100", "--val-size", "0", "--quiet"]
    folders = ["--data-dir", str(mnist_dir), "--out-dir", str(tmp_path), "--device", "cpu"]
    assert main.main([*common, *folders, *"--run-name r --model mlp --epochs 3".split()]) == 0
    monkeypatch.setattr(main, "test", real_test)
    titles = saved_titles(monkeypatch)
    assert plot.main([str(tmp_path / "r")]) == 0
    assert titles["mlp_confusion.png"][0].endswith("last.pt: epoch 3, test accuracy 70.00%")
    row = next(
        line
        for line in (tmp_path / "r/report.md").read_text().splitlines()
        if line.startswith("| mlp |")
    )
    assert "90.00%" not in row and "| 70.00% |" in row


def test_a_grid_of_every_error_says_all(run_copy, monkeypatch):
    titles = saved_titles(monkeypatch)
    monkeypatch.setattr(plot, "MAX_MISCLASSIFIED", 10_000)
    assert plot.main([str(run_copy)]) == 0
    assert "), all " in titles["mlp_misclassified.png"][0]


def test_show_opens_each_figure_whole(run_copy, monkeypatch):
    import matplotlib.pyplot as plt

    shown = {}
    monkeypatch.setattr(
        plt, "show", lambda: shown.update({n: plt.figure(n) for n in plt.get_figlabels()})
    )
    assert plot.main([str(run_copy), "--show"]) == 0
    # comparison, robustness, calibration, per model curves, confusion and misclassified, and the
    # four of learned.py
    assert len(shown) == 3 + 3 * 3 + 4
    for name, fig in shown.items():
        with Image.open(run_copy / "plots" / name) as image:
            assert tuple(round(v) for v in fig.get_size_inches() * fig.dpi) == image.size
    plt.close("all")


def test_a_corrupt_or_foreign_last_pt_is_named_and_the_rest_drawn(run_copy, capsys):
    (run_copy / "lenet5/last.pt").write_bytes(b"PK\x03\x04 not really a zip")
    torch.save({"epoch": 2, "model": {"fc9.weight": torch.zeros(1)}}, run_copy / "mlp/last.pt")
    assert plot.main([str(run_copy)]) == 0
    err = capsys.readouterr().err
    assert f"{run_copy / 'lenet5/last.pt'}: not a readable checkpoint" in err
    assert f"{run_copy / 'mlp/last.pt'}: not a checkpoint of mlp" in err
    assert (run_copy / "plots/lenet5_reg_confusion.png").exists() and "Traceback" not in err


@pytest.mark.parametrize("config", ["[]", '{"data_dir": 3}', "{"])
def test_a_config_of_the_wrong_shape_still_gives_the_curves(run_copy, capsys, config):
    (run_copy / "config.json").write_text(config)
    assert plot.main([str(run_copy)]) == 0
    err = capsys.readouterr().err
    assert f"{run_copy / 'config.json'}: not" in err and "no confusion matrices" in err
    assert (run_copy / "plots/lenet5_curves.png").exists()


def test_report_is_utf8_and_latest_may_be_a_text_file(trained_run, tmp_path):
    runs_dir = tmp_path / "runs"
    shutil.copytree(trained_run / "seeds", runs_dir / "seeds")
    (runs_dir / "latest").write_text("seeds\n")  # what main.py writes where symlinks are refused
    assert plot.main([str(runs_dir / "latest")]) == 0
    assert "±" in (runs_dir / "seeds/report.md").read_bytes().decode("utf-8")


def test_run_names_in_any_script_are_drawn_with_a_font_that_has_them_or_named_in_a_warning(
    trained_run, tmp_path, monkeypatch, capsys
):
    # STIX, shipped with matplotlib, has 𝒜
    a = shutil.copytree(trained_run / "tiny", tmp_path / "𝒜 run")
    b = shutil.copytree(trained_run / "seeds", tmp_path / "실험")  # no Hangul font on this machine
    legends = recorded_saves(monkeypatch, legend_texts)
    assert plot.main([str(a), str(b)]) == 0
    texts = dict(legends["comparison.png"])
    assert texts["𝒜 run: lenet5"][:2] == ["DejaVu Sans", "STIXGeneral"]
    assert "??: mlp" in texts
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "no installed font has '실험'" in err


def test_a_digit_missing_from_a_short_test_set_is_a_dash_in_the_per_class_table(run_copy):
    config = json.loads((run_copy / "config.json").read_text())
    # labels 7, 2, 1, 0, 4
    (run_copy / "config.json").write_text(json.dumps({**config, "test_limit": 5}))
    assert plot.main([str(run_copy)]) == 0
    report = (run_copy / "report.md").read_text()
    table = report[report.index("## Test accuracy per class") :].split("\n\n")[1].splitlines()
    for row in table[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert [k for k, cell in enumerate(cells) if cell == "–"] == [3, 5, 6, 8, 9]
    assert "nan" not in report and "–: the test set holds no image of that digit" in report


def test_only_the_jobs_config_json_lists_are_the_runs(run_copy):
    # the advice for training a model anew
    shutil.copytree(run_copy / "mlp", run_copy / "mlp.moved")
    # a folder no job of this run has
    shutil.copytree(run_copy / "lenet5", run_copy / "lenet5/seed3")
    assert [len(seeds) for seeds in plot.load_run(run_copy).values()] == [1, 1, 1]
    assert plot.main([str(run_copy)]) == 0
    report = (run_copy / "report.md").read_text()
    assert "Accuracies are mean ± std" not in report  # one seed each
    mlp = next(line for line in report.splitlines() if line.startswith("| mlp |"))
    assert "±" not in mlp
