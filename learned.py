"""What the models learned, drawn and measured: the figures and notes of report.md's "What the
models learned", which plot.py saves, from the real weights and the real intermediate tensors
(model.inside's forward hooks), as CNN Explainer (Wang et al. 2020) and Harley's MNIST visualizer
(2015) show them.

- ``filters_figure``: each LeNet-5's conv1 and conv2 kernels, one diverging colour scale per layer;
- ``mlp_weights_figure``: the MLP's 75 first-layer units, each unit's 784 weights as a 28x28 image;
- ``activations_figure``: the layers' activations after ReLU on a test digit of each class;
- ``notes``: how many MLP units hold a digit-like template (a stated rule), and whether each model's
  first layer moves with a moved digit.

Each figure is one image per layer, composed with numpy (NaN between the tiles, drawn as the
background): a few imshow calls however many maps, and the maps line up pixel for pixel.
"""

import math

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from dataset import normalize, to_unit
from distortions import shift
from model import IMAGE_SIDE, KERNEL, LeNet5, inside


def tiles(maps, columns, pad=1, zoom=1):
    """(N, h, w) maps as one 2-D array, ``columns`` a row, each ``zoom`` times, NaN between."""
    maps = np.asarray(maps, dtype=float).repeat(zoom, 1).repeat(zoom, 2)
    n, h, w = maps.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad), np.nan)
    for k, one in enumerate(maps):
        r, c = divmod(k, columns)
        grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = one
    return grid


def centres(count, side, pad=1):
    """Pixel centres of ``count`` tiles of ``side`` pixels in a row of ``tiles``."""
    return [k * (side + pad) + (side - 1) / 2 for k in range(count)]


def diverging(ax, image, top):
    """Signed weights, blue (negative) to red (positive), white at zero; grey between tiles."""
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.75")
    return ax.imshow(image, cmap=cmap, vmin=-top, vmax=top)


def conv_models(models):
    return {name: model for name, model in models.items() if isinstance(model, LeNet5)}


def filters_figure(models):
    """Each LeNet-5's conv1 kernels (a column, kernel k beside row k of conv2: the kernels that read
    conv1's map k) and conv2's 16x6 kernels (row: the map read, column: the map made)."""
    models = conv_models(models)
    fig = Figure(figsize=(10, 1.2 + 2.7 * len(models)), layout="constrained")
    widths = [1, 16]  # tiles across: conv1's column, conv2's grid
    axes = fig.subplots(
        len(models), 2, width_ratios=[w * (KERNEL + 1) - 1 for w in widths], squeeze=False
    )
    for (name, model), (ax1, ax2) in zip(models.items(), axes, strict=True):
        conv1 = model.conv1.weight.detach()[:, 0]  # (6, 5, 5)
        # (6 * 16, 5, 5), a row per map read
        conv2 = model.conv2.weight.detach().transpose(0, 1).flatten(0, 1)
        side = conv1.shape[-1]
        for ax, weights, columns, where in [
            (ax1, conv1, widths[0], "left"),
            (ax2, conv2, widths[1], "right"),
        ]:
            image = diverging(ax, tiles(weights, columns), weights.abs().max().item())
            fig.colorbar(image, ax=ax, location=where, shrink=0.9, label="weight")
        ax1.set_title(f"{name}\nconv1", fontsize=10)
        ax1.set(xticks=[], yticks=centres(6, side))
        ax1.set_yticklabels(range(6), fontsize=8)
        ax2.set_title(f"{name} conv2", fontsize=10)
        ax2.set_yticks(centres(6, side), [f"from map {k}" for k in range(6)], fontsize=8)
        ax2.set_xticks(centres(16, side), range(16), fontsize=8)
        ax2.set_xlabel("conv2 map it makes", fontsize=9)
    fig.suptitle(
        "What the convolutions learned: 5x5 kernels of the final weights,"
        " one colour scale per layer"
    )
    return fig


def mlp_weights_figure(model):
    """The MLP's 75 first-layer units, each unit's 784 weights as the 28x28 image it responds to."""
    weights = model.fc1.weight.detach().view(-1, IMAGE_SIDE, IMAGE_SIDE)
    columns = 15
    fig = Figure(figsize=(10, 4.3), layout="constrained")
    ax = fig.subplots()
    image = diverging(ax, tiles(weights, columns, pad=2), weights.abs().max().item())
    rows = math.ceil(len(weights) / columns)
    ax.set_xticks(centres(columns, IMAGE_SIDE, 2), range(columns), fontsize=8)
    ax.set_yticks(centres(rows, IMAGE_SIDE, 2), range(0, len(weights), columns), fontsize=8)
    ax.set(xlabel="+ column", ylabel="unit")
    fig.colorbar(image, ax=ax, shrink=0.9, label="weight (one scale)")
    ax.set_title(
        "mlp fc1: the weights of each of its 75 units as a 28x28 image (red: ink there raises it)"
    )
    return fig


TEMPLATE_CORRELATION = 0.5  # the rule for a "digit-like" MLP unit, below


def templates(mlp, test_set):
    """(units with a digit-like template, the median unit's best correlation): a unit's 784 weights
    count as a template of a digit when they correlate at TEMPLATE_CORRELATION or more (in either
    sign) with one class's mean test image minus the mean of all test images."""
    images = to_unit(test_set.images).flatten(1)
    classes = torch.stack([images[test_set.labels == c].mean(0) for c in test_set.labels.unique()])
    best = correlations(mlp.fc1.weight.detach(), classes - images.mean(0)).abs().amax(1)
    return int((best >= TEMPLATE_CORRELATION).sum()), best.median().item()


