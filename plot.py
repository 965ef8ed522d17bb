"""Figures and a Markdown report from the files that main.py saved.

    python plot.py                       # the latest run (runs/latest)
    python plot.py runs/A runs/B         # one comparison figure overlaying several runs

Writes, under RUN_DIR/plots/: <model>_curves.png (train/test loss and accuracy
per epoch, mean and a band of +-1 std over seeds), comparison.png (all models,
and all runs given, on the same four panels), and from each model's final weights
(last.pt) <model>_confusion.png, <model>_misclassified.png, robustness.png (the
sweep of robustness.py, kept in RUN_DIR/robustness.json) and calibration.png (with each
model's not-a-digit rule, outliers.py); from the first seed's final
weights, what the models learned: filters.png (the LeNet-5s' kernels), mlp_weights.png
(each MLP unit's weights as an image), activations.png and lenet5_reg_activations.png
(the layers' activations on a test digit of each class); then RUN_DIR/report.md.
"""

import functools
import math
import statistics
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
from matplotlib.ticker import MaxNLocator
from torchvision.utils import make_grid

import cli
import compare
import learned
import outliers
import robustness
import runs
from dataset import MNIST, TEST_BATCH_SIZE, DatasetError, batch_loader, split_path
from files import write_text
from model import MODELS
from runs import RunError, mean_std, seeds_note

PANELS = [  # (stats key, panel title, y label)
    ("train_loss", "Training loss", "mean cross-entropy"),
    ("train_acc", "Training accuracy", "accuracy (%)"),
    ("test_loss", "Test loss", "mean cross-entropy"),
    ("test_acc", "Test accuracy", "accuracy (%)"),
]
REFERENCE = {"lenet5": "LeCun et al. 1998: 0.95% error (99.05%)"}
MAX_MISCLASSIFIED = 64
DPI = 100


# ------------------------------------------------------------ reading


def stats_files(run_dir):
    """The stats.json of each job that the run's config.json lists (a folder moved aside is not the
    run's); without a readable config.json, every */stats.json and */seed*/stats.json (a damaged one
    is warned of)."""
    try:
        folders = [folder for _, _, folder in runs.job_folders(run_dir)]
    except RunError as e:
        # a damaged one is said; a missing one is said below, if it matters
        if (run_dir / "config.json").exists():
            cli.error(f"{e}; drawing every model folder's stats.json")
        return sorted(run_dir.glob("*/stats.json")) + sorted(run_dir.glob("*/seed*/stats.json"))
    # started jobs
    return [folder / "stats.json" for folder in folders if (folder / "stats.json").exists()]


def load_run(run_dir):
    """{model: [(folder, stats) per seed]} for the readable stats.json files of one run's jobs."""
    run = {}
    for path in stats_files(run_dir):
        try:
            stats = runs.read_stats(path)
        except RunError as e:
            cli.error(e)
            continue
        if not stats["epochs"]:
            cli.error(f"{path}: holds no epochs")
            continue
        run.setdefault(stats["model"], []).append((path.parent, stats))
    if not run:
        cli.error(f"{run_dir}: no readable stats.json in its model folders")
    order = list(MODELS)  # the registry's order; unknown names last
    return dict(
        sorted(
            run.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)
        )
    )


def per_epoch(seeds, key):
    """Per epoch, the mean and std over seeds of one stat; accuracies in percent."""
    scale = 100 if key.endswith("acc") else 1
    n = min(len(stats["epochs"]) for _, stats in seeds)  # seeds may differ in length mid-run
    columns = [[stats["epochs"][i][key] * scale for _, stats in seeds] for i in range(n)]
    mean = [statistics.fmean(c) for c in columns]
    # sample std, as in report.md
    std = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
    return list(range(1, n + 1)), mean, std


# ------------------------------------------------------------ fonts


