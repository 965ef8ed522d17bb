"""Not a digit: the rule by which a model refuses an image, and the non-digits it is judged on.

A model answers every image with a digit. Its rule says whether it takes the image for one, and
how sure it may be. main.py fits the rule at the end of each job, on digits the model never trained
on (the validation split), and saves it beside the weights, RUN/<model>[/seed<k>]/rule.pt:

- a temperature T: the logits over T give calibrated probabilities, T fitted by minimising their
  negative log-likelihood (Guo et al., "On calibration of modern neural networks", ICML 2017);
- a score and its threshold, the value that KEEP of those digits reach: the cosine similarity of an
  image's features to those of its K-th nearest of BANK training digits, which the rule keeps
  (Sun et al., "Out-of-distribution detection with deep nearest neighbors", ICML 2022). The
  features are what the first fully connected layer is given: LeNet-5's 400 convolution features,
  the MLP's 784 pixels (Sun et al. take the last layer's input; here the first's turns away more,
  docs/predict.md). Below the threshold, the model does not take the image for a digit. The
  calibrated top probability and the energy (Liu et al., NeurIPS 2020) keep a threshold each too,
  for the report's comparison.

The non-digits: strokes, shapes and scribbles drawn by code with a fixed seed, on a page as the
drawing page has it, then made to look like MNIST as predict.py does (``made_sets``); and
Fashion-MNIST's test images where they are installed (Debian's dataset-fashion-mnist).
"""

import contextlib
import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

import cli
from dataset import TEST_BATCH_SIZE, DatasetError, normalize, read_idx, to_unit
from files import atomic_open
from preprocess import to_mnist
from runs import RunError

RULE = "rule.pt"
KEEP = 0.995  # the share of unseen digits the threshold keeps
K = 10  # the score is the similarity to the K-th nearest bank digit
BANK = 20_000  # training digits whose features the rule keeps
FIT = 10_000  # digits a rule is fitted on when a run holds no validation split out
SCORES = ("confidence", "energy", "nearest")
STORED = "nearest"  # the score that decides
MADE_SEED = 20261207
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
BINS = 15  # of the expected calibration error and the reliability diagram


# ------------------------------------------------------------ the rule


@contextlib.contextmanager
def features_of(model):
    """Within the block, ``got["features"]`` is what the model's first fully connected layer (fc1)
    was last given, one row per image."""
    got = {}
    hook = model.fc1.register_forward_pre_hook(
        lambda _, inputs: got.update(features=inputs[0].flatten(1))
    )
    try:
        yield got
    finally:
        hook.remove()


@torch.no_grad()
def logits_and_features(model, images):
    """(logits, the features fc1 is given) of a batch of normalized images, in eval mode."""
    model.eval()
    logits, features = [], []
    with features_of(model) as got:
        for chunk in images.split(TEST_BATCH_SIZE):
            logits.append(model(chunk))
            features.append(got["features"])
    return torch.cat(logits).float(), torch.cat(features).float()


