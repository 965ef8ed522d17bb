"""How the models hold up off MNIST's own test set: the robustness sweep.

The test digits under families of change, each at five strengths from mild to severe, reported as
Hendrycks and Dietterich report ImageNet-C ("Benchmarking neural network robustness to common
corruptions and perturbations", ICLR 2019): accuracy per family and strength, and their mean. Each
change draws its randomness (directions, positions, noise) from a generator seeded by its family
and strength, so every model and every run sees the same images.

    python plot.py RUN_DIR    # RUN_DIR/robustness.json made once, drawn, added to report.md

Two kinds of family, kept apart as ImageNet-C and MNIST-C keep them: *trained on* (shifted,
rotated, zoomed, sheared, on a lighter background, fainter, noisy, blurred, partly covered, thinner
or thicker strokes: distortions.py's operations, which lenet5_reg's augmentation uses over broad
random ranges) and *held out* (ruled lines, a form box's edges, a dotted line, a shadow, motion
blur, an elastic warp, a coarse scan: corruptions.py, which training never calls). The held-out
mean is the robustness figure; the trained-on mean says what the augmentation taught.

Its section of report.md (``report_lines``) and its figure (``figure``) are made here too.
"""

import base64
import copy
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import corruptions
from dataset import TEST_BATCH_SIZE, normalize, to_unit
from distortions import (
    blur,
    contrast,
    cover,
    hollow,
    lift,
    noise,
    rotate,
    salt_and_pepper,
    shear,
    shift,
    strokes,
    thicker,
    thinner,
    zoom,
)
from files import file_digest, write_json
from model import MODELS
from runs import mean_std, seeds_note

SWEEP_SEED = 20261201
# Raised whenever a change computes differently, so that saved sweeps are made again.
VERSION = 3


def either_way(images, generator):
    """+1 for a random half of the images and -1 for the others, one sign each."""
    plus = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(plus, 1.0, -1.0)


def shifted(images, pixels, generator):
    """Moved by ``pixels`` in a random direction, its own for each image."""
    direction = torch.rand(len(images), generator=generator) * 2 * math.pi
    return shift(images, torch.stack([direction.cos(), direction.sin()], 1) * pixels)


class Family(NamedTuple):
    """One family of change: what its strength is, the strengths from none (the first) to severe,
    the change (images, strength, generator), and whether lenet5_reg's training ever makes it."""

    unit: str
    strengths: list
    change: Callable
    trained_on: bool


def trained(unit, strengths, change):
    """A family whose operation lenet5_reg's augmentation uses (distortions.py)."""
    return Family(unit, strengths, change, trained_on=True)


def held_out(unit, strengths, change):
    """A family no operation of the augmentation makes, at any strength (corruptions.py)."""
    return Family(unit, strengths, change, trained_on=False)


FAMILIES = {
    "shift": trained("pixels", [0, 1, 2, 3, 4, 5], shifted),
    "rotation": trained(
        "degrees", [0, 10, 20, 30, 40, 50], lambda x, d, g: rotate(x, either_way(x, g) * d)
    ),
    "zoom in": trained("scale", [1, 1.1, 1.2, 1.3, 1.4, 1.5], lambda x, s, g: zoom(x, s)),
    "zoom out": trained("scale", [1, 0.9, 0.8, 0.7, 0.6, 0.5], lambda x, s, g: zoom(x, s)),
    "shear": trained(
        "degrees", [0, 10, 20, 30, 40, 50], lambda x, d, g: shear(x, either_way(x, g) * d)
    ),
    "brightness": trained(
        "background level", [0, 0.1, 0.2, 0.3, 0.4, 0.5], lambda x, level, g: lift(x, level)
    ),
    "contrast": trained(
        "contrast factor",
        [1, 0.6, 0.45, 0.3, 0.2, 0.1],
        lambda x, f, g: contrast(x, f, image_means(x)),
    ),
    "gaussian noise": trained("sigma", [0, 0.1, 0.2, 0.3, 0.4, 0.5], noise),
    "salt and pepper": trained(
        "fraction of pixels", [0, 0.05, 0.1, 0.15, 0.2, 0.3], salt_and_pepper
    ),
    "blur": trained("sigma", [0, 0.5, 1, 1.5, 2, 2.5], lambda x, s, g: blur(x, s) if s else x),
    "occlusion": trained("square side, pixels", [0, 6, 8, 10, 12, 14], cover),
    "thinner": trained(
        "pixels off each side",
        [0, 0.25, 0.5, 0.75, 1, 1.25],
        lambda x, w, g: thinner(x, w, math.ceil(w)),
    ),
    "thicker": trained(
        "pixels on each side", [0, 0.5, 1, 1.5, 2, 2.5], lambda x, w, g: thicker(x, w, math.ceil(w))
    ),
    "ruled lines": held_out("line darkness", [0, 0.4, 0.55, 0.7, 0.85, 1], corruptions.ruled_lines),
    "box edges": held_out("line width, pixels", [0, 1, 1.5, 2, 2.5, 3], corruptions.box_edges),
    "dotted line": held_out(
        "dot radius, pixels", [0, 0.5, 0.75, 1, 1.25, 1.5], corruptions.dotted_line
    ),
    "shadow": held_out("darkness", [0, 0.2, 0.35, 0.5, 0.65, 0.8], corruptions.shadow),
    "motion blur": held_out("length, pixels", [0, 2, 4, 6, 8, 10], corruptions.motion_blur),
    "elastic": held_out("pixels moved (rms)", [0, 0.4, 0.8, 1.2, 1.6, 2], corruptions.elastic),
    "coarse scan": held_out("scanned at, pixels", [28, 20, 16, 13, 11, 9], corruptions.coarse_scan),
    # last, so that the families above keep their seeds
    "strokes": trained("strokes across", [0, 1, 2, 3, 4, 5], lambda x, k, g: stroked(x, k, g)),
    "hollow": trained(
        "outline, pixels", [0, 2, 1.5, 1.25, 1, 0.75], lambda x, w, g: hollow(x, w, 2) if w else x
    ),
}


