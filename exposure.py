"""Outlier exposure: the non-digits lenet5_reg trains on, and the loss that tells it they are none.

Hendrycks, Mazeika and Dietterich ("Deep Anomaly Detection with Outlier Exposure", ICLR 2019):
beside the cross-entropy on the digits, the cross-entropy from the uniform distribution to the
model's softmax on non-digits, so that on what is no digit it spreads its probability over the ten
classes instead of naming one. Here the non-digits are shuffled in with the digits, labelled
NON_DIGIT, and ``ExposureLoss`` is the mean over a batch of each image's own term.

Each epoch makes a run's share of non-digits per training digit (SHARE unless ``--non-digit-share``
says otherwise) anew, on the training device, from torch's global RNG (main.py seeds it per seed
and epoch, so a resumed run repeats them), by code that the report's non-digits
(outliers.made_sets, drawn with PIL) do not use:

- scribbles: 3 to 6 free strokes (``distortions.strokes``) on an empty page;
- patchwork: two training digits of different classes, the page cut into four at a random point
  and each quarter taken from one of them, checkerwise;
- Fashion-MNIST's training images, where Debian's dataset-fashion-mnist is installed (the report
  judges on its test images); a run records whether it used them.

They then go through the digits' augmentation, so that no trace of it tells them apart. Letters and
rendered fonts stay out: the project is checked on them.
"""

import copy
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dataset import DatasetError, normalize, read_idx, to_unit
from distortions import DISTORT_CHUNK, distort, strokes

NON_DIGIT = -1  # the label of a non-digit
# non-digits per training digit, each epoch: one in sixteen turns away as many of the validation
# non-digits as one in four did, for a quarter of the steps (docs/predict.md)
SHARE = 0.0625
WEIGHT = 0.5  # of the uniform term against the digits' cross-entropy
FASHION_TRAIN = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


class ExposureLoss(nn.Module):
    """Cross-entropy on the digits, WEIGHT times the cross-entropy to the uniform target on the
    non-digits (``-mean_k log p_k``), averaged over the batch; on digits alone, cross-entropy."""

    def __init__(self, weight=WEIGHT):
        super().__init__()
        self.weight = weight

    def forward(self, logits, labels):
        # no indexing by the mask: the shapes stay fixed, as a CUDA graph needs
        digit = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
        uniform = -F.log_softmax(logits, 1).mean(1)
        return torch.where(labels == NON_DIGIT, self.weight * uniform, digit).mean()


def scribbles(count, device):
    """``count`` pages of 3 to 6 free strokes each, 1 to 3 pixels wide, 0.6 to 1 bright."""
    page = torch.zeros(count, 1, 28, 28, device=device)
    strokes_on = torch.randint(3, 7, (count, 1, 1, 1), device=device)
    for k in range(6):
        width, darkness = torch.rand(2, count, device=device)
        drawn = strokes(page, 1 + 2 * width, 0.6 + 0.4 * darkness)
        page = torch.where(strokes_on > k, drawn, page)
    return page


def patchwork(images, labels, count):
    """``count`` pages of quarters of two training digits (``images`` in [0, 1]) of different
    classes; pairs of one class are drawn again."""
    n, device = len(labels), labels.device
    first, second = torch.randint(n, (2, 2 * count), device=device)
    apart = (labels[first] != labels[second]).nonzero().squeeze(1)[:count]
    first, second = first[apart], second[apart]
    cut = torch.randint(10, 19, (2, len(apart), 1, 1), device=device)
    rows = torch.arange(28, device=device).view(1, 28, 1) < cut[0]
    cols = torch.arange(28, device=device).view(1, 1, 28) < cut[1]
    mine = (rows == cols).unsqueeze(1)  # top left and bottom right
    return torch.where(mine, images[first], images[second])


@functools.lru_cache(maxsize=1)
def fashion_train(path=FASHION_TRAIN):
    """Fashion-MNIST's 60,000 training images as uint8 (N, 28, 28); None where not installed."""
    try:
        return torch.from_numpy(read_idx(path).copy())
    except DatasetError:
        return None


SOURCES = ("scribbles", "patchwork", "fashion")


def sources():
    """Where this machine's non-digits come from: what a new run records in its config."""
    return ["scribbles", "patchwork"] + (["fashion"] if FASHION_TRAIN.is_file() else [])


def require(used):
    """DatasetError if a run's non-digits need Fashion-MNIST and this machine lacks it."""
    if "fashion" in used and not FASHION_TRAIN.is_file():
        raise DatasetError(
            f"{FASHION_TRAIN}: missing, and the run's non-digits need it"
            " (apt-get install dataset-fashion-mnist, or a new run with --non-digits without it)"
        )


def non_digits(split, count, used):
    """``count`` non-digits in [0, 1] on the split's device, in equal parts from the ``used``
    sources (``sources()`` as the run recorded it)."""
    device, parts = split.device, []
    shares = [count // len(used) + (k < count % len(used)) for k in range(len(used))]
    for source, share in zip(used, shares, strict=True):
        if source == "scribbles":
            parts.append(scribbles(share, device))
        elif source == "patchwork":
            parts.append(patchwork(to_unit(split.images), split.labels, share))
        else:
            pictures = fashion_train()
            chosen = torch.randint(len(pictures), (share,))
            parts.append(to_unit(pictures[chosen]).to(device))
    return torch.cat(parts)


def exposed(split, used, share=SHARE, without=(), augment=True):
    """A copy of the epoch's training ``split`` with ``share`` non-digits per digit added, augmented
    as the digits are (if ``augment``, leaving out the parts ``without`` names) and labelled
    NON_DIGIT: what its batches serve. It has no uint8 ``images``."""
    made = non_digits(split, round(share * len(split)), used)
    chunks = made.split(DISTORT_CHUNK)
    augmented = [normalize(distort(chunk, without) if augment else chunk) for chunk in chunks]
    label = torch.full((len(made),), NON_DIGIT, dtype=split.labels.dtype, device=split.device)
    out = copy.copy(split)
    out.images = None
    out.normalized = torch.cat([split.normalized, *augmented])
    out.labels = torch.cat([split.labels, label])
    return out