def fit_temperature(logits, labels):
    """The T > 0 that minimises the cross-entropy of ``logits / T`` (L-BFGS over log T)."""
    log_t = torch.zeros(1, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=100, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(logits / log_t.exp(), labels)
        value.backward()
        return value

    optimizer.step(loss)
    return log_t.exp().item()


def scores(rule, logits, features):
    """(calibrated probabilities, {score name: one value per image, higher for a digit})."""
    t = rule["temperature"]
    probs = calibrated(rule, logits)
    bank = rule["bank"].to(features.device, torch.float32)
    k = min(rule["k"], len(bank))
    nearest = torch.cat(  # a thousand images at a time: the similarities of 10,000 would be 800 MB
        [
            (chunk @ bank.T).topk(k, dim=1).values[:, -1]
            for chunk in F.normalize(features, dim=1).split(1000)
        ]
    )
    return probs, {
        "confidence": probs.amax(1),
        "energy": t * torch.logsumexp(logits / t, 1),
        "nearest": nearest,
    }


def fit_rule(model, bank_images, digits, labels):
    """A model's rule: the bank's features from ``bank_images`` (training digits), the temperature
    and each score's threshold from ``digits`` and their ``labels``, which it never trained on."""
    _, bank = logits_and_features(model, bank_images[:BANK])
    logits, features = logits_and_features(model, digits)
    rule = {
        "temperature": fit_temperature(logits, labels),
        "bank": F.normalize(bank, dim=1).half().cpu(),
        "k": K,
        "score": STORED,
        "digits": len(labels),
    }
    _, measured = scores(rule, logits, features)
    # the value that KEEP of the digits reach: the (n * (1 - KEEP) + 1)-th smallest (no quantile,
    # which computes in float64, which MPS lacks)
    lowest = int(len(labels) * (1 - KEEP) + 1e-9) + 1
    rule["thresholds"] = {
        name: values.cpu().kthvalue(lowest).values.item() for name, values in measured.items()
    }
    return rule


def write_rule(folder, model, train_set, val_set):
    """Fit a trained model's rule and save it in its job folder: the bank from the first training
    images; the temperature and thresholds from the validation split, or in a run that holds none
    out, from the last training images (which the model trained on: its rule then keeps fewer
    unseen digits than KEEP)."""
    bank_set, fit_set = (
        (train_set, val_set)
        if val_set is not None
        else train_set.held_out(min(FIT, len(train_set) // 2))
    )
    rule = fit_rule(model, bank_set.normalized, fit_set.normalized, fit_set.labels)
    rule["fitted_on"] = "validation" if val_set is not None else "training"
    with atomic_open(Path(folder) / RULE) as f:
        torch.save(rule, f)


def load_rule(folder, bank=True):
    """A job folder's rule, its bank as float32 (without ``bank``, a rule without one, which
    calibrates but cannot refuse); None for a run made before rules; RunError naming the file when
    it is damaged."""
    path = Path(folder) / RULE
    if not path.is_file():
        return None
    try:
        rule = torch.load(path, map_location="cpu", weights_only=True)
        missing = [
            key for key in ("temperature", "bank", "k", "score", "thresholds") if key not in rule
        ]
        if missing:
            raise ValueError(f"it has no {missing[0]!r}")
        if bank:
            rule["bank"] = rule["bank"].float()
        else:
            del rule["bank"]
        float(rule["thresholds"][rule["score"]])  # its score has a threshold, a number
    # a truncated zip, a foreign pickle, a field missing: any failure makes the rule unusable
    except Exception as e:
        raise RunError(f"{path}: not a rule of main.py ({cli.first_line(e)})") from None
    return rule


def can_refuse(rule):
    """Whether ``rule`` can say "not a digit": a whole rule, not None (a run made before rules) nor
    a rule loaded without its bank (what predict.load_models keeps of a seed after the first)."""
    return rule is not None and "bank" in rule


def calibrated(rule, logits):
    """The probabilities of ``logits`` under ``rule``'s temperature (none: as they are)."""
    return (logits / (rule["temperature"] if rule else 1)).softmax(1)


def judge(rule, logits, features):
    """(calibrated probabilities, whether each image is taken for a digit) under ``rule``."""
    probs, measured = scores(rule, logits, features)
    return probs, measured[rule["score"]] >= rule["thresholds"][rule["score"]]


# ------------------------------------------------------------ calibration


def reliability(probs, labels, bins=BINS):
    """Per equal-width confidence bin: (count, mean confidence, accuracy), each a (bins,) tensor;
    an empty bin has nan for the last two."""
    confidence, predicted = probs.amax(1), probs.argmax(1)
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    count = torch.bincount(which, minlength=bins).double()
    mean = torch.bincount(which, confidence.double(), minlength=bins) / count
    right = torch.bincount(which, (predicted == labels).double(), minlength=bins) / count
    return count, mean, right


def ece(probs, labels, bins=BINS):
    """Expected calibration error: the count-weighted mean gap between confidence and accuracy."""
    count, mean, right = reliability(probs, labels, bins)
    gap = (mean - right).abs().nan_to_num(0)
    return (count * gap).sum().item() / len(labels)


def auroc(digits, others):
    """The chance that a digit scores above a non-digit (ties count half): the area under the ROC
    curve of the score as a test for digits."""
    ranked = digits.double().sort().values
    others = others.double()
    above = len(ranked) - torch.searchsorted(ranked, others, right=True)
    tied = torch.searchsorted(ranked, others, right=True) - torch.searchsorted(ranked, others)
    return ((above + tied / 2).sum() / (len(ranked) * len(others))).item()


# ------------------------------------------------------------ non-digits


PAGE_SIDE = 140  # pixels of the page a made non-digit is drawn on


def _line(centre, length, angle):
    """The two ends of a line through ``centre``."""
    dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
    return [(centre[0] - dx, centre[1] - dy), (centre[0] + dx, centre[1] + dy)]


def draw_strokes(draw, rng, width):
    """A dash (within 25 degrees of level), a cross, or a star of three strokes: never a 1, a 7 or
    a 4, whose strokes meet at their ends."""
    centre, length = rng.uniform(50, 90, 2), rng.uniform(50, 110)
    kind, turn = rng.integers(3), rng.uniform(0, math.pi)
    if kind == 0:
        angles = [rng.uniform(-1, 1) * math.radians(25)]
    else:
        angles = [turn + k * math.pi / (kind + 1) for k in range(kind + 1)]
    for angle in angles:
        draw.line(_line(centre, length * rng.uniform(0.8, 1), angle), fill=0, width=width)


def _polygon(rng, corners, inner=1.0):
    """A polygon around the page's middle, its corners at even turns, every other one at ``inner``
    of the radius (a star)."""
    centre, radius, turn = rng.uniform(60, 80, 2), rng.uniform(35, 55), rng.uniform(0, 2 * math.pi)
    points = []
    for k in range(corners):
        r, angle = radius * (inner if k % 2 else 1), turn + 2 * math.pi * k / corners
        points.append((centre[0] + r * math.cos(angle), centre[1] + r * math.sin(angle)))
    return points


def draw_shapes(draw, rng, width):
    """The outline of a rectangle, a triangle or a five-pointed star, none of them narrow (a 1): no
    ellipse, which is a 0."""
    kind, side = rng.integers(3), rng.uniform(55, 95)
    corner = rng.uniform(15, 40, 2)
    box = [tuple(corner), tuple(corner + [side, side * rng.uniform(0.7, 1.3)])]
    if kind == 0:
        draw.rectangle(box, outline=0, width=width)
    elif kind == 1:
        draw.polygon(_polygon(rng, 3), outline=0, width=width)
    else:
        draw.polygon(_polygon(rng, 10, inner=0.4), outline=0, width=width)


def draw_scribbles(draw, rng, width):
    """A random walk of 12 to 24 steps with some momentum, drawn as one line."""
    point, velocity = rng.uniform(40, 100, 2), rng.normal(0, 1, 2)
    points = [tuple(point)]
    for _ in range(rng.integers(12, 25)):
        velocity = 0.6 * velocity + rng.normal(0, 12, 2)
        point = np.clip(point + velocity, 10, PAGE_SIDE - 10)
        points.append(tuple(point))
    draw.line(points, fill=0, width=width, joint="curve")


MAKERS = {"strokes": draw_strokes, "shapes": draw_shapes, "scribbles": draw_scribbles}


@functools.lru_cache(maxsize=2)  # made once a process: plot.py reports runs one after another
def made_sets(count=500, seed=MADE_SEED):
    """{set name: ``count`` non-digits drawn dark on a white page with a pen 6 to 13 pixels wide,
    made to look like MNIST digits by preprocess.to_mnist}, normalized; the same for a seed."""
    rng = np.random.default_rng(seed)
    sets = {}
    for name, make in MAKERS.items():
        images = []
        for _ in range(count):
            page = Image.new("L", (PAGE_SIDE, PAGE_SIDE), 255)
            make(ImageDraw.Draw(page), rng, int(rng.integers(6, 14)))
            images.append(to_mnist(page)[0])
        sets[name] = torch.cat(images)
    return sets


@functools.lru_cache(maxsize=2)
def fashion(path=FASHION):
    """Fashion-MNIST's 10,000 test images, normalized as MNIST's are; None where not installed."""
    try:
        images = read_idx(path)
    except DatasetError:
        return None
    return normalize(to_unit(torch.from_numpy(images.copy())))


HANDS = "UCI digits"  # digits in other hands: kept, where the others are turned away


@functools.lru_cache(maxsize=1)
def other_hands():
    """The 1,797 handwritten digits of the UCI set that scikit-learn ships (8x8, 16 grey levels,
    written by people none of whom wrote MNIST's), each scaled up to 64x64 and made to look like
    MNIST's by preprocess.to_mnist, normalized; None without scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    pages = (255 - load_digits().images * 255 / 16).astype(np.uint8)  # dark ink on white
    bigger = [Image.fromarray(page).resize((64, 64), Image.Resampling.BILINEAR) for page in pages]
    return torch.cat([to_mnist(page)[0] for page in bigger])


# ------------------------------------------------------------ the report


def measure(model, rule, test_set, others):
    """What plot.py reports of one model and its rule: raw and calibrated test probabilities, and
    each score on the test digits and on each set of ``others`` (non-digits)."""
    logits, features = logits_and_features(model, test_set.normalized)
    probs, on_digits = scores(rule, logits, features)
    return {
        "raw": logits.softmax(1),
        "calibrated": probs,
        "digits": on_digits,
        "others": {
            name: scores(rule, *logits_and_features(model, images))[1]
            for name, images in others.items()
        },
        "rule": rule,
    }


def shares(m, score):
    """Under ``score`` and its threshold, of ``measure``'s ``m``: {"kept": the share of test digits
    kept; each set of non-digits, and "made" (the made sets together): its share turned away;
    "auroc <set>": the score's AUROC, test digits against that set}."""
    threshold, digits = m["rule"]["thresholds"][score], m["digits"][score]
    sets = {name: values[score] for name, values in m["others"].items()}
    sets["made"] = torch.cat([sets[name] for name in MAKERS])
    result = {"kept": (digits >= threshold).double().mean().item()}
    if HANDS in sets:  # digits: the share kept
        result[HANDS] = (sets.pop(HANDS) >= threshold).double().mean().item()
    for name, values in sets.items():
        result[name] = (values < threshold).double().mean().item()
        result[f"auroc {name}"] = auroc(digits, values)
    return result


def report(jobs, test_set):
    """(the calibration figure, report.md's lines) for ``jobs``, (name, seed, folder, model) each;
    a job without a rule is named in one line (and the figure is None when no job has one)."""
    others = dict(made_sets())  # a copy: the cached sets stay as they are
    if (images := fashion()) is not None:
        others["Fashion-MNIST"] = images
    if (images := other_hands()) is not None:
        others[HANDS] = images
    measured, missing = {}, []
    for name, seed, folder, model in jobs:
        try:
            rule = load_rule(folder)
        except RunError as e:
            cli.error(f"{e}; no not-a-digit report for it")
            continue
        if rule is None:
            missing.append(f"{name} seed {seed}")
            continue
        measured.setdefault(name, []).append((seed, measure(model, rule, test_set, others)))
    lines = ["", "## Not a digit, and calibration", ""]
    if missing:
        lines += [f"Made before not-a-digit rules, so not here: {', '.join(missing)}.", ""]
    if not measured:
        return None, lines
    lines += seed_lines(measured, test_set.labels, others)
    lines += score_lines(measured, fashion="Fashion-MNIST" in others)
    return calibration_figure(measured, test_set.labels), lines


def seed_lines(measured, labels, others):
    """What each seed's rule does: its temperature and the calibration error, the test digits it
    keeps, the share of each set of ``others`` it turns away and its AUROC."""
    fashion_note = (
        f"Fashion-MNIST's {len(others['Fashion-MNIST']):,} test images"
        if "Fashion-MNIST" in others
        else "no Fashion-MNIST (not installed: apt-get install dataset-fashion-mnist)"
    )
    hands_note = (
        f" Kept too: the share of the {len(others[HANDS]):,} {HANDS} (scikit-learn's) kept."
        if HANDS in others
        else f" No {HANDS} (scikit-learn is not installed)."
    )
    made = ", ".join(f"{len(others[name]):,} {name}" for name in MAKERS)
    columns = ["kept", *([HANDS] if HANDS in others else []), *MAKERS, "made", "auroc made"]
    columns += ["Fashion-MNIST", "auroc Fashion-MNIST"] if "Fashion-MNIST" in others else []
    lines = [
        "Each model's rule (outliers.py), fitted at the end of training on its run's validation"
        f" split: a temperature T, and the threshold of the {STORED} score that keeps"
        f" {KEEP:.1%} of those digits. Non-digits: {made}, drawn by code (seed {MADE_SEED}), and"
        f" {fashion_note}. ECE: the expected calibration error on the test set, {BINS} bins,"
        " before and after T. Kept: the share of test digits the rule takes for digits; each"
        " set: the share it turns away (made: the three made sets together); AUROC: the score's"
        " area under the ROC curve, test digits against that set." + hands_note,
        "",
        "| model | seed | T | ECE before | ECE after | test digits kept | "
        + " | ".join(columns[1:]).replace("auroc", "AUROC,").replace(HANDS, f"{HANDS} kept")
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(columns),
    ]
    for name, seeds in measured.items():
        for seed, m in seeds:
            got = shares(m, STORED)
            lines.append(
                f"| {name} | {seed} | {m['rule']['temperature']:.2f}"
                f" | {ece(m['raw'], labels):.4f} | {ece(m['calibrated'], labels):.4f} | "
                + " | ".join(cell(column, got[column]) for column in columns)
                + " |"
            )
    return lines


def score_lines(measured, fashion):
    """The scores compared, each at its own threshold, mean over seeds."""
    columns = ["kept", "made", "auroc made"]
    columns += ["Fashion-MNIST", "auroc Fashion-MNIST"] if fashion else []
    lines = [
        "",
        f"The scores compared, each at the threshold that keeps {KEEP:.1%} of the validation"
        " digits, mean over seeds:",
        "",
        "| model | score | " + " | ".join(columns).replace("auroc", "AUROC,") + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for name, seeds in measured.items():
        for score in SCORES:
            got = [shares(m, score) for _, m in seeds]
            mean = {column: np.mean([g[column] for g in got]) for column in columns}
            chosen = " (the rule's)" if score == STORED else ""
            lines.append(
                f"| {name} | {score}{chosen} | "
                + " | ".join(cell(column, mean[column]) for column in columns)
                + " |"
            )
    return lines


def cell(column, value):
    return f"{value:.3f}" if column.startswith("auroc") else f"{value:.1%}"


def calibration_figure(measured, labels):
    """A reliability diagram per model, its seeds pooled: accuracy per confidence bin before and
    after temperature scaling, against the diagonal of perfect calibration."""
    fig = Figure(figsize=(4 * len(measured), 3.8), layout="constrained")
    axes = fig.subplots(1, len(measured), squeeze=False)[0]
    centres = (torch.arange(BINS) + 0.5) / BINS
    for ax, (name, seeds) in zip(axes, measured.items(), strict=True):
        for key, offset, colour in (("raw", -0.25, "0.6"), ("calibrated", 0.25, "C0")):
            probs = torch.cat([m[key] for _, m in seeds])
            _, _, right = reliability(probs, labels.repeat(len(seeds)))
            error = ece(probs, labels.repeat(len(seeds)))
            label = f"{'before' if key == 'raw' else 'after'} T (ECE {error:.4f})"
            x, height = (centres + offset / BINS).numpy(), right.nan_to_num(0).numpy()
            ax.bar(x, height, 0.5 / BINS, color=colour, label=label)
        ax.plot([0, 1], [0, 1], color="C3", linewidth=1, label="perfectly calibrated")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
        ax.set_title(
            f"{name} ({len(seeds)} seed{'s' * (len(seeds) > 1)}, {BINS} bins)", fontsize=10
        )
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Calibration on the test set: accuracy per confidence bin")
    return fig