def stroked(images, count, generator):
    """``count`` free strokes over each image, 1.5 pixels wide, at full darkness."""
    for _ in range(count):
        images = strokes(images, 1.5, 1.0, generator)
    return images


def image_means(images):
    """Each image's mean pixel, (N, 1, 1, 1): where a loss of contrast pulls it."""
    return images.mean((-3, -2, -1), keepdim=True)


def corrupted(images, family, level):
    """[0, 1] images (N, 1, 28, 28) under ``family`` at its ``level``-th strength (0: unchanged)."""
    _, strengths, change, _ = FAMILIES[family]
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
def correct(model, images, labels):
    """(N,) bool: which of the [0, 1] images an eval-mode model gets right."""
    return torch.cat(
        [
            model(normalize(batch)).argmax(1) == target
            for batch, target in zip(
                images.split(TEST_BATCH_SIZE), labels.split(TEST_BATCH_SIZE), strict=True
            )
        ]
    )


def accuracy(model, images, labels):
    """Accuracy of an eval-mode model on [0, 1] images."""
    return correct(model, images, labels).float().mean().item()


def sweep(models, images, labels):
    """{key: {"accuracy": {family: [accuracy at each strength]}, "right": ...}} for each eval-mode
    model of ``models`` ({key: model}), on [0, 1] images (N, 1, 28, 28) on the CPU; each changed
    set is made once for all the models.

    "right" says which of the test digits (their number: "digits") the model gets right, on the
    clean set ("clean") and at each changed strength of each family ("families": {family: [one
    per strength from the first]}), each as ``packed`` bits: what compare.py's paired tests
    need, the same digits for every model.
    """
    models = {key: folded(model) for key, model in models.items()}
    right = {key: correct(model, images, labels) for key, model in models.items()}
    result = {
        key: {
            "accuracy": {},
            "right": {"digits": len(labels), "clean": packed(right[key]), "families": {}},
        }
        for key in models
    }
    for family, (_, strengths, *_) in FAMILIES.items():
        for key in models:
            result[key]["accuracy"][family] = [right[key].float().mean().item()]
            result[key]["right"]["families"][family] = []
        for level in range(1, len(strengths)):
            changed = corrupted(images, family, level)
            for key, model in models.items():
                hits = correct(model, changed, labels)
                result[key]["accuracy"][family].append(hits.float().mean().item())
                result[key]["right"]["families"][family].append(packed(hits))
    return result


def packed(hits):
    """(N,) bools as text for robustness.json: eight digits a byte, in base 64."""
    return base64.b64encode(np.packbits(hits.numpy()).tobytes()).decode("ascii")


