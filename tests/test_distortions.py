"""distortions.py: lenet5_reg's augmentation is seeded, drawn per image and within its stated
ranges, and the sweep's shape changes go through the same affine as training's."""

import pytest
import torch
from conftest import centre_of_mass

import dataset
import distortions
from robustness import FAMILIES, corrupted


@pytest.fixture(scope="module")
def digits(mnist_dir):
    """The first 256 test digits in [0, 1]."""
    return dataset.to_unit(dataset.MNIST(mnist_dir / "test.tar", limit=256).images)


def test_the_training_augmentation_is_seeded_and_batched_with_a_draw_per_image(digits):
    batch = digits
    torch.manual_seed(0)
    first = distortions.distort(batch)
    torch.manual_seed(0)
    assert torch.equal(distortions.distort(batch), first)  # the same seed, the same distortions
    changed = [
        tuple(image.flatten().tolist())
        for image, plain in zip(first, batch, strict=False)
        if not torch.equal(image, plain)
    ]
    # each image its own draw
    assert len(changed) > 0.75 * len(batch) and len(set(changed)) == len(changed)
    torch.manual_seed(1)
    assert not torch.equal(distortions.distort(batch), first)


def test_the_augmentations_shift_covers_its_stated_range_and_no_more(digits, monkeypatch):
    batch = digits
    monkeypatch.setattr(distortions, "ROTATION", 0.0)
    monkeypatch.setattr(distortions, "SHEAR", 0.0)
    monkeypatch.setattr(distortions, "ZOOM", (1.0, 1.0))
    torch.manual_seed(0)
    moves = []
    for _ in range(8):
        moved = distortions.random_geometry(batch)
        # no ink pushed out of the image
        whole = moved.sum((1, 2, 3)) > 0.999 * batch.sum((1, 2, 3))
        moves.append((centre_of_mass(moved) - centre_of_mass(batch))[whole])
    moves = torch.cat(moves)
    # each axis, in pixels
    assert len(moves) > len(batch) and moves.abs().max() <= distortions.SHIFT + 0.02
    assert (moves > distortions.SHIFT - 0.2).any(0).all() and (moves < 0.2 - distortions.SHIFT).any(
        0
    ).all()


def test_the_augmentations_draws_cover_their_stated_ranges(digits, monkeypatch):
    drawn, real_affine = {}, distortions.affine

    def record(batch, angle, scale, shift, shear):
        drawn.update(angle=angle.rad2deg(), scale=scale, shift=shift, shear=shear.rad2deg())
        return real_affine(batch, angle, scale, shift, shear)

    monkeypatch.setattr(distortions, "affine", record)
    torch.manual_seed(0)
    distortions.random_geometry(torch.zeros(4000, 1, 28, 28))
    ranges = {
        "angle": (-distortions.ROTATION, distortions.ROTATION),
        "scale": distortions.ZOOM,
        "shift": (-distortions.SHIFT, distortions.SHIFT),
        "shear": (-distortions.SHEAR, distortions.SHEAR),
    }
    for name, (low, high) in ranges.items():
        values, width = drawn[name], high - low
        assert width > 0, name  # each change is drawn, none fixed at one value
        assert values.min() >= low - 1e-6 and values.max() <= high + 1e-6, name
        assert values.min() < low + 0.02 * width and values.max() > high - 0.02 * width, name


def test_whole_pixel_moves_and_quarter_turns_are_exact(digits):
    right = torch.zeros_like(digits)
    right[..., 2:] = digits[..., :-2]
    assert torch.allclose(distortions.shift(digits, (2, 0)), right, atol=1e-5)
    turned = distortions.rotate(digits, 90)
    assert any(torch.allclose(turned, digits.rot90(k, (-2, -1)), atol=1e-5) for k in (1, -1))
    assert torch.allclose(distortions.zoom(digits, 1.0), digits, atol=1e-5)


@pytest.mark.parametrize("family", ["shift", "rotation", "zoom in", "zoom out", "shear"])
def test_the_sweeps_changes_of_shape_go_through_the_one_affine(digits, family, monkeypatch):
    calls, real_affine = [], distortions.affine
    monkeypatch.setattr(
        distortions, "affine", lambda *args: calls.append(family) or real_affine(*args)
    )
    corrupted(digits, family, len(FAMILIES[family][1]) - 1)
    assert calls == [family]