@functools.cache
def _characters(font_file):
    try:
        return frozenset(FT2Font(font_file).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


def font_families(texts):
    """(font families, characters none has) for drawing ``texts``: matplotlib's DejaVu Sans, then,
    for characters it lacks (Hangul, say), the first installed fonts that have them."""
    families = [matplotlib.rcParamsDefault["font.sans-serif"][0]]
    missing = {ord(c) for text in texts for c in text} - _characters(
        font_manager.findfont(families[0])
    )
    for font in font_manager.fontManager.ttflist:
        if not missing:
            break
        if "Last Resort" in font.name:  # a box for every character: exactly what is to be avoided
            continue
        if found := missing & _characters(font.fname):
            families.append(font.name)
            missing -= found
    return families, {chr(c) for c in missing}


def drawable(text, unavailable):
    """``text`` with the characters no installed font has replaced by '?'."""
    return "".join("?" if c in unavailable else c for c in text)


# ------------------------------------------------------------ figures


def draw_curves(axes, seeds, label):
    for ax, (key, _, _) in zip(axes.flat, PANELS, strict=True):
        epochs, mean, std = per_epoch(seeds, key)
        (line,) = ax.plot(epochs, mean, marker="o", markersize=3, label=label)
        if len(seeds) > 1:
            low, high = (
                [m - s for m, s in zip(mean, std, strict=True)],
                [m + s for m, s in zip(mean, std, strict=True)],
            )
            ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)


