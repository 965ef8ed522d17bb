"""The yardstick a recipe is chosen by: a run's models on its own validation split (--val-size).

Each job is scored on the validation images clean, over the sweep's trained-on families
(robustness.py), and over five *validation families* that neither training nor the sweep makes:
ink spatter, a page photographed at a tilt (keystone), a pen that skips, a vignette and speckle
noise, each at five strengths. ImageNet-C keeps validation corruptions apart from its test ones in
the same way: a recipe tuned on these numbers has seen neither the sweep's held-out families nor
the test set. docs/recipe.md has the choices made with it.

    python main.py --model lenet5_reg --val-size 10000 --run-name trial
    python validation.py runs/trial

Each family takes a (N, 1, H, W) batch in [0, 1] with background 0, a strength and a CPU
``torch.Generator``; each image's draws are one row of a draw for the batch.
"""

import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import cli
import robustness
import runs
from corruptions import centres, draws, line_ink, over
from dataset import DatasetError, load_splits, to_unit
from runs import RunError

SEED = 777  # the draws of family k at strength i: SEED + 100 * k + i


def _to_segment(points, start, end):
    """(N, P): each point's (P, 2) distance to each image's segment ``start``-``end`` (N, 2)."""
    along = end - start
    length2 = (along * along).sum(1, keepdim=True).clamp_min(1e-9)
    offset = points.unsqueeze(0) - start.unsqueeze(1)  # (N, P, 2)
    t = ((offset * along.unsqueeze(1)).sum(2) / length2).clamp(0, 1)
    nearest = start.unsqueeze(1) + t.unsqueeze(2) * along.unsqueeze(1)
    return (points.unsqueeze(0) - nearest).norm(dim=2)


def spatter(batch, count, generator):
    """``count`` round blots of ink, 0.7 to 2.2 pixels in radius, anywhere on the page."""
    points = centres(batch)
    ink = torch.zeros(batch.shape[0], points.shape[0])
    for _ in range(int(count)):
        centre = 2 + 24 * draws(batch, generator, 2)
        radius = 0.7 + 1.5 * draws(batch, generator, 1)
        distance = (points.unsqueeze(0) - centre.unsqueeze(1)).norm(dim=2)
        ink = torch.maximum(ink, line_ink(distance, 2 * radius))
    return over(batch, ink)


def keystone(batch, amount, generator):
    """A page photographed at a tilt: each row (or column) scaled about the centre by 1 - amount
    at one edge to 1 + amount at the other, toward a side of its own in each image."""
    n, _, height, width = batch.shape
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, height) * (1 - 1 / height),
        torch.linspace(-1, 1, width) * (1 - 1 / width),
        indexing="ij",
    )
    sign = (torch.rand(n, 1, 1, generator=generator) < 0.5).float() * 2 - 1
    vertical = (torch.rand(n, 1, 1, generator=generator) < 0.5).unsqueeze(-1)
    x_scaled = torch.stack([xs / (1 + sign * amount * ys), ys.expand(n, -1, -1)], -1)
    y_scaled = torch.stack([xs.expand(n, -1, -1), ys / (1 + sign * amount * xs)], -1)
    grid = torch.where(vertical, y_scaled, x_scaled)
    return F.grid_sample(batch, grid, align_corners=False, padding_mode="zeros")


def pen_skips(batch, gaps, generator):
    """A pen that skips: ``gaps`` lines one pixel wide across the digit where its ink is missing."""
    points = centres(batch)
    kept = torch.ones(batch.shape[0], points.shape[0])
    for _ in range(int(gaps)):
        start, end = 4 + 20 * draws(batch, generator, 2), 4 + 20 * draws(batch, generator, 2)
        end = start + (end - start) * 3  # long enough to cross the digit's box
        kept = kept * (1 - line_ink(_to_segment(points, start, end), 1.0))
    return batch * kept.view(batch.shape)