def test_the_training_grey_is_a_loss_of_contrast_on_a_lifted_background(digits):
    u, v = torch.rand(2, len(digits), 1, 1, 1, generator=torch.Generator().manual_seed(0))
    grey = distortions.grey(digits, u, v)
    factor, level = 0.05**v, 0.7 * u
    assert torch.allclose(grey, level + (1 - level) * factor * digits, atol=1e-6)
    background = digits == 0
    assert torch.allclose(grey[background], level.expand_as(digits)[background])


def test_salt_and_pepper_sets_its_fraction_of_pixels_to_0_and_to_1_in_halves():
    grey = torch.full((64, 1, 28, 28), 0.5)
    speckled = distortions.salt_and_pepper(grey, 0.2, torch.Generator().manual_seed(0))
    pixels = grey.numel()
    salt, pepper = (speckled == 1).sum().item() / pixels, (speckled == 0).sum().item() / pixels
    assert salt == pytest.approx(0.1, abs=0.005) and pepper == pytest.approx(0.1, abs=0.005)
    assert torch.all((speckled == 0.5) | (speckled == 0) | (speckled == 1))


def test_contrast_scales_each_pixels_distance_from_the_centre_which_stays_put(digits):
    centre = torch.rand(len(digits), 1, 1, 1, generator=torch.Generator().manual_seed(0))
    factor = torch.linspace(0.1, 0.9, len(digits))
    changed = distortions.contrast(digits, factor, centre)
    assert torch.allclose(changed - centre, (digits - centre) * factor.view(-1, 1, 1, 1), atol=1e-6)
    assert torch.equal(
        distortions.contrast(centre.expand_as(digits), factor, centre)[:, :, 0, 0],
        centre[:, :, 0, 0],
    )


def test_free_strokes_only_add_ink_are_seeded_and_take_any_batch_size(digits):
    def drawn(batch, seed, width=1.5, darkness=1.0):
        return distortions.strokes(batch, width, darkness, torch.Generator().manual_seed(seed))

    crossed = drawn(digits, 0)
    assert torch.equal(drawn(digits, 0), crossed) and not torch.equal(drawn(digits, 1), crossed)
    assert torch.all(crossed >= digits)  # ink added, none taken away
    assert torch.all(((crossed - digits) > 0.3).flatten(1).sum(1) >= 2)  # on every image
    for n in (0, 1, 3):
        assert torch.equal(drawn(digits[:n], 0), crossed[:n])  # each image its own draw
    blank = torch.zeros(256, 1, 28, 28)
    # on an empty page: no brighter than its darkness, and wider strokes hold more ink
    lines = [drawn(blank, 0, width, 0.7) for width in (1, 2, 3)]
    assert all(0.65 < line.max() <= 0.7 for line in lines)
    ink = [line.sum().item() for line in lines]
    assert ink[0] < ink[1] < ink[2]


def test_a_hollow_stroke_keeps_its_edge_and_loses_its_inside():
    square = torch.zeros(1, 1, 28, 28)
    square[..., 6:22, 6:22] = 1  # a stroke 16 pixels thick
    hollow = distortions.hollow(square, 1.0)
    ring = square.clone()
    ring[..., 7:21, 7:21] = 0  # its outermost pixel all round
    assert torch.equal(hollow, ring)  # ink kept on the edge, none inside or outside
    bar = torch.zeros(1, 1, 28, 28)
    bar[..., 6:22, 13:15] = 1  # 2 pixels thick: no inside to take out
    assert torch.equal(distortions.hollow(bar, 1.0), bar)


def test_the_augmentation_leaves_out_the_parts_it_is_told_to(digits, monkeypatch):
    monkeypatch.setattr(distortions, "GEOMETRY_SHARE", 0.0)  # strokes only: no moves, no looks
    monkeypatch.setattr(distortions, "LOOK_SHARE", 0.0)
    torch.manual_seed(0)
    stroked = distortions.distort(digits)
    changed = (stroked != digits).flatten(1).any(1).float().mean().item()
    assert torch.all(stroked >= digits) and changed == pytest.approx(
        distortions.STROKE_SHARE, abs=0.08
    )
    torch.manual_seed(0)
    assert torch.equal(distortions.distort(digits, without=("strokes",)), digits)
    monkeypatch.setattr(distortions, "LOOK_SHARE", 1.0)  # every image hollow
    others = [part for part in distortions.PARTS if part != "hollow"]
    torch.manual_seed(0)
    hollow = distortions.distort(digits, without=others)
    assert torch.all(hollow <= digits) and torch.all((hollow < digits).flatten(1).any(1))
