"""How the models hold up off MNIST's own test set: the robustness sweep.

The test digits under families of change (shifted, rotated, zoomed, sheared, on a lighter
background, fainter, noisy, blurred, partly covered, thinner or thicker strokes), each at five
strengths from mild to severe, reported as Hendrycks and Dietterich report ImageNet-C
("Benchmarking neural network robustness to common corruptions and perturbations", ICLR 2019):
accuracy per family and strength, and their mean. Each change draws its randomness (directions,
positions, noise) from a generator seeded by its family and strength, so every model and every
run sees the same images.

    python plot.py RUN_DIR    # RUN_DIR/robustness.json made once, drawn, added to report.md

Its section of report.md (``report_lines``) and its figure (``figure``) are made here too.

The sweep is a diagnostic: lenet5_reg's augmentation (distortions.py) trains on broad random ranges
of such changes, never on these exact settings.
"""

import copy
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from dataset import TEST_BATCH_SIZE, normalize, to_unit
from distortions import (
    blur,
    contrast,
    cover,
    lift,
    noise,
    rotate,
    salt_and_pepper,
    shear,
    shift,
    thicker,
    thinner,
    zoom,
)
from files import file_digest, write_json
from model import MODELS
from runs import mean_std, seeds_note

SWEEP_SEED = 20261201
# Raised whenever a change computes differently, so that saved sweeps are made again.
VERSION = 2


def either_way(images, generator):
    """+1 for a random half of the images and -1 for the others, one sign each."""
    plus = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(plus, 1.0, -1.0)


def shifted(images, pixels, generator):
    """Moved by ``pixels`` in a random direction, its own for each image."""
    direction = torch.rand(len(images), generator=generator) * 2 * math.pi
    return shift(images, torch.stack([direction.cos(), direction.sin()], 1) * pixels)


# name: (what the strength is, strengths from none (the first) to severe, the change).
FAMILIES = {
    "shift": ("pixels", [0, 1, 2, 3, 4, 5], shifted),
    "rotation": (
        "degrees",
        [0, 10, 20, 30, 40, 50],
        lambda x, d, g: rotate(x, either_way(x, g) * d),
    ),
    "zoom in": ("scale", [1, 1.1, 1.2, 1.3, 1.4, 1.5], lambda x, s, g: zoom(x, s)),
    "zoom out": ("scale", [1, 0.9, 0.8, 0.7, 0.6, 0.5], lambda x, s, g: zoom(x, s)),
    "shear": ("degrees", [0, 10, 20, 30, 40, 50], lambda x, d, g: shear(x, either_way(x, g) * d)),
    "brightness": (
        "background level",
        [0, 0.1, 0.2, 0.3, 0.4, 0.5],
        lambda x, level, g: lift(x, level),
    ),
    "contrast": (
        "contrast factor",
        [1, 0.6, 0.45, 0.3, 0.2, 0.1],
        lambda x, f, g: contrast(x, f, image_means(x)),
    ),
    "gaussian noise": ("sigma", [0, 0.1, 0.2, 0.3, 0.4, 0.5], noise),
    "salt and pepper": ("fraction of pixels", [0, 0.05, 0.1, 0.15, 0.2, 0.3], salt_and_pepper),
    "blur": ("sigma", [0, 0.5, 1, 1.5, 2, 2.5], lambda x, s, g: blur(x, s) if s else x),
    "occlusion": ("square side, pixels", [0, 6, 8, 10, 12, 14], cover),
    "thinner": (
        "pixels off each side",
        [0, 0.25, 0.5, 0.75, 1, 1.25],
        lambda x, w, g: thinner(x, w, math.ceil(w)),
    ),
    "thicker": (
        "pixels on each side",
        [0, 0.5, 1, 1.5, 2, 2.5],
        lambda x, w, g: thicker(x, w, math.ceil(w)),
    ),
}


def image_means(images):
    """Each image's mean pixel, (N, 1, 1, 1): where a loss of contrast pulls it."""
    return images.mean((-3, -2, -1), keepdim=True)