def unpacked(text, count):
    """The (``count``,) bool array that ``packed`` made ``text`` of."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8), count=count)
    return bits.astype(bool)


def definition():
    """What the sweep is, for robustness.json: a result of another definition is not reused."""
    return {
        family: {"unit": f.unit, "strengths": f.strengths, "trained_on": f.trained_on}
        for family, f in FAMILIES.items()
    }


def sweep_mean(accuracies, trained_on):
    """The mean accuracy over every changed strength of the trained-on families
    (``trained_on=True``) or of the held-out ones (False), as ImageNet-C means its corruptions."""
    chosen = [
        acc[1:] for family, acc in accuracies.items() if FAMILIES[family].trained_on == trained_on
    ]
    return sum(map(sum, chosen)) / sum(map(len, chosen))


# ------------------------------------------------------------ robustness.json


def run_sweep(path, jobs, test_set):
    """{job key: {"model", "seed", "checkpoint", "accuracy", "right"}} (``sweep``'s) for ``jobs``
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
            results[key] = {"model": name, "seed": seed, "checkpoint": digest, **swept[key]}
        write_json(path, {**made, "jobs": results})
    return results


# ------------------------------------------------------------ report.md and the figure


def kind(family):
    """How report.md and the figure mark a family."""
    return "trained on" if FAMILIES[family].trained_on else "held out"


def report_lines(sweep):
    """report.md's robustness section: per family (held out or trained on), each model's mean
    accuracy over the five strengths, and its accuracy at the strongest; then the clean accuracy,
    the mean over the held-out families (the robustness figure) and over the trained-on ones."""
    if not sweep:
        return []
    accuracies = by_model(sweep)
    names = list(accuracies)
    lines = ["", "## Robustness: the test digits changed (robustness.py)", ""]
    lines += [
        "Accuracy of the final weights, mean over the five strengths of each family (at the"
        " strongest in brackets); mean ± std over seeds where there are several. *Held out*: no"
        " operation of lenet5_reg's augmentation makes this change, at any strength"
        " (corruptions.py); *trained on*: the augmentation uses its operation (distortions.py)."
        " The held-out mean is the robustness figure.",
        "",
    ]
    lines += [
        "| family | | strengths | " + " | ".join(names) + " |",
        "|---|---|---|" + "---:|" * len(names),
    ]
    for family, (unit, strengths, *_) in FAMILIES.items():
        cells = [
            f"{mean_std([statistics.fmean(a[family][1:]) for a in accuracies[n]], 1)}"
            f" ({mean_std([a[family][-1] for a in accuracies[n]], 1)})"
            for n in names
        ]
        lines.append(
            f"| {family} | {kind(family)} | {', '.join(f'{s:g}' for s in strengths[1:])} {unit} | "
            + " | ".join(cells)
            + " |"
        )
    first = next(iter(FAMILIES))
    rows = {
        "clean test set": lambda a: a[first][0],
        "mean over the held-out families": lambda a: sweep_mean(a, trained_on=False),
        "mean over the trained-on families": lambda a: sweep_mean(a, trained_on=True),
    }
    for title, value in rows.items():
        cells = [mean_std([value(a) for a in accuracies[n]]) for n in names]
        lines.append(f"| **{title}** | | | " + " | ".join(cells) + " |")
    levels = max(len(f.strengths) for f in FAMILIES.values()) - 1
    for name in names:
        lines += ["", f"### {name}: accuracy at each strength", ""]
        lines += ["| family | " + " | ".join(f"strength {k}" for k in range(1, levels + 1)) + " |"]
        lines += ["|---|" + "---:|" * levels]
        for family, (unit, strengths, *_) in FAMILIES.items():
            cells = [
                f"{s:g}: {mean_std([a[family][k] for a in accuracies[name]], 1)}"
                for k, s in enumerate(strengths)
            ]
            lines.append(f"| {family} ({unit}) | " + " | ".join(cells[1:]) + " |")
    return lines


def jobs_by_model(sweep):
    """{model: {seed: job}} of robustness.json's jobs, models in the registry's order, seeds in
    theirs."""
    found = {}
    for job in sweep.values():
        found.setdefault(job["model"], {})[job["seed"]] = job
    return {name: dict(sorted(found[name].items())) for name in MODELS if name in found}


def by_model(sweep):
    """{model: [each seed's {family: [accuracy per strength]}]}, in the registry's order."""
    return {
        name: [job["accuracy"] for job in jobs.values()]
        for name, jobs in jobs_by_model(sweep).items()
    }


def figure(sweep):
    """One small panel per family: accuracy against strength (none to severe, left to right), a line
    per model with its seed band."""
    families, cols = FAMILIES, 5
    rows = math.ceil((len(families) + 1) / cols)  # one panel more, for the legend
    fig = Figure(figsize=(12.5, 2.5 * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, sharey=True, squeeze=False).flat)
    accuracies = by_model(sweep)
    for ax, (family, (unit, strengths, *_)) in zip(axes, families.items(), strict=False):
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
        held = not FAMILIES[family].trained_on
        ax.set_title(f"{family} ({kind(family)})", fontsize=9, color="C3" if held else "black")
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
        "Robustness: test accuracy as the digits are changed more and more (final weights);"
        " held out (red titles): changes lenet5_reg never trained on"
    )
    return fig
