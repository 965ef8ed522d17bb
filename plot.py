"""Figures and a Markdown report from the files that main.py saved.

    python plot.py                       # the latest run (runs/latest)
    python plot.py runs/A runs/B         # one comparison figure overlaying several runs

Writes, under RUN_DIR/plots/: <model>_curves.png (train/test loss and accuracy
per epoch, mean and a band of +-1 std over seeds), comparison.png (all models,
and all runs given, on the same four panels), and for each model with best.pt
<model>_confusion.png and <model>_misclassified.png; then RUN_DIR/report.md.
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; --show switches to an interactive backend
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator
from torchvision.utils import make_grid

from dataset import MNIST, DatasetError, batch_loader
from main import TEST_BATCH_SIZE
from model import MODELS

PANELS = [  # (stats key, panel title, y label)
    ("train_loss", "Training loss", "mean cross-entropy"),
    ("train_acc", "Training accuracy", "accuracy (%)"),
    ("test_loss", "Test loss", "mean cross-entropy"),
    ("test_acc", "Test accuracy", "accuracy (%)"),
]
STATS_FIELDS = ("model", "params", "epochs")
EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds")
REFERENCE = {"lenet5": "LeCun et al. 1998: 0.95% error (99.05%)"}
MAX_MISCLASSIFIED = 64


def warn(message):
    print(f"error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- reading


def read_stats(path):
    """One stats.json, checked; None (and a line on stderr) when it is unusable."""
    try:
        stats = json.loads(path.read_text())
        missing = [f for f in STATS_FIELDS if f not in stats]
        missing += sorted({f for row in stats.get("epochs", []) for f in EPOCH_FIELDS if f not in row})
        if missing:
            raise ValueError(f"lacks the field {', '.join(missing)}")
        if not stats["epochs"]:
            raise ValueError("holds no epochs")
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        warn(f"{path}: {'not valid JSON' if isinstance(e, json.JSONDecodeError) else e}")
        return None
    return stats


def load_run(run_dir):
    """{model: [(folder, stats) per seed]} for the readable stats.json files of one run."""
    run = {}
    for path in sorted(run_dir.glob("*/stats.json")) + sorted(run_dir.glob("*/seed*/stats.json")):
        stats = read_stats(path)
        if stats is not None:
            run.setdefault(stats["model"], []).append((path.parent, stats))
    if not run:
        warn(f"{run_dir}: no readable stats.json in its model folders")
    order = list(MODELS)  # the registry's order; unknown names last
    return dict(sorted(run.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def per_epoch(seeds, key):
    """Per epoch, the mean and std over seeds of one stat; accuracies in percent."""
    scale = 100 if key.endswith("acc") else 1
    n = min(len(stats["epochs"]) for _, stats in seeds)  # seeds may differ in length mid-run
    columns = [[stats["epochs"][i][key] * scale for _, stats in seeds] for i in range(n)]
    mean = [statistics.fmean(c) for c in columns]
    std = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]  # sample std, as in report.md
    return list(range(1, n + 1)), mean, std


def mean_std(values, digits=2):
    """Fractions as percent: the one value, or mean ± sample std over seeds."""
    if len(values) == 1:
        return f"{values[0] * 100:.{digits}f}%"
    return f"{statistics.fmean(values) * 100:.{digits}f} ± {statistics.stdev(values) * 100:.{digits}f}%"


# --------------------------------------------------------------------------- figures


def draw_curves(axes, seeds, label):
    for ax, (key, _, _) in zip(axes.flat, PANELS):
        epochs, mean, std = per_epoch(seeds, key)
        (line,) = ax.plot(epochs, mean, marker="o", markersize=3, label=label)
        if len(seeds) > 1:
            low, high = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
            ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)


def curves_figure(title):
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, (_, panel, ylabel) in zip(axes.flat, PANELS):
        ax.set(title=panel, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig, axes


def save(fig, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(path)
    return path


def seeds_note(count):
    return f", mean and ±1 std band over {count} seeds" if count > 1 else ""


def plot_model_curves(name, seeds, out):
    fig, axes = curves_figure(f"{name} ({seeds[0][1]['params']:,} parameters){seeds_note(len(seeds))}")
    draw_curves(axes, seeds, name)
    return save(fig, out / f"{name}_curves.png")


def plot_comparison(runs, out):
    several = len(runs) > 1
    most_seeds = max(len(seeds) for run in runs.values() for seeds in run.values())
    fig, axes = curves_figure("Comparison" + (" of runs" if several else " of models") + seeds_note(most_seeds))
    for run_dir, run in runs.items():
        for name, seeds in run.items():
            draw_curves(axes, seeds, f"{run_dir.name}: {name}" if several else name)
    axes.flat[0].legend(fontsize="small")
    return save(fig, out / "comparison.png")


def predict(folder, test_set):
    """Predictions of a model folder's best.pt on the test set; None if it has no usable best.pt."""
    path = folder / "best.pt"
    try:
        best = torch.load(path, map_location="cpu", weights_only=True)
        model = MODELS[best["name"]](**best["kwargs"])
        model.load_state_dict(best["model"])
    except FileNotFoundError:
        warn(f"{path}: missing, so no confusion matrix or misclassified digits for {folder}")
        return None
    except (OSError, RuntimeError, KeyError, TypeError) as e:
        warn(f"{path}: not a checkpoint of a known model ({e})")
        return None
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(images).argmax(1) for images, _ in batch_loader(test_set, TEST_BATCH_SIZE)])