def curves_figure(title):
    # A bare Figure, not pyplot: nothing global changes (a notebook's backend stays as it was).
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    for ax, (_, panel, ylabel) in zip(axes.flat, PANELS, strict=True):
        ax.set(title=panel, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig, axes


def save(fig, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    print(path)
    return path


def plot_model_curves(name, seeds, out):
    fig, axes = curves_figure(
        f"{name} ({seeds[0][1]['params']:,} parameters){seeds_note(len(seeds))}"
    )
    draw_curves(axes, seeds, name)
    return save(fig, out / f"{name}_curves.png")


def plot_comparison(runs_, out, unavailable=frozenset()):
    several = len(runs_) > 1
    most_seeds = max(len(seeds) for run in runs_.values() for seeds in run.values())
    fig, axes = curves_figure(
        "Comparison" + (" of runs" if several else " of models") + seeds_note(most_seeds)
    )
    for run_dir, run in runs_.items():
        for name, seeds in run.items():
            draw_curves(
                axes, seeds, drawable(f"{run_dir.name}: {name}", unavailable) if several else name
            )
    axes.flat[0].legend(fontsize="small")
    return save(fig, out / "comparison.png")


def final_model(folder):
    """(model, stats row of its epoch) of a job folder's last.pt; None if it is unusable."""
    try:
        return runs.load_model(folder)
    except RunError as e:
        cli.error(
            f"{e}, so no confusion matrix, misclassified digits or robustness sweep for {folder}"
        )
        return None


@torch.inference_mode()
def predictions(model, test_set):
    """The model's predicted label for each test image."""
    return torch.cat(
        [model(images).argmax(1) for images, _ in batch_loader(test_set, TEST_BATCH_SIZE)]
    )


def checkpoint_note(rows):
    """Which weights a figure shows: each seed's last.pt, its epoch and test accuracy."""
    if len(rows) == 1:
        return f"last.pt: epoch {rows[0]['epoch']}, test accuracy {rows[0]['test_acc']:.2%}"
    epochs = ", ".join(sorted({str(r["epoch"]) for r in rows}))
    accuracy = mean_std([r["test_acc"] for r in rows])
    return f"last.pt of {len(rows)} seeds: epoch {epochs}, test accuracy {accuracy}"


def plot_confusion(name, confusion, rows, out):
    """confusion[true, predicted], counts (averaged over seeds)."""
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    confusion = confusion.numpy()
    image = ax.imshow(
        confusion, cmap="Blues", norm=matplotlib.colors.LogNorm(vmin=0.5, vmax=confusion.max())
    )
    for (true, pred), count in np.ndenumerate(confusion):
        if count >= 0.5:
            color = "white" if count > confusion.max() / 4 else "black"
            ax.text(pred, true, f"{count:.0f}", ha="center", va="center", fontsize=7, color=color)
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted label", ylabel="true label")
    ax.set_title(f"{name}: test confusion matrix\n{checkpoint_note(rows)}")
    fig.colorbar(image, ax=ax, label="test images (log scale)")
    return save(fig, out / f"{name}_confusion.png")


def plot_misclassified(name, test_set, predictions, row, out):
    wrong = (predictions != test_set.labels).nonzero().flatten()
    if len(wrong) == 0:
        return None
    shown = wrong[:MAX_MISCLASSIFIED]
    images = test_set.images[shown].unsqueeze(1)  # raw uint8, (K, 1, 28, 28)
    cols = 8
    rows = math.ceil(len(shown) / cols)
    grid = make_grid(images, nrow=cols, padding=2, pad_value=0)[0]  # one channel of the RGB grid
    fig = Figure(figsize=(8, rows + 1.2), layout="constrained")
    ax = fig.subplots()
    ax.imshow(grid.numpy(), cmap="gray_r")  # dark digits on white
    for k, index in enumerate(shown.tolist()):
        true, pred = test_set.labels[index].item(), predictions[index].item()
        x, y = (k % cols) * 30 + 3, (k // cols) * 30 + 2  # each cell is 28 pixels plus 2 of padding
        ax.text(x, y, f"{true}→{pred}", color="red", fontsize=9, fontweight="bold", va="top")
    ax.set_axis_off()
    count = (
        f"all {len(wrong)}"
        if len(shown) == len(wrong)
        else f"the first {len(shown)} of {len(wrong)}"
    )
    ax.set_title(
        f"{name}: misclassified test digits (true→predicted), {count}\n{checkpoint_note([row])}"
    )
    return save(fig, out / f"{name}_misclassified.png")


# ------------------------------------------------------------ report


def report(run_dir, run, per_class, figures, sweep=None, inside_notes=()):
    lines = [f"# Report: {run_dir.name}", "", "## Results", ""]
    seeds_in = max(len(seeds) for seeds in run.values())
    if seeds_in > 1:
        lines += [f"Accuracies are mean ± std over {seeds_in} seeds.", ""]
    validated = all("val_acc" in s["epochs"][-1] for seeds in run.values() for _, s in seeds)
    lines += [
        "| model | parameters | final test acc | "
        + "final val acc | " * validated
        + "final train acc | s/epoch | reference |",
        "|---|---:|---:|" + "---:|" * validated + "---:|---:|---|",
    ]
    for name, seeds in run.items():
        stats = [s for _, s in seeds]
        final = [s["epochs"][-1] for s in stats]
        seconds = statistics.fmean(e["seconds"] for s in stats for e in s["epochs"])
        val = f" | {mean_std([f['val_acc'] for f in final])}" if validated else ""
        lines.append(
            f"| {name} | {stats[0]['params']:,} | {mean_std([f['test_acc'] for f in final])}{val}"
            f" | {mean_std([f['train_acc'] for f in final])} | {seconds:.1f}"
            f" | {REFERENCE.get(name, '')} |"
        )
    lines += robustness.report_lines(sweep)
    lines += compare.report_lines(sweep) + compare.halves_lines(sweep)
    if per_class:
        lines += ["", "## Test accuracy per class (final weights)", ""]
        lines += ["| model | " + " | ".join(map(str, range(10))) + " |", "|---|" + "---:|" * 10]
        for name, accs in per_class.items():
            cells = [mean_std([a[c] for a in accs], digits=1) for c in range(10)]
            cells = [
                "–" if any(math.isnan(a[c]) for a in accs) else cell for c, cell in enumerate(cells)
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if any(math.isnan(v) for accs in per_class.values() for a in accs for v in a):
            lines += ["", "–: the test set holds no image of that digit (--test-limit)."]
    lines += inside_notes
    lines += ["", "## Figures", ""]
    lines += [
        f"![{p.stem}]({p.relative_to(run_dir).as_posix()})"
        for p in figures
        if p.is_relative_to(run_dir)
    ]
    path = run_dir / "report.md"
    # UTF-8 whatever the locale: the ± and → stay readable
    write_text(path, "\n".join(lines) + "\n")
    print(path)
    return path


# ------------------------------------------------------------ CLI


def load_test_split(run_dir, data_dir):
    """The test set the run was evaluated on (its data folder and --test-limit), or None."""
    try:
        config = runs.read_config(run_dir)
    except RunError as e:
        cli.error(f"{e}; no confusion matrices")
        return None
    data_dir = Path(data_dir or config["data_dir"])
    try:
        return MNIST(
            split_path(data_dir, "test") or data_dir / "test.tar", limit=config["test_limit"]
        )
    except DatasetError as e:
        cli.error(f"{e}; no confusion matrices")
        return None


def confusion_matrix(labels, predictions):
    """counts[true, predicted] as a float (10, 10) tensor."""
    return torch.bincount(labels * 10 + predictions, minlength=100).view(10, 10).float()


def plot_run(run_dir, run, data_dir):
    """The run's figures; returns (figures, per-class accuracies, robustness sweep, report.md's
    notes on what the models take for a digit and on what they learned)."""
    out = run_dir / "plots"
    figures = [plot_model_curves(name, seeds, out) for name, seeds in run.items()]
    test_set = load_test_split(run_dir, data_dir)
    if test_set is None:
        return figures, {}, {}, []
    per_class, usable, first = {}, {}, {}
    for name, seeds in run.items():
        results = []
        for folder, stats in seeds:
            if (loaded := final_model(folder)) is not None:
                model, row = loaded
                results.append((predictions(model, test_set), row))
                usable[folder.relative_to(run_dir).as_posix()] = (
                    name,
                    stats["seed"],
                    folder,
                    model,
                )
                # the figures of looking inside show one seed: the first
                first.setdefault(name, model)
        if not results:
            continue
        confusions = [confusion_matrix(test_set.labels, predictions) for predictions, _ in results]
        per_class[name] = [(c.diagonal() / c.sum(1)).tolist() for c in confusions]
        figures.append(
            plot_confusion(name, torch.stack(confusions).mean(0), [row for _, row in results], out)
        )
        figures.append(plot_misclassified(name, test_set, *results[0], out))
    sweep = robustness.run_sweep(run_dir / "robustness.json", usable, test_set) if usable else {}
    if sweep:
        figures.append(save(robustness.figure(sweep), out / "robustness.png"))
    calibration, notes = outliers.report(usable.values(), test_set)
    if calibration is not None:
        figures.append(save(calibration, out / "calibration.png"))
    figures += plot_learned(first, test_set, out)
    notes += learned.notes(first, test_set) if first else []
    return [f for f in figures if f is not None], per_class, sweep, notes


def plot_learned(models, test_set, out):
    """filters.png, mlp_weights.png, activations.png (LeNet-5 beside the MLP) and
    lenet5_reg_activations.png (learned.py), from the models given (one per name), as far as they
    are there."""
    figures = []
    if learned.conv_models(models):
        figures.append(save(learned.filters_figure(models), out / "filters.png"))
    if "mlp" in models:
        figures.append(save(learned.mlp_weights_figure(models["mlp"]), out / "mlp_weights.png"))
    pair = {name: models[name] for name in ("lenet5", "mlp") if name in models}
    if pair:
        figures.append(save(learned.activations_figure(pair, test_set), out / "activations.png"))
    if "lenet5_reg" in models:
        reg = learned.activations_figure({"lenet5_reg": models["lenet5_reg"]}, test_set)
        figures.append(save(reg, out / "lenet5_reg_activations.png"))
    return figures


def show(figures):
    """Open each saved figure in a window of its own size, so it shows whole."""
    import matplotlib.pyplot as plt  # only here: importing pyplot picks a window system

    for path in figures:
        image = plt.imread(path)
        height, width = image.shape[:2]
        fig = plt.figure(path.name, figsize=(width / DPI, height / DPI), dpi=DPI)
        fig.figimage(image)
    plt.show()


def parse_args(argv=None):
    p = cli.parser("plot.py", __doc__)
    p.add_argument("runs", nargs="*", type=Path, help="run folders; without any, runs/latest")
    p.add_argument(
        "--data-dir", type=Path, help="folder of test.tar or test/; without it, the run's own"
    )
    p.add_argument("--show", action="store_true", help="also open the figures in a window")
    return p.parse_args(cli.arguments(argv))


def main(argv=None):
    """The command line; ``main()`` from a notebook plots runs/latest."""
    args = parse_args(argv)
    found = {}
    for path in args.runs or [Path("runs") / runs.LATEST]:
        try:
            run_dir = runs.find_run(path)  # runs/latest names the run it points to
        except RunError as e:
            cli.error(e)
            continue
        if not run_dir.is_dir():
            cli.error(f"{path}: not a run folder")
        elif run := load_run(run_dir):
            found[run_dir] = run
    if not found:
        return 1
    families, unavailable = font_families(
        [run_dir.name for run_dir in found] if len(found) > 1 else []
    )
    if unavailable:
        missing = "".join(sorted(unavailable))
        cli.warning(
            f"no installed font has {missing!r}, so figures show '?' for it; "
            "install a font that has it (e.g. Noto Sans CJK for Hangul)"
        )
    with matplotlib.rc_context({"font.family": families}):
        figures = [plot_comparison(found, next(iter(found)) / "plots", unavailable)]
        for run_dir, run in found.items():
            run_figures, per_class, sweep, notes = plot_run(run_dir, run, args.data_dir)
            report(run_dir, run, per_class, figures[:1] + run_figures, sweep, notes)
            figures += run_figures
    if args.show:
        show(figures)
    return 0


if __name__ == "__main__":
    cli.safe_console()
    sys.exit(main(sys.argv[1:]))
