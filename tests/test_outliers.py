"""outliers.py: the not-a-digit rule, calibration and the made non-digits."""

import numpy as np
import pytest
import torch

import dataset
import outliers
from dataset import normalize, to_unit
from model import LeNet5
from runs import RunError


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model_and_keeps_its_answers():
    # The labels are drawn from softmax(truth); the model says 4 * truth, far too sure of itself.
    generator = torch.Generator().manual_seed(0)
    truth = torch.randn(20_000, 10, generator=generator) * 2
    labels = torch.multinomial(truth.softmax(1), 1, generator=generator).squeeze(1)
    logits = truth * 4
    fit, held = slice(0, 10_000), slice(10_000, None)
    t = outliers.fit_temperature(logits[fit], labels[fit])
    assert t == pytest.approx(4, rel=0.1)
    before = outliers.ece(logits[held].softmax(1), labels[held])
    after = outliers.ece((logits[held] / t).softmax(1), labels[held])
    assert before > 0.2 and after < 0.03
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))


def test_ece_and_the_reliability_bins_match_a_hand_computation():
    # confidences 0.95 (right), 0.85 (wrong), 0.55 (right), 0.75 (wrong)
    probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.45, 0.55], [0.25, 0.75]])
    labels = torch.tensor([0, 1, 1, 0])
    count, mean, right = outliers.reliability(probs, labels, bins=2)
    assert count.tolist() == [0, 4] and mean[1].item() == pytest.approx(0.775)
    assert right[1].item() == 0.5 and mean[0].isnan()
    assert outliers.ece(probs, labels, bins=2) == pytest.approx(0.275)
    # a bin holds the confidences above its lower edge up to its upper one, as Guo et al. bin them
    assert outliers.reliability(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), 2)[0].tolist() == [
        1,
        0,
    ]
    # with 10 bins each is alone in its bin: the mean of |confidence - right|
    assert outliers.ece(probs, labels, bins=10) == pytest.approx((0.05 + 0.85 + 0.45 + 0.75) / 4)


def test_auroc_is_the_chance_that_a_digit_outscores_a_non_digit_ties_half():
    digits, others = torch.tensor([3.0, 2.0, 1.0]), torch.tensor([2.0, 0.0])
    # pairs won: against 2.0: 3 wins, 2 ties, 1 loses -> 1.5; against 0.0: 3 -> 4.5 of 6
    assert outliers.auroc(digits, others) == pytest.approx(4.5 / 6)
    assert outliers.auroc(torch.tensor([1.0]), torch.tensor([2.0])) == 0


@pytest.fixture(scope="module")
def toy_rule():
    """A rule of an untrained LeNet-5 on random images: what fit_rule does, whatever the model."""
    torch.manual_seed(0)
    model = LeNet5().eval()
    images = normalize(torch.rand(1_200, 1, 1, 1) * torch.rand(1_200, 1, 28, 28))
    labels = torch.randint(0, 10, (1_200,))
    bank, digits = images[:200], images[200:]
    return model, outliers.fit_rule(model, bank, digits, labels[200:]), digits


def test_each_threshold_keeps_its_share_of_the_digits_it_was_set_on(toy_rule):
    model, rule, digits = toy_rule
    _, measured = outliers.scores(rule, *outliers.logits_and_features(model, digits))
    for name, values in measured.items():
        kept = (values >= rule["thresholds"][name]).double().mean().item()
        assert outliers.KEEP <= kept <= outliers.KEEP + 2 / len(digits), name
    assert rule["bank"].shape == (200, 400) and rule["score"] == outliers.STORED
    assert rule["digits"] == 1_000 and rule["temperature"] > 0


def test_a_rule_saved_reads_back_and_a_damaged_one_is_one_line(toy_rule, tmp_path):
    model, rule, digits = toy_rule
    assert outliers.load_rule(tmp_path) is None  # a run made before rules
    torch.save(rule, tmp_path / outliers.RULE)
    loaded = outliers.load_rule(tmp_path)
    assert loaded["thresholds"] == rule["thresholds"] and loaded["bank"].dtype == torch.float32
    logits, features = outliers.logits_and_features(model, digits[:5])
    probs, is_digit = outliers.judge(loaded, logits, features)
    assert probs.sum(1).allclose(torch.ones(5)) and is_digit.dtype == torch.bool
    for damage in [b"not a zip", None]:
        if damage is None:
            torch.save({"temperature": 1.0}, tmp_path / outliers.RULE)  # no bank, no threshold
        else:
            (tmp_path / outliers.RULE).write_bytes(damage)
        with pytest.raises(RunError) as error:
            outliers.load_rule(tmp_path)
        assert str(error.value).startswith(f"{tmp_path / outliers.RULE}: not a rule of main.py (")
        assert "\n" not in str(error.value)
    assert str(error.value).endswith("(it has no 'bank')")


def test_the_made_non_digits_are_seeded_inked_and_unlike_each_other():
    first = outliers.made_sets(40)
    outliers.made_sets.cache_clear()  # drawn again, not the cached sets
    again, other = outliers.made_sets(40), outliers.made_sets(40, seed=1)
    assert list(first) == ["strokes", "shapes", "scribbles"]
    for name, images in first.items():
        assert images.shape == (40, 1, 28, 28)
        assert torch.equal(images, again[name]) and not torch.equal(images, other[name])
        ink = images > normalize(torch.full((1, 1, 1), 0.5))  # ink, as preprocess made it
        assert ink.flatten(1).sum(1).min() >= 10, name
        assert len({image.numpy().tobytes() for image in images}) == 40, name


def test_fashion_mnist_is_read_where_installed_and_none_elsewhere(tmp_path):
    assert outliers.fashion(tmp_path / "missing.gz") is None
    path = tmp_path / "t10k-images-idx3-ubyte"
    pixels = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    header = b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (2, 28, 28))
    path.write_bytes(header + pixels.tobytes())
    assert torch.equal(outliers.fashion(path), normalize(to_unit(torch.from_numpy(pixels))))


def test_the_uci_digits_are_read_through_scikit_learn_where_it_is_installed(monkeypatch):
    import sys
    import types

    outliers.other_hands.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # not installed: None, and the report says so
    assert outliers.other_hands() is None
    one = np.zeros((8, 8))
    one[1:7, 4] = 16  # a 1: a bar of full ink, 0-16 as the UCI set has it
    fake = types.ModuleType("sklearn.datasets")
    fake.load_digits = lambda: types.SimpleNamespace(images=np.stack([one, one / 2]))
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.datasets", fake)
    outliers.other_hands.cache_clear()
    digits = to_unit_again(outliers.other_hands())
    outliers.other_hands.cache_clear()
    assert digits.shape == (2, 1, 28, 28)
    rows, cols = (digits[0, 0] > 0.5).nonzero(as_tuple=True)
    # scaled into MNIST's 20-pixel box and centred: a tall bar near the middle column
    assert rows.max() - rows.min() + 1 >= 15 and 12 <= cols.float().mean() <= 15
    assert (digits[1, 0] > 0.5).sum() >= 15  # a fainter bar is still found and scaled up


def to_unit_again(normalized):
    return normalized * dataset.STD + dataset.MEAN
