"""The robustness sweep: each family does what its name says, reproducibly, and plot.py keeps its
results."""

import json
import shutil

import pytest
import torch
from conftest import centre_of_mass

import dataset
import files
import plot
import robustness
import runs
from robustness import FAMILIES, corrupted


@pytest.fixture(scope="module")
def digits(mnist_dir):
    """The first 500 test digits in [0, 1], and their labels."""
    test = dataset.MNIST(mnist_dir / "test.tar", limit=500)
    return dataset.to_unit(test.images), test.labels


def total_variation(images):
    return (
        (images.diff(dim=-1).abs().sum((1, 2, 3)) + images.diff(dim=-2).abs().sum((1, 2, 3)))
        .mean()
        .item()
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_no_strength_is_the_identity_and_each_level_changes_more(digits, family):
    images, _ = digits
    unit, strengths, change, _ = FAMILIES[family]
    unchanged = change(images, strengths[0], torch.Generator().manual_seed(0))
    assert torch.allclose(unchanged, images, atol=1e-5)
    assert corrupted(images, family, 0) is images
    distances = [
        (corrupted(images, family, level) - images).abs().mean().item()
        for level in range(len(strengths))
    ]
    assert distances[0] == 0 and all(
        a < b for a, b in zip(distances, distances[1:], strict=False)
    ), distances


@pytest.mark.parametrize("family", FAMILIES)
def test_the_same_family_and_strength_give_the_same_images(digits, family):
    images, _ = digits
    first, again = corrupted(images, family, 3), corrupted(images.clone(), family, 3)
    assert torch.equal(first, again)
    assert first.shape == images.shape and first.min() >= 0 and first.max() <= 1


def test_a_shift_of_k_pixels_moves_the_centre_of_mass_by_k_in_a_direction_of_its_own(digits):
    images, _ = digits
    before = centre_of_mass(images)
    for level, pixels in enumerate(FAMILIES["shift"][1][1:], 1):
        shifted = corrupted(images, "shift", level)
        moved = centre_of_mass(shifted) - before
        distance = moved.norm(dim=1)
        # no ink pushed out of the image
        whole = shifted.sum((1, 2, 3)) > 0.999 * images.sum((1, 2, 3))
        assert whole.float().mean() > 0.5
        assert torch.allclose(distance[whole], torch.tensor(float(pixels)), atol=0.02)
        angles = torch.atan2(moved[:, 1], moved[:, 0])
        assert angles.std() > 1.5  # every direction, not one for the whole set


def test_brightness_lifts_the_background_and_keeps_the_ink(digits):
    images, _ = digits
    for level, lifted_to in enumerate(FAMILIES["brightness"][1]):
        lifted = corrupted(images, "brightness", level)
        assert torch.allclose(lifted[images == 0], torch.tensor(float(lifted_to)))
        assert torch.allclose(lifted[images == 1], torch.tensor(1.0))
        # the digit's anti-aliased edges move toward white in proportion
        grey = (images > 0) & (images < 1)
        assert torch.allclose(
            lifted[grey], images[grey] + lifted_to * (1 - images[grey]), atol=1e-6
        )


def test_blur_lowers_the_total_variation_level_by_level(digits):
    images, _ = digits
    variation = [total_variation(corrupted(images, "blur", level)) for level in range(6)]
    assert all(a > b for a, b in zip(variation, variation[1:], strict=False)), variation


def test_thicker_strokes_carry_more_ink_and_thinner_ones_less(digits):
    images, _ = digits
    ink = images.sum().item()
    assert all(corrupted(images, "thicker", level).sum().item() > ink for level in range(1, 6))
    assert all(corrupted(images, "thinner", level).sum().item() < ink for level in range(1, 6))


def test_occlusion_covers_a_square_of_the_stated_side_on_the_digit(digits):
    ones = torch.ones(200, 1, 28, 28)
    side = FAMILIES["occlusion"][1][1]
    covered = corrupted(ones, "occlusion", 1)
    assert ((covered == 0).sum((1, 2, 3)) == side * side).all()
    rows = (covered == 0).any(3).squeeze(1).float()  # (N, 28): the rows the square covers
    centre = (rows * torch.arange(28)).sum(1) / rows.sum(1) + 0.5
    assert centre.min() >= 4 and centre.max() <= 24  # on the 20x20 box of the digit


def test_contrast_pulls_every_pixel_toward_the_image_mean(digits):
    images, _ = digits
    factor = FAMILIES["contrast"][1][-1]
    low = corrupted(images, "contrast", len(FAMILIES["contrast"][1]) - 1)
    spread = (low.amax((1, 2, 3)) - low.amin((1, 2, 3))) / (
        images.amax((1, 2, 3)) - images.amin((1, 2, 3))
    )
    assert torch.allclose(spread, torch.tensor(factor), atol=1e-4)
    # about the image's mean, which stays: every pixel is pulled toward it by the same factor
    mean = images.mean((1, 2, 3), keepdim=True)
    assert torch.allclose(low.mean((1, 2, 3), keepdim=True), mean, atol=1e-5)
    assert torch.allclose(low - mean, (images - mean) * factor, atol=1e-5)


def test_accuracy_under_shift_falls_as_the_shift_grows(one_epoch_run, digits):
    images, labels = digits
    model, _ = runs.load_model(one_epoch_run / "lenet5")
    accuracy = [
        robustness.accuracy(model, corrupted(images, "shift", level), labels) for level in range(6)
    ]
    assert accuracy[0] > 0.9 and all(a > b for a, b in zip(accuracy, accuracy[1:], strict=False)), (
        accuracy
    )


def test_the_sweep_is_saved_reused_and_redone_for_a_changed_checkpoint(
    one_epoch_run, mnist_dir, tmp_path, monkeypatch
):
    run = shutil.copytree(one_epoch_run, tmp_path / "r")
    config = json.loads((run / "config.json").read_text())
    files.write_json(run / "config.json", {**config, "test_limit": 300})  # a quicker sweep
    swept, real_sweep = [], robustness.sweep

    def counting_sweep(models, images, labels):
        swept.append(sorted(models))
        return real_sweep(models, images, labels)

    monkeypatch.setattr(robustness, "sweep", counting_sweep)
    assert plot.main([str(run)]) == 0
    saved = json.loads((run / "robustness.json").read_text())
    assert (
        swept == [["lenet5", "lenet5_reg", "mlp"]] and saved["families"] == robustness.definition()
    )
    accuracy = saved["jobs"]["lenet5"]["accuracy"]
    assert set(accuracy) == set(FAMILIES) and all(len(a) == 6 for a in accuracy.values())
    assert saved["test_set"]["size"] == 300
    labels = dataset.MNIST(mnist_dir / "test.tar", limit=300).labels
    model, _ = runs.load_model(run / "lenet5")
    with torch.inference_mode():
        plain = (
            (model(dataset.MNIST(mnist_dir / "test.tar", limit=300).normalized).argmax(1) == labels)
            .float()
            .mean()
        )
    assert accuracy["shift"][0] == pytest.approx(plain.item())  # strength 0 is the test set itself
    report = (run / "report.md").read_text()
    held = plot.mean_std([robustness.sweep_mean(accuracy, trained_on=False)])
    trained = plot.mean_std([robustness.sweep_mean(accuracy, trained_on=True)])
    assert f"| **mean over the held-out families** | | | {held} |" in report
    assert f"| **mean over the trained-on families** | | | {trained} |" in report
    assert "| shift | trained on | 1, 2, 3, 4, 5 pixels |" in report
    assert "| ruled lines | held out | " in report
    # which digits it gets right, clean and at each setting: what the paired tests compare
    right = saved["jobs"]["lenet5"]["right"]
    clean = robustness.unpacked(right["clean"], right["digits"])
    assert right["digits"] == 300 and clean.mean() == pytest.approx(accuracy["shift"][0])
    for family in FAMILIES:
        hits = [robustness.unpacked(bits, 300).mean() for bits in right["families"][family]]
        assert hits == pytest.approx(accuracy[family][1:])
    assert "| lenet5_reg − lenet5 | held-out families | 0 | " in report
    one, two = (accuracy["shift"][k] * 100 for k in (1, 2))
    assert f"| shift (pixels) | 1: {one:.1f}% | 2: {two:.1f}% |" in report
    assert (run / "plots/robustness.png").is_file()

    assert plot.main([str(run)]) == 0  # nothing changed: nothing swept
    assert swept == [["lenet5", "lenet5_reg", "mlp"]]

    last = torch.load(run / "mlp/last.pt", weights_only=True)
    last["model"]["fc3.bias"] += 1.0
    torch.save(last, run / "mlp/last.pt")
    assert plot.main([str(run)]) == 0
    assert swept == [["lenet5", "lenet5_reg", "mlp"], ["mlp"]]  # only the job whose weights changed
    again = json.loads((run / "robustness.json").read_text())
    assert (
        again["jobs"]["lenet5"] == saved["jobs"]["lenet5"]
        and again["jobs"]["mlp"] != saved["jobs"]["mlp"]
    )