def plot_confusion(name, confusion, out):
    """confusion[true, predicted], counts (averaged over seeds)."""
    fig, ax = plt.subplots(figsize=(6.5, 5.5), constrained_layout=True)
    confusion = confusion.numpy()
    image = ax.imshow(confusion, cmap="Blues", norm=matplotlib.colors.LogNorm(vmin=0.5, vmax=confusion.max()))
    for (true, pred), count in np.ndenumerate(confusion):
        if count >= 0.5:
            color = "white" if count > confusion.max() / 4 else "black"
            ax.text(pred, true, f"{count:.0f}", ha="center", va="center", fontsize=7, color=color)
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted label", ylabel="true label")
    accuracy = confusion.diagonal().sum() / confusion.sum()
    ax.set_title(f"{name}: test confusion matrix (accuracy {accuracy:.2%})")
    fig.colorbar(image, ax=ax, label="test images (log scale)")
    return save(fig, out / f"{name}_confusion.png")


def plot_misclassified(name, test_set, predictions, out):
    wrong = (predictions != test_set.labels).nonzero().flatten()[:MAX_MISCLASSIFIED]
    if len(wrong) == 0:
        return None
    images = test_set.images[wrong].unsqueeze(1)  # raw uint8, (K, 1, 28, 28)
    cols = 8
    rows = math.ceil(len(wrong) / cols)
    grid = make_grid(images, nrow=cols, padding=2, pad_value=0)[0]  # one channel of the RGB grid
    fig, ax = plt.subplots(figsize=(8, rows + 1), constrained_layout=True)
    ax.imshow(grid.numpy(), cmap="gray_r")  # dark digits on white
    for k, index in enumerate(wrong.tolist()):
        true, pred = test_set.labels[index].item(), predictions[index].item()
        x, y = (k % cols) * 30 + 3, (k // cols) * 30 + 2  # each cell is 28 pixels plus 2 of padding
        ax.text(x, y, f"{true}→{pred}", color="red", fontsize=9, fontweight="bold", va="top")
    ax.set_axis_off()
    ax.set_title(f"{name}: misclassified test digits (true→predicted), first {len(wrong)}")
    return save(fig, out / f"{name}_misclassified.png")


# --------------------------------------------------------------------------- report


def report(run_dir, run, per_class, figures):
    lines = [f"# Report: {run_dir.name}", "", "## Results", ""]
    seeds_in = max(len(seeds) for seeds in run.values())
    if seeds_in > 1:
        lines += [f"Accuracies are mean ± std over {seeds_in} seeds.", ""]
    lines += [
        "| model | parameters | final test acc | best test acc (epoch) | final train acc | s/epoch | reference |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, seeds in run.items():
        runs = [stats for _, stats in seeds]
        final = [s["epochs"][-1] for s in runs]
        bests = [max(s["epochs"], key=lambda e: e["test_acc"]) for s in runs]
        best_epochs = ", ".join(str(b["epoch"]) for b in bests)
        seconds = statistics.fmean(e["seconds"] for s in runs for e in s["epochs"])
        lines.append(
            f"| {name} | {runs[0]['params']:,} | {mean_std([f['test_acc'] for f in final])}"
            f" | {mean_std([b['test_acc'] for b in bests])} ({best_epochs})"
            f" | {mean_std([f['train_acc'] for f in final])} | {seconds:.1f} | {REFERENCE.get(name, '')} |"
        )
    if per_class:
        lines += ["", "## Test accuracy per class (best checkpoint)", ""]
        lines += ["| model | " + " | ".join(map(str, range(10))) + " |", "|---|" + "---:|" * 10]
        for name, accs in per_class.items():
            cells = [mean_std([a[c] for a in accs], digits=1) for c in range(10)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})" for p in figures if p.is_relative_to(run_dir)]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    print(path)
    return path


# --------------------------------------------------------------------------- CLI


def load_test_split(run_dir, data_dir):
    """The test set the run was evaluated on (its data folder and --test-limit), or None."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        warn(f"{run_dir / 'config.json'}: unreadable ({e}); no confusion matrices")
        return None
    try:
        return MNIST(Path(data_dir or config["data_dir"]) / "test.tar", limit=config.get("test_limit"))
    except DatasetError as e:
        warn(f"{e}; no confusion matrices")
        return None


def confusion_matrix(labels, predictions):
    """counts[true, predicted] as a float (10, 10) tensor."""
    return torch.bincount(labels * 10 + predictions, minlength=100).view(10, 10).float()


def plot_run(run_dir, run, data_dir):
    out = run_dir / "plots"
    figures = [plot_model_curves(name, seeds, out) for name, seeds in run.items()]
    test_set = load_test_split(run_dir, data_dir)
    if test_set is None:
        return figures, {}
    per_class = {}
    for name, seeds in run.items():
        predictions = [p for folder, _ in seeds if (p := predict(folder, test_set)) is not None]
        if not predictions:
            continue
        confusions = [confusion_matrix(test_set.labels, p) for p in predictions]
        per_class[name] = [(c.diagonal() / c.sum(1)).tolist() for c in confusions]
        figures.append(plot_confusion(name, torch.stack(confusions).mean(0), out))
        figures.append(plot_misclassified(name, test_set, predictions[0], out))
    return [f for f in figures if f is not None], per_class


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="plot.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="*", type=Path, help="run folders (default: runs/latest)")
    p.add_argument("--data-dir", type=Path, help="folder of test.tar (default: the run's own)")
    p.add_argument("--show", action="store_true", help="also open the figures in a window")
    args = p.parse_args(argv)
    if args.show:
        plt.switch_backend(matplotlib.rcParamsDefault["backend"])
    runs = {}
    for run_dir in args.runs or [Path("runs/latest")]:
        if not run_dir.is_dir():
            warn(f"{run_dir}: not a run folder")
        elif run := load_run(run_dir.resolve()):  # runs/latest names the run it links to
            runs[run_dir.resolve()] = run
    if not runs:
        return 1
    figures = [plot_comparison(runs, next(iter(runs)) / "plots")]
    for run_dir, run in runs.items():
        run_figures, per_class = plot_run(run_dir, run, args.data_dir)
        report(run_dir, run, per_class, figures[:1] + run_figures)
        figures += run_figures
    if args.show:
        for path in figures:
            plt.figure(path.name).figimage(plt.imread(path))
        plt.show()
    return 0


if __name__ == "__main__":
    sys.exit(main())
