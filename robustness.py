"""How the models hold up off MNIST's own test set: the robustness sweep.

The test digits under families of change (shifted, rotated, zoomed, sheared, on a lighter
background, fainter, noisy, blurred, partly covered, thinner or thicker strokes), each at five
strengths from mild to severe, reported as Hendrycks and Dietterich report ImageNet-C
("Benchmarking neural network robustness to common corruptions and perturbations", ICLR 2019):
accuracy per family and strength, and their mean. Each change draws its randomness (directions,
positions, noise) from a generator seeded by its family and strength, so every model and every
run sees the same images.

    python plot.py RUN_DIR    # computes RUN_DIR/robustness.json once, draws it, adds it to report.md

The sweep is a diagnostic: lenet5_reg's augmentation (dataset.py) trains on broad random ranges
of such changes, never on these exact settings.
"""

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import runs
from dataset import affine, blur, cover, file_digest, lift, noise, normalize, salt_and_pepper, thicker, thinner, to_unit

BILINEAR = InterpolationMode.BILINEAR
SWEEP_SEED = 20261201
VERSION = 1  # raised whenever a change computes differently, so that saved sweeps are made again
BATCH = 1000  # inference only; on a 2-core CPU 250 to 1,000 are fastest, 2,500 is 1.4x slower


def _either_way(images, generator, change):
    """``change(images, sign)`` with sign +1 for a random half of the images and -1 for the others."""
    plus = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(plus.view(-1, 1, 1, 1), change(images, 1), change(images, -1))


def shift(images, pixels, generator):
    """Moved by ``pixels`` in a random direction, its own for each image."""
    direction = torch.rand(len(images), generator=generator) * 2 * math.pi
    zero = torch.zeros(len(images))
    moves = torch.stack([direction.cos(), direction.sin()], 1) * pixels
    return affine(images, zero, torch.ones(len(images)), moves, zero)


def rotate(images, degrees, generator):
    return _either_way(images, generator, lambda x, sign: TF.rotate(x, sign * degrees, BILINEAR))


def zoom(images, scale, generator):
    return TF.affine(images, angle=0.0, translate=[0.0, 0.0], scale=scale, shear=[0.0, 0.0], interpolation=BILINEAR)


def shear(images, degrees, generator):
    return _either_way(
        images,
        generator,
        lambda x, sign: TF.affine(x, 0.0, [0.0, 0.0], 1.0, [sign * degrees, 0.0], interpolation=BILINEAR),
    )


# name: (what the strength is, strengths from none (the first) to severe, the change).
FAMILIES = {
    "shift": ("pixels", [0, 1, 2, 3, 4, 5], shift),
    "rotation": ("degrees", [0, 10, 20, 30, 40, 50], rotate),
    "zoom in": ("scale", [1, 1.1, 1.2, 1.3, 1.4, 1.5], zoom),
    "zoom out": ("scale", [1, 0.9, 0.8, 0.7, 0.6, 0.5], zoom),
    "shear": ("degrees", [0, 10, 20, 30, 40, 50], shear),
    "brightness": ("background level", [0, 0.1, 0.2, 0.3, 0.4, 0.5], lambda x, level, g: lift(x, level)),
    "contrast": ("contrast factor", [1, 0.6, 0.45, 0.3, 0.2, 0.1], lambda x, f, g: TF.adjust_contrast(x, f)),
    "gaussian noise": ("sigma", [0, 0.1, 0.2, 0.3, 0.4, 0.5], noise),
    "salt and pepper": ("fraction of pixels", [0, 0.05, 0.1, 0.15, 0.2, 0.3], salt_and_pepper),
    "blur": ("sigma", [0, 0.5, 1, 1.5, 2, 2.5], lambda x, s, g: blur(x, s) if s else x),
    "occlusion": ("square side, pixels", [0, 6, 8, 10, 12, 14], cover),
    "thinner": ("pixels off each side", [0, 0.25, 0.5, 0.75, 1, 1.25], lambda x, w, g: thinner(x, w, math.ceil(w))),
    "thicker": ("pixels on each side", [0, 0.5, 1, 1.5, 2, 2.5], lambda x, w, g: thicker(x, w, math.ceil(w))),
}


def corrupted(images, family, level):
    """The [0, 1] images (N, 1, 28, 28) under ``family`` at its ``level``-th strength (0: unchanged)."""
    _, strengths, change = FAMILIES[family]
    if level == 0:
        return images
    generator = torch.Generator().manual_seed(SWEEP_SEED + 1000 * list(FAMILIES).index(family) + level)
    return change(images, strengths[level], generator).clamp(0, 1)


def folded(model):
    """An eval-mode copy of ``model`` for fast inference: each BatchNorm folded into the layer before it
    (torch's own fusion), then channels-last. The same function, in about 0.6 of the time on a 2-core
    CPU (lenet5_reg: 0.28 s for 10,000 images against 0.51 s, measured at batch 1,000)."""
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
        for batch, target in zip(images.split(BATCH), labels.split(BATCH))
    )
    return correct / len(labels)


def sweep(models, images, labels):
    """{key: {family: [accuracy at each strength]}} for each eval-mode model of ``models`` ({key: model}),
    on [0, 1] images (N, 1, 28, 28) on the CPU; each changed set is made once for all the models."""
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
    """What the sweep is, for robustness.json: results made under another definition are not reused."""
    return {family: {"unit": unit, "strengths": strengths} for family, (unit, strengths, _) in FAMILIES.items()}


def sweep_mean(accuracies):
    """The mean accuracy over every family and changed strength (strength 0 left out), as in ImageNet-C."""
    return sum(sum(acc[1:]) for acc in accuracies.values()) / sum(len(acc) - 1 for acc in accuracies.values())


# --------------------------------------------------------------------------- robustness.json


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
        swept = sweep({key: model for key, (*_, model) in todo.items()}, to_unit(test_set.images), test_set.labels)
        for key, (name, seed, digest, _) in todo.items():
            results[key] = {"model": name, "seed": seed, "checkpoint": digest, "accuracy": swept[key]}
        runs.write_json(path, {**made, "jobs": results})
    return results
