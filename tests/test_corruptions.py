"""The held-out families (corruptions.py): each does what its name says, the same on any batch
size, and lenet5_reg's training never makes any of them."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import centre_of_mass, run_main

import corruptions
import dataset
import distortions
from robustness import FAMILIES, corrupted

HELD_OUT = [family for family, f in FAMILIES.items() if not f.trained_on]
ADDED_INK = ["ruled lines", "box edges", "dotted line"]


@pytest.fixture(scope="module")
def digits(mnist_dir):
    """The first 300 test digits in [0, 1]."""
    return dataset.to_unit(dataset.MNIST(mnist_dir / "test.tar", limit=300).images)


def strongest(family):
    return len(FAMILIES[family].strengths) - 1


def test_at_least_seven_families_are_held_out_each_of_them_corruptions_code():
    assert len(HELD_OUT) >= 7 and set(ADDED_INK) <= set(HELD_OUT)
    for family, f in FAMILIES.items():
        module = inspect.getmodule(f.change).__name__
        assert (module == "corruptions") == (not f.trained_on), family


@pytest.fixture
def held_out_code_fails(monkeypatch):
    """Every function of corruptions.py, its helpers too, made to fail when called, however it is
    reached (its code is replaced, not the module's name for it)."""

    def called(*args, **kwargs):
        raise AssertionError("lenet5_reg's training called the held-out families' code")

    for _, function in inspect.getmembers(corruptions, inspect.isfunction):
        if function.__module__ == "corruptions":
            monkeypatch.setattr(function, "__code__", called.__code__)


def test_the_held_out_code_fails_when_called_under_the_split_fixture(held_out_code_fails):
    with pytest.raises(AssertionError, match="held-out families' code"):
        corrupted(torch.zeros(2, 1, 28, 28), HELD_OUT[0], 1)


def test_lenet5_regs_augmentation_and_training_never_call_a_held_out_family(
    held_out_code_fails, digits, mnist_dir, tmp_path
):
    torch.manual_seed(0)
    for _ in range(3):  # every part of the augmentation is drawn, on some images of each batch
        distortions.distort(digits)
    argv = ["--model", "lenet5_reg", "--epochs", "1", "--train-limit", "512", "--test-limit", "64"]
    assert run_main(mnist_dir, tmp_path, *argv) == 0


@pytest.mark.parametrize("family", HELD_OUT)
def test_each_image_gets_the_same_change_whatever_the_batch_size(digits, family):
    whole = corrupted(digits, family, 3)
    # the same to float32's rounding: vectorized sums may add in another order
    assert torch.allclose(corrupted(digits[:7], family, 3), whole[:7], atol=1e-6)
    assert torch.allclose(corrupted(digits[:1], family, 3), whole[:1], atol=1e-6)


@pytest.mark.parametrize("family", ADDED_INK)
def test_added_ink_only_raises_pixels_and_keeps_the_digits_own_ink(digits, family):
    for level in range(1, strongest(family) + 1):
        changed = corrupted(digits, family, level)
        assert (changed >= digits).all()
        assert (changed > digits).any(3).any(2).float().mean() > 0.9  # in nearly every image


def test_the_box_edges_are_two_vertical_lines_at_the_sides_off_the_digits_box():
    blank = torch.zeros(200, 1, 28, 28)
    edges = corrupted(blank, "box edges", strongest("box edges"))
    assert torch.equal(edges, edges[:, :, :1].expand_as(edges))  # every row the same
    inked = (edges[:, 0, 0] > 0).any(0)  # (28,): columns with ink in some image
    assert inked[1:3].all() and inked[-3:-1].all() and not inked[7:21].any()


def test_ruled_lines_are_whole_rows_of_the_stated_darkness_9_to_13_pixels_apart():
    blank = torch.zeros(300, 1, 28, 28)
    for level, darkness in enumerate(FAMILIES["ruled lines"].strengths[1:], 1):
        lined = corrupted(blank, "ruled lines", level)
        assert torch.equal(lined, lined[..., :1].expand_as(lined))  # each row one value
        rows = lined[:, 0, :, 0]
        assert torch.allclose(rows.amax(1), torch.tensor(float(darkness)))
        gaps = torch.cat([row.nonzero().squeeze(1).diff() for row in rows])
        assert gaps.min() == 9 and gaps.max() == 13


def test_a_dotted_line_is_dots_across_the_digits_box():
    blank = torch.zeros(200, 1, 28, 28)
    dotted = corrupted(blank, "dotted line", 1)
    assert (dotted[..., 4:24, 4:24].sum((1, 2, 3)) > 0).all()
    # gaps between the dots: closing them (a dilation) adds much ink
    assert (dotted > 0).sum() < 0.6 * (F.max_pool2d(dotted, 3, stride=1, padding=1) > 0).sum()


def test_a_shadow_darkens_the_paper_and_leaves_the_ink(digits):
    shaded = corrupted(digits, "shadow", strongest("shadow"))
    paper, ink = digits == 0, digits == 1
    assert torch.equal(shaded[ink], digits[ink])
    raised = ((shaded > 0.1) & paper).flatten(1).float().mean(1)  # share of the page shaded
    assert (raised > 0.05).float().mean() > 0.9
    # soft: the paper's shade takes many levels, not two
    assert len(torch.unique(shaded[paper].mul(100).round())) > 50


def test_motion_blur_smears_each_image_along_a_line_and_keeps_its_ink(digits):
    dot = torch.zeros(100, 1, 28, 28)
    dot[..., 14, 14] = 1
    for level, length in enumerate(FAMILIES["motion blur"].strengths[1:], 1):
        smeared = corrupted(dot, "motion blur", level)
        assert torch.allclose(smeared.sum((1, 2, 3)), torch.ones(100))
        spread = (smeared[:, 0] > 0).nonzero()  # (count, 3): image, row, column
        for k in range(
            3
        ):  # the smear's extent: the line's length, give or take its anti-aliased pixels
            y, x = spread[spread[:, 0] == k, 1:].float().T
            extent = torch.hypot(y.max() - y.min(), x.max() - x.min())
            assert length - 1 <= extent <= length + 3, (length, extent)
    assert torch.allclose(
        corrupted(digits, "motion blur", 2).sum((1, 2, 3)), digits.sum((1, 2, 3)), rtol=0.05
    )


def test_elastic_moves_pixels_by_the_stated_amount_on_average():
    ramp = torch.linspace(0, 1, 28).expand(50, 1, 28, 28).contiguous()  # x, 1/27 a pixel
    for level, pixels in enumerate(FAMILIES["elastic"].strengths[1:], 1):
        warped = corrupted(ramp, "elastic", level)[..., 6:22, 6:22]  # away from the edges
        moved = (warped - ramp[..., 6:22, 6:22]) * 27  # pixels moved along x
        # the field's rms over both axes is ``pixels``: about pixels / sqrt(2) along one
        rms = moved.square().mean().sqrt().item()
        assert pixels / 2**0.5 * 0.7 < rms < pixels / 2**0.5 * 1.3, (pixels, rms)


def test_a_coarse_scan_keeps_the_ink_in_place_and_loses_fine_detail_level_by_level(digits):
    laplace = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    detail = []
    for level in range(strongest("coarse scan") + 1):
        scan = corrupted(digits, "coarse scan", level)
        assert (centre_of_mass(scan) - centre_of_mass(digits)).abs().max() < 0.25
        assert torch.allclose(scan.sum((1, 2, 3)), digits.sum((1, 2, 3)), rtol=0.03)
        detail.append(F.conv2d(scan, laplace).abs().mean().item())
    assert all(a > b for a, b in zip(detail, detail[1:], strict=False)), detail