def correlations(a, b):
    """Pearson correlation of each row of ``a`` with each row of ``b``: (len(a), len(b))."""
    a, b = (x.flatten(1) - x.flatten(1).mean(1, keepdim=True) for x in (a, b))
    return (a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (
        b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ).T


@torch.inference_mode()
def shift_agreement(models, test_set, pixels=2, count=1000):
    """{model: (layer, r)}: r is the mean correlation of the first layer of model.INSIDE on the
    first ``count`` test digits moved ``pixels`` to the right, with that layer on the unmoved
    digits, moved as far for a convolution's maps (does what it found move with the digit?), as they
    are for a dense layer's units."""
    images = to_unit(test_set.images[:count])
    right = (pixels, 0)
    out = {}
    for name, model in models.items():
        layer, before = next(iter(inside(model, normalize(images))[1].items()))
        after = inside(model, normalize(shift(images, right)))[1][layer]
        if before.dim() == 4:
            before = shift(before, right)
        out[name] = (layer, correlations(after, before).diagonal().mean().item())
    return out


def notes(models, test_set):
    """report.md's section on what the models learned, from the models whose figures it shows."""
    lines = ["", "## What the models learned (first seed's final weights)", ""]
    if "mlp" in models:
        count, median = templates(models["mlp"], test_set)
        units = models["mlp"].fc1.out_features
        lines += [
            f"- mlp: {count} of {units} first-layer units have a digit-like"
            f" template: their weights correlate at {TEMPLATE_CORRELATION} or more with one class's"
            " mean test image minus the mean of all; the median unit's best correlation is"
            f" {median:.2f}."
        ]
    for name, (layer, r) in shift_agreement(models, test_set).items():
        what = (
            "the moved digit's maps and the unmoved digit's maps moved as far"
            if layer.startswith("conv")
            else ("the moved digit's activations and the unmoved digit's")
        )
        moved_by = "the first 1,000 test digits moved 2 px right"
        lines.append(f"- {name} {layer}, {moved_by}: mean correlation {r:.3f} between {what}.")
    return lines


def first_of_each_class(test_set):
    """Indices of the first test image of each digit 0-9 (fewer if a class is missing)."""
    return [
        int((test_set.labels == c).nonzero()[0, 0])
        for c in range(10)
        if (test_set.labels == c).any()
    ]


# pixels of one digit's row in activations.png (two 28x28 maps and a gap), and between rows
ROW, GAP = 57, 6


def layer_tiles(values):
    """One digit's activations of one layer, (C, h, w) maps or (units,), as a tile image at most ROW
    tall: 28x28 maps in rows of 3, smaller maps enlarged twice in rows of 8, units as cells of a
    5-row grid."""
    if values.dim() == 1:
        return tiles(values.view(-1, 1, 1), math.ceil(len(values) / 5), pad=0, zoom=11)
    side = values.shape[-1]
    return tiles(values, 3, 1) if side > ROW // 3 else tiles(values, 8, 1, zoom=2)


def column(blocks):
    """Tile images, one per digit, centred in rows of ROW pixels with GAP between them."""
    out = np.full((len(blocks) * (ROW + GAP) - GAP, max(b.shape[1] for b in blocks)), np.nan)
    for k, block in enumerate(blocks):
        top = k * (ROW + GAP) + (ROW - block.shape[0]) // 2
        out[top : top + block.shape[0], : block.shape[1]] = block
    return out


@torch.inference_mode()
def activations_figure(models, test_set):
    """For one test digit of each class (a row each): the input, then each model's activations after
    ReLU at the layers of model.INSIDE (taken with hooks: model.inside), each layer on one grey
    scale from 0 to its largest value over these digits, and each model's answer on the right."""
    chosen = first_of_each_class(test_set)
    columns = [column([tiles(image, 1, zoom=2) for image in to_unit(test_set.images[chosen])])]
    heads, answers = ["input"], []
    for name, model in models.items():
        logits, seen = inside(model, test_set.normalized[chosen])
        answers.append((name, logits.argmax(1).tolist()))
        for layer, values in seen.items():
            values = values / values.max().clamp_min(1e-12)
            columns.append(column([layer_tiles(v) for v in values]))
            heads.append(f"{name} {layer}\n" + "x".join(map(str, values.shape[1:])))
    canvas = np.full(
        (columns[0].shape[0], sum(c.shape[1] for c in columns) + 8 * (len(columns) - 1)), np.nan
    )
    left, middles = 0, []
    for block in columns:
        canvas[:, left : left + block.shape[1]] = block
        middles.append(left + block.shape[1] / 2)
        left += block.shape[1] + 8
    fig = Figure(
        figsize=(2.6 + canvas.shape[1] / 70, 1.2 + canvas.shape[0] / 70), layout="constrained"
    )
    ax = fig.subplots()
    ax.imshow(canvas, cmap=matplotlib.colormaps["gray"].with_extremes(bad="white"), vmin=0, vmax=1)
    rows = [k * (ROW + GAP) + ROW / 2 for k in range(len(chosen))]
    ax.set_xticks(middles, heads, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(rows, [f"label {test_set.labels[i].item()}" for i in chosen], fontsize=8)
    said = ax.secondary_yaxis("right")
    said.set_yticks(
        rows, ["  ".join(f"{name}: {a[k]}" for name, a in answers) for k in range(len(chosen))]
    )
    said.tick_params(labelsize=8, length=0)
    ax.tick_params(length=0)
    for spine in [*ax.spines.values(), *said.spines.values()]:
        spine.set_visible(False)
    fig.suptitle(
        "What the models compute on a digit: activations after ReLU, final weights, each layer on\n"
        "one grey scale (black 0, white its largest value over these ten digits);"
        " the answers on the right",
        fontsize=10,
    )
    return fig