def corrupted(images, family, level):
    """[0, 1] images (N, 1, 28, 28) under ``family`` at its ``level``-th strength (0: unchanged)."""
    _, strengths, change = FAMILIES[family]
    if level == 0:
        return images
    generator = torch.Generator().manual_seed(
        SWEEP_SEED + 1000 * list(FAMILIES).index(family) + level
    )
    return change(images, strengths[level], generator).clamp(0, 1)


def folded(model):
    """An eval-mode copy of ``model`` for fast inference: each BatchNorm folded into the layer
    before it (torch's own fusion), then channels-last; the same function (docs/performance.md: how
    much faster)."""
    model = copy.deepcopy(model).eval()
    for layer, norm in (("conv1", "bn1"), ("conv2", "bn2"), ("fc1", "bn3"), ("fc2", "bn4")):
        if isinstance(getattr(model, norm, None), (nn.BatchNorm1d, nn.BatchNorm2d)):
            fuse = fuse_conv_bn_eval if layer.startswith("conv") else fuse_linear_bn_eval
            setattr(model, layer, fuse(getattr(model, layer), getattr(model, norm)))
            setattr(model, norm, nn.Identity())
    return model.to(memory_format=torch.channels_last)


@torch.inference_mode()
def accuracy(model, images, labels):
    """Accuracy of an eval-mode model on [0, 1] images."""
    correct = sum(
        (model(normalize(batch)).argmax(1) == target).sum().item()
        for batch, target in zip(
            images.split(TEST_BATCH_SIZE), labels.split(TEST_BATCH_SIZE), strict=True
        )
    )
    return correct / len(labels)


def sweep(models, images, labels):
    """{key: {family: [accuracy at each strength]}} for each eval-mode model of ``models`` ({key:
    model}), on [0, 1] images (N, 1, 28, 28) on the CPU; each changed set is made once for all the
    models."""
    models = {key: folded(model) for key, model in models.items()}
    clean = {key: accuracy(model, images, labels) for key, model in models.items()}
    result = {key: {} for key in models}
    for family, (_, strengths, _) in FAMILIES.items():
        for key in models:
            result[key][family] = [clean[key]]
        for level in range(1, len(strengths)):
            changed = corrupted(images, family, level)
            for key, model in models.items():
                result[key][family].append(accuracy(model, changed, labels))
    return result


def definition():
    """What the sweep is, for robustness.json: a result of another definition is not reused."""
    return {
        family: {"unit": unit, "strengths": strengths}
        for family, (unit, strengths, _) in FAMILIES.items()
    }


def sweep_mean(accuracies):
    """The mean accuracy over every family and changed strength, as in ImageNet-C."""
    return sum(sum(acc[1:]) for acc in accuracies.values()) / sum(
        len(acc) - 1 for acc in accuracies.values()
    )


# ------------------------------------------------------------ robustness.json