def vignette(batch, level, generator):
    """Light falling off toward the edges: the paper darkened to ``level`` at the corners,
    radially from a centre of its own near the middle of each image."""
    points, height = centres(batch), batch.shape[-2]
    centre = 10 + 8 * draws(batch, generator, 2)
    distance = (points.unsqueeze(0) - centre.unsqueeze(1)).norm(dim=2) / (height / 2 * 1.41)
    darkness = (level * distance.clamp(0, 1) ** 2).view(batch.shape)
    return torch.lerp(batch, torch.ones_like(batch), darkness)


def speckle(batch, sigma, generator):
    """Multiplicative noise: each pixel times 1 + a Gaussian of ``sigma``."""
    return batch * (1 + sigma * torch.randn(batch.shape, generator=generator))


FAMILIES = {
    "spatter": (spatter, [3, 6, 9, 12, 15]),
    "keystone": (keystone, [0.15, 0.3, 0.45, 0.6, 0.75]),
    "pen skips": (pen_skips, [2, 3, 4, 5, 6]),
    "vignette": (vignette, [0.2, 0.4, 0.6, 0.8, 1]),
    "speckle": (speckle, [0.3, 0.6, 0.9, 1.2, 1.5]),
}


def changed(images, family, i):
    """[0, 1] images under a validation ``family`` at its ``i``-th strength (0 to 4), seeded."""
    change, strengths = FAMILIES[family]
    generator = torch.Generator().manual_seed(SEED + 100 * list(FAMILIES).index(family) + i)
    return change(images, strengths[i], generator).clamp(0, 1)


def score(model, images, labels):
    """{"clean", "trained_on", "validation", each validation family}: accuracies on [0, 1] images,
    each family's the mean over its five strengths."""
    model = robustness.folded(model)
    trained = [
        robustness.accuracy(model, robustness.corrupted(images, family, level), labels)
        for family, spec in robustness.FAMILIES.items()
        if spec.trained_on
        for level in range(1, len(spec.strengths))
    ]
    families = {
        family: statistics.fmean(
            robustness.accuracy(model, changed(images, family, i), labels) for i in range(5)
        )
        for family in FAMILIES
    }
    return {
        "clean": robustness.accuracy(model, images, labels),
        "trained_on": statistics.fmean(trained),
        "validation": statistics.fmean(families.values()),
        **families,
    }


def run_scores(run_dir):
    """[(model, seed, scores)] for each trained job of a run, on the run's validation split."""
    cfg = runs.read_config(run_dir)
    if not cfg["val_size"]:
        raise RunError(f"{run_dir}: the run holds out no validation split (--val-size 0)")
    train_set, _ = load_splits(
        cfg["data_dir"], None, torch.device("cpu"), cfg["train_limit"], cfg["test_limit"]
    )
    _, val_set = train_set.held_out(cfg["val_size"])
    images = to_unit(val_set.images)
    return [
        (name, seed, score(runs.load_model(folder)[0], images, val_set.labels))
        for name, seed, folder in runs.trained_jobs(run_dir)
    ]


def parse_args(argv=None):
    p = cli.parser("validation.py", __doc__)
    p.add_argument("run", type=Path, help="a run of main.py with a validation split")
    return p.parse_args(cli.arguments(argv))


def main(argv=None):
    """One line per job, then one JSON line with every number."""
    args = parse_args(argv)
    try:
        scores = run_scores(runs.find_run(args.run))
    except (RunError, DatasetError) as e:
        cli.error(e)
        return 1
    for name, seed, s in scores:
        apart = ", ".join(f"{family} {s[family]:.2%}" for family in FAMILIES)
        print(
            f"{name} seed {seed}: clean {s['clean']:.2%}, trained-on {s['trained_on']:.2%},"
            f" validation families {s['validation']:.2%} ({apart})"
        )
    print(json.dumps([{"model": name, "seed": seed, **s} for name, seed, s in scores]))
    return 0


if __name__ == "__main__":
    cli.safe_console()
    sys.exit(main(sys.argv[1:]))