def run_sweep(path, jobs, test_set):
    """{job key: {"model", "seed", "accuracy": {family: [accuracy per strength]}}} for ``jobs``
    ({key: (model name, seed, job folder, its model loaded from last.pt)}), kept in ``path``
    (robustness.json). A job is swept again only when its last.pt, the test set or the sweep itself
    (its families, strengths or VERSION) has changed."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    test = {"path": str(test_set.path), "size": len(test_set)}
    made = {"version": VERSION, "families": definition(), "test_set": test}
    same = isinstance(saved, dict) and all(saved.get(key) == value for key, value in made.items())
    kept = saved["jobs"] if same and isinstance(saved.get("jobs"), dict) else {}
    results, todo = {}, {}
    for key, (name, seed, folder, model) in jobs.items():
        digest = file_digest(folder / "last.pt")
        if isinstance(kept.get(key), dict) and kept[key].get("checkpoint") == digest:
            results[key] = kept[key]
        else:
            todo[key] = (name, seed, digest, model)
    if todo:
        swept = sweep(
            {key: model for key, (*_, model) in todo.items()},
            to_unit(test_set.images),
            test_set.labels,
        )
        for key, (name, seed, digest, _) in todo.items():
            results[key] = {
                "model": name,
                "seed": seed,
                "checkpoint": digest,
                "accuracy": swept[key],
            }
        write_json(path, {**made, "jobs": results})
    return results


# ------------------------------------------------------------ report.md and the figure


def report_lines(sweep):
    """report.md's robustness section: per family, each model's mean accuracy over the five
    strengths, and its accuracy at the strongest; then the clean accuracy and the mean over the
    whole sweep."""
    if not sweep:
        return []
    accuracies = by_model(sweep)
    names = list(accuracies)
    lines = ["", "## Robustness: the test digits changed (robustness.py)", ""]
    lines += [
        "Accuracy of the final weights, mean over the five strengths of each family (at the"
        " strongest in brackets); mean ± std over seeds where there are several.",
        "",
    ]
    lines += [
        "| family | strengths | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    for family, (unit, strengths, _) in FAMILIES.items():
        cells = [
            f"{mean_std([statistics.fmean(a[family][1:]) for a in accuracies[n]], 1)}"
            f" ({mean_std([a[family][-1] for a in accuracies[n]], 1)})"
            for n in names
        ]
        lines.append(
            f"| {family} | {', '.join(f'{s:g}' for s in strengths[1:])} {unit} | "
            + " | ".join(cells)
            + " |"
        )
    clean = [mean_std([a["shift"][0] for a in accuracies[n]]) for n in names]
    mean = [mean_std([sweep_mean(a) for a in accuracies[n]]) for n in names]
    lines.append("| **clean test set** | | " + " | ".join(clean) + " |")
    lines.append("| **mean over the sweep** | | " + " | ".join(mean) + " |")
    levels = max(len(strengths) for _, strengths, _ in FAMILIES.values()) - 1
    for name in names:
        lines += ["", f"### {name}: accuracy at each strength", ""]
        lines += ["| family | " + " | ".join(f"strength {k}" for k in range(1, levels + 1)) + " |"]
        lines += ["|---|" + "---:|" * levels]
        for family, (unit, strengths, _) in FAMILIES.items():
            cells = [
                f"{s:g}: {mean_std([a[family][k] for a in accuracies[name]], 1)}"
                for k, s in enumerate(strengths)
            ]
            lines.append(f"| {family} ({unit}) | " + " | ".join(cells[1:]) + " |")
    return lines


def by_model(sweep):
    """{model: [each seed's {family: [accuracy per strength]}]}, in the registry's order."""
    found = {}
    for job in sweep.values():
        found.setdefault(job["model"], []).append(job["accuracy"])
    return {name: found[name] for name in MODELS if name in found}


def figure(sweep):
    """One small panel per family: accuracy against strength (none to severe, left to right), a line
    per model with its seed band."""
    families, cols = FAMILIES, 5
    rows = math.ceil((len(families) + 1) / cols)  # one panel more, for the legend
    fig = Figure(figsize=(12.5, 2.5 * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, sharey=True, squeeze=False).flat)
    accuracies = by_model(sweep)
    for ax, (family, (unit, strengths, _)) in zip(axes, families.items(), strict=False):
        levels = range(len(strengths))
        for name, seeds in accuracies.items():
            values = np.array([a[family] for a in seeds]) * 100  # (seeds, strengths)
            (line,) = ax.plot(levels, values.mean(0), marker="o", markersize=3, label=name)
            if len(seeds) > 1:
                low, high = (
                    values.mean(0) - values.std(0, ddof=1),
                    values.mean(0) + values.std(0, ddof=1),
                )
                ax.fill_between(levels, low, high, color=line.get_color(), alpha=0.2)
        ax.set_title(family, fontsize=10)
        ax.set_xlabel(unit, fontsize=8)
        ax.set_xticks(levels, [f"{s:g}" for s in strengths])
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for ax in axes[len(families) :]:
        ax.set_axis_off()
    handles, labels = fig.axes[0].get_legend_handles_labels()
    seeds = max(len(s) for s in accuracies.values())
    legend = axes[len(families)].legend(
        handles, labels, loc="center left", title=f"accuracy (%){seeds_note(seeds)}"
    )
    # it may reach into the empty panel beside it; the panels keep their widths
    legend.set_in_layout(False)
    fig.suptitle(
        "Robustness: test accuracy as the digits are changed more and more (final weights)"
    )
    return fig
